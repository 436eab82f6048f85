"""Continuous batching: a fixed number of slots over one preallocated KV cache.

Each slot holds one request (a prompt and its answer so far) at its own length.
`Engine.step` is one boundary of the running batch:

  1. slots whose request ended or was cancelled are already free;
  2. waiting requests are prefilled into free slots (their first answer token
     comes out of the prefill), a few prompts per call, padded to a bounded set
     of shapes (PROMPT_BUCKETS x prefill_rows);
  3. one decode step writes every slot's next token (one compiled program for
     all slots, whatever is in them); a slot is freed the moment its row writes
     a stop token (<|endoftext|>; a base's template: its eos ids and end of turn)
     or reaches max_tokens.

A request with `logprobs` also gets, through on_token, each answer token's log-probability
and the TOP_LOGPROBS most likely tokens' (`TokenLogprobs`, the model's distribution before
temperature); a decode step where no row asks runs the plain program.

So a batch never waits for its longest row: a finished row's slot takes the next
waiting prompt at the next step.

A step that fails never loses a request. A prefill that raises ends the requests it
held (its own and those taken off the queue with it, not yet prefilled) with
finish_reason "error" and `Request.error`; a decode step that raises ends every
running request that way. Either way the engine then checks its KV cache: the
programs donate it, so a failure inside one may leave it deleted or unreadable; if
so, every running request is ended too and the cache is allocated afresh. The step
raises `StepFailed` once every request it held has ended; the engine can go on
(waiting requests stay queued). If the fresh cache cannot be allocated it raises
`EngineBroken`: the engine cannot go on (a server fails what is still queued and
exits, jaxsft/serve/worker.py). Every computation is row-wise (a row's keys,
mask, position and sampling key are its own) and every program has a fixed
shape, so a row's tokens do not depend on what the other slots hold: greedy
answers are identical alone or among others (tests/test_engine.py).

Shapes: N slots, S = max_seq_len cache positions, R prompts per prefill,
P padded prompt length, H heads, K head size, V vocabulary.

    eng = Engine(params, cfg, stop_ids=tok.stop_ids, slots=32)
    reqs = [Request(ids, max_tokens=100) for ids in prompts]
    eng.run(reqs)                    # or submit() + step() from a serving loop
    [r.tokens for r in reqs]         # answers without their stop token
"""
from __future__ import annotations

import collections
import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, NoReturn, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import masks, model
from .config import ModelConfig

# few shapes: a server compiles them all at start-up, and each costs seconds to compile
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
PREFILL_ROWS = (1, 8)  # prompts per prefill call
TOP_LOGPROBS = 20  # alternatives computed per token when a row asks (OpenAI's most); static: one program


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` (ascending) that holds n; past the last, the last: every
    caller ends its sizes at its cap (`capped`), so shapes stay in a bounded set."""
    return next((s for s in sizes if s >= n), sizes[-1])


def capped(cap: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """`sizes` below `cap`, then `cap` itself."""
    return tuple(b for b in sizes if b < cap) + (cap,)


def prompt_buckets(max_seq_len: int, sizes: Sequence[int] = PROMPT_BUCKETS) -> tuple[int, ...]:
    """The padded prompt lengths an engine compiles for: `sizes` below the context,
    then the context itself."""
    return capped(max_seq_len, sizes)


# sampling, row by row: each row has its own temperature, top-k, top-p and key

def pick_rows(logits, keys, temperature, top_k, top_p):
    """logits (B, V) f32, keys (B, 2) uint32 (this step's), temperature top_p (B,) f32,
    top_k (B,) int32 -> tokens (B,) int32. temperature 0: greedy; top_k 0: all tokens;
    top_p 1: no cut. The same rule as tests/reference_decode.pick, with every setting per row."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        V = logits.shape[-1]
        lg = logits / jnp.maximum(temperature, 1e-6)[:, None]
        srt = jnp.sort(lg, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
        lg = jnp.where(lg < kth, -jnp.inf, lg)
        srt = jnp.sort(lg, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # keep the smallest prefix whose probability reaches top_p (always >= 1 token)
        idx = jnp.minimum(jnp.sum(cum < top_p[:, None], axis=-1, keepdims=True), V - 1)
        cutoff = jnp.take_along_axis(srt, idx, axis=-1)
        lg = jnp.where((top_p[:, None] < 1.0) & (lg < cutoff), -jnp.inf, lg)
        drawn = jax.vmap(jax.random.categorical)(keys, lg).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)


class Logprobs(NamedTuple):
    """What `token_logprobs` gives: chosen (B,) f32, top_ids (B, K) int32, top (B, K) f32."""
    chosen: jax.Array
    top_ids: jax.Array
    top: jax.Array


def token_logprobs(logits, chosen) -> Logprobs:
    """logits (B, V), chosen (B,) int32 (the tokens picked) -> each row's chosen token's
    log-probability and its K = min(TOP_LOGPROBS, V) most likely tokens (ids and
    log-probabilities, most likely first), under log_softmax(logits): the model's own
    distribution, before temperature, top-k and top-p."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top, ids = jax.lax.top_k(lp, min(TOP_LOGPROBS, logits.shape[-1]))
    return Logprobs(jnp.take_along_axis(lp, chosen[:, None], axis=-1)[:, 0], ids.astype(jnp.int32), top)


# a prefill's log-probabilities: its own small program on the last positions' logits, run only
# when a row asked (a cond inside the prefill cost every plain prefill ~0.2-0.35 ms on 2 cores)
_prefill_logprobs = jax.jit(token_logprobs)


def _step_keys(keys, i):
    """Per-row base keys (B, 2) and answer-token index (B,) -> this step's keys: token i of
    a request's answer is drawn with fold_in(PRNGKey(seed), i), as tests/reference_decode.generate does."""
    return jax.vmap(jax.random.fold_in)(keys, i)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(1,))
def _prefill(params, cache, prefix, prompts, lens, slots, keys, temperature, top_k, top_p, *, graphdef):
    """prompts (R, P) int32, right-padded (row r's is prompts[r, :lens[r]]), written into cache
    rows `slots` (R,); a slot index N (out of range) is a filler row and writes nothing. prefix:
    None (each row is its whole prompt, at positions [0, P)) or (1, L), the tokens every row's
    prompt starts with (the shared system prompt), run once for all R rows: each row's rest,
    at [L, L + P), sees it and itself. Returns each prompt's first answer token (R,), the logits
    it was drawn from (R, V) (for `_prefill_logprobs`, when a row asked) and the cache."""
    R, P = prompts.shape
    if prefix is None:
        L = 0
        dtype = cache[0][0].dtype
        H, K = cache[0][0].shape[1], cache[0][0].shape[3]
        fresh = [(jnp.zeros((R, H, P, K), dtype),) * 2 for _ in cache]
        mask = masks.causal(P)
    else:
        L = prefix.shape[1]
        fresh, _ = model.prefix_cache(graphdef, params, prefix, R, P)
        mask = masks.with_prefix(masks.causal(P), jnp.ones((1, P), jnp.int32), L)  # (1, P, L + P)
    positions = jnp.broadcast_to(L + jnp.arange(P, dtype=jnp.int32), (R, P))
    last = jnp.arange(R) * P + lens - 1  # each prompt's last token in the flattened (R * P)
    logits, kv = model.apply(graphdef, params, prompts, positions=positions, mask=mask, cache=fresh, index=L,
                             select=last)
    cache = [(ck.at[slots, :, :L + P].set(k, mode="drop"), cv.at[slots, :, :L + P].set(v, mode="drop"))
             for (ck, cv), (k, v) in zip(cache, kv)]
    first = pick_rows(logits, _step_keys(keys, jnp.zeros_like(lens)), temperature, top_k, top_p)
    return first, logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "logprobs"), donate_argnums=(1,))
def _decode(params, cache, tok, pos, keys, i, temperature, top_k, top_p, *, graphdef, logprobs=False):
    """One token for every slot: tok (N,) the last token of each row, at position pos (N,)
    (written to the cache there); i (N,) the index of the token to draw. Returns the next
    tokens (N,), their Logprobs (None unless `logprobs`) and the cache. Free slots compute too
    (on garbage) and are ignored. Two programs: a step where no row asked for log-probabilities
    runs the one without them, the plain step as it was."""
    S = cache[0][0].shape[2]
    logits, cache = model.apply(graphdef, params, tok[:, None], positions=pos[:, None],
                                mask=masks.slot_step(pos, S), cache=cache, index=pos)
    nxt = pick_rows(logits[:, -1], _step_keys(keys, i), temperature, top_k, top_p)
    return nxt, token_logprobs(logits[:, -1], nxt) if logprobs else None, cache


def compiled_programs() -> int:
    """Programs compiled so far by every engine (prefill shapes + decode steps + the prefill's log-probabilities)."""
    return _prefill._cache_size() + _decode._cache_size() + _prefill_logprobs._cache_size()


_ids = itertools.count()


class StepFailed(RuntimeError):
    """A prefill or decode step raised; every request it held has ended with finish_reason
    "error" (and every running one, when the KV cache was lost with it). The engine can go on."""


class EngineBroken(RuntimeError):
    """A step failed and the engine cannot go on: its KV cache was lost and allocating
    another failed. The running requests have ended with finish_reason "error"."""


def describe(e: BaseException) -> str:
    """An exception in one line, no traceback (what a client may be told)."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _host(lps: Optional[Logprobs], want) -> Optional[Logprobs]:
    """A step's Logprobs as numpy when some row wanted them; else None, never copied off the device."""
    return Logprobs(*map(np.asarray, lps)) if np.any(want) else None


def _row(lps: Optional[Logprobs], j: int) -> Optional["TokenLogprobs"]:
    return None if lps is None else TokenLogprobs(float(lps.chosen[j]), lps.top_ids[j], lps.top[j])


@dataclass(frozen=True)
class TokenLogprobs:
    """One answer token's log-probabilities under the model (before temperature, top-k and
    top-p): the token's own, and the TOP_LOGPROBS most likely tokens', most likely first."""
    logprob: float
    top_ids: np.ndarray  # (K,) int32
    top_logprobs: np.ndarray  # (K,) float32


@dataclass(eq=False)
class Request:
    """One prompt to answer. The engine fills `tokens` (the answer, without
    its stop token) and `finish_reason`: "stop" (a stop token), "length" (max_tokens
    tokens), "cancelled" (cancel()) or "error" (a step that held it failed: `error` says
    what, in one line). on_token(req, token, logprobs) and on_finish(req) are called from
    the thread that runs Engine.step, as each token comes out; logprobs is the token's
    TokenLogprobs when the request set `logprobs`, else None."""
    prompt: np.ndarray
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: bool = False
    on_token: Optional[Callable] = None
    on_finish: Optional[Callable] = None
    tokens: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    id: int = field(default_factory=lambda: next(_ids))
    t_submit: float = 0.0
    t_first: Optional[float] = None  # when the first token came out (perf_counter)
    cancelled: bool = False
    error: Optional[str] = None  # why it ended with finish_reason "error"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Status:
    slots: int
    active: int  # slots holding a request
    waiting: int  # requests submitted, not yet in a slot
    context: int  # cache positions per slot


class Engine:
    """A continuous-batching decoder over `slots` rows of one KV cache.

    Not thread-safe by itself except for `submit`, `cancel` and `cancel_all`, which may be
    called from other threads while one thread calls `step` (serving loops: jaxsft/serve/worker.py).
    """

    def __init__(self, params, cfg: ModelConfig, stop_ids: Sequence[int], slots: int = 32, pad_id: int = 0,
                 prefill_rows: Sequence[int] = PREFILL_ROWS, buckets: Sequence[int] = PROMPT_BUCKETS,
                 admit_at: int = 1, prefix: Optional[Sequence[int]] = None, context: Optional[int] = None):
        """stop_ids: a row ends when it writes any of them (not part of its answer; the tokenizer's
        stop_ids). admit_at: waiting prompts are admitted once that many slots are free (or as many
        as are waiting, or when nothing is decoding): 1 for the lowest latency (a server),
        more to prefill several prompts per call (batch answering). prefix: token ids most
        prompts start with (the rendered system prompt): a prompt that does is prefilled
        after it (the prefix computed once per prefill call, the rest padded to its own,
        shorter bucket); any other prompt whole. context: the cache's positions per slot
        (default max_seq_len, at most that): a batch whose prompts and answers are short needs
        fewer, and every decode step reads all of them."""
        self.params, self.cfg, self.stop_ids, self.pad_id = params, cfg, tuple(stop_ids), pad_id
        self.prefix = np.asarray(prefix, np.int32)[None] if prefix is not None and len(prefix) else None
        self.graphdef = model.abstract(cfg)[0]
        self.slots, self.S = slots, min(context or cfg.max_seq_len, cfg.max_seq_len)
        self.prefill_rows = tuple(sorted(r for r in prefill_rows if r <= slots)) or (1,)
        self.buckets = prompt_buckets(self.S, buckets)
        self.admit_at = max(1, min(admit_at, slots))
        self.cache = None  # allocated on first use, in the parameters' dtype
        N = slots
        self.req: list[Optional[Request]] = [None] * N
        self.tok = np.zeros(N, np.int32)  # each slot's last token, fed to the next decode step
        self.pos = np.zeros(N, np.int32)  # ... and its position (= tokens in the cache before it)
        self.i = np.zeros(N, np.int32)  # index of the answer token the next step draws
        self.keys = np.zeros((N, 2), np.uint32)
        self.temperature = np.zeros(N, np.float32)
        self.top_k = np.zeros(N, np.int32)
        self.top_p = np.ones(N, np.float32)
        self.want = np.zeros(N, bool)  # slots whose request asked for log-probabilities
        self.waiting: collections.deque[Request] = collections.deque()
        # figures: steps run, slot-steps that decoded a live row, prefill calls and rows (those
        # after the prefix), the positions the prefills computed (padding and prefixes included),
        # seconds in each
        self.stats = {"decode_steps": 0, "busy_slot_steps": 0, "prefills": 0, "prefill_rows": 0,
                      "prefill_pad_rows": 0, "prefill_after_prefix": 0, "prefill_positions": 0, "tokens": 0,
                      "prefill_s": 0.0, "decode_s": 0.0}

    # -- requests

    def check(self, req: Request) -> None:
        """ValueError when `req` cannot be answered: an empty prompt, or prompt + max_tokens
        beyond the context."""
        n = len(req.prompt)
        if n == 0:
            raise ValueError("the prompt is empty")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {req.max_tokens}")
        if n + req.max_tokens > self.S:
            raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                             f"context of {self.S} tokens")

    def submit(self, req: Request) -> Request:
        self.check(req)
        req.t_submit = time.perf_counter()
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Ends `req` at the next step boundary (its slot is freed there)."""
        req.cancelled = True

    def cancel_all(self) -> None:
        """Cancels every request running or waiting (each ends at the next step boundary)."""
        for r in list(self.waiting) + [r for r in self.req if r is not None]:
            self.cancel(r)

    def fail_all(self, error: str, waiting: bool = False) -> None:
        """Ends every running request now with finish_reason "error" and `error` (their cache rows
        cannot be trusted), and with `waiting` every waiting one too (the engine will not go on);
        otherwise waiting requests stay, to be admitted later."""
        doomed = [r for r in self.req if r is not None]
        if waiting:
            while self.waiting:
                doomed.append(self.waiting.popleft())
        callback = self._end_all([(r, error) for r in doomed])
        if callback:
            raise callback

    def has_room(self, max_waiting: int) -> bool:
        """Whether one more request may be submitted: fewer than slots + max_waiting are
        running or waiting (cancelled ones not counted: their clients are gone)."""
        return self.active + self.queued < self.slots + max_waiting

    def status(self) -> "Status":
        """What is running and waiting now (a server's /health)."""
        return Status(self.slots, self.active, self.queued, self.S)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot, cancelled ones not counted."""
        return sum(not r.cancelled for r in list(self.waiting))

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.req)

    def free_slots(self) -> list[int]:
        return [s for s, r in enumerate(self.req) if r is None]

    # -- the loop

    def step(self) -> int:
        """One step boundary: admit waiting requests into free slots, then decode one
        token for every occupied slot. Returns how many tokens came out."""
        return self.admit() + self.decode()

    def decode(self) -> int:
        """One decode step over every slot (nothing when all are free); returns the tokens out."""
        self._reap()
        live = [s for s, r in enumerate(self.req) if r is not None]
        if not live:
            return 0
        try:
            t = time.perf_counter()
            want = bool(self.want.any())
            nxt, lps, self.cache = _decode(self.params, self.cache, self.tok, self.pos, self.keys, self.i,
                                           self.temperature, self.top_k, self.top_p, graphdef=self.graphdef,
                                           logprobs=want)
            nxt = np.asarray(nxt)
            lps = _host(lps, want)
            self.stats["decode_s"] += time.perf_counter() - t
            self.stats["decode_steps"] += 1
            self.stats["busy_slot_steps"] += len(live)
            for s in live:
                self.pos[s] += 1
                self._emit(s, int(nxt[s]), _row(lps, s))
        except BaseException as e:  # every running row was in the step (a callback's error included)
            self._failed("decode", [r for r in self.req if r is not None], e)
        return len(live)

    def run(self, reqs: Sequence[Request]) -> list[Request]:
        """Answers `reqs` (submitted in order) and returns them when all are done."""
        for r in reqs:
            self.submit(r)
        while not all(r.done for r in reqs):
            self.step()
        return list(reqs)

    def stream(self, req: Request):
        """Submits `req` and yields its tokens one at a time as they are decoded."""
        self.submit(req)
        seen = 0
        try:
            while True:
                while seen < len(req.tokens):
                    seen += 1
                    yield req.tokens[seen - 1]
                if req.done:
                    return
                if req in self.waiting:
                    self.admit()  # the first token goes out before the first decode step
                else:
                    self.step()
        finally:
            if not req.done:  # the consumer stopped early: free the slot now
                self.cancel(req)
                for s, r in enumerate(self.req):
                    if r is req:
                        self._finish(s, "cancelled")
                if req in self.waiting:
                    self.waiting.remove(req)
                    req.finish_reason = "cancelled"

    def warm_up(self, prompt_lens: Optional[Sequence[int]] = None) -> int:
        """Compiles the decode step (with and without log-probabilities) and a prefill for every
        prompt bucket (or those of `prompt_lens`) and row count, writing nothing; returns the
        programs compiled."""
        if self.cache is None:
            self._allocate()
        before = compiled_programs()
        N = self.slots
        zeros = np.zeros(N, np.int32)
        for logprobs in (False, True):
            _, _, self.cache = _decode(self.params, self.cache, zeros, zeros, self.keys, zeros, self.temperature,
                                       self.top_k, self.top_p, graphdef=self.graphdef, logprobs=logprobs)
        lens = prompt_lens or self.buckets
        shapes = {(False, bucket(n, self.buckets)) for n in lens}
        if self.prefix is not None:  # prompts after the prefix, where one that long would fit
            L = self.prefix.shape[1]
            shapes |= {(True, bucket(n - L, self.buckets)) for n in lens if n > L}
            shapes = {(after, P) for after, P in shapes if not after or L + P <= self.S}
        rows = {}
        for after, P in sorted(shapes):
            for R in self.prefill_rows:
                one = np.ones(R, np.int32)
                first, logits, self.cache = _prefill(self.params, self.cache, self.prefix if after else None,
                                                     np.zeros((R, P), np.int32), one, np.full(R, N, np.int32),
                                                     np.zeros((R, 2), np.uint32), np.zeros(R, np.float32),
                                                     np.zeros(R, np.int32), np.ones(R, np.float32),
                                                     graphdef=self.graphdef)
                rows[R] = (logits, first)
        for logits, first in rows.values():  # the prefill's log-probabilities, one program per row count
            _prefill_logprobs(logits, first)
        jax.block_until_ready(self.cache)
        return compiled_programs() - before

    # -- internals

    def _allocate(self):
        cfg = self.cfg
        leaf = jax.tree.leaves(self.params)[0]
        shape = (self.slots, cfg.kv_heads, self.S, cfg.head_dim)
        # placed (committed) where the parameters are, as the programs' outputs are: a cache placed
        # otherwise would make the first call compile a program that no later call can use.
        # Parameters on a mesh, even of one device (the trainer's evaluation hook), get a cache
        # replicated over that mesh.
        mesh = getattr(leaf.sharding, "mesh", None)
        where = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None
                 else next(iter(leaf.devices())))
        self.cache = [tuple(jax.device_put(jnp.zeros(shape, leaf.dtype), where) for _ in "kv")
                      for _ in range(cfg.n_layers)]

    def admit(self) -> int:
        """Prefills waiting requests into free slots: prompts of one length bucket together,
        at most max(prefill_rows) per call. Returns how many first tokens came out."""
        if self.cache is None:
            self._allocate()
        self._reap()
        free = self.free_slots()
        if len(free) < min(self.admit_at, len(self.waiting)) and len(free) < self.slots:
            return 0  # let a few more rows end first, then prefill them together
        taken = []  # (slot, request): off the queue, so only this call can end them
        calls: list[tuple[int, int, list]] = []
        done = 0  # calls that went through
        try:
            while free and self.waiting:
                r = self.waiting.popleft()
                if r.cancelled:
                    self._end(r, "cancelled")
                    continue
                taken.append((free.pop(0), r))
            by_bucket: dict[tuple, list] = {}
            for s, r in taken:
                L = self._after(r.prompt)
                by_bucket.setdefault((L, bucket(len(r.prompt) - L, self.buckets)), []).append((s, r))
            most = self.prefill_rows[-1]
            calls = [(L, P, group[start:start + most]) for (L, P), group in sorted(by_bucket.items())
                     for start in range(0, len(group), most)]
            for L, P, group in calls:
                self._prefill(L, P, group)
                done += 1
        except BaseException as e:  # this call's rows and the later calls' are held here alone
            held = [r for _, _, group in calls[done:] for _, r in group] if calls else [r for _, r in taken]
            self._failed("prefill", held, e)
        return len(taken)

    def _after(self, prompt) -> int:
        """The prefix's length if `prompt` is prefilled after it (it starts with the prefix, has
        more, and fits the context in its bucket), else 0."""
        if self.prefix is None:
            return 0
        L = self.prefix.shape[1]
        if len(prompt) <= L or L + bucket(len(prompt) - L, self.buckets) > self.S:
            return 0
        return L if np.array_equal(prompt[:L], self.prefix[0]) else 0

    def _prefill(self, L: int, P: int, group: list):
        """Prompts of `group` ((slot, request) pairs) into their slots: whole, padded to P (L 0), or
        their part after the L-token prefix, padded to P."""
        n = len(group)
        R = bucket(n, self.prefill_rows)
        N = self.slots
        prompts = np.full((R, P), self.pad_id, np.int32)
        lens = np.ones(R, np.int32)
        slots = np.full(R, N, np.int32)  # filler rows write nowhere
        keys = np.zeros((R, 2), np.uint32)
        temp, top_k, top_p = np.zeros(R, np.float32), np.zeros(R, np.int32), np.ones(R, np.float32)
        want = np.zeros(R, bool)
        for j, (s, r) in enumerate(group):
            prompts[j, :len(r.prompt) - L] = r.prompt[L:]
            lens[j], slots[j] = len(r.prompt) - L, s
            keys[j] = np.asarray(jax.random.key_data(jax.random.PRNGKey(r.seed)))
            temp[j], top_k[j], top_p[j], want[j] = r.temperature, r.top_k, r.top_p, r.logprobs
            self.req[s] = r
            self.pos[s], self.i[s], self.keys[s] = len(r.prompt), 1, keys[j]
            self.temperature[s], self.top_k[s], self.top_p[s] = r.temperature, r.top_k, r.top_p
            self.want[s] = r.logprobs
        t = time.perf_counter()
        first, logits, self.cache = _prefill(self.params, self.cache, self.prefix if L else None, prompts, lens,
                                             slots, keys, temp, top_k, top_p, graphdef=self.graphdef)
        lps = _prefill_logprobs(logits, first) if want.any() else None
        first = np.asarray(first)
        lps = _host(lps, want)
        self.stats["prefill_s"] += time.perf_counter() - t
        self.stats["prefill_positions"] += R * P + L
        self.stats["prefill_after_prefix"] += n if L else 0
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += n
        self.stats["prefill_pad_rows"] += R - n
        for j, (s, r) in enumerate(group):
            self._emit(s, int(first[j]), _row(lps, j))

    def _reap(self):
        """Frees the slots of cancelled requests and drops cancelled ones from the queue."""
        for s, r in enumerate(self.req):
            if r is not None and r.cancelled:
                self._finish(s, "cancelled")
        for r in [r for r in list(self.waiting) if r.cancelled]:
            self.waiting.remove(r)  # atomic, as submit's append in another thread is
            self._end(r, "cancelled")

    def _emit(self, s: int, t: int, lp: Optional[TokenLogprobs]):
        r = self.req[s]
        if r.cancelled:
            self._finish(s, "cancelled")
            return
        if r.t_first is None:
            r.t_first = time.perf_counter()
        if t in self.stop_ids:
            self._finish(s, "stop")
            return
        r.tokens.append(t)
        self.stats["tokens"] += 1
        if r.on_token:
            r.on_token(r, t, lp if r.logprobs else None)
        if r.cancelled:  # the callback may cancel (a stop string)
            self._finish(s, "cancelled")
        elif len(r.tokens) >= r.max_tokens:
            self._finish(s, "length")
        else:
            self.tok[s] = t
            self.i[s] += 1

    def _finish(self, s: int, reason: str):
        r = self.req[s]
        self.req[s] = None
        self.tok[s] = self.pad_id
        self.pos[s] = 0
        self.temperature[s] = 0.0  # a free slot never makes the step sample ...
        self.want[s] = False  # ... nor compute log-probabilities
        r.finish_reason = reason
        if r.on_finish:
            r.on_finish(r)

    # -- failures

    def _failed(self, what: str, held: list, e: BaseException) -> NoReturn:
        """After step `what` raised `e`: ends the requests it held with an error, checks the cache
        and, if it was lost, ends every running request too and allocates a fresh one. Raises
        StepFailed, EngineBroken (no fresh cache), or `e` itself when it is no Exception (an
        interrupt or an exit ends its own way, after the requests it held)."""
        error = f"{what} failed: {describe(e)}"
        ends = [(r, error) for r in held]
        lost = not self._cache_ok()
        broken = None
        if lost:
            ends += [(r, f"the KV cache was lost when a {error}") for r in self.req
                     if r is not None and r not in held]
            self.cache = None  # a later admit tries again if this allocation fails
            try:
                self._allocate()
            except Exception as e2:
                broken = EngineBroken(f"{error}; the KV cache was lost and allocating another failed: "
                                      f"{describe(e2)}")
        callback = self._end_all(ends)
        if not isinstance(e, Exception):
            raise e
        if broken:
            raise broken from e
        if callback:  # a bug in a callback: the caller learns of it as of any other
            raise callback
        raise StepFailed(error + (" (the KV cache was lost and allocated again)" if lost else "")) from e

    def _cache_ok(self) -> bool:
        """Whether the KV cache can still be read: a program that raised after it took its
        donated cache leaves it deleted, or (dispatched) failing when read."""
        leaves = jax.tree.leaves(self.cache)
        if not leaves or any(a.is_deleted() for a in leaves):
            return False
        try:
            jax.block_until_ready(leaves)
        except Exception:
            return False
        return True

    def _end(self, r: Request, reason: str, error: Optional[str] = None):
        """Ends `r` wherever it is: in a slot (freed) or off the queue. Nothing if it has ended."""
        if r.done:
            return
        r.error = error
        s = next((s for s, q in enumerate(self.req) if q is r), None)
        if s is not None:
            self._finish(s, reason)
            return
        r.finish_reason = reason
        if r.on_finish:
            r.on_finish(r)

    def _end_all(self, ends: Sequence[tuple[Request, str]]) -> Optional[BaseException]:
        """Ends each (request, error) with finish_reason "error": every one, even when another's
        on_finish raises. Returns the first such exception."""
        first = None
        for r, error in ends:
            try:
                self._end(r, "error", error)
            except BaseException as e:
                first = first or e
        return first

    def occupancy(self) -> float:
        """Mean fraction of slots decoding a live row, over the decode steps so far."""
        st = self.stats
        return st["busy_slot_steps"] / max(st["decode_steps"] * self.slots, 1)
