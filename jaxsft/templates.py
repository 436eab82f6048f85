"""A base model's own chat template: Jinja2 text rendered as transformers renders it
(`transformers/utils/chat_template_utils.py`: a sandbox with trim_blocks, lstrip_blocks, loop
controls, raise_exception, strftime_now and its tojson), and the answer spans of a rendered
conversation found with no code per template.

The spans come from prefixes: for assistant turn i, the text of messages[:i] with
add_generation_prompt must be a prefix of the text of messages[:i+1], and what lies between
is the answer and the template's end of turn. The span runs from the answer's text to the
end of the turn without its trailing whitespace (Qwen's "<|im_end|>\\n" -> "<|im_end|>",
Llama 3's "<|eot_id|>"), so the loss falls on the answer and the token(s) that end it:

    text      <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
    before    |<------- messages[:1], add_generation_prompt ------->|
    span                                                             |<-- Hello<|im_end|> -->|

A template that rewrites earlier turns, or does not write an answer as it is, is refused
(TemplateError, naming where the template came from). Text only: chatml.py maps the spans
to tokens through the tokenizer's offsets.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional, Sequence

from .config import UserError

# an answer no template rewrites; lower case, so a template that changes its case is caught
PROBE = "jaxsft probe answer"
# the special-token variables transformers passes a template (its SPECIAL_TOKENS_ATTRIBUTES)
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(UserError):
    """A chat template that does not compile, raises, or renders turns jaxsft cannot mask:
    "<origin>: <problem>" (`problem` alone for a client that should not see the base's path)."""

    def __init__(self, origin: str, problem: str):
        super().__init__(f"{origin}: {problem}")
        self.problem = problem


@dataclass(frozen=True)
class ChatTemplate:
    """A base's chat template and what goes with it, kept in the run's tokenizer.json."""
    source: str  # the Jinja text
    origin: str  # where it was read, for messages: "<dir>/tokenizer_config.json: chat_template"
    tokens: dict = field(default_factory=dict)  # TOKEN_NAMES the base sets -> token text
    stop_ids: tuple = ()  # generation stops at any: the base's eos ids and the template's end of turn
    generation_config: dict = field(default_factory=dict)  # the base's generation_config.json, as it was

    def to_dict(self) -> dict:
        return {"source": self.source, "origin": self.origin, "tokens": self.tokens,
                "stop_ids": list(self.stop_ids), "generation_config": self.generation_config}

    @classmethod
    def from_dict(cls, d: dict) -> "ChatTemplate":
        return cls(d["source"], d["origin"], dict(d["tokens"]), tuple(d["stop_ids"]), dict(d["generation_config"]))


@dataclass(frozen=True)
class Rendered:
    """A conversation's text and the (start, end) character spans of its answers with their
    end of turn, in order."""
    text: str
    spans: tuple


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own: no HTML escaping, and its options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=None)
def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; the
        body renders as it is (jaxsft finds answers by prefixes)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    return _environment().from_string(source)


def _problem(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def render_text(t: ChatTemplate, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The template's text for `messages` ({"role", "content"} dicts), as apply_chat_template(...,
    tokenize=False) gives it; TemplateError naming the template when it fails."""
    try:
        return _compiled(t.source).render(messages=list(messages), tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **t.tokens)
    except Exception as e:  # the template's own fault, whatever it raised (jinja's errors, a str + int, ...)
        raise TemplateError(t.origin, _problem(e)) from None


def conversation(messages, system_prompt: Optional[str]) -> list[dict]:
    """(role, content) pairs -> the template's messages: a leading system turn of their own, else
    `system_prompt` as one when it is not empty, else none (the template does what it does
    without one: Qwen's adds its default system turn, Llama 3's adds none)."""
    msgs = [{"role": r, "content": c} for r, c in messages]
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def render(t: ChatTemplate, messages, system_prompt: Optional[str], add_generation_prompt: bool = False) -> Rendered:
    """A conversation ((role, content) pairs) -> its text and answer spans (see the module's
    docstring); TemplateError when a prefix is not one or an answer is not in its turn. A
    prompt (add_generation_prompt) has no spans: nothing is learned from it, so a template
    that rewrites history still answers."""
    msgs = conversation(messages, system_prompt)
    text = render_text(t, msgs, add_generation_prompt)
    if add_generation_prompt:
        return Rendered(text, ())
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        n = len(spans) + 1
        before = render_text(t, msgs[:i], True)
        turn = render_text(t, msgs[:i + 1], False)
        if not turn.startswith(before) or not text.startswith(turn.rstrip()):
            raise TemplateError(t.origin, f"the text before assistant turn {n} changes as the conversation goes "
                                          "on (the template rewrites earlier turns); jaxsft masks answers by prefixes")
        at = turn.find(m["content"], len(before))  # as written, else as a template that trims it writes it
        at = turn.find(m["content"].strip(), len(before)) if at < 0 else at
        if at < 0:
            raise TemplateError(t.origin, f"assistant turn {n}'s answer is not in the text the template renders "
                                          "for it (the template changes or leaves out answers)")
        spans.append((at, len(turn.rstrip())))
    return Rendered(text, tuple(spans))


def end_of_turn(t: ChatTemplate) -> str:
    """The text the template closes an answer with, trailing whitespace left out ("<|im_end|>",
    "<|eot_id|>", "</s>"); found by rendering a probe answer. TemplateError when it cannot be
    masked, or closes answers with nothing (a model trained on it would never learn to stop)."""
    r = render(t, [("user", "Hi"), ("assistant", PROBE)], None)
    start, end = r.spans[0]
    suffix = r.text[start + len(PROBE): end].strip()
    if not suffix:
        raise TemplateError(t.origin, "the template ends an assistant turn with nothing after the answer, so a "
                                      "model trained on it would not learn to stop")
    return suffix
