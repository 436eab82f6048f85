"""Fault injection for the engine's compiled programs: `Flaky` stands in for `engine._prefill`
or `engine._decode` (monkeypatched) and makes chosen calls raise, as a device error would."""


class Flaky:
    """Calls `fn` (a jitted engine program) but makes the calls armed with `arm` raise a
    RuntimeError whose message has a second line (a client must never see it). With
    consume the program runs first, so JAX really deletes the cache donated to it, as when a
    running program fails; without, it raises before the program takes the cache."""

    def __init__(self, fn):
        self.fn, self.calls, self.failed = fn, 0, 0
        self.armed: list = []  # consume flags of the next calls to fail
        self.always = None  # consume flag of every call, when set

    def arm(self, consume=False, times=1):
        self.armed += [consume] * times
        return self

    def __call__(self, params, cache, *args, **kw):
        self.calls += 1
        if self.armed or self.always is not None:
            consume = self.armed.pop(0) if self.armed else self.always
            if consume:
                self.fn(params, cache, *args, **kw)  # donated: the cache passed in is deleted
            self.failed += 1
            raise RuntimeError(f"injected failure {self.failed}\n  the second line of the device's report")
        return self.fn(params, cache, *args, **kw)

    def _cache_size(self):  # engine.compiled_programs() (and the server's /health) read it
        return self.fn._cache_size()
