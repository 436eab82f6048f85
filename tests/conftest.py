"""Shared fixtures: tiny Q/A rows and config files, and one tiny model trained
end to end with bin/train (session-scoped `trained_run`, reused by the CLI tests).

Everything is written under pytest's tmp dirs; nothing reads ../shared or data/.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# tests use tiny models, so compiling is most of their time: XLA's cheapest backend
# optimisation compiles about 3x faster on CPU and runs them about as fast, and XLA's older
# loop emitters compile the quick tier's programs in about two thirds of the time of the new
# fusion emitters (quick tier 57-62 s against 80-95 s, cold cache, session 8); and one LLVM
# module a program instead of XLA's split for parallel code generation, which these small programs
# do not gain from (7-12% less CPU on test_train + test_engine + test_model, session 13). Set
# before JAX starts; subprocesses inherit it.
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
             "--xla_cpu_parallel_codegen_split_count=1"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

# exact numerics on a GPU too: its default TF32 matmuls are ~1e-3 off f32, which the
# tolerance checks here would mistake for bugs (no effect on CPU)
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# train.dtype auto is float32 here on every CPU (an AMX CPU would pick bfloat16), so that the
# tests' exact figures do not depend on the machine; test_train.py checks auto's choice itself
os.environ.setdefault("JAXSFT_AUTO_DTYPE", "float32")

# the programs the tests start (bin/train, bin/chat, drivers that import jaxsft first) would
# restart themselves for huge pages (cli.huge_pages), paying the interpreter and any JAX import
# twice; test_huge_pages.py clears this to check the restart itself
os.environ.setdefault("JAXSFT_HUGE_PAGES", "0")

# the programs run with buffered output, as a user's do: CI's machines set PYTHONUNBUFFERED=1, which
# hid that a SIGKILLed bin/train lost its last printed lines (the trainer now flushes each one)
os.environ.pop("PYTHONUNBUFFERED", None)

# bytecode written as usual (these machines set PYTHONDONTWRITEBYTECODE=1): the workers' rewritten
# test modules and the programs' jaxsft imports compile once, not in every process (2.3 s a worker)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# datasets' cache (the data files it converts to Arrow, jaxsft's map steps: datasets_io.py) in a
# directory of this session, not the user's ~/.cache; set before datasets is imported, by the
# process that starts the session (xdist's workers inherit it), which removes it at the end
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

# the collector's young generations 70x and full collections 10x less often than Python's defaults,
# from before the test modules import (see pytest_collection_finish)
gc.set_threshold(50_000, 20, 100)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # plain `pytest` (not `python -m pytest`) from any directory
    sys.path.insert(0, REPO)

# a few distinct question/answer pairs; the trained tiny model must reproduce each answer exactly
QA = [
    ("什么是机器学习？", "让计算机从数据中学习规律。"),
    ("你好", "你好！有什么可以帮你？"),
    ("1+1等于几？", "等于2。"),
    ("天空是什么颜色？", "晴天是蓝色的。"),
]

# the tiny run: small enough to train in seconds, big enough to memorise QA
TINY_YAML = """\
model:
  max_seq_len: 64
  d_model: 64
  n_heads: 4
  n_layers: 1
  d_ff: 128
  dropout: 0.0
data:
  train: {train}
  val: {val}
  test: null
train:
  batch_size: 8
  epochs: 8
  lr: 3.0e-3
  weight_decay: 0.0
  warmup_steps: 10
  max_grad_norm: 1.0
  seed: 0
  sample_questions: 0
  buckets: [32, 64]
out_dir: {out}
"""
TINY_REPEATS = 50  # 4 pairs x 50 = 200 rows = 25 steps per epoch (few evaluations)
TINY_STEPS = 150


def read_events(run_dir) -> tuple[dict, list]:
    """What TensorBoard shows of a run: its own reader (EventAccumulator, which drops the steps
    a restarted session replaces) on run_dir/tensorboard. Returns ({tag: [(step, value)]},
    [(step, config text)])."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(str(run_dir), "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = [(e.step, e.tensor_proto.string_val[0].decode("utf-8")) for e in acc.Tensors("config/text_summary")]
    return scalars, texts


def assert_events_are_metrics(run_dir) -> dict:
    """TensorBoard's scalars of a run are its metrics.jsonl: tag for tag (each key of a record
    whose value is a number; `best`, a flag, is none), step for step in order, none twice, and
    value for value with no tolerance beyond float32's rounding: an event holds a float32, so
    each value read back must be exactly the JSON value rounded to float32 (a relative error of
    at most 2^-24; anything else, e.g. a value of another step or row, fails). Returns the scalars."""
    import numpy as np
    expected = {}
    with open(os.path.join(str(run_dir), "metrics.jsonl"), encoding="utf-8") as f:
        for r in map(json.loads, f):
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    expected.setdefault(k, []).append((r["step"], float(np.float32(v))))
    scalars, _ = read_events(run_dir)
    assert expected and sorted(scalars) == sorted(expected)
    for tag in expected:
        assert scalars[tag] == expected[tag], tag
    return scalars


def write_jsonl(path, pairs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            f.write(json.dumps({"instruction": q, "response": a}, ensure_ascii=False) + "\n")
    return str(path)


def run_script(name: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs bin/<name> with this interpreter; returns the completed process (text output)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8", PYTHONPATH=REPO)  # this checkout's jaxsft
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", name), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_main(name: str, args, capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of bin/<name> args run in this process: main() under
    cli.main_guard as the program runs it, without a new interpreter and JAX import (0 when
    main() returns)."""
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        importlib.import_module(f"jaxsft.cli.{name}").main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def jitted_vjp(f, args, g):
    """f's cotangents at args (a tuple) for the output cotangent g, as one compiled program: a
    reference computed op by op compiles a program per op and shape."""
    import jax
    return jax.jit(lambda a, g: jax.vjp(f, *a)[1](g))(tuple(args), g)


def one_line_error(code: int, err: str, *fragments) -> str:
    """Asserts a user's mistake's contract: exit status 2, one line 'error: ...' on stderr
    holding each fragment, no traceback. Returns the line."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def qa():
    """The question/answer pairs, as a list of (question, answer)."""
    return list(QA)


def write_tiny_config(tmp, out_dir, train_pairs=None, val_pairs=None) -> str:
    """Writes train/val JSONL and the tiny YAML under `tmp`; returns the YAML path."""
    train = write_jsonl(os.path.join(tmp, "train.jsonl"), train_pairs if train_pairs is not None
                        else QA * TINY_REPEATS)
    val = write_jsonl(os.path.join(tmp, "val.jsonl"), val_pairs if val_pairs is not None else QA)
    path = os.path.join(tmp, "tiny.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(TINY_YAML.format(train=json.dumps(train), val=json.dumps(val), out=json.dumps(str(out_dir))))
    return path


def once_per_session(tmp_path_factory, name: str, build) -> tuple[str, dict]:
    """build(dir) -> a JSON-able dict, run once for the whole test session: under xdist each
    worker has its own session fixtures, so the first worker to ask builds, under a file lock,
    in the temp dir its workers share, and the others wait and read the result. A failed build
    is retried by the next worker that asks. Returns (dir, build's result); dir is shared:
    read it, never write it."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # workers': <session>/popen-gwN
    d, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            done.with_suffix(".tmp").write_text(json.dumps(build(str(d))), encoding="utf-8")
            done.with_suffix(".tmp").rename(done)
        return str(d), json.loads(done.read_text(encoding="utf-8"))


def _train_tiny(tmp) -> dict:
    run_dir = os.path.join(tmp, "run")
    config = write_tiny_config(tmp, run_dir)
    # packed rows (about 3 rows of 64 tokens per step) and exact match on the 4 val rows at each evaluation
    # and data.test: the 4 val rows again, scored with the best checkpoint at the end
    proc = run_script("train", "--config", config, "--set", f"train.max_steps={TINY_STEPS}", "--set",
                      "train.pack_len=64", "--set", "train.eval_exact=4", "--set",
                      f"data.test={os.path.join(tmp, 'val.jsonl')}", "--no-progress", timeout=300)
    assert proc.returncode == 0, f"bin/train failed:\n{proc.stdout}\n{proc.stderr}"
    return {"run_dir": run_dir, "config": config, "rows": os.path.join(tmp, "val.jsonl"),
            "proc": [proc.args, proc.returncode, proc.stdout, proc.stderr]}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny model trained with bin/train to memorise QA, once per session (xdist workers
    share it: `once_per_session`). Returns a dict with run_dir, config (YAML path), rows (the
    val JSONL) and the bin/train process."""
    _, run = once_per_session(tmp_path_factory, "tiny_run", _train_tiny)
    return {**run, "proc": subprocess.CompletedProcess(*run["proc"])}


def share_compilation_cache(config) -> None:
    """One persistent JAX compilation cache for the session: this process, its xdist workers
    and every program the tests start (they inherit the environment) read and write it, so a
    program compiled once, by any of them, loads from disk after. It lives in pytest's cache
    (.pytest_cache/d/), kept between sessions (a few MB). No size bound: with one, JAX rescans
    the whole directory at every write. A read that races another process's write (xdist)
    fails to load and compiles instead, with a warning. A cache the user set
    (JAX_COMPILATION_CACHE_DIR) is kept."""
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider: a per-session dir
    path = str(cache.mkdir("jax-compilation-cache")) if cache is not None else tempfile.mkdtemp(prefix="jax-cache-")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny models compile fast
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "jax" in sys.modules:  # a plugin imported JAX before this ran: it read the environment already
        import jax
        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    share_compilation_cache(config)
    # orbax 0.12's background asyncio runner sometimes schedules on its loop after the loop
    # has closed, when a finished CheckpointManager is garbage collected; harmless, and
    # reported at whichever test happens to be running then
    config.addinivalue_line(
        "filterwarnings", r"ignore:(?s).*RuntimeError. Event loop is closed:pytest.PytestUnraisableExceptionWarning")


# The files that take longest go to the workers first, so that none is left running one long file
# while the others wait (xdist hands out whole files, --dist loadfile, in collection order with
# --no-loadscope-reorder, the next one to a worker with two tests or fewer left); the rest keep
# pytest's order after these. test_damaged_checkpoints.py stays out of the full list: begun beside
# test_reliability.py it waits for the reference run that one builds. Ordered by each file's summed
# test time from a cold cache: the full list in session 14 (test_lora 111 s, test_reliability 78 s, ...
# test_configs 8.5 s; the last file had left the other worker idle 12 s), the quick one by each
# file's CPU in session 16 (test_lora, with the rest of its TOGETHER group 36 s, test_head 17 s, ...).
LONGEST_QUICK = ("test_lora.py", "test_head.py", "test_engine.py", "test_train.py", "test_attention.py",
                 "test_model.py", "test_decode.py", "test_dpo.py", "test_datasets_io.py", "test_server_faults.py")
LONGEST_FULL = ("test_lora.py", "test_reliability.py", "test_families.py", "test_hf.py", "test_dpo.py",
                "test_server.py", "test_attention.py", "test_head.py", "test_pretrain.py", "test_parallel.py",
                "test_train.py", "test_multihost.py", "test_preference_eval.py", "test_model.py", "test_configs.py")


# Files whose tests share a heavy import run on one worker, as one unit of xdist's scheduling: torch
# and transformers (their import and the first use of transformers' model classes cost a worker
# ~4 s of CPU), openai's client. Each worker collects every file, so these files import them lazily
# (`lazy_import`): only the worker that runs the group pays.
TOGETHER = {"test_lora.py": "torch", "test_families.py": "torch", "test_hf.py": "torch", "test_templates.py": "torch",
            "test_server.py": "openai", "test_serve_guard.py": "openai"}


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile (pyproject's), but each group of TOGETHER is one unit (at its first file's
    place in the order); another --dist is xdist's own."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return TOGETHER.get(os.path.basename(path), path)
    return Scheduling(config, log)


class lazy_import:
    """A module imported at its first attribute (pytest.importorskip: the test asking skips where it
    is missing), not when its test file is collected (TOGETHER)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr):
        if attr.startswith("_") or attr == "pytestmark":  # what collection asks of a module's names
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self.name), attr)


def pytest_collection_finish(session):
    """Everything imported by now (the test modules and theirs: JAX, flax, orbax) is
    moved out of the cyclic collector's sight (gc.freeze), with the thresholds set above. With
    Python's defaults a quick-tier worker spent ~6.6 s in about 17 full collections of ~0.33 s
    each, 1.3-2 s after this (measured with gc.callbacks, session 14)."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    """An xdist worker, done, hides its heap from the collector before it exits: pytest's
    end-of-session collections (5 full passes, for the unraisable exceptions of garbage cycles) and
    the interpreter's last one would otherwise scan it all, ~3.8 s and ~2.3 s of a quick-tier
    worker's exit; a worker has sent its last report by now, so those passes could report nothing
    (timestamps of the workers' hooks and exits, session 14). The main process keeps them."""
    if hasattr(config, "workerinput"):
        gc.freeze()


def pytest_collection_modifyitems(config, items):
    if shutil.which("nvidia-smi") is None:  # no GPU here: its tests are deselected, not skipped (CI fails on a skip)
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    quick = "not slow" in (config.getoption("markexpr") or "")
    rank = {name: i for i, name in enumerate(LONGEST_QUICK if quick else LONGEST_FULL)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
