"""The engine's thread: the one place an `Engine` is stepped while a server runs.

The HTTP side (asyncio) hands it requests (`submit`, `cancel`) and gets their tokens
back through the requests' callbacks, which `post` to an asyncio queue. What a step
produces is handed to the event loop once per step boundary: one wake-up of the loop
per step, not one per token. Only the engine's public API is used (submit, cancel,
cancel_all, fail_all, has_room, status, busy, admit, decode).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import traceback

from ..engine import Engine, Request, Status, describe

log = logging.getLogger("jaxsft.serve")


class Busy(Exception):
    """Every slot is taken and the wait queue is full, or the server is stopping."""


class Worker:
    """Steps the engine in its own thread while it has work; sleeps otherwise."""

    def __init__(self, engine: Engine, max_waiting: int, loop: asyncio.AbstractEventLoop):
        self.engine, self.max_waiting, self.loop = engine, max_waiting, loop
        self.cond = threading.Condition()
        self.stopping = False
        self.outbox: list = []
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def post(self, queue: asyncio.Queue, item):
        """From the engine's callbacks: `item` goes to `queue` at the end of this step."""
        self.outbox.append((queue, item))

    def submit(self, req: Request):
        """Queues `req`, or raises Busy."""
        with self.cond:
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

    def stop(self):
        """Cancels what is still running or waiting and ends the thread."""
        with self.cond:
            self.stopping = True
            self.engine.cancel_all()
            self.cond.notify()
        self.thread.join(timeout=30)

    def _run(self):
        eng = self.engine
        while True:
            with self.cond:
                while not self.stopping and not eng.busy:
                    self.cond.wait()
                if self.stopping and not eng.busy:
                    return
            try:
                eng.admit()
                self._flush()  # first tokens out before the decode step
                eng.decode()
            except Exception as e:  # a bug must not hang every client: fail what is in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                eng.fail_all(f"the engine step failed: {describe(e)}")
            self._flush()

    def _flush(self):
        if self.outbox:
            box, self.outbox = self.outbox, []
            self.loop.call_soon_threadsafe(_deliver, box)


def _deliver(box):
    for queue, item in box:
        queue.put_nowait(item)
