"""The engine's thread: the one place an `Engine` is stepped while a server runs.

The HTTP side (asyncio) hands it requests (`submit`, `cancel`) and gets their tokens
back through the requests' callbacks, which `post` to an asyncio queue. What a step
produces is handed to the event loop once per step boundary: one wake-up of the loop
per step, not one per token. Only the engine's public API is used (submit, cancel,
cancel_all, fail_all, has_room, status, busy, admit, decode).

No request is ever left waiting for a thread that will not answer it:
  - a step that fails (`StepFailed`: a prefill or decode raised) has already ended the
    requests it held with finish_reason "error"; the thread logs it and goes on;
  - any other exception from a step (a bug outside the compiled programs) ends every
    running request with an error, since what the slots hold is unknown; it goes on;
  - `max_failed_steps` failed steps in a row, or `EngineBroken` (the KV cache was lost and
    could not be allocated again), or anything at all escaping the loop (a BaseException
    from a callback) ends the thread: every running and waiting request gets an error,
    later submits raise `Failed`, `liveness()` says why, and `on_fatal` is called (bin/serve
    then exits 1, for a supervisor to restart it).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from ..engine import Engine, EngineBroken, Request, Status, StepFailed, describe

log = logging.getLogger("jaxsft.serve")

MAX_FAILED_STEPS = 3  # failed steps in a row after which the engine counts as broken


class Busy(Exception):
    """Every slot is taken and the wait queue is full, or the server is stopping."""


class Failed(Busy):
    """The engine has failed for good: no request will be answered (the server should be restarted)."""


@dataclass(frozen=True)
class Liveness:
    """Whether the engine thread can still answer (a server's /health)."""
    alive: bool  # the thread is running
    failure: Optional[str]  # why the engine failed for good; None while it has not
    step_age: Optional[float]  # seconds since the last step ended (or work began after idling); None when idle


class Worker:
    """Steps the engine in its own thread while it has work; sleeps otherwise.

    on_step(seconds) is called from the engine thread after each step (admit + decode) that went
    through; on_fatal() from it once, when the engine has failed for good."""

    def __init__(self, engine: Engine, max_waiting: int, loop: asyncio.AbstractEventLoop,
                 on_step: Optional[Callable[[float], None]] = None, on_fatal: Optional[Callable[[], None]] = None,
                 max_failed_steps: int = MAX_FAILED_STEPS):
        self.engine, self.max_waiting, self.loop = engine, max_waiting, loop
        self.on_step, self.on_fatal, self.max_failed_steps = on_step, on_fatal, max_failed_steps
        self.cond = threading.Condition()
        self.stopping = False
        self.failure: Optional[str] = None
        self.stepped_at: Optional[float] = None  # time.monotonic() of the last step's end; None when idle
        self.outbox: list = []
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def post(self, queue: asyncio.Queue, item):
        """From the engine's callbacks: `item` goes to `queue` at the end of this step."""
        self.outbox.append((queue, item))

    def submit(self, req: Request):
        """Queues `req`, or raises Busy (Failed when the engine has failed for good)."""
        with self.cond:
            if self.failure:
                raise Failed(self.failure)
            if self.stopping:
                raise Busy("the server is shutting down")
            if not self.engine.has_room(self.max_waiting):
                raise Busy("every slot is busy and the wait queue is full")
            self.engine.submit(req)
            self.cond.notify()

    def cancel(self, req: Request):
        self.engine.cancel(req)
        with self.cond:
            self.cond.notify()

    def status(self) -> Status:
        return self.engine.status()

    def liveness(self) -> Liveness:
        at = self.stepped_at
        return Liveness(self.thread.is_alive(), self.failure, None if at is None else time.monotonic() - at)

    def stop(self):
        """Cancels what is still running or waiting and ends the thread."""
        with self.cond:
            self.stopping = True
            self.engine.cancel_all()
            self.cond.notify()
        self.thread.join(timeout=30)

    def _run(self):
        try:
            self._serve()
        except BaseException as e:  # the thread ends here: nobody else would ever answer its requests
            reason = str(e) if isinstance(e, EngineBroken) else f"the engine thread died: {describe(e)}"
            self._die(reason)

    def _serve(self):
        eng = self.engine
        failures = 0  # failed steps in a row
        while True:
            with self.cond:
                if not eng.busy:
                    self.stepped_at = None
                while not self.stopping and not eng.busy:
                    self.cond.wait()
                if self.stopping and not eng.busy:
                    return
                if self.stepped_at is None:
                    self.stepped_at = time.monotonic()
            t = time.perf_counter()
            try:
                eng.admit()
                self._flush()  # first tokens out before the decode step
                eng.decode()
                failures = 0
            except EngineBroken:
                raise
            except Exception as e:
                failures += 1
                log.error("engine step failed (%d in a row):\n%s", failures, traceback.format_exc())
                if not isinstance(e, StepFailed):  # a bug outside the programs: what the slots hold is unknown
                    eng.fail_all(f"the engine step failed: {describe(e)}")
                if failures >= self.max_failed_steps:
                    last = str(e) if isinstance(e, StepFailed) else describe(e)
                    raise EngineBroken(f"{failures} engine steps failed in a row, the last: {last}") from e
            else:
                self._stepped(time.perf_counter() - t)
            self._flush()

    def _stepped(self, seconds: float):
        self.stepped_at = time.monotonic()
        if self.on_step:
            try:
                self.on_step(seconds)
            except Exception:  # a metric's bug must not fail requests
                log.error("on_step failed:\n%s", traceback.format_exc())

    def _die(self, reason: str):
        """Every request still running or waiting gets an error; no more are taken."""
        log.error("the engine has failed: %s\n%s", reason, traceback.format_exc())
        with self.cond:
            self.failure = reason
            try:
                self.engine.fail_all(reason, waiting=True)
            except BaseException:  # a callback's: every request has ended anyway (fail_all ends all first)
                log.error("ending the requests in flight:\n%s", traceback.format_exc())
        try:
            self._flush()
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass
        if self.on_fatal:
            self.on_fatal()

    def _flush(self):
        if self.outbox:
            box, self.outbox = self.outbox, []
            self.loop.call_soon_threadsafe(_deliver, box)


def _deliver(box):
    for queue, item in box:
        queue.put_nowait(item)
