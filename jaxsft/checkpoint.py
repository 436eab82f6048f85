"""Checkpoints with orbax: the best parameters by validation loss, and the
latest full training state for --resume, in two separate managers so keeping
the best never evicts the latest.

A run directory holds:

    config.json      the full config (model section with vocab_size)
    tokenizer.json   the vocabulary (characters, or an imported model's own tokenizer)
    best/<step>/     parameters with the lowest validation loss so far
    latest/<step>/   parameters, optimizer state, step, best validation loss
                     (the two newest states: a damaged newest one falls back to the other)
    (lora_base.json  a LoRA run only: runs.py writes and reads it)

Each step directory holds checksums.json (the size and sha256 of each of its
files, written just before orbax commits the step), checked before every
restore: orbax keeps checksums for its indexes but none for the array data, so
a flipped byte there would otherwise restore as a wrong number. A damaged or
missing file is reported in one line naming the step and the file (a
DamagedCheckpoint, exit status 2); a step saved without checksums.json is read
unchecked, and deleting it is how to read a step whose damage is known to be
harmless.

This module stores and verifies trees of arrays and a run's metadata; what the trees are (a
model, a LoRA run's adapters on its base) is runs.py's: scripts restore a usable model with
jaxsft.runs.restore(run_dir).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import sys

import jax
import orbax.checkpoint as ocp

from .config import UserError, to_dict
from .files import write_json
from .tokenizer import AnyTokenizer, load as load_tokenizer


def write_meta(run_dir: str, cfg, tok: AnyTokenizer) -> None:
    """config.json and tokenizer.json beside the checkpoints (process 0 only)."""
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "config.json"), to_dict(cfg), indent=2)
    tok.save(os.path.join(run_dir, "tokenizer.json"))


def read_meta(run_dir: str) -> tuple[dict, AnyTokenizer]:
    cfg_path = os.path.join(run_dir, "config.json")
    tok_path = os.path.join(run_dir, "tokenizer.json")
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    if not os.path.isfile(cfg_path) or not os.path.isfile(tok_path):
        raise UserError(f"{run_dir}: not a jaxsft run (config.json or tokenizer.json missing)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        tok = load_tokenizer(tok_path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{run_dir}: unreadable run metadata ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(f"{cfg_path}: unreadable run metadata (no 'model' section)")
    return cfg, tok


CHECKSUMS = "checksums.json"
# what orbax writes into a step directory as it commits it, after checksums.json (its restores read
# around their damage); every other file of the step is covered
_UNSUMMED = ("_CHECKPOINT_METADATA", "commit_success.txt", CHECKSUMS)
_TMP = ".orbax-checkpoint-tmp"  # orbax writes step N to "N.orbax-checkpoint-tmp" and renames it to "N"


class DamagedCheckpoint(UserError):
    """A step directory with a file missing, cut short, changed since it was saved, or unreadable."""

    def __init__(self, step_dir: str, what: str, problem: str):
        super().__init__(f"{step_dir}: {what} is damaged: {problem}")
        self.step_dir, self.problem = step_dir, problem


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(step_dir: str) -> None:
    """checksums.json in a step directory: {"files": {relative path: {"bytes", "sha256"}}}."""
    files = {}
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir).replace(os.sep, "/")
            if rel not in _UNSUMMED:
                p = os.path.join(root, n)
                files[rel] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    write_json(os.path.join(step_dir, CHECKSUMS), {"files": dict(sorted(files.items()))})


def _read_checksums(step_dir: str, what: str) -> dict | None:
    """{relative path: (bytes, sha256)} from a step's checksums.json; None when it has none."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return {rel: (int(s["bytes"]), str(s["sha256"])) for rel, s in json.load(f)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(step_dir, what, f"{CHECKSUMS} cannot be read ({_first_line(e)})") from None


def verify(step_dir: str, what: str) -> bool:
    """DamagedCheckpoint naming the first file of a step that is missing, cut short, changed since
    it was saved or unreadable, by the step's checksums.json; False (nothing checked) without one."""
    sums = _read_checksums(step_dir, what)
    if sums is None:
        return False
    for rel, (size, digest) in sorted(sums.items()):
        p = os.path.join(step_dir, rel)
        try:
            actual = os.path.getsize(p)
            if actual < size:
                problem = f"{rel} is cut short ({actual} of {size} bytes)"
            elif actual > size:
                problem = f"{rel} has {actual} bytes, {size} were saved"
            elif _sha256(p) != digest:
                problem = f"{rel} differs from what was saved (sha256 mismatch)"
            else:
                continue
        except FileNotFoundError:
            problem = f"{rel} is missing"
        except OSError as e:
            problem = f"{rel} cannot be read ({e.strerror or e})"
        raise DamagedCheckpoint(step_dir, what, problem)
    return True


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


# tensorstore's status for a file that is missing, cut short or fails its own CRC check
_TS_DAMAGE = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION): ")


def _damage(e: BaseException, step_dir: str) -> str | None:
    """What a failed orbax read says is unreadable; None when the error is not about damaged files."""
    seen, x = [], e
    while x is not None and len(seen) < 20:
        seen.append(x)
        x = x.__cause__ or x.__context__
    base = os.path.abspath(step_dir) + os.sep
    for x in seen:
        if isinstance(x, OSError):
            name = os.path.relpath(x.filename, step_dir) if isinstance(x.filename, str) else "a file"
            return f"{name} cannot be read ({x.strerror or x})"
        if isinstance(x, ValueError) and _TS_DAMAGE.match(str(x)):
            line = re.sub(r"\s*\[tensorstore_spec.*$", "", _first_line(x, 100000))
            code, rest = line.split(": ", 1)
            array = re.search(r'"([^"/]+)/[^"]*" in OCDBT', rest)
            files = [f for f in re.findall(r'local file "([^"]+)"', rest) if not f.endswith("/")]
            if '": ' in rest:  # the innermost cause, after the last quoted name
                detail = rest.rsplit('": ', 1)[1]
            else:
                detail = re.sub(r'(Error opening "\w+" driver: )+', "", rest)
            detail = detail.replace(base, "")
            part = files[-1].replace(base, "") if files else ""
            if array:
                part = f"{part} (array {array.group(1)})" if part else f"array {array.group(1)}"
            return f"{part or 'a file'} cannot be read ({code}: {detail[:200]})"
        if isinstance(x, (UnicodeDecodeError, json.JSONDecodeError)):
            return f"its metadata cannot be read ({_first_line(x)})"
    return None


@contextlib.contextmanager
def _quiet():
    """orbax's log lines off around a read (what goes wrong reaches the caller as an exception),
    and the debris of a failed read dropped whenever it comes."""
    _drop_failed_read_debris()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


class _OrbaxErrorLines(logging.Filter):
    """While a RunCheckpoints is open: drops the error lines (with tracebacks) orbax logs from its
    save threads, as each failure also reaches the caller as an exception, reported in one line."""
    users = 0

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

    def use(self, n: int) -> None:
        type(self).users += n
        if self.users > 0:
            logging.getLogger("absl").addFilter(self)
        else:
            logging.getLogger("absl").removeFilter(self)


_ORBAX_ERROR_LINES = _OrbaxErrorLines()


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's 'Future/Task exception was never retrieved' for a tensorstore error or an
    error raised inside orbax's reads (the other reads of a failed restore)."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "never retrieved" not in str(record.msg):
            return True
        if re.match(r"[A-Z_]+: ", str(exc)) is not None:
            return False
        # any other error raised inside orbax's reads (a truncated shard read under load, say)
        tb = exc.__traceback__
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _drop_failed_read_debris() -> None:
    """A failed orbax read leaves its other reads in flight on an event loop that it closes: as they
    end they report 'Event loop is closed', or their own error, as unraisable exceptions or asyncio
    log lines at any later moment (even before the read's own error is raised, or at exit). Those
    are dropped; anything else reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxsft_failed_reads", False):
        return
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadErrors) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadErrors())

    def hook(u):
        code = getattr(u.object, "cr_code", None)
        if (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)) or \
                (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename):
            return
        previous(u)
    hook._jaxsft_failed_reads = True
    sys.unraisablehook = hook


def _full_disk_error(e: BaseException) -> bool:
    """An OSError(ENOSPC), or tensorstore's ValueError for one (RESOURCE_EXHAUSTED ... No space left)."""
    x, n = e, 0
    while x is not None and n < 20:
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left on device" in str(x):
            return True
        x, n = x.__cause__ or x.__context__, n + 1
    return False


@contextlib.contextmanager
def _saving(directory: str):
    """A full disk during a save as OSError(ENOSPC) naming the checkpoint directory (bin/train
    reports it in one line and exits 1); the previous committed steps are untouched."""
    try:
        yield
    except Exception as e:
        if _full_disk_error(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory) from None
        raise


class RunCheckpoints:
    """The two orbax managers of a run directory."""

    def __init__(self, run_dir: str):
        self.dirs = {"best": os.path.join(run_dir, "best"), "latest": os.path.join(run_dir, "latest")}
        self._step = {}  # "best" or "latest" -> the step its save in flight writes
        # a save is written to "<step>.orbax-checkpoint-tmp*" and renamed when complete, so a killed
        # process leaves the previous checkpoint readable; cleanup_tmp_directories removes the debris
        self.best = self._manager("best", "the best checkpoint", max_to_keep=1, best_fn=lambda m: m["val_loss"],
                                  best_mode="min")
        self.latest = self._manager("latest", "the saved training state", max_to_keep=2)
        # orbax deletes a step beyond max_to_keep only after the newer one is committed, so the
        # newest max_to_keep are whole; older ones are what a kill during that deletion left
        # half-removed (latest/ keeps two: a damaged newest state falls back to the one before)
        for mngr, keep in ((self.best, 1), (self.latest, 2)):
            for step in sorted(mngr.all_steps())[:-keep]:
                mngr.delete(step)
        _ORBAX_ERROR_LINES.use(+1)  # until close()

    def _manager(self, name: str, what: str, **options):
        directory = os.path.abspath(self.dirs[name])

        def before_commit():  # in orbax's save thread: the step is written, not yet renamed
            step = self._step.get(name)
            if step is None:  # saved by a caller of the orbax manager itself: no checksums
                return
            tmp = [n for n in os.listdir(directory) if n.startswith(f"{step}{_TMP}")]
            write_checksums(os.path.join(directory, max(tmp) if tmp else str(step)))

        # each manager gets its own barrier names. With several processes orbax ends every save in a
        # background thread with barriers whose names the two managers would share
        # ("ThreadSaveMultiHostValueHolder:set_value_start", "async_write_complete.<step>" when both
        # save a step): a process that reaches one of them for latest while it still waits there for
        # best (another process being slower) gets "Barrier ... is already ongoing", which orbax
        # reports as "Timed out while waiting for async_write_complete barrier", and the other
        # processes hang at that barrier (20 minutes, orbax's default)
        opts = ocp.CheckpointManagerOptions(
            cleanup_tmp_directories=True, **options,
            async_options=ocp.AsyncOptions(post_finalization_callback=before_commit),
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
        try:
            with _quiet():
                return ocp.CheckpointManager(directory, options=opts)
        except Exception as e:  # it reads each step's metrics
            problem = _damage(e, self.dirs[name])
            if problem is None:
                raise
            for step in _steps(directory):  # the file, when checksums tell
                verify(os.path.join(self.dirs[name], str(step)), what)
            raise DamagedCheckpoint(self.dirs[name], what, problem) from None

    def _save(self, name: str, mngr, step: int, **kw) -> None:
        with _saving(self.dirs[name]):
            mngr.wait_until_finished()  # the save before (its errors surface here) has run before_commit
            self._step[name] = step
            mngr.save(step, **kw)

    def save_best(self, step: int, params, val_loss: float) -> None:
        if step in self.best.all_steps():
            # a run killed between its best and latest saves at this step, now resumed:
            # the same step gives the same parameters, and orbax refuses to overwrite
            return
        self._save("best", self.best, step, args=ocp.args.StandardSave(params),
                   metrics={"val_loss": float(val_loss)})

    def save_latest(self, step: int, state: dict) -> None:
        """state: {"params", "opt_state", "step", "best_val_loss"} (a pytree of arrays)."""
        self._save("latest", self.latest, step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, target: dict, warn=None) -> dict | None:
        """The newest readable training state onto `target`'s structure, or None when none was saved
        yet. A damaged newest state is deleted, after the one before it is restored, and warn(line)
        says so (default: stderr, on process 0)."""
        what = "the saved training state"
        damaged = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            step_dir = os.path.join(self.dirs["latest"], str(step))
            try:
                restored = _restore_step(step_dir, target, what, self.dirs["latest"])
            except DamagedCheckpoint as e:
                damaged.append((step, e))
                continue
            for bad, e in damaged:
                line = (f"warning: {e.step_dir} is unreadable ({e.problem}), so it is removed; "
                        f"resuming from {step_dir}")
                if warn is not None:
                    warn(line)
                elif jax.process_index() == 0:
                    print(line, file=sys.stderr, flush=True)
                self.latest.delete(bad)
            return restored
        if damaged:
            first = damaged[0][1]
            older = "; ".join(f"{e.step_dir} before it is damaged too: {e.problem}" for _, e in damaged[1:])
            raise DamagedCheckpoint(first.step_dir, what, first.problem + (f"; {older}" if older else "")) from None
        return None

    def wait(self) -> None:
        for name, mngr in (("best", self.best), ("latest", self.latest)):
            with _saving(self.dirs[name]):
                mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in flight and releases the managers (a second call does nothing); the
        first error of either is raised after both are closed."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        error = None
        for name, mngr in (("best", self.best), ("latest", self.latest)):
            try:
                with _saving(self.dirs[name]):
                    mngr.close()
            except Exception as e:
                error = error or e
        _ORBAX_ERROR_LINES.use(-1)
        if error is not None:
            raise error


def _steps(path: str) -> list[int]:
    """The committed steps under an orbax directory, oldest first."""
    return sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def _leaf_name(path) -> str:
    """A pytree path as orbax names the stored array, e.g. "blocks.0.attn.wq.kernel.value"."""
    parts = []
    for k in path:
        parts.append(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))))
    return ".".join(parts)


def check_shapes(step_dir: str, target, what: str) -> None:
    """UserError naming the first array whose stored shape differs from `target`'s, before any
    array is read (a failed orbax restore leaves its pending reads behind); DamagedCheckpoint when
    the step's metadata cannot be read."""
    if not os.path.isfile(os.path.join(step_dir, "default", "_METADATA")):
        raise DamagedCheckpoint(step_dir, what, "default/_METADATA is missing")
    try:
        # (quiet: reading an item directory's metadata warns that the step's own file is elsewhere)
        with _quiet(), ocp.StandardCheckpointer() as c:  # (a relative path reads as an empty tree)
            meta = c.metadata(os.path.abspath(os.path.join(step_dir, "default"))).item_metadata
    except Exception as e:
        problem = _damage(e, step_dir)
        if problem is None:
            raise
        raise DamagedCheckpoint(step_dir, what, problem) from None
    stored = {m.name: tuple(m.shape) for m in jax.tree.leaves(meta) if hasattr(m, "name")}
    if not stored:
        return  # metadata in a form this version does not know: orbax's restore checks instead
    wanted = {_leaf_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(target)}
    for name in sorted(stored.keys() | wanted.keys()):
        if stored.get(name) != wanted.get(name):
            raise UserError(f"{step_dir}: {what} does not match this model config ({name}: stored "
                            f"{stored.get(name, 'nothing')}, the config needs {wanted.get(name, 'nothing')})")


def _restore_step(step_dir: str, target, what: str, where: str):
    """One step's arrays onto `target`'s structure, its files checked first. DamagedCheckpoint when
    a file is damaged; UserError (naming `where`) when the arrays do not fit the target."""
    verify(step_dir, what)
    check_shapes(step_dir, target, what)
    try:
        with _quiet(), ocp.StandardCheckpointer() as c:
            return c.restore(os.path.abspath(os.path.join(step_dir, "default")), target)
    except Exception as e:
        problem = _damage(e, step_dir)
        if problem is not None:
            raise DamagedCheckpoint(step_dir, what, problem) from None
        if isinstance(e, (ValueError, KeyError, TypeError)):
            raise UserError(f"{where}: {what} does not match this model config ({_first_line(e)})") from None
        raise


def restore_params(path: str, target, what: str):
    """Restores the newest step under an orbax directory onto `target`'s structure."""
    steps = _steps(path) if os.path.isdir(path) else []
    if not steps:
        raise UserError(f"{path}: holds no checkpoint")
    return _restore_step(os.path.join(path, str(steps[-1])), target, what, path)
