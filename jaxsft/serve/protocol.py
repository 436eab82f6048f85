"""The chat-completions API's bodies, in and out (OpenAI's shapes).

In: `parse_chat(body, tok, context, system_prompt)` -> `ChatParams`. The JSON body is
validated by pydantic models (`ChatRequest`, `Message`) in the order OpenAI clients
expect the first problem to be named; any problem is an `ApiError` (400) whose body is
{"error": {"message", "type", "param", "code"}}: `param` where the problem is
("messages[1].role"), `code` what it is ("invalid_value").

Out: every body one answer produces is built here, once: `completion` (a whole
answer), `chunk` (one server-sent event's object; `text_event` formats the text
chunks from it), `usage`, `event` (an object as an SSE line), `DONE`.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional

import numpy as np
from pydantic import (BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, WrapValidator,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .. import chatml
from ..templates import TemplateError

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop strings per request, as OpenAI allows


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


def _stop(v):
    stop = [] if v is None else [v] if isinstance(v, str) else v
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise PydanticCustomError("invalid_value",
                                  f"'stop' must be a non-empty string or an array of at most {MAX_STOP} of them")
    return stop


def _stream(v):
    if v is not None and not isinstance(v, bool):
        raise PydanticCustomError("invalid_type", "'stream' must be a boolean")
    return bool(v)


def _stream_options(v):
    if v and not isinstance(v, dict):
        raise PydanticCustomError("invalid_type", "'stream_options' must be an object")
    return v or {}


def _messages_array(v):
    if v is None:
        raise PydanticCustomError("missing_required_parameter", "'messages' is required")
    if not isinstance(v, list):
        raise PydanticCustomError("invalid_type", "'messages' must be an array of {role, content} objects")
    if not v:
        raise PydanticCustomError("empty_array", "'messages' must not be empty")
    return v


def _system_only_first(v, handler):
    """The entries' own checks, and a system message after the first entry: whichever
    comes first in the array is the error."""
    late = next((i for i, m in enumerate(v) if i and isinstance(m, dict) and m.get("role") == "system"), None)
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


class Message(BaseModel):
    role: str = Field(None, validate_default=True)
    content: str = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _object(cls, v):
        if not isinstance(v, dict):
            raise PydanticCustomError("invalid_type", "{param} must be an object with 'role' and 'content'")
        return v

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v):
        if v not in ROLES:
            raise PydanticCustomError("invalid_value", f"{{param}} must be one of {', '.join(ROLES)}, "
                                                       f"not {json.dumps(v)}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if not isinstance(v, str):
            raise PydanticCustomError("invalid_type", "{param} must be a string")
        return v


class ChatRequest(BaseModel):
    """A chat-completions body; fields in the order they are checked. Other keys (model,
    user, ...) are ignored."""
    messages: Annotated[list[Message], WrapValidator(_system_only_first), BeforeValidator(_messages_array)] = \
        Field(None, validate_default=True)
    n: Annotated[Optional[int], BeforeValidator(_integer)] = None
    temperature: Annotated[float, _number(1.0, 0.0, 2.0)] = 1.0
    top_p: Annotated[float, _number(1.0, 0.0, 1.0, lo_open=True)] = 1.0
    stop: Annotated[list[str], BeforeValidator(_stop)] = Field(default_factory=list)
    seed: Annotated[Optional[int], BeforeValidator(_integer)] = None
    stream: Annotated[bool, BeforeValidator(_stream)] = False
    stream_options: Annotated[dict, BeforeValidator(_stream_options)] = Field(default_factory=dict)
    # checked once the prompt's length is known (answer_length), after the context check
    max_completion_tokens: Any = None
    max_tokens: Any = None

    @model_validator(mode="before")
    @classmethod
    def _object(cls, v):
        if not isinstance(v, dict):
            raise PydanticCustomError("invalid_type", "the request body must be a JSON object")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, n):
        if n is not None and n != 1:
            raise PydanticCustomError("invalid_value", f"only n=1 is supported, not {n}")
        return n


def _param(loc: tuple) -> Optional[str]:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out or None


def api_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as the 400 a client gets."""
    first = e.errors()[0]
    param = (first.get("ctx") or {}).get("param") or _param(first["loc"])
    return ApiError(400, first["msg"].replace("{param}", param or "", 1), param, first["type"])


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


def parse_chat(body, tok, context: int, system_prompt: Optional[str]) -> ChatParams:
    """A chat-completions body (parsed JSON) -> ChatParams, or ApiError (400) saying
    which parameter is wrong and why. `context` is the model's max_seq_len."""
    try:
        req = ChatRequest.model_validate(body)
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
                      seed % 2 ** 32, req.stream, bool(req.stream_options.get("include_usage", False)))


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


def completion(c: Completion, text: str, finish_reason: str, counts: dict) -> dict:
    """A whole answer (`stream: false`)."""
    return {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": counts}


_OMIT = object()


def chunk(c: Completion, delta: Optional[dict], finish_reason: Optional[str] = None, counts=_OMIT) -> dict:
    """One `chat.completion.chunk`: delta None for OpenAI's last chunk of counts (no choices);
    counts (a dict or None) adds "usage"."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
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
