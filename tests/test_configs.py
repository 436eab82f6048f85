"""Every shipped config (configs/*.yaml): it loads and validates with every value it
sets, and two steps of it run through its real entry point (bin/train, or bin/pretrain
for a corpus config) in this process, shrunk with --set to a tiny model and tiny data
written here, so that each run takes seconds on CPU."""
import dataclasses
import glob
import importlib
import json
import os
import sys

import pytest
import yaml

from conftest import REPO
from jaxsft.config import load_config, to_dict
from jaxsft.data import read_jsonl

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
NAMES = [os.path.basename(p)[:-len(".yaml")] for p in CONFIGS]


def _config(name):
    return load_config(os.path.join(REPO, "configs", f"{name}.yaml"))


def test_the_configs_the_readme_names_are_shipped():
    assert {"default", "seed", "pretrain", "sft_from_pretrain"} <= set(NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_loads_with_every_value_it_sets(path):
    cfg = load_config(path)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    loaded = to_dict(cfg)
    for section, body in raw.items():
        if section == "out_dir":
            assert cfg.out_dir == body
            continue
        for key, value in body.items():
            got = loaded[section][key]
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    # what it reads ships with the repository (its paths are relative to the root, where the README runs it)
    for p in [cfg.data.corpus] if cfg.data.corpus else [cfg.data.train, cfg.data.val, cfg.data.test]:
        assert os.path.exists(os.path.join(REPO, p)), p
    if cfg.train.focus_categories:  # a category the data lacks would quietly shrink the curriculum
        categories = {r.category for r in read_jsonl(os.path.join(REPO, cfg.data.train))}
        assert set(cfg.train.focus_categories) <= categories


def test_sft_from_pretrain_is_default_started_from_the_pretrain_run():
    """sft_from_pretrain = default + model.init_from: the pretrain config's out_dir, whose model
    shape it must share (init_from refuses another)."""
    default, pre, sft = _config("default"), _config("pretrain"), _config("sft_from_pretrain")
    assert sft.model.init_from == pre.out_dir
    for f in ("d_model", "n_heads", "n_layers", "d_ff"):
        assert getattr(sft.model, f) == getattr(pre.model, f), f
    assert dataclasses.replace(sft, model=dataclasses.replace(sft.model, init_from=None),
                               out_dir=default.out_dir) == default


# two steps of each config

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "train.max_steps=2",
        "train.eval_exact=0", "train.sample_questions=0", "data.test="]


def _write_data(d) -> dict:
    """Rows of the categories default.yaml's curriculum draws from (its first steps run as
    shipped), and a corpus of 40 paragraphs (two held out) for bin/pretrain."""
    rows = [{"instruction": f"{a}加{b}等于多少？", "response": str(a + b), "category": "算术"}
            for a, b in [(1, 2), (3, 5), (12, 30), (7, 8)]]
    rows += [{"instruction": f"把{w}倒过来写", "response": w[::-1], "category": "字符串"}
             for w in ("abc", "jax", "hello", "tiny")]
    paths = {"train": os.path.join(d, "train.jsonl"), "val": os.path.join(d, "val.jsonl"),
             "corpus": os.path.join(d, "corpus.txt"), "pairs": os.path.join(d, "pairs.jsonl")}
    pairs = [{"prompt": r["instruction"], "chosen": r["response"], "rejected": r["response"] + "0"} for r in rows]
    for name, chosen in (("train", rows), ("val", rows[::3]), ("pairs", pairs)):
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen)
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        f.writelines(f"第{i}段：{i}加{i + 1}等于{2 * i + 1}，把abc倒过来写是cba。\n" for i in range(40))
    return paths


def _main(entry: str, config: str, sets: list) -> None:
    """bin/<entry> --config CONFIG --set ... run in this process; fails unless it exits 0."""
    argv = [entry, "--config", config, "--no-progress"] + [a for s in sets for a in ("--set", s)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        try:
            importlib.import_module(f"jaxsft.cli.{entry}").main()  # returns on success
        except SystemExit as e:
            pytest.fail(f"{' '.join(argv)} exited {e.code}")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """config path -> run directory of two steps of it, each config run once. A config with
    model.init_from starts from the run of the shipped config whose out_dir it names."""
    tmp = tmp_path_factory.mktemp("configs")
    data, runs = _write_data(tmp), {}

    def run(path):
        if path not in runs:
            cfg, name = load_config(path), os.path.basename(path)
            out = os.path.join(tmp, name, "run")
            sets = TINY + [f"out_dir={out}"]
            rows = data["pairs"] if cfg.train.objective == "dpo" else data["train"]
            sets += [f"data.corpus={data['corpus']}"] if cfg.data.corpus else [
                f"data.train={rows}", f"data.val={rows}" if cfg.train.objective == "dpo" else f"data.val={data['val']}"]
            if cfg.model.init_from:
                base = next(p for p in CONFIGS if load_config(p).out_dir == cfg.model.init_from)
                sets.append(f"model.init_from={run(base)}")
            _main("pretrain" if cfg.data.corpus else "train", path, sets)
            runs[path] = out
        return runs[path]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_two_steps_of_the_config_run(path, two_step_run):
    with open(os.path.join(two_step_run(path), "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_train_dtype_auto_picks_bfloat16_where_the_products_are_native(monkeypatch):
    """ops.choose_dtype's rule, and resolve_dtype on this machine with the CPU's flags forced."""
    from jaxsft import ops
    amx = frozenset({"avx512f", "amx_bf16", "amx_tile"})
    assert ops.choose_dtype("cpu", None, amx)[0] == "bfloat16"
    bf16_dots = frozenset({"avx2", "avx512f", "avx512_bf16"})  # AVX-512 BF16 alone: 1.3-1.6x (bench/README.md)
    assert ops.choose_dtype("cpu", None, bf16_dots) == ("bfloat16", "this CPU has AVX-512 bfloat16 products (avx512_bf16)")
    assert ops.choose_dtype("cpu", None, frozenset({"avx2", "avx512f"}))[0] == "float32"
    assert ops.choose_dtype("cpu", None, frozenset())[0] == "float32"
    assert ops.choose_dtype("gpu", "9.0", frozenset())[0] == "bfloat16"  # H100
    assert ops.choose_dtype("gpu", "8.0", frozenset())[0] == "bfloat16"  # A100
    assert ops.choose_dtype("gpu", "7.5", frozenset())[0] == "float32"  # T4: no bfloat16 units
    assert ops.choose_dtype("tpu", None, frozenset())[0] == "bfloat16"
    assert ops.resolve_dtype("float32") == ("float32", "as configured")
    assert ops.resolve_dtype("bfloat16")[0] == "bfloat16"
    assert ops.resolve_dtype("auto") == ("float32", "JAXSFT_AUTO_DTYPE")  # tests/conftest.py pins it
    monkeypatch.delenv("JAXSFT_AUTO_DTYPE")
    monkeypatch.setattr(ops, "cpu_flags", lambda: amx)
    assert ops.resolve_dtype("auto") == ("bfloat16", "this CPU has AMX bfloat16 products (amx_bf16)")
    monkeypatch.setattr(ops, "cpu_flags", lambda: frozenset({"avx2"}))
    assert ops.resolve_dtype("auto")[0] == "float32"


@pytest.mark.slow  # needs bin/train's run
def test_train_dtype_auto_is_the_default_and_a_run_records_its_choice(trained_run):
    from jaxsft.config import TrainConfig
    assert TrainConfig().dtype == "auto"
    with open(os.path.join(trained_run["run_dir"], "config.json"), encoding="utf-8") as f:
        assert json.load(f)["train"]["dtype"] == "float32"  # auto, resolved (pinned to float32 in the tests)
    assert trained_run["proc"].stdout.splitlines()[0] == "train.dtype auto: float32 (JAXSFT_AUTO_DTYPE)"
