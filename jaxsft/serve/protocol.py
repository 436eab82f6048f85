"""The chat-completions API's bodies, in and out (OpenAI's shapes).

In: `parse_chat(body, tok, context, system_prompt, model)` -> `ChatParams`. The JSON body
is validated by pydantic models (`ChatRequest`, `Message`) in the order OpenAI clients
expect the first problem to be named; any problem is an `ApiError` (400; 404 for another
model) whose body is {"error": {"message", "type", "param", "code"}}: `param` where the
problem is ("messages[1].role"), `code` what it is ("invalid_value"). No key is ignored:
each of OpenAI's is honoured, accepted as meaning nothing here (user) or, for a feature
this server lacks (tools, logit_bias, ...), accepted only with its "off" value; any other
key is "unrecognized". The work a body may ask for is bounded before any tokenising.

Out: every body one answer produces is built here, once: `completion` (a whole
answer), `chunk` (one server-sent event's object; `text_event` formats the text
chunks from it), `token_logprob` (one token's logprobs entry), `usage`, `event` (an
object as an SSE line), `DONE`.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional

import numpy as np
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo,
                      WrapValidator, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .. import chatml
from ..engine import TOP_LOGPROBS
from ..templates import TemplateError

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
MAX_STOP = 4  # stop strings per request, as OpenAI allows
# characters per stop string: far beyond any end marker or delimiter ("\n\nUser:", "</answer>"),
# and what TextStream matches and holds back per stop string stays small
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = TOP_LOGPROBS  # 20, as OpenAI allows: the engine computes that many


class ApiError(Exception):
    """An error the client gets as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- in: validators keep OpenAI-style messages; "{param}" is filled in with where the value was

def _is_integer(v) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _integer(v, info: ValidationInfo):
    if not _is_integer(v):
        raise PydanticCustomError("invalid_type", f"'{info.field_name}' must be an integer")
    return v


def _boolean(v, info: ValidationInfo):
    if v is not None and not isinstance(v, bool):
        raise PydanticCustomError("invalid_type", f"'{info.field_name}' must be a boolean")
    return bool(v)


def _string(v, info: ValidationInfo):
    if v is not None and not isinstance(v, str):
        raise PydanticCustomError("invalid_type", f"'{info.field_name}' must be a string")
    return v


def _number(default: float, lo: float, hi: float, lo_open: bool = False) -> BeforeValidator:
    def check(v, info: ValidationInfo):
        key = info.field_name
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PydanticCustomError("invalid_type", f"'{key}' must be a number")
        if not (lo < v if lo_open else lo <= v) or v > hi:
            span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise PydanticCustomError("invalid_value", f"'{key}' must be in {span}, not {v}")
        return float(v)
    return BeforeValidator(check)


def _zero(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _off(*offs) -> BeforeValidator:
    """A key whose feature this server lacks: null, or a value that means "off" (an
    `offs` predicate holds), is accepted; anything else is refused, not ignored."""
    def check(v, info: ValidationInfo):
        if v is None or any(off(v) for off in offs):
            return None
        raise PydanticCustomError("not_supported", f"'{info.field_name}' is not supported by this server "
                                                   f"(only its default is accepted), not {json.dumps(v)[:80]}")
    return BeforeValidator(check)


def _is(*values):
    return lambda v: any(type(v) is type(x) and v == x for x in values)


def _stop(v):
    stop = [] if v is None else [v] if isinstance(v, str) else v
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise PydanticCustomError("invalid_value",
                                  f"'stop' must be a non-empty string or an array of at most {MAX_STOP} of them")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise PydanticCustomError("invalid_value", f"a stop string may have at most {MAX_STOP_CHARS} characters, "
                                                   f"not {max(map(len, stop))}")
    return stop


def _stream_options(v):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise PydanticCustomError("invalid_type", "'stream_options' must be an object")
    for key, value in v.items():
        if key == "include_usage":
            if value is not None and not isinstance(value, bool):
                raise PydanticCustomError("invalid_type", "'stream_options.include_usage' must be a boolean",
                                          {"param": "stream_options.include_usage"})
        elif key == "include_obfuscation":  # no obfuscation field is sent: only "off"
            if value is not None and value is not False:
                raise PydanticCustomError("not_supported", "'stream_options.include_obfuscation' is not supported "
                                                           "by this server: only false",
                                          {"param": "stream_options.include_obfuscation"})
        else:
            raise PydanticCustomError("unknown_parameter", f"unrecognized request argument supplied: "
                                                           f"stream_options.{key}", {"param": f"stream_options.{key}"})
    return v


def _messages_array(v, info: ValidationInfo):
    if v is None:
        raise PydanticCustomError("missing_required_parameter", "'messages' is required")
    if not isinstance(v, list):
        raise PydanticCustomError("invalid_type", "'messages' must be an array of {role, content} objects")
    if not v:
        raise PydanticCustomError("empty_array", "'messages' must not be empty")
    most = (info.context or {}).get("context")
    if most is not None and len(v) > most:  # each message renders to at least one token
        raise PydanticCustomError("context_length_exceeded", f"{len(v)} messages can never fit this model's "
                                                             f"context of {most} tokens")
    return v


def _system_only_first(v, handler):
    """The entries' own checks, and a system message after the first entry: whichever
    comes first in the array is the error."""
    late = next((i for i, m in enumerate(v) if i and isinstance(m, dict) and m.get("role") in SYSTEM), None)
    try:
        out = handler(v)
    except ValidationError as e:
        if late is None or e.errors()[0]["loc"][0] <= late:
            raise
    else:
        if late is None:
            return out
    raise PydanticCustomError("invalid_value", f"messages[{late}]: a system message may only come first",
                              {"param": f"messages[{late}].role"})


SYSTEM = ("system", "developer")
# keys a message may have beyond role and content: their "off" values (null always is)
MESSAGE_OFF = {"tool_calls": _is([]), "function_call": _is(), "refusal": _is(), "audio": _is(), "annotations": _is([]),
               "name": _is(), "tool_call_id": _is()}


def _text_parts(v):
    """A content-part array -> its text parts joined (parts are one message's text, in order:
    nothing is put between them); any other part is refused, naming it."""
    texts = []
    for i, part in enumerate(v):
        if not isinstance(part, dict):
            raise PydanticCustomError("invalid_type", "{param} must be an object: {\"type\": \"text\", \"text\": ...}",
                                      {"at": f"[{i}]"})
        if part.get("type") != "text":
            raise PydanticCustomError("not_supported", f"{{param}}: {json.dumps(part.get('type'))} parts are not "
                                                       f"supported, only \"text\"", {"at": f"[{i}].type"})
        if not isinstance(part.get("text"), str):
            raise PydanticCustomError("invalid_type", "{param} must be a string", {"at": f"[{i}].text"})
        extra = next((k for k in part if k not in ("type", "text")), None)
        if extra is not None:
            raise PydanticCustomError("unknown_parameter", "unrecognized request argument supplied: {param}",
                                      {"at": f"[{i}].{extra}"})
        texts.append(part["text"])
    return "".join(texts)


class Message(BaseModel):
    role: str = Field(None, validate_default=True)
    content: str = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _object(cls, v):
        if not isinstance(v, dict):
            raise PydanticCustomError("invalid_type", "{param} must be an object with 'role' and 'content'")
        for key, value in v.items():
            if key in ("role", "content"):
                continue
            if key not in MESSAGE_OFF:
                raise PydanticCustomError("unknown_parameter", "unrecognized request argument supplied: {param}",
                                          {"at": f".{key}"})
            if value is not None and not MESSAGE_OFF[key](value):
                raise PydanticCustomError("not_supported", "{param} is not supported by this server",
                                          {"at": f".{key}"})
        return v

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v):
        if v not in ROLES:
            raise PydanticCustomError("invalid_value", f"{{param}} must be one of {', '.join(ROLES)}, "
                                                       f"not {json.dumps(v)}")
        return "system" if v in SYSTEM else v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            return _text_parts(v)
        if not isinstance(v, str):
            raise PydanticCustomError("invalid_type", "{param} must be a string or an array of text parts")
        return v


def _total_characters(v: list[Message], info: ValidationInfo):
    """No token covers more than token_chars characters: more than context x token_chars can never fit."""
    bounds = info.context or {}
    if "context" not in bounds:
        return v
    n, most = sum(len(m.content) for m in v), bounds["context"] * bounds["token_chars"]
    if n > most:
        raise PydanticCustomError("context_length_exceeded",
                                  f"the messages have {n} characters: more than can ever fit this model's context "
                                  f"({bounds['context']} tokens of at most {bounds['token_chars']} characters each)",
                                  {"param": "messages"})
    return v


def _model(v, info: ValidationInfo):
    """null or absent: the model served; another name: 404, as OpenAI answers."""
    served = (info.context or {}).get("model")
    if v is None:
        return served
    if not isinstance(v, str):
        raise PydanticCustomError("invalid_type", "'model' must be a string")
    if served is not None and v != served:
        raise PydanticCustomError("model_not_found", f"the model {json.dumps(v)} does not exist: this server "
                                                     f"serves {json.dumps(served)} (GET /v1/models)")
    return v


class ChatRequest(BaseModel):
    """A chat-completions body; fields in the order they are checked, after the keys
    themselves (`_keys`): every key of OpenAI's body is honoured, accepted (user, ...) or,
    where its feature is missing here, accepted only with the value that means "off"."""
    model: Annotated[Optional[str], BeforeValidator(_model)] = Field(None, validate_default=True)
    messages: Annotated[list[Message], WrapValidator(_system_only_first), BeforeValidator(_messages_array),
                        AfterValidator(_total_characters)] = Field(None, validate_default=True)
    n: Annotated[Optional[int], BeforeValidator(_integer)] = None
    temperature: Annotated[float, _number(1.0, 0.0, 2.0)] = 1.0
    top_p: Annotated[float, _number(1.0, 0.0, 1.0, lo_open=True)] = 1.0
    stop: Annotated[list[str], BeforeValidator(_stop)] = Field(default_factory=list)
    seed: Annotated[Optional[int], BeforeValidator(_integer)] = None
    stream: Annotated[bool, BeforeValidator(_boolean)] = False
    stream_options: Annotated[dict, BeforeValidator(_stream_options)] = Field(default_factory=dict)
    logprobs: Annotated[bool, BeforeValidator(_boolean)] = False
    top_logprobs: Annotated[Optional[int], BeforeValidator(_integer)] = None
    # accepted: they ask for nothing this server would do differently
    user: Annotated[Optional[str], BeforeValidator(_string)] = None
    safety_identifier: Annotated[Optional[str], BeforeValidator(_string)] = None
    prompt_cache_key: Annotated[Optional[str], BeforeValidator(_string)] = None
    # features this server lacks: their "off" values only
    frequency_penalty: Annotated[Any, _off(_zero)] = None
    presence_penalty: Annotated[Any, _off(_zero)] = None
    logit_bias: Annotated[Any, _off(_is({}))] = None
    tools: Annotated[Any, _off(_is([]))] = None
    tool_choice: Annotated[Any, _off(_is("none", "auto"))] = None  # with no tools, "auto" is "none"
    parallel_tool_calls: Annotated[Any, _off(_is(True, False))] = None  # nothing to call
    functions: Annotated[Any, _off(_is([]))] = None
    function_call: Annotated[Any, _off(_is("none", "auto"))] = None
    response_format: Annotated[Any, _off(_is({"type": "text"}))] = None
    modalities: Annotated[Any, _off(_is(["text"]))] = None
    audio: Annotated[Any, _off()] = None
    prediction: Annotated[Any, _off()] = None
    reasoning_effort: Annotated[Any, _off()] = None
    verbosity: Annotated[Any, _off()] = None
    web_search_options: Annotated[Any, _off()] = None
    service_tier: Annotated[Any, _off(_is("auto", "default"))] = None
    store: Annotated[Any, _off(_is(False))] = None  # nothing is stored ...
    metadata: Annotated[Any, _off(_is({}))] = None  # ... so nothing to tag
    # checked once the prompt's length is known (answer_length), after the context check
    max_completion_tokens: Any = None
    max_tokens: Any = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, v):
        if not isinstance(v, dict):
            raise PydanticCustomError("invalid_type", "the request body must be a JSON object")
        unknown = next((k for k in v if k not in cls.model_fields), None)
        if unknown is not None:
            raise PydanticCustomError("unknown_parameter", f"unrecognized request argument supplied: {unknown}",
                                      {"param": unknown})
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, n):
        if n is not None and n != 1:
            raise PydanticCustomError("invalid_value", f"only n=1 is supported, not {n}")
        return n

    @field_validator("top_logprobs")
    @classmethod
    def _top(cls, k, info: ValidationInfo):
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise PydanticCustomError("invalid_value", f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], not {k}")
        if k and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "'top_logprobs' needs 'logprobs': true")
        return k

    @model_validator(mode="after")
    def _together(self):
        if self.stream_options and not self.stream:
            raise PydanticCustomError("invalid_value", "'stream_options' is only allowed with 'stream': true",
                                      {"param": "stream_options"})
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise PydanticCustomError("invalid_value", "give 'max_completion_tokens' or 'max_tokens', not both "
                                                       "with different values", {"param": "max_tokens"})
        return self


def _param(loc: tuple) -> Optional[str]:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out or None


STATUS = {"model_not_found": 404}  # a problem's status, when not 400


def api_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as the error a client gets; ctx "param" names the
    parameter outright, "at" adds to where pydantic was ("messages[0].content" + "[1].type")."""
    first = e.errors()[0]
    ctx = first.get("ctx") or {}
    param = ctx.get("param") or ((_param(first["loc"]) or "") + ctx.get("at", "")) or None
    return ApiError(STATUS.get(first["type"], 400), first["msg"].replace("{param}", param or "", 1), param,
                    first["type"])


@dataclass
class ChatParams:
    """A request as the engine takes it: prompt (T,) int32 ChatML ids, ending with the
    assistant marker."""
    prompt: np.ndarray
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int
    stream: bool
    include_usage: bool
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token shown (with logprobs)


def answer_length(req: ChatRequest, prompt_len: int, context: int) -> int:
    """max_completion_tokens (or max_tokens), at most what the context leaves; default all of it."""
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    n = getattr(req, key)
    if not _is_integer(n):
        raise ApiError(400, f"'{key}' must be an integer", key, "invalid_type")
    room = context - prompt_len
    if n is None:
        return room
    if n <= 0:
        raise ApiError(400, f"'{key}' must be at least 1, not {n}", key, "invalid_value")
    if n > room:
        raise ApiError(400, f"'{key}' is {n}, but the prompt takes {prompt_len} of the {context} tokens "
                            f"of context: at most {room} are left to answer", key, "context_length_exceeded")
    return n


def parse_chat(body, tok, context: int, system_prompt: Optional[str], model: Optional[str] = None) -> ChatParams:
    """A chat-completions body (parsed JSON) -> ChatParams, or ApiError (400; 404 for a model
    other than `model`, the one served) saying which parameter is wrong and why. `context` is
    the model's max_seq_len. Everything is checked before anything is tokenised, the messages'
    size too: more messages than `context`, or more characters than `context` times the
    longest token's (tok.max_token_chars), can never fit."""
    bounds = {"model": model, "context": context, "token_chars": tok.max_token_chars}
    try:
        req = ChatRequest.model_validate(body, context=bounds)
    except ValidationError as e:
        raise api_error(e) from None
    try:
        ids, _ = chatml.render([(m.role, m.content) for m in req.messages], tok, system_prompt,
                               add_generation_prompt=True)
    except TemplateError as e:  # the model's own chat template refuses these messages (e.g. roles out of order)
        raise ApiError(400, f"the model's chat template refuses these messages: {e.problem}", "messages",
                       "invalid_value") from None
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {context} tokens, "
                            f"so the messages may take at most {context - 1}", "messages", "context_length_exceeded")
    seed = secrets.randbits(32) if req.seed is None else req.seed
    return ChatParams(ids, answer_length(req, len(ids), context), req.temperature, req.top_p, req.stop,
                      seed % 2 ** 32, req.stream, bool(req.stream_options.get("include_usage")),
                      req.logprobs, req.top_logprobs or 0)


# -- out

@dataclass(frozen=True)
class Completion:
    """What every body of one answer carries: its id, when it was made, the model's name."""
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> "Completion":
        return cls(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _candidate(tok, token: int, logprob: float) -> dict:
    """One token's fields: bytes, what it adds to the answer's text (the entries' bytes joined are
    the text); token, those bytes as text (\\xNN where part of a character), or a marker's name."""
    b = tok.token_bytes(token)
    return {"token": b.decode("utf-8", errors="backslashreplace") or tok.itos[token],
            "logprob": max(float(logprob), -9999.0), "bytes": list(b)}


def token_logprob(tok, token: int, lp, top: int) -> dict:
    """One entry of logprobs.content: the token's text, log-probability (OpenAI's -9999 for
    none at all) and bytes, and its `top` most likely alternatives (lp: engine.TokenLogprobs)."""
    entry = _candidate(tok, token, lp.logprob)
    entry["top_logprobs"] = [_candidate(tok, int(i), v) for i, v in zip(lp.top_ids[:top], lp.top_logprobs[:top])]
    return entry


def logprobs(content: Optional[list]) -> Optional[dict]:
    """A choice's "logprobs": None when not asked for, else its entries (`token_logprob`)."""
    return None if content is None else {"content": content, "refusal": None}


def completion(c: Completion, text: str, finish_reason: str, counts: dict, content_logprobs=None) -> dict:
    """A whole answer (`stream: false`); content_logprobs: its tokens' entries, when asked for."""
    return {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs(content_logprobs), "finish_reason": finish_reason}],
            "usage": counts}


_OMIT = object()


def chunk(c: Completion, delta: Optional[dict], finish_reason: Optional[str] = None, counts=_OMIT,
          content_logprobs=None) -> dict:
    """One `chat.completion.chunk`: delta None for OpenAI's last chunk of counts (no choices);
    counts (a dict or None) adds "usage"; content_logprobs: the entries of the tokens whose
    text the chunk carries."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs(content_logprobs),
                                         "finish_reason": finish_reason}]
    obj = {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
           "choices": choices}
    if counts is not _OMIT:
        obj["usage"] = counts
    return obj


def event(obj: dict) -> str:
    """An object as one server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def text_event(c: Completion) -> Callable[[str], str]:
    """new text -> its chunk's event: the chunk's JSON around the text's JSON string (one
    json.dumps of a str per chunk, not of a whole object)."""
    head, tail = event(chunk(c, {"content": "\0"})).split('"\\u0000"')
    return lambda text: head + json.dumps(text, ensure_ascii=False) + tail
