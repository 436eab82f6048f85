"""Damaged checkpoints and a full disk.

- bin/chat, bin/eval and bin/inspect on a run whose best/<step> has a file cut short, changed
  (bytes flipped: orbax keeps no checksum of array data, checksums.json does) or missing: exit
  status 2 and exactly one line on stderr naming the step directory and the file;
- a step saved without checksums.json (as older runs were) still gives one line, naming the array
  tensorstore could not read;
- bin/train --resume whose newest latest/ state is damaged falls back to the one before it, says
  so in one line and ends bitwise where an uninterrupted run does; with both damaged it stops;
- a full disk during a save: exit status 1, one line, the earlier checkpoints whole and resumable.

The runs are test_reliability's tiny config; its reference run and helpers are reused.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import run_main
from test_reliability import (REPO, TOTAL_STEPS, Runs, T, _env, assert_same_as_reference, load_tree, snapshot,
                              steps)
from test_reliability import cache, reference  # noqa: F401  (fixtures: the tiny reference run)

pytestmark = pytest.mark.slow

BEST = f"run/best/{TOTAL_STEPS}"


def copy_run(reference, d) -> str:
    """The reference run with its config and data files, copied into d; returns d."""
    shutil.copytree(reference["runs"].d, d, dirs_exist_ok=True)
    return str(d)


def data_file(step_dir) -> str:
    """The largest array data file of a step (its relative path, as messages name it)."""
    d = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
    name = max(os.listdir(d), key=lambda n: os.path.getsize(os.path.join(d, n)))
    return f"default/ocdbt.process_0/d/{name}"


def truncate(step_dir, rel) -> str:
    p = os.path.join(step_dir, rel)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    return f"{rel} is cut short ({size // 2} of {size} bytes)"


def flip(step_dir, rel) -> str:
    p = os.path.join(step_dir, rel)
    with open(p, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
        f.seek(0)
        f.write(data)
    return f"{rel} differs from what was saved (sha256 mismatch)"


def remove(step_dir, rel) -> str:
    os.remove(os.path.join(step_dir, rel))
    return f"{rel} is missing"


DAMAGE = {  # id: (how, which file)
    "data-truncated": (truncate, data_file),
    "data-flipped": (flip, data_file),
    "metadata-flipped": (flip, lambda _: "default/_METADATA"),
    "data-missing": (remove, data_file),
}
TOOLS = {
    "chat": ["chat", "--checkpoint", "run", "--max-new-tokens", "4", "3加5等于多少？"],
    "eval": ["eval", "--checkpoint", "run", "--data", "val.jsonl", "--max-new-tokens", "4"],
    "inspect": ["inspect", "--config", "tiny.yaml", "--checkpoint", "run"],
}


def run_tool(d, args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", args[0]), *args[1:]], cwd=d, env=_env(None),
                          capture_output=True, text=True, timeout=180)


def test_every_step_has_checksums_that_cover_its_files(reference):
    from jaxsft import checkpoint
    run = reference["runs"].path()
    for d in ("best", "latest"):
        for s in steps(os.path.join(run, d)):
            step_dir = os.path.join(run, d, str(s))
            assert checkpoint.verify(step_dir, "x") is True
            with open(os.path.join(step_dir, "checksums.json")) as f:
                listed = set(json.load(f)["files"])
            on_disk = {os.path.relpath(os.path.join(r, n), step_dir) for r, _, ns in os.walk(step_dir) for n in ns}
            # all but what orbax writes as it commits the step, after the checksums
            assert listed == on_disk - {"checksums.json", "_CHECKPOINT_METADATA", "commit_success.txt"}
            assert data_file(step_dir) in listed and "default/_METADATA" in listed


def damage_best(reference, tmp_path, damage) -> tuple[str, str]:
    """A copy of the reference run whose best checkpoint has `damage`: (its dir, the problem)."""
    d = copy_run(reference, tmp_path)
    how, which = DAMAGE[damage]
    step_dir = os.path.join(d, BEST)
    return d, how(step_dir, which(step_dir))


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_best_checkpoint_is_one_line_and_exit_2(tmp_path, reference, damage, tool, capsys, monkeypatch):
    """In this process, through each tool's main()."""
    d, problem = damage_best(reference, tmp_path, damage)
    before = snapshot(d)
    monkeypatch.chdir(d)
    code, _, err = run_main(tool, TOOLS[tool][1:], capsys, monkeypatch)
    assert code == 2, err
    assert err.splitlines() == [f"error: {BEST}: the best checkpoint is damaged: {problem}"]
    assert snapshot(d) == before  # a reader changes nothing


@pytest.mark.parametrize("tool,damage", [("chat", "data-truncated"), ("eval", "data-flipped"),
                                         ("inspect", "metadata-flipped")])
def test_damaged_best_checkpoint_in_a_real_process(tmp_path, reference, tool, damage):
    """Each tool's program end to end: exit status 2 and the one line, nothing else on stderr."""
    d, problem = damage_best(reference, tmp_path, damage)
    before = snapshot(d)
    p = run_tool(d, TOOLS[tool])
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [f"error: {BEST}: the best checkpoint is damaged: {problem}"]
    assert snapshot(d) == before


def test_damaged_step_without_checksums_names_the_array(tmp_path, reference, capsys, monkeypatch):
    """A step saved before checksums.json existed: tensorstore's own error, in one line."""
    d = copy_run(reference, tmp_path)
    step_dir = os.path.join(d, BEST)
    os.remove(os.path.join(step_dir, "checksums.json"))
    truncate(step_dir, data_file(step_dir))
    monkeypatch.chdir(d)
    code, _, err = run_main("chat", TOOLS["chat"][1:], capsys, monkeypatch)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"error: {BEST}: the best checkpoint is damaged: array "
    assert lines[0].startswith(prefix), lines[0]
    array, rest = lines[0][len(prefix):].split(" ", 1)
    assert "".join(f"['{k}']" for k in array.split(".")) in reference["best"][TOTAL_STEPS], array
    assert rest.startswith("cannot be read (OUT_OF_RANGE: "), rest


def test_failed_restore_leaves_nothing_behind(tmp_path, reference, monkeypatch):
    """In process: the other reads of a failed orbax restore end quietly (no thread left, nothing
    reported to sys.unraisablehook later), and a whole checkpoint then restores exactly."""
    import jax
    from jaxsft import checkpoint, runs
    d = copy_run(reference, tmp_path)
    step_dir = os.path.join(d, BEST)
    os.remove(os.path.join(step_dir, "checksums.json"))  # so that orbax itself fails mid-restore
    truncate(step_dir, data_file(step_dir))
    gc.collect()  # earlier tests' debris first: pytest puts back its own hook for each test, so
    # theirs would reach `reported` if a collection ran before this test's first read wraps it
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    threads = set(threading.enumerate())
    for _ in range(3):
        with pytest.raises(checkpoint.DamagedCheckpoint, match="cannot be read"):
            runs.restore(os.path.join(d, "run"))
    def new_threads():
        gc.collect()
        return [t for t in threading.enumerate() if t not in threads and t.is_alive()]

    deadline = time.time() + 5  # they end on their own; on a loaded machine that took over 0.5 s once
    while new_threads() and time.time() < deadline:
        time.sleep(0.1)
    assert new_threads() == []
    # (what names another test's directory came from that test's reads, collected during this one)
    def elsewhere(u):
        return str(tmp_path.parent) in str(u.exc_value) and str(tmp_path) not in str(u.exc_value)
    assert [u for u in reported if not elsewhere(u)] == []
    params, _, _ = runs.restore(reference["runs"].path())
    leaves = sorted(np.asarray(a).tobytes() for a in jax.tree.leaves(params))
    assert leaves == sorted(a.tobytes() for a in reference["best"][TOTAL_STEPS].values())


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
def test_resume_falls_back_from_a_damaged_newest_state(tmp_path, cache, reference, checksums):
    d = copy_run(reference, tmp_path)
    r = Runs(d, cache)
    newest = r.path("latest", str(TOTAL_STEPS))
    if not checksums:  # saved before checksums.json existed: orbax's read fails, the same fallback follows
        os.remove(os.path.join(newest, "checksums.json"))
    problem = truncate(newest, data_file(newest))
    p = r.run("--resume")
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    if checksums:
        assert lines == [f"warning: run/latest/{TOTAL_STEPS} is unreadable ({problem}), so it is removed; "
                         f"resuming from run/latest/20"]
    else:
        assert len(lines) == 1 and lines[0].startswith(f"warning: run/latest/{TOTAL_STEPS} is unreadable (array state.")
        assert lines[0].endswith("), so it is removed; resuming from run/latest/20"), lines[0]
    assert "resumed run at step 20 " in p.stdout
    assert_same_as_reference(r, reference, 20)  # latest/24 written again, bit for bit


def test_resume_with_every_state_damaged_stops_with_one_line(tmp_path, cache, reference, capsys, monkeypatch):
    d = copy_run(reference, tmp_path)
    r = Runs(d, cache, write=False)
    problems = {s: remove(r.path("latest", str(s)), data_file(r.path("latest", str(s)))) for s in (20, TOTAL_STEPS)}
    before = snapshot(d)
    monkeypatch.chdir(d)
    code, _, err = run_main("train", [*r.args, "--resume"], capsys, monkeypatch)  # bin/train, in this process
    assert code == 2, err
    assert err.splitlines() == [
        f"error: run/latest/{TOTAL_STEPS}: the saved training state is damaged: {problems[TOTAL_STEPS]}; "
        f"run/latest/20 before it is damaged too: {problems[20]}"]
    assert snapshot(d) == before  # nothing removed: there is nothing to resume from


# python full_disk.py REPO HOOK STEP bin/train-args...: the save of latest/STEP finds the disk full;
# test_reliability's driver.py (hook "none") then runs bin/train
FULL_DISK = r'''
import errno, os, sys, runpy
repo, hook, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
import orbax.checkpoint as ocp
from jaxsft import checkpoint
FULL = {
    "oserror": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # as tensorstore reports a full disk (seen on a full tmpfs)
    "tensorstore": ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/_sharding": Failed writing: '
                              '"/x/_sharding.__lock": Failed to write 5059 bytes to file 5: No space left on device'),
}
if hook in FULL:  # the save fails as it starts
    save = ocp.CheckpointManager.save
    def hooked(self, step, *a, **k):
        if self.directory.name == "latest" and step == at:
            raise FULL[hook]
        return save(self, step, *a, **k)
    ocp.CheckpointManager.save = hooked
elif hook == "at_commit":  # its last write, in orbax's save thread, fails
    write = checkpoint.write_checksums
    def hooked(step_dir):
        if os.path.basename(os.path.dirname(step_dir)) == "latest" and os.path.basename(step_dir).startswith(f"{at}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(step_dir, "checksums.json"))
        write(step_dir)
    checkpoint.write_checksums = hooked
elif hook != "none":
    raise SystemExit(f"unknown hook {hook}")
sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "driver.py"), repo, "none", "0"] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


class FullDiskRuns(Runs):
    def __init__(self, d, cache):
        super().__init__(d, cache)
        with open(os.path.join(self.d, "full_disk.py"), "w") as f:
            f.write(FULL_DISK)

    def cmd(self, *extra, hook=("none", 0)):
        return [sys.executable, os.path.join(self.d, "full_disk.py"), REPO, hook[0], str(hook[1]), *T, *extra]


@pytest.mark.parametrize("hook", ["oserror", "tensorstore", "at_commit"])
def test_full_disk_exits_1_with_one_line_and_keeps_the_checkpoints(tmp_path, cache, reference, hook):
    """The save of latest/12 (after best/12's) finds the disk full."""
    from jaxsft import checkpoint, runs
    r = FullDiskRuns(tmp_path, cache)
    p = r.run(hook=(hook, 12))
    assert p.returncode == 1, p.stderr
    assert p.stderr.splitlines() == [
        "error: run/latest: No space left on device; the last complete checkpoints in run are kept"]
    assert steps(r.path("latest")) == [5, 10] and steps(r.path("best")) == [12]
    for d, s in (("latest", 5), ("latest", 10), ("best", 12)):
        assert checkpoint.verify(r.path(d, str(s)), "x") is True
        assert len(load_tree(r.path(d), s)) >= 10
    assert runs.restore(r.path())[1].d_model == 32
    if hook == "at_commit":  # with room again, --resume ends exactly where an uninterrupted run does
        p = r.run("--resume")
        assert p.returncode == 0, p.stderr
        assert "resumed run at step 10 " in p.stdout
        assert_same_as_reference(r, reference, 10)
