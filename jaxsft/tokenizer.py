"""Character-level tokenizer with atomic special tokens, saved as JSON.

ids 0..6 are the special tokens below; the rest are single characters seen in
the training rows, in sorted order. A ChatML marker is one id, never split into
characters; a character outside the vocabulary becomes <unk>.
"""
from __future__ import annotations

import json
import re
from typing import Iterable

from .files import atomic

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"
SPECIALS = (PAD, BOS, UNK, SYSTEM, USER, ASSISTANT, END)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class Tokenizer:
    def __init__(self, chars: Iterable[str]):
        chars = [c for c in dict.fromkeys(chars) if c not in SPECIALS]
        self.itos = list(SPECIALS) + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.unk_id = 0, 1, 2
        self.system_id, self.user_id, self.assistant_id, self.end_id = 3, 4, 5, 6

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Tokenizer":
        """Vocabulary = every character of `texts`, sorted (so it does not depend on row order)."""
        chars = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars))

    def __len__(self) -> int:
        return len(self.itos)

    def extend(self, texts: Iterable[str]) -> "Tokenizer":
        """A tokenizer with new characters appended; existing ids keep their meaning."""
        new = set()
        for t in texts:
            new.update(c for c in t if c not in self.stoi)
        return Tokenizer(self.itos[len(SPECIALS):] + sorted(new))

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """Characters to ids. With specials=True, marker strings become their single id."""
        if not specials:
            return [self.stoi.get(c, self.unk_id) for c in text]
        ids = []
        for part in _SPECIAL_RE.split(text):
            if part in self.stoi and part in SPECIALS:
                ids.append(self.stoi[part])
            else:
                ids.extend(self.stoi.get(c, self.unk_id) for c in part)
        return ids

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary (they encode as <unk>)."""
        return [c for c in text if c not in self.stoi]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < 0 or i >= len(self.itos):
                continue
            if skip_special and i < len(SPECIALS):
                continue
            out.append(self.itos[i])
        return "".join(out)

    def save(self, path: str) -> None:
        with atomic(path) as f:
            json.dump({"type": "char", "specials": list(SPECIALS), "chars": self.itos[len(SPECIALS):]},
                      f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("specials") != list(SPECIALS):
            raise ValueError(f"{path}: tokenizer special tokens differ from this version's")
        return cls(d["chars"])
