"""Tokenizers, saved as JSON: two kinds with one interface.

`Tokenizer`, the character vocabulary of from-scratch runs: ids 0..6 are the
special tokens below; the rest are single characters seen in the training rows,
in sorted order. A ChatML marker is one id, never split into characters; a
character outside the vocabulary becomes <unk>.

`HFTokenizer`, an imported model's own tokenizer (BPE, byte-level BPE, ...) run
by the `tokenizers` library, with our ChatML markers added as single tokens where
its vocabulary lacks them; or, rendering with the model's own chat template
(`template`, templates.py), with nothing added.

What the rest of jaxsft uses of either: encode, decode, the ids bos_id, pad_id,
end_id, system_id, user_id, assistant_id (ChatML's markers: None where a template
renders instead, as bos_id is for a base without one), stop_ids (generation stops
at any), template (None: ChatML),
unknown(text), len(tok), itos (token strings by id), token_bytes(id) (what a token adds to
a decoded text, for log-probabilities), max_token_chars (the most characters of text one token
covers), extend(texts), save(path); `load(path)` reads either kind back and `TextStream`
(`stream_text`) turns ids arriving one by one into whole characters.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Iterable, Iterator, Optional, Union

from .files import atomic
from .templates import ChatTemplate

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"
SPECIALS = (PAD, BOS, UNK, SYSTEM, USER, ASSISTANT, END)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class Tokenizer:
    template = None  # always ChatML

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

    @property
    def stop_ids(self) -> tuple:
        return (self.end_id,)

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

    def token_bytes(self, i: int) -> bytes:
        """What token i adds to a decoded text: its character; nothing for a marker."""
        return self.itos[i].encode() if len(SPECIALS) <= i < len(self.itos) else b""

    # text is encoded character by character (markers only with specials=True, never a message's)
    max_token_chars = 1

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
            return cls.from_dict(json.load(f), path)

    @classmethod
    def from_dict(cls, d: dict, path: str = "tokenizer") -> "Tokenizer":
        if d.get("specials") != list(SPECIALS):
            raise ValueError(f"{path}: tokenizer special tokens differ from this version's")
        return cls(d["chars"])


class HFTokenizer:
    """A `tokenizers.Tokenizer` with our markers: bos, pad, system, user, assistant
    and end (role -> token string in `markers`), each registered as one special token;
    or, with a `template` (the base's own chat template), only the base's bos (if it has
    one), end (its eos) and pad, and no ChatML markers (their ids are None).

    encode never adds a bos or eos of its own (chatml.render places every marker), and
    any added token's text in `text` becomes that token, as transformers does when it
    tokenizes a chat template's output. `size` >= the tokenizer's ids: the model's
    vocabulary rows (a Llama config's vocab_size may pad the tokenizer's)."""

    ROLES = ("bos", "system", "user", "assistant", "end", "pad")

    def __init__(self, backend, markers: dict, size: int = 0, template: Optional[ChatTemplate] = None):
        self.backend, self.markers, self.template = backend, dict(markers), template
        ids = {role: backend.token_to_id(markers[role]) for role in self.ROLES if role in markers}
        missing = [markers[r] for r in ids if ids[r] is None]
        if missing:
            raise ValueError(f"tokenizer has no token {missing[0]!r}")
        self.bos_id, self.pad_id, self.system_id = ids.get("bos"), ids["pad"], ids.get("system")
        self.user_id, self.assistant_id, self.end_id = ids.get("user"), ids.get("assistant"), ids["end"]
        unk = getattr(backend.model, "unk_token", None)
        self.unk_id = backend.token_to_id(unk) if unk else None
        self.n_ids = backend.get_vocab_size(with_added_tokens=True)
        self.size = max(self.n_ids, size)
        self._itos = None

    @classmethod
    def wrap(cls, backend, bos: Optional[str] = None, pad: Optional[str] = None, size: int = 0) -> "HFTokenizer":
        """`backend` (changed in place) with our markers added as special tokens where absent;
        bos: the model's own beginning-of-text token (default <bos>, added); pad: its padding
        token (default the end marker). New tokens get the next free ids, in ROLES order."""
        from tokenizers import AddedToken
        markers = {"bos": bos or BOS, "pad": pad or END, "system": SYSTEM, "user": USER, "assistant": ASSISTANT,
                   "end": END}
        registered = {t.content for t in backend.get_added_tokens_decoder().values()}
        for role in cls.ROLES:
            tok = markers[role]
            if tok not in registered:  # present as an ordinary token: keeps its id; absent: a new id
                backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
                registered.add(tok)
        return cls(backend, markers, size)

    def __len__(self) -> int:
        return self.size

    @property
    def stop_ids(self) -> tuple:
        return self.template.stop_ids if self.template else (self.end_id,)

    @property
    def itos(self) -> list[str]:
        """Token strings by id ("" for a model row no token uses)."""
        if self._itos is None:
            self._itos = [self.backend.id_to_token(i) or "" for i in range(self.size)]
        return self._itos

    def extend(self, texts: Iterable[str]) -> "HFTokenizer":
        """The same tokenizer: a subword vocabulary already writes every text."""
        return self

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token's string has, added tokens included: no token covers
        more characters of a text (a byte-level string has a character per byte)."""
        return max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def token_bytes(self, i: int) -> bytes:
        """What token i adds to a decoded text: a byte-level token's bytes (maybe part of a character),
        a byte-fallback token's (<0xE4>), a special token's nothing, another added token's text; else
        its string with sentencepiece's "▁" as a space."""
        b = self._bytes.get(i)
        if b is None:
            b = self._bytes[i] = self._token_bytes(i)
        return b

    def _token_bytes(self, i: int) -> bytes:
        added = self._added.get(i)
        if added is not None:
            return b"" if added.special else added.content.encode()
        piece = self.backend.id_to_token(i) or ""
        if self._byte_level and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        return bytes([int(m[1], 16)]) if m else piece.replace("▁", " ").encode()

    @functools.cached_property
    def _bytes(self) -> dict:  # token_bytes by id, filled as asked
        return {}

    @functools.cached_property
    def _added(self) -> dict:
        return self.backend.get_added_tokens_decoder()

    @functools.cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self.backend.to_str()).get("decoder"))

    def encode(self, text: str, specials: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list]:
        """(ids, (start, end) character span of each in `text`), as apply_chat_template(tokenize=True)
        encodes a rendered conversation."""
        e = self.backend.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that encode as the unknown token (none for byte-level BPE)."""
        if self.unk_id is None or self.unk_id not in self.encode(text):
            return []
        return [c for c in text if self.unk_id in self.encode(c)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        return self.backend.decode([i for i in ids if 0 <= i < self.n_ids], skip_special_tokens=skip_special)

    def to_dict(self) -> dict:
        return {"type": "hf", "markers": self.markers, "size": self.size,
                **({"template": self.template.to_dict()} if self.template else {}),
                "tokenizer": json.loads(self.backend.to_str())}

    def save(self, path: str) -> None:
        with atomic(path) as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "HFTokenizer":
        from tokenizers import Tokenizer as Backend
        template = ChatTemplate.from_dict(d["template"]) if "template" in d else None
        return cls(Backend.from_str(json.dumps(d["tokenizer"])), d["markers"], d.get("size", 0), template)


def _bytes_to_unicode() -> dict:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()

AnyTokenizer = Union[Tokenizer, HFTokenizer]


def load(path: str) -> AnyTokenizer:
    """A run's tokenizer.json, of either kind ("type": "char" or "hf")."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return HFTokenizer.from_dict(d) if d.get("type") == "hf" else Tokenizer.from_dict(d, path)


class _Stop:
    """One stop string matched as characters arrive (Knuth-Morris-Pratt): `state` is the length
    of the longest end of the text so far that begins the string, and the string is found when
    it is the whole string. O(1) per character (amortised), whatever the string's length."""

    def __init__(self, s: str):
        self.s, self.state = s, 0
        self.fail = [0] * len(s)  # fail[i]: the longest proper border of s[:i + 1]
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = self.fail[k - 1]
            k += s[i] == s[k]
            self.fail[i] = k

    def step(self, c: str) -> bool:
        s, k = self.s, self.state
        if k == len(s):
            k = self.fail[k - 1]
        while k and s[k] != c:
            k = self.fail[k - 1]
        k += s[k] == c
        self.state = k
        return k == len(s)


class TextStream:
    """Token ids in, text out as soon as it is certain: the answer's ids are decoded
    as a whole (tok.decode), and only complete characters are released (a byte-level
    token may end inside a UTF-8 character, which decodes to U+FFFD), never the start
    of a possible stop string. feed() -> new text; .stopped once a stop string
    appeared (the text before it is all that is released); .text: all released so far.

    Each new character goes once through each stop string's matcher (`_Stop`), so a token
    costs its own characters times the stop strings, not the text's or the strings' lengths.
    `ends[i]`: where token i's text ends in the decoded text (None until the character it
    ends inside is complete); `carried()` counts the tokens the released text carries."""

    def __init__(self, tok, stop=()):
        self.tok, self.stop = tok, list(stop)
        self.matchers = [_Stop(s) for s in self.stop]
        self.ids: list = []
        self.ends: list = []
        self.seen = 0  # characters through the matchers
        self.sent = 0  # characters released
        self._carried = 0  # tokens counted by carried() so far
        self.text = ""
        self.stopped = False

    def feed(self, token: int) -> str:
        if self.stopped:  # the answer ended at the stop string
            return ""
        self.ids.append(token)
        self.ends.append(None)
        text = self.tok.decode(self.ids)
        complete = text.rstrip("\ufffd")
        if len(complete) == len(text):
            self._end_tokens(len(text))
        at = None  # where the earliest stop string found starts
        if self.matchers:
            for i in range(self.seen, len(complete)):
                for m in self.matchers:
                    if m.step(complete[i]):
                        at = min(i + 1 - len(m.s), len(complete) if at is None else at)
        self.seen = len(complete)
        if at is not None:
            self.stopped = True
            return self._release(complete[:at])
        hold = max((m.state for m in self.matchers), default=0)  # an end that may grow into a stop string
        return self._release(complete[:len(complete) - hold])

    def flush(self) -> str:
        """At the end: whatever is held back (the end of the text cannot start a stop string any more)."""
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids)
        self._end_tokens(len(text))
        return self._release(text)

    def carried(self, final: bool = False) -> int:
        """How many of the tokens fed the released text carries: those whose text it holds whole;
        with `final` (the answer has ended), also those whose text starts in it (one cut by a stop
        string). Tokens are counted in order: a token is never counted before an earlier one."""
        n = self._carried
        while n < len(self.ends) and self.ends[n] is not None and self.ends[n] <= self.sent:
            n += 1
        if final and n < len(self.ends):
            start = self.ends[n - 1] if n else 0
            if start is not None and start < self.sent:
                n += 1
        self._carried = n
        return n

    def _end_tokens(self, at: int):
        """Tokens whose text is complete now end at `at` (the decoded text's length)."""
        i = len(self.ends)
        while i and self.ends[i - 1] is None:
            i -= 1
            self.ends[i] = at

    def _release(self, complete: str) -> str:
        if len(complete) <= self.sent:
            return ""
        new = complete[self.sent:]
        self.sent = len(complete)
        self.text += new
        return new


def stream_text(tok: AnyTokenizer, ids: Iterable[int]) -> Iterator[str]:
    """The text of `ids` piece by piece as they arrive, never half a character (a
    `TextStream` without stop strings); the pieces joined are tok.decode(ids)."""
    text = TextStream(tok)
    for i in ids:
        piece = text.feed(i)
        if piece:
            yield piece
    piece = text.flush()
    if piece:
        yield piece
