"""One chat completion from parameters to bodies: `Answer` submits the request to the
worker, turns the tokens that come back into text (`tokenizer.TextStream`: whole
characters, never the start of a stop string) and gives either the whole answer
(`whole`) or its server-sent events (`events`). A client that disconnects, or a stop
string, frees the request's slot at once. With `logprobs`, each piece of text comes with
the entries of the tokens it carries (a token whose text is held back waits with it).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, NamedTuple, Optional

from ..engine import Engine, Request
from ..tokenizer import TextStream
from . import protocol
from .access_log import accepted_at, note, request_id
from .protocol import ApiError, ChatParams
from .worker import Busy, Failed, Worker


@dataclass
class Model:
    """What the server serves: an engine (its slots, KV cache and parameters), the
    tokenizer, the default system prompt, and the name /v1/models lists."""
    engine: Engine
    tok: object
    system_prompt: Optional[str]
    name: str


class Piece(NamedTuple):
    """New text of an answer, and the logprobs entries of the tokens it carries (None when not
    asked for)."""
    text: str
    logprobs: Optional[list]


class Answer:
    """One request in flight: its engine request, its text so far, the bodies it makes."""

    def __init__(self, worker: Worker, model: Model, p: ChatParams, http):
        self.worker, self.p, self.http, self.tok = worker, p, http, model.tok
        self.tokens: asyncio.Queue = asyncio.Queue()  # token ids, then None at the end
        self.lps: list = []  # each token's engine.TokenLogprobs (with logprobs), appended by the engine's thread
        self.entries: Optional[list] = [] if p.logprobs else None  # logprobs.content so far
        self.req = Request(p.prompt, p.max_tokens, p.temperature, 0, p.top_p, p.seed, logprobs=p.logprobs,
                           on_token=self._with_logprobs if p.logprobs else lambda r, t, lp: worker.post(self.tokens, t),
                           on_finish=lambda r: worker.post(self.tokens, None))
        try:
            worker.submit(self.req)
        except Failed as e:
            raise ApiError(503, f"the engine has failed: {e}; this server answers no more requests", None,
                           "engine_failed", "server_error")
        except Busy as e:
            raise ApiError(503, f"the server is busy: {e}; retry shortly", None, "server_busy", "server_error",
                           {"Retry-After": "1"})
        self.meta = protocol.Completion.new(model.name)
        self.text = TextStream(model.tok, p.stop)
        self.watcher = asyncio.create_task(self._watch_disconnect())

    async def whole(self) -> dict:
        """The answer once it has ended (`stream: false`)."""
        try:
            async for _ in self._pieces():
                pass
        finally:
            self._close()
        return protocol.completion(self.meta, self.text.text, self._finish_reason(), self._usage(), self.entries)

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events, as they come (`stream: true`)."""
        text_event = protocol.text_event(self.meta)
        try:
            yield protocol.event(protocol.chunk(self.meta, {"role": "assistant", "content": ""}))
            try:
                async for piece in self._pieces():
                    if piece.logprobs is None:
                        yield text_event(piece.text)
                    else:
                        yield protocol.event(protocol.chunk(self.meta, {"content": piece.text},
                                                            content_logprobs=piece.logprobs))
            except ApiError as e:  # the headers are out: the error goes as an event
                yield protocol.event(e.body())
            else:
                reason = self._finish_reason()
                if not self.p.include_usage:
                    yield protocol.event(protocol.chunk(self.meta, {}, reason))
                else:  # "usage": null on the finish chunk, then OpenAI's last chunk: no choices, the counts
                    yield protocol.event(protocol.chunk(self.meta, {}, reason, counts=None))
                    yield protocol.event(protocol.chunk(self.meta, None, counts=self._usage()))
            yield protocol.DONE
        finally:  # the end, or the client went away (the task is cancelled): free the slot
            self._close()

    async def _pieces(self) -> AsyncIterator[Piece]:
        """The answer's new text until the row ends or a stop string: a piece per token,
        or per few tokens when the client side falls behind the engine."""
        while True:
            batch = [await self.tokens.get()]
            while not self.tokens.empty():
                batch.append(self.tokens.get_nowait())
            new, ended, failed = "", False, False
            for t in batch:
                if t is None:
                    if self.req.finish_reason == "error":
                        failed = True  # the text decoded before the failure goes out first
                        break
                    new += self.text.flush()
                    ended = True
                    break
                if not self.text.stopped:
                    new += self.text.feed(t)
                    if self.text.stopped:
                        self.worker.cancel(self.req)  # free the slot now
            entries = self._carried(ended or self.text.stopped)
            if new or entries:
                yield Piece(new, entries)
            if failed:  # the request's error is one line, no traceback
                raise ApiError(500, f"the answer failed: {self.req.error or 'see the server log'} "
                                    f"(request id {request_id(self.http.scope)})", None, None, "server_error")
            if ended:
                return

    def _with_logprobs(self, r, t, lp):
        """on_token, in the engine's thread: the token's log-probabilities are in place before it is posted."""
        self.lps.append(lp)
        self.worker.post(self.tokens, t)

    def _carried(self, final: bool) -> Optional[list]:
        """The logprobs entries of the tokens the text released so far carries, not given before
        (None without logprobs); `final`: the text is all there will be."""
        if self.entries is None:
            return None
        done = len(self.entries)
        new = [protocol.token_logprob(self.tok, self.text.ids[i], self.lps[i], self.p.top_logprobs)
               for i in range(done, self.text.carried(final))]
        self.entries += new
        return new

    async def _watch_disconnect(self):
        while True:
            message = await self.http.receive()
            if message["type"] == "http.disconnect":
                self.worker.cancel(self.req)
                return

    def _finish_reason(self) -> str:
        return "stop" if self.text.stopped or self.req.finish_reason == "stop" else "length"

    def _usage(self) -> dict:
        return protocol.usage(len(self.p.prompt), len(self.req.tokens))

    def _close(self):
        self.watcher.cancel()
        self.worker.cancel(self.req)
        req = self.req
        first = req.t_first - accepted_at(self.http.scope) if req.t_first else None  # from acceptance
        self.http.app.state.jaxsft.metrics.answer(len(self.p.prompt), len(req.tokens), first)
        ttft = f" ttft={1000 * first:.0f}ms" if first is not None else ""
        note(self.http.scope, f"prompt={len(self.p.prompt)} completion={len(req.tokens)} "
                              f"{req.finish_reason or 'unfinished'}{' stream' if self.p.stream else ''}{ttft}")
