"""Reliability: a user's mistakes and their machine's.

- bad data, config and chat input: exit status 2, one line on stderr naming the
  file, line (or key) and the problem, no traceback, nothing written;
- SIGKILL at the worst moments (between the best and the latest checkpoint of a
  step; with a checkpoint fully written but not yet committed; at a random
  moment) and Ctrl-C leave readable checkpoints, and `--resume` ends with
  bitwise the parameters, optimizer state and metrics of an uninterrupted run;
- two runs under other str hash salts (PYTHONHASHSEED) are bitwise alike;
- a non-finite loss stops the run naming the step, keeping the last good
  checkpoints; chat input never crashes; nothing a user loads is a pickle.

Every training run is the same tiny config (24 steps, evaluations at the ends of
epochs 12 and 24, latest state every 5 steps); the runs share a persistent JAX
compilation cache so only the first one compiles. The tests that start processes
are marked slow (pytest -m "not slow" runs the in-process ones only).
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_events_are_metrics, once_per_session, read_events, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# line numbers matter: error messages are checked against them
YAML = """\
model:
  max_seq_len: 64
  d_model: 32
  n_heads: 2
  n_layers: 1
  d_ff: 64
  dropout: 0.1
data:
  train: train.jsonl
  val: val.jsonl
  test: null
train:
  batch_size: 4
  epochs: 2
  lr: 1.0e-3
  warmup_steps: 4
  eval_every: 0
  save_every: 5
  seed: 3
  sample_questions: 0
  buckets: [64]
out_dir: run
"""
TOTAL_STEPS = 24  # 48 rows / batch 4 = 12 steps per epoch, 2 epochs
SAVES = (5, 10, 12, 15, 20, 24)  # the training state is saved every 5 steps and at each evaluation


def kept_latest(newest: int, start: int = 0, saves=SAVES) -> list[int]:
    """latest/'s steps once a run that began at `start` (0, or the step it resumed at) has saved
    step `newest`: the newest two (the older is what a damaged newest one falls back to)."""
    return (([start] if start else []) + [s for s in saves if start < s < newest] + [newest])[-2:]


def _row(i: int) -> dict:
    a, b = 3 + i % 17, 5 + (7 * i) % 23
    return {"instruction": f"{a}加{b}等于多少？", "response": f"{a}加{b}等于{a + b}。"}


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# the seed's files start with a UTF-8 BOM and may hold blank lines: both are fine
TRAIN = "\ufeff" + _jsonl(_row(i) for i in range(24)) + "\n" + _jsonl(_row(i) for i in range(24, 48)) + "\n\n"
VAL = _jsonl(_row(i) for i in range(100, 108))


def write_inputs(d, **overrides) -> None:
    files = {"tiny.yaml": YAML, "train.jsonl": TRAIN, "val.jsonl": VAL, **overrides}
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(os.path.join(d, name), mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(content)


def snapshot(d) -> dict:
    """Every path under d with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------
# bad inputs, in-process through the scripts' main() (the jax import is paid once)

def script(name):
    """The module behind bin/<name> (its main() is wrapped by cli.main_guard)."""
    return importlib.import_module(f"jaxsft.cli.{name}")


def _replace(text, old, new):
    assert old in text, old
    return text.replace(old, new)


def _fake_run(d):
    """A run directory with config.json and tokenizer.json but no checkpoint."""
    from jaxsft import config, tokenizer
    os.makedirs(os.path.join(d, "norun"))
    tok = tokenizer.Tokenizer("0123456789")
    tok.save(os.path.join(d, "norun", "tokenizer.json"))
    cfg = config.Config(model=config.ModelConfig(vocab_size=len(tok), max_seq_len=64, d_model=32, n_heads=2,
                                                 n_layers=1, d_ff=64))
    with open(os.path.join(d, "norun", "config.json"), "w") as f:
        json.dump(config.to_dict(cfg), f)


Y = YAML
T = ["--config", "tiny.yaml", "--no-progress"]
BAD_INPUTS = [
    # (id, script, args, files to write, setup, substrings of the error line)
    ("config-missing", "train", ["--config", "nope.yaml"], {}, None, ["nope.yaml: config file not found"]),
    ("config-unknown-key", "train", T, {"tiny.yaml": _replace(Y, "  lr: 1.0e-3", "  learning_rate: 1.0e-3")},
     None, ["tiny.yaml:15: train.learning_rate: unknown key"]),
    ("config-unknown-section", "train", T, {"tiny.yaml": _replace(Y, "train:\n", "trian:\n")}, None,
     ["tiny.yaml:12: trian: unknown section"]),
    ("config-mistyped-int", "train", T, {"tiny.yaml": _replace(Y, "batch_size: 4", "batch_size: four")}, None,
     ["tiny.yaml:13: train.batch_size: expected an integer, got 'four'"]),
    ("config-mistyped-float", "train", T, {"tiny.yaml": _replace(Y, "lr: 1.0e-3", "lr: fast")}, None,
     ["tiny.yaml:15: train.lr: expected a number, got 'fast'"]),
    ("config-lr-zero", "train", T, {"tiny.yaml": _replace(Y, "lr: 1.0e-3", "lr: 0")}, None,
     ["tiny.yaml:15: train.lr: must be positive, got 0.0"]),
    ("config-lr-negative", "train", T, {"tiny.yaml": _replace(Y, "lr: 1.0e-3", "lr: -1e-3")}, None,
     ["tiny.yaml:15: train.lr: must be positive, got -0.001"]),
    ("config-lr-nan", "train", T, {"tiny.yaml": _replace(Y, "lr: 1.0e-3", "lr: .nan")}, None,
     ["tiny.yaml:15: train.lr: expected a finite number"]),
    ("config-batch-zero", "train", T, {"tiny.yaml": _replace(Y, "batch_size: 4", "batch_size: 0")}, None,
     ["tiny.yaml:13: train.batch_size: must be positive, got 0"]),
    ("config-length-negative", "train", T, {"tiny.yaml": _replace(Y, "max_seq_len: 64", "max_seq_len: -64")},
     None, ["tiny.yaml:2: model.max_seq_len: must be positive, got -64"]),
    ("config-heads-not-dividing", "train", T, {"tiny.yaml": _replace(Y, "n_heads: 2", "n_heads: 3")}, None,
     ["tiny.yaml:4: model.n_heads: n_heads=3 does not divide d_model=32"]),
    ("config-invalid-yaml", "train", T, {"tiny.yaml": _replace(Y, "  d_ff: 64", "  d_ff: [64")}, None,
     ["tiny.yaml:", "invalid YAML"]),
    ("config-not-utf8", "train", T, {"tiny.yaml": Y.encode() + b"# \xff\n"}, None,
     ["tiny.yaml:23: not valid UTF-8 (byte 0xff)"]),
    ("set-no-such-key", "train", T + ["--set", "train.learnin_rate=0.1"], {}, None,
     ["--set train.learnin_rate: no such key in section train"]),
    ("set-no-such-section", "train", T + ["--set", "optim.lr=0.1"], {}, None, ["--set optim.lr: no such key"]),
    ("set-no-value", "train", T + ["--set", "train.lr"], {}, None, ["--set train.lr: expected key=value"]),
    ("set-bad-value", "train", T + ["--set", "train.epochs=-1"], {}, None,
     ["<no line>", "train.epochs: must be positive, got -1"]),
    ("set-pack-len-negative", "train", T + ["--set", "train.pack_len=-128"], {}, None,
     ["<no line>", "train.pack_len: must not be negative, got -128"]),
    ("set-focus-no-category", "train", T + ["--set", "train.focus_steps=5"], {}, None,
     ["<no line>", "train.focus_steps: 5 focus steps need train.focus_categories"]),
    ("set-epochs-null-no-budget", "train", T + ["--set", "train.epochs=null"], {}, None,
     ["<no line>", "train.epochs: null (train for max_steps) needs train.max_steps"]),
    ("set-tensorboard-not-bool", "train", T + ["--set", "train.tensorboard=1"], {}, None,
     ["--set train.tensorboard: expected true or false, got 1"]),
    ("set-data-path-missing", "train", T + ["--set", "data.val=nope.jsonl"], {}, None,
     ["nope.jsonl: file not found"]),
    ("set-init-from-missing", "train", T + ["--set", "model.init_from=nowhere"], {}, None,
     ["nowhere: no such run directory"]),
    ("data-missing", "train", T, {"tiny.yaml": _replace(Y, "train: train.jsonl", "train: missing.jsonl")}, None,
     ["missing.jsonl: file not found"]),
    ("data-not-json", "train", T, {"train.jsonl": TRAIN.replace('"}\n', '"\n', 1)}, None,
     ["train.jsonl:1: not valid JSON"]),
    ("data-not-object", "train", T, {"val.jsonl": VAL + '["a", "b"]\n'}, None,
     ["val.jsonl:9: expected a JSON object, got list"]),
    ("data-missing-response", "train", T, {"train.jsonl": TRAIN + '{"instruction": "问"}\n'}, None,
     ["train.jsonl:52: missing 'response'"]),
    ("data-missing-instruction", "train", T, {"train.jsonl": '{"question": "问", "response": "答"}\n'}, None,
     ["train.jsonl:1: missing 'instruction' (or 'messages')"]),
    ("data-non-string", "train", T, {"train.jsonl": '{"instruction": 12, "response": "答"}\n'}, None,
     ["train.jsonl:1: 'instruction' must be a string"]),
    ("data-empty-answer", "train", T, {"train.jsonl": '\n{"instruction": "问", "response": "  "}\n'}, None,
     ["train.jsonl:2: empty 'response'"]),
    ("messages-unknown-role", "train", T,
     {"train.jsonl": '{"messages": [{"role": "human", "content": "问"}, {"role": "assistant", "content": "答"}]}\n'},
     None, ["train.jsonl:1: messages[0] has unknown role 'human'"]),
    ("messages-no-assistant", "train", T, {"train.jsonl": '{"messages": [{"role": "user", "content": "问"}]}\n'},
     None, ["train.jsonl:1: messages has no assistant answer"]),
    ("messages-not-alternating", "train", T,
     {"train.jsonl": '{"messages": [{"role": "user", "content": "问"}, {"role": "user", "content": "又问"}, '
                     '{"role": "assistant", "content": "答"}]}\n'},
     None, ["train.jsonl:1: messages must alternate user/assistant"]),
    ("data-invalid-utf8", "train", T, {"train.jsonl": TRAIN.encode("utf-8") + b'{"instruction": "\xe4\xb8", '
                                                                             b'"response": "x"}\n'}, None,
     ["train.jsonl:52: not valid UTF-8 (byte 0xe4)"]),
    ("data-lone-surrogate", "train", T, {"val.jsonl": '{"instruction": "\\ud800", "response": "x"}\n'}, None,
     ["val.jsonl:1: a \\u escape encodes half a surrogate pair"]),
    ("data-empty-file", "train", T, {"train.jsonl": "\ufeff\n\n"}, None, ["train.jsonl: no rows (the file is empty)"]),
    ("data-nothing-fits", "train", T + ["--set", "model.max_seq_len=16"], {}, None,
     ["train.jsonl: no row fits max_seq_len=16"]),
    ("resume-nothing", "train", T + ["--resume"], {}, None, ["run: nothing to resume"]),
    ("train-corpus-config", "train", T + ["--set", "data.corpus=corpus"], {}, None,
     ["tiny.yaml: data.corpus is set, which makes this a pretraining config; run it with bin/pretrain"]),
    ("run-exists", "train", T, {}, lambda d: os.makedirs(os.path.join(d, "run", "latest")),
     ["run: already holds a run; pass --resume"]),
    ("chat-no-run", "chat", ["--checkpoint", "nowhere", "你好"], {}, None, ["nowhere: no such run directory"]),
    ("chat-empty-question", "chat", ["--checkpoint", "nowhere", "   "], {}, None, ["the question is empty"]),
    ("chat-bad-file-row", "chat", ["--checkpoint", "nowhere", "--file", "train.jsonl"],
     {"train.jsonl": '{"instruction": "问"}\n{"instruction": ""}\n'}, None, ["train.jsonl:2: empty 'instruction'"]),
    ("chat-bad-option", "chat", ["--checkpoint", "nowhere", "--max-new-tokens", "0", "你好"], {}, None,
     ["--max-new-tokens and --batch-size must be positive"]),
    ("chat-no-checkpoint", "chat", ["--checkpoint", "norun", "你好"], {}, _fake_run,
     ["norun/best: holds no checkpoint"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    name, prog, args, files, setup, expected = case
    write_inputs(tmp_path, **files)
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(str(tmp_path))
    before = snapshot(tmp_path)
    code, out, err = run_main(prog, args, capsys, monkeypatch)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for s in expected:
        if s == "<no line>":  # an override names the key, not a line of the file
            assert "tiny.yaml:" not in lines[0], lines[0]
        else:
            assert s in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing written, not even the run directory


def run_ok(name, args, capsys, monkeypatch):
    """(stdout, stderr) of bin/<name> args run in this process, which must succeed."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    capsys.readouterr()
    script(name).main()
    return capsys.readouterr()


@pytest.mark.slow
def test_a_curriculum_of_absent_categories_is_skipped_and_resume_warns_of_changes(tmp_path, capsys, monkeypatch):
    """configs/default.yaml's curriculum names categories of data/; on a user's rows without
    them the run trains after a one-line note. --resume with another lr, max_steps or
    model.attention says that the run will differ from an uninterrupted one (train.remat,
    bitwise the same, goes without a word; train.tensorboard, which changes no step, neither:
    the first session wrote no events, the resumed one writes its own)."""
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    focus = ["--set", "train.focus_categories=[字符串,算术]", "--set", "train.focus_steps=5"]
    out, err = run_ok("train", T + focus + ["--set", "train.max_steps=3", "--set", "train.tensorboard=false"],
                      capsys, monkeypatch)
    assert not os.path.exists("run/tensorboard")
    assert [l for l in err.splitlines() if "focus" in l] == [
        "note: train.focus_categories: train.jsonl has no row of category '字符串', '算术'; the curriculum is skipped"]
    assert "curriculum" not in out and "done: 3 steps" in out
    with open("run/metrics.jsonl") as f:
        assert [json.loads(l)["step"] for l in f if '"loss"' in l] == [1, 2, 3]
    out, err = run_ok("train", T + focus + ["--set", "train.max_steps=4", "--set", "train.lr=2e-3", "--set",
                                            "model.attention=blockwise", "--set", "train.remat=block", "--resume"],
                      capsys, monkeypatch)
    assert [l for l in err.splitlines() if l.startswith("warning")] == [
        "warning: model.attention was auto in run, is blockwise now: the resumed run will not match an "
        "uninterrupted one",
        "warning: train.max_steps was 3 in run, is 4 now: the resumed run will not match an uninterrupted one",
        "warning: train.lr was 0.001 in run, is 0.002 now: the resumed run will not match an uninterrupted one"]
    assert "resumed run at step 3" in out and "done: 4 steps" in out
    scalars, texts = read_events("run")
    assert {s for series in scalars.values() for s, _ in series} == {4} and [s for s, _ in texts] == [4]


def test_rows_too_long_are_dropped_with_one_warning(tmp_path, capsys, monkeypatch):
    """Rows whose answer cannot start within max_seq_len are counted in one warning."""
    from jaxsft import config, parallel, setup
    long_q = {"instruction": "长" * 80, "response": "答"}
    write_inputs(tmp_path, **{"train.jsonl": TRAIN + _jsonl([long_q] * 3), "val.jsonl": VAL + _jsonl([long_q])})
    monkeypatch.chdir(tmp_path)
    cfg = config.load_config("tiny.yaml")
    msgs = []
    prepared = setup.prepare(cfg, parallel.one_device_mesh(), log=lambda *a, **k: msgs.append(" ".join(map(str, a))))
    train_ex, val_ex = prepared.train_examples, prepared.val_examples
    assert (len(train_ex), len(val_ex)) == (48, 8)
    warnings = [m for m in msgs if m.startswith("warning")]
    assert warnings == ["warning: dropped 3 training and 1 validation rows whose answer does not fit "
                        "max_seq_len=64"]


def test_config_accepts_bom_blank_lines_and_exponents(tmp_path):
    """A BOM, `1e-3` (a string to YAML 1.1) and `--set train.lr=2e-4` are all fine."""
    from jaxsft import config
    p = tmp_path / "c.yaml"
    p.write_text("\ufeff" + _replace(YAML, "lr: 1.0e-3", "lr: 1e-3") + "\n\n", encoding="utf-8")
    assert config.load_config(str(p)).train.lr == 1e-3
    assert config.load_config(str(p), ["train.lr=2e-4"]).train.lr == 2e-4


@pytest.mark.slow
def test_bad_input_in_a_real_process(tmp_path):
    """The same failure end to end: exit status 2, one line, no traceback."""
    write_inputs(tmp_path, **{"train.jsonl": TRAIN + "{oops\n"})
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bin", "train"), *T], cwd=tmp_path,
                          env=_env(None), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.jsonl:52: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# training runs in subprocesses: kills, Ctrl-C, resume


def _env(cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8", PYTHONPATH=REPO)  # this checkout's jaxsft
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


# bin/train with test-only hooks: python DRIVER REPO HOOK STEP bin/train-args...
# curves.png is not drawn (matplotlib takes seconds per evaluation on a busy machine
# and has nothing to do with checkpoints); everything else is bin/train itself
DRIVER = r'''
import os, signal, sys, runpy
import numpy as np
repo, hook, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
from jaxsft import batching, checkpoint
try:
    import jaxsft.plots
    jaxsft.plots.write_curves = lambda run_dir: None
except ImportError:
    pass
if "TEST_HEAD_MIN_LOGITS" in os.environ:  # train.head_chunk on at the tiny config's vocabulary
    import jaxsft.head
    jaxsft.head.MIN_LOGITS = int(os.environ["TEST_HEAD_MIN_LOGITS"])

plan_batch = batching.RunPlan.batch  # the seam: the batch of global step s (prepared one step ahead)
if hook == "none":
    pass
elif hook in ("sigint_at", "sigterm_at", "sigkill_at"):  # a signal while step `at` runs: mid-run, never after it
    sig = {"sigint_at": signal.SIGINT, "sigterm_at": signal.SIGTERM, "sigkill_at": signal.SIGKILL}[hook]
    def hooked(self, step):
        if step == at:
            os.kill(os.getpid(), sig)
        return plan_batch(self, step)
    batching.RunPlan.batch = hooked
elif hook == "kill_before_latest":  # step `at` has its best checkpoint and metrics, not its latest state
    save_latest = checkpoint.RunCheckpoints.save_latest
    def hooked(self, step, state):
        if step == at:
            self.best.wait_until_finished()  # the moment right after best/<at> is committed
            os.kill(os.getpid(), signal.SIGKILL)
        save_latest(self, step, state)
    checkpoint.RunCheckpoints.save_latest = hooked
elif hook == "kill_before_commit":  # latest/<at> is fully written to orbax's tmp dir, not yet renamed
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def hooked(self, *a, **k):
        final = self.get_final()
        if final.name == str(at) and final.parent.name == "latest":
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = hooked
elif hook == "kill_after_timed_save":  # SIGKILL right after the first save made by the clock (save_every 0)
    import time
    from jaxsft import trainer
    save_due, save_latest = trainer.Trainer._save_due, trainer.Trainer.save_latest
    def due(self, done):
        self.timed = save_due(self, done)
        return self.timed
    def save(self, step):
        save_latest(self, step)
        if getattr(self, "timed", False):
            self.ckpt.latest.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.Trainer._save_due, trainer.Trainer.save_latest = due, save
    def slow(self, step):  # `at` ms a step, so the timer fires mid-run
        time.sleep(at / 1000)
        return plan_batch(self, step)
    batching.RunPlan.batch = slow
elif hook == "nan_at":  # the batch of step `at` (1-based) gets a NaN loss mask
    def hooked(self, step):
        b = plan_batch(self, step)
        return b.replace(loss_mask=b.loss_mask * np.float32("nan")) if step + 1 == at else b
    batching.RunPlan.batch = hooked
else:
    raise SystemExit(f"unknown hook {hook}")
sys.argv = [os.path.join(repo, "bin", "train")] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# the path a user of configs/default.yaml runs: rows packed with the system prompt computed once
# per batch (data.system_prompt is the default), the output head at answer positions only, exact
# match at each evaluation, and a curriculum: steps 1-14 on the 短 rows, then 2 epochs of all 48
# rows (evaluations at 26 and 38, the latest state every 5 steps)
PROD = ["--set", "train.pack_len=64", "--set", "train.eval_exact=4", "--set", "train.focus_categories=[短]",
        "--set", "train.focus_steps=14"]
PROD_STEPS = 38
PROD_SAVES = (5, 10, 15, 20, 25, 26, 30, 35, 38)  # every 5 steps and at each evaluation
PROD_TRAIN = _jsonl(dict(_row(i), category="短" if int(_row(i)["instruction"].split("加")[0]) < 10 else "长")
                    for i in range(48))


class Runs:
    """Starts bin/train (optionally under a hook) on the tiny config in one directory;
    prod: on the production path (PROD)."""

    def __init__(self, d, cache, prod=False, write=True):
        self.d, self.cache, self.args = str(d), cache, T + (PROD if prod else [])
        if write:  # write=False: a run directory already written (a shared reference)
            write_inputs(self.d, **({"train.jsonl": PROD_TRAIN} if prod else {}))
            with open(os.path.join(self.d, "driver.py"), "w") as f:
                f.write(DRIVER)

    def cmd(self, *extra, hook=("none", 0)):
        return [sys.executable, os.path.join(self.d, "driver.py"), REPO, hook[0], str(hook[1]), *self.args,
                *extra]

    def run(self, *extra, hook=("none", 0), timeout=300, env=None):
        return subprocess.run(self.cmd(*extra, hook=hook), cwd=self.d, env={**_env(self.cache), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def run_here(self, capsys, monkeypatch, *extra, min_logits=None):
        """bin/train's main() in this process (conftest.run_main), in the run's directory: a run no
        hook stops (a resumed run's end), without an interpreter and JAX import of its own.
        min_logits: the driver's TEST_HEAD_MIN_LOGITS. Returns a CompletedProcess, as run()."""
        if min_logits is not None:
            from jaxsft import head
            monkeypatch.setattr(head, "MIN_LOGITS", min_logits)
        monkeypatch.chdir(self.d)
        code, out, err = run_main("train", [*self.args, *extra], capsys, monkeypatch)
        return subprocess.CompletedProcess(["bin/train", *self.args, *extra], code, out, err)

    def path(self, *p):
        return os.path.join(self.d, "run", *p)


def steps(d) -> list[int]:
    """Committed checkpoint steps under an orbax manager directory."""
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def load_tree(d, step) -> dict:
    """A checkpoint's arrays as {path: numpy array}, read with orbax without a target."""
    import jax
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(d, str(step), "default"))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def cache():
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (conftest.share_compilation_cache)


def _reference(tmp_path_factory, cache, prod):
    """The uninterrupted run, once per session (test_damaged_checkpoints.py and xdist's
    workers share it: conftest.once_per_session), with its checkpoints loaded."""
    def build(d):
        proc = Runs(d, cache, prod).run()
        assert proc.returncode == 0, proc.stderr
        return {"stdout": proc.stdout}
    d, built = once_per_session(tmp_path_factory, "prod_reference" if prod else "reference", build)
    r = Runs(d, cache, prod, write=False)
    total, saves = (PROD_STEPS, PROD_SAVES) if prod else (TOTAL_STEPS, SAVES)
    assert steps(r.path("latest")) == kept_latest(total, saves=saves)
    with open(r.path("metrics.jsonl")) as f:
        metrics = f.read()
    assert len([l for l in metrics.splitlines() if '"loss"' in l]) == total
    return {"runs": r, "total": total, "saves": saves, "latest": load_tree(r.path("latest"), total), "metrics": metrics,
            "best": {s: load_tree(r.path("best"), s) for s in steps(r.path("best"))}, "stdout": built["stdout"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The uninterrupted padded run; every interrupted one must end exactly here."""
    return _reference(tmp_path_factory, cache, prod=False)


@pytest.fixture(scope="module")
def prod_reference(tmp_path_factory, cache):
    """The uninterrupted run on the production path (PROD)."""
    ref = _reference(tmp_path_factory, cache, prod=True)
    out = ref["stdout"]
    assert "curriculum: steps 1-14 draw from the" in out and "exact match" in out  # the options are on
    return ref


def timeless(metrics: str) -> list:
    """metrics.jsonl records without their wall-clock field, which no rerun repeats."""
    return [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in metrics.splitlines()]


def assert_same_as_reference(r: Runs, reference, resumed_at=None):
    """resumed_at: the step the last run resumed from, which fixes the two latest states kept
    (None: only the newest is checked, for a run whose saves depend on the clock)."""
    total = reference["total"]
    assert steps(r.path("latest"))[-1] == total
    if resumed_at is not None:
        assert steps(r.path("latest")) == kept_latest(total, resumed_at, reference["saves"])
    assert_bitwise_equal(load_tree(r.path("latest"), total), reference["latest"])
    assert {s: load_tree(r.path("best"), s) for s in steps(r.path("best"))}.keys() == reference["best"].keys()
    for s, tree in reference["best"].items():
        assert_bitwise_equal(load_tree(r.path("best"), s), tree)
    with open(r.path("metrics.jsonl")) as f:
        assert timeless(f.read()) == timeless(reference["metrics"])  # same losses, step for step


@pytest.mark.slow
def test_sigkill_at_the_worst_moments_then_resume_is_bitwise_exact(tmp_path, cache, reference, capsys, monkeypatch):
    r = Runs(tmp_path, cache)
    # 1. killed after step 12's best checkpoint and metrics, before its latest state
    p = r.run(hook=("kill_before_latest", 12))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert steps(r.path("best")) == [12] and steps(r.path("latest")) == [5, 10]
    load_tree(r.path("best"), 12), load_tree(r.path("latest"), 10)  # both readable
    with open(r.path("metrics.jsonl")) as f:
        assert max(json.loads(l)["step"] for l in f) == 12  # beyond the latest state: trimmed on resume

    # 2. resumed, then killed with latest/20 written to its tmp dir but not committed
    p = r.run("--resume", hook=("kill_before_commit", 20))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "resumed run at step 10" in p.stdout
    assert steps(r.path("latest")) == [12, 15]
    assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(r.path("latest"))), os.listdir(r.path("latest"))
    load_tree(r.path("latest"), 15)

    # 3. resumed to the end (in this process): the same parameters, optimizer state, best checkpoints and metrics
    p = r.run_here(capsys, monkeypatch, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resumed run at step 15" in p.stdout
    assert_same_as_reference(r, reference, 15)
    # TensorBoard shows those metrics, each step once: the steps the killed sessions wrote past
    # the states the next ones resumed from (11-12, then 16-20) are dropped by their restart markers
    assert len(os.listdir(r.path("tensorboard"))) == 3
    assert_events_are_metrics(r.path())
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(r.path("latest")))


@pytest.mark.slow
def test_production_path_sigkill_then_resume_is_bitwise_exact(tmp_path, cache, prod_reference, capsys, monkeypatch):
    """Packing, the shared prefix, the answer-only head, exact match and a curriculum whose
    boundary (step 14) falls after the first kill: the resumed run must take up the focus
    batches where they stopped, then the whole set, and end bit for bit as the reference."""
    r = Runs(tmp_path, cache, prod=True)
    # 1. killed with latest/10 written but not committed: resumes from 5, inside the curriculum
    p = r.run(hook=("kill_before_commit", 10))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert steps(r.path("latest")) == [5]
    # 2. resumed, killed after step 26's best checkpoint (the first epoch's end) before its latest state
    p = r.run("--resume", hook=("kill_before_latest", 26))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "resumed run at step 5" in p.stdout
    assert steps(r.path("best")) == [26] and steps(r.path("latest")) == [20, 25]
    # 3. resumed to the end (in this process)
    p = r.run_here(capsys, monkeypatch, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resumed run at step 25" in p.stdout
    assert_same_as_reference(r, prod_reference, 25)


@pytest.mark.slow
def test_production_path_kill_after_a_timed_save_resumes_bitwise(tmp_path, cache, prod_reference, capsys, monkeypatch):
    """With no step-count saves, the clock saves the latest state (train.save_every_s) and a
    kill right after such a save loses nothing: the resumed run ends as the reference."""
    r = Runs(tmp_path, cache, prod=True)
    timed = ["--set", "train.save_every=0", "--set", "train.save_every_s=1"]
    p = r.run(*timed, hook=("kill_after_timed_save", 150))  # 0.15 s a step: the 1 s timer fires by step ~8
    assert p.returncode == -signal.SIGKILL, p.stderr
    saved = steps(r.path("latest"))[-1]
    assert 0 < saved < 26 and not steps(r.path("best"))  # before the first evaluation: only the clock saved
    p = r.run_here(capsys, monkeypatch, *timed, "--resume")
    assert p.returncode == 0, p.stderr
    assert f"resumed run at step {saved}" in p.stdout
    assert_same_as_reference(r, prod_reference)


@pytest.mark.slow
def test_runs_under_other_hash_seeds_are_bitwise_alike(tmp_path, cache, prod_reference):
    """Python salts str hashes per process (PYTHONHASHSEED), so a set of characters or of
    categories iterates in another order in each: nothing a run computes may depend on it.
    A run on the production path under a fixed seed logs the metrics and writes bitwise the
    best checkpoints and final training state of the reference run (its own random salt)."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # not the reference's
    r = Runs(tmp_path, cache, prod=True)
    p = r.run(env={"PYTHONHASHSEED": seed})
    assert p.returncode == 0, p.stderr
    assert steps(r.path("best")) != []
    assert_same_as_reference(r, prod_reference)  # losses, learning rates, gradient norms, tokens; every tree


def assert_interrupted(p, r: Runs, saves=SAVES) -> int:
    """A run stopped by a signal while step 7 ran: it stopped after that step (or the next),
    saved, its TensorBoard events complete, and exited 130 with the resume command and no
    traceback. Returns the step."""
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    m = re.search(r"interrupted at step (\d+)", p.stderr)
    assert m, p.stderr
    step = int(m.group(1))
    assert step in (7, 8)  # the step in flight when the signal came, or the next
    assert steps(r.path("latest")) == kept_latest(step, saves=saves)
    assert int(load_tree(r.path("latest"), step)["['state']['step']"]) == step
    assert_events_are_metrics(r.path())
    assert p.stderr.strip().splitlines()[-1] == "resume with: " + shlex.join(
        [os.path.relpath(os.path.join(REPO, "bin", "train"), r.d), *r.args, "--resume"])
    return step


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["sigterm"])  # SIGINT (Ctrl-C): the first run of the next test
def test_a_signal_saves_a_resumable_state(tmp_path, cache, sig):
    """A scheduler's SIGTERM, sent while step 7 runs: the run stops after that step, saves,
    exits 130 with the resume command and no traceback."""
    r = Runs(tmp_path, cache)
    assert_interrupted(r.run(hook=(f"{sig}_at", 7)), r)


@pytest.mark.slow
@pytest.mark.parametrize("prod", [False, True], ids=["padded", "production"])
def test_ctrl_c_then_sigkill_mid_step_then_resume_is_bitwise_exact(tmp_path, cache, reference, prod_reference, prod,
                                                                   capsys, monkeypatch):
    ref = prod_reference if prod else reference
    r = Runs(tmp_path, cache, prod)
    step = assert_interrupted(r.run(hook=("sigint_at", 7)), r, ref["saves"])  # Ctrl-C
    # resumed, then SIGKILL while step 18 runs (after the save at 15, mid-step, a save perhaps in flight)
    p = r.run("--resume", hook=("sigkill_at", 18))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert f"resumed run at step {step}" in p.stdout
    for d in ("latest", "best"):  # whatever the moment, the newest committed step is whole
        if steps(r.path(d)):
            load_tree(r.path(d), steps(r.path(d))[-1])
    assert step <= steps(r.path("latest"))[-1] <= 15  # the save at 15 may still be in flight
    resumed_at = steps(r.path("latest"))[-1]
    p = r.run_here(capsys, monkeypatch, "--resume")  # in this process
    assert p.returncode == 0, p.stderr
    assert f"resumed run at step {resumed_at} " in p.stdout
    assert_same_as_reference(r, ref, resumed_at)


@pytest.mark.slow
def test_a_kill_while_an_old_step_is_deleted_leaves_debris_that_is_cleared(tmp_path, reference):
    """orbax deletes the older step only after the newer one is committed, with a plain
    recursive delete: a kill then leaves it half removed. The run directory's managers
    drop such steps when they start, and every reader takes the newest step."""
    import jax
    from jaxsft import checkpoint, runs
    run = tmp_path / "run"
    shutil.copytree(reference["runs"].path(), run)
    for d, keep in (("best", "metrics"), ("latest", "_CHECKPOINT_METADATA")):  # as a kill left them
        shutil.copytree(run / d / str(TOTAL_STEPS), run / d / "12")
        for n in os.listdir(run / d / "12"):
            if n != keep:
                shutil.rmtree(run / d / "12" / n, ignore_errors=True)
                (run / d / "12" / n).unlink(missing_ok=True)
    params, _, _ = runs.restore(str(run))  # readers take the newest step

    def arrays(leaves):
        return sorted((np.asarray(a).shape, np.asarray(a).tobytes()) for a in leaves)
    assert arrays(jax.tree.leaves(params)) == arrays(reference["best"][TOTAL_STEPS].values())
    ck = checkpoint.RunCheckpoints(str(run))  # what a resume starts with
    ck.close()
    assert steps(run / "best") == [TOTAL_STEPS] and steps(run / "latest") == [20, TOTAL_STEPS]
    assert sorted(os.listdir(run / "best")) == [str(TOTAL_STEPS)]


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path, cache, reference):
    r = Runs(tmp_path, cache)
    p = r.run(hook=("nan_at", 14))
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: non-finite loss or gradient norm at step 14;")
    assert steps(r.path("latest")) == [10, 12] and steps(r.path("best")) == [12]
    latest = load_tree(r.path("latest"), 12)
    assert int(latest["['state']['step']"]) == 12
    assert all(np.isfinite(v).all() for v in latest.values())
    best = load_tree(r.path("best"), 12)
    assert all(np.isfinite(v).all() for v in best.values())
    with open(r.path("metrics.jsonl")) as f:
        assert max(json.loads(l)["step"] for l in f) == 13  # nothing of the bad step is logged
    # the good prefix is the reference's, bit for bit (determinism on CPU)
    ref12 = [m for m in timeless(reference["metrics"]) if m["step"] <= 13]
    with open(r.path("metrics.jsonl")) as f:
        assert timeless(f.read()) == ref12


@pytest.mark.slow
def test_resume_or_chat_with_another_model_config_is_refused(tmp_path, reference, capsys, monkeypatch):
    src = reference["runs"].d
    for n in ("tiny.yaml", "train.jsonl", "val.jsonl"):
        shutil.copy(os.path.join(src, n), tmp_path)
    shutil.copytree(os.path.join(src, "run"), tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_main("train", T + ["--resume", "--set", "model.d_model=64"], capsys, monkeypatch)
    assert code == 2 and err.strip() == ("error: run: was trained with another model config or vocabulary; "
                                         "cannot resume")
    assert snapshot(tmp_path) == before
    # a config.json edited by hand: the stored arrays do not fit the model it describes
    with open(tmp_path / "run" / "config.json") as f:
        cfg = json.load(f)
    cfg["model"]["d_model"] = 64
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump(cfg, f)
    before = snapshot(tmp_path)
    code, _, err = run_main("chat", ["--checkpoint", "run", "你好"], capsys, monkeypatch)
    assert code == 2 and err.strip() == ("error: run/best/24: the best checkpoint does not match this model config "
                                         "(blocks.0.attn.wk.kernel.value: stored (32, 32), the config needs (64, 64))")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_nothing_a_user_loads_is_a_pickle(reference, monkeypatch):
    run = reference["runs"].path()
    for root, _, files in os.walk(run):
        for n in files:
            with open(os.path.join(root, n), "rb") as f:
                head = f.read(2)
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), n

    from jaxsft import runs  # imported before pickle is taken away (some imports use it)

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    class Refused(pickle.Unpickler):
        load = refuse
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    params, model_cfg, tok = runs.restore(run)
    assert model_cfg.d_model == 32 and len(tok) > 7
    assert load_tree(os.path.join(run, "latest"), TOTAL_STEPS).keys() == reference["latest"].keys()


def chat_here(lines, run_dir, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """Interactive bin/chat on run_dir, main() in this process (conftest.run_main), reading `lines`
    as typed (its own process, on a terminal: test_stream.py)."""
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    args = ["--checkpoint", run_dir, "--max-new-tokens", "8"]
    code, out, err = run_main("chat", args, capsys, monkeypatch)
    return subprocess.CompletedProcess(["bin/chat", *args], code, out, err)


@pytest.mark.slow
def test_chat_unknown_characters_empty_questions_and_long_conversations(reference, capsys, monkeypatch):
    """Interactive chat: an empty line is refused politely, characters outside the
    vocabulary are reported once, a conversation beyond the context is cut from
    its oldest turns; nothing crashes."""
    lines = ["", "12加5等于多少？😀", "😀3加4等于多少？", "1加2等于多少？" * 20, "/quit"]  # 😀: not in the vocabulary
    proc = chat_here(lines, reference["runs"].path(), capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("(please type a question)") == 1
    assert proc.stderr.count("not in the vocabulary") == 1  # 😀 twice, told once
    assert "😀" in proc.stderr
    assert "oldest turns are left out" in proc.stderr
    assert proc.stdout.count("你> ") == 5  # every line read, to /quit


@pytest.mark.slow
def test_chat_commands_are_listed_and_never_sent_to_the_model(reference, capsys, monkeypatch):
    """/help lists the commands; an unknown /command says so and lists them; neither is a question."""
    proc = chat_here(["/help", "/frobnicate now", "/quit"], reference["runs"].path(), capsys, monkeypatch)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    listing = "/clear forgets the conversation, /system TEXT sets the system prompt, /help lists these, /quit leaves."
    assert f"({listing})" in err and f"(unknown command /frobnicate; {listing})" in err
    assert proc.stdout == "你> " * 3  # three prompts, no answer printed


def test_prompt_is_cut_to_the_context_never_crashing():
    from jaxsft import chatml
    from jaxsft.config import ModelConfig
    from jaxsft.decode import Generator
    from jaxsft.tokenizer import Tokenizer
    tok = Tokenizer("问答长系统")
    cfg = ModelConfig(vocab_size=len(tok), max_seq_len=64, d_model=32, n_heads=2, n_layers=1, d_ff=64)
    gen = Generator(None, cfg, tok, "系统", max_new_tokens=16)  # prompt budget 48 tokens
    tail = [tok.encode("\n")[0], tok.assistant_id]
    history = [("user", "问" * 10), ("assistant", "答" * 10)] * 3 + [("user", "问问")]
    ids, cut = gen.prompt_ids(history)
    assert cut and len(ids) <= 48 and list(ids[-2:]) == tail
    assert list(ids[-5:-3]) == tok.encode("问问")  # the last question, whole
    # the fewest oldest (user, assistant) pairs are dropped; the system prompt stays
    k = next(k for k in range(4) if len(chatml.render(history[2 * k:], tok, "系统", True)[0]) <= 48)
    assert k == 2
    assert list(ids) == list(chatml.render(history[2 * k:], tok, "系统", True)[0])
    for conv in ([("user", "长" * 500)], [("system", "系" * 100), ("user", "问")], [("user", "?")]):
        ids, _ = gen.prompt_ids(conv)
        assert 0 < len(ids) <= 48
