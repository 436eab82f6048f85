"""LoRA (jaxsft/lora.py): adapters on a frozen base.

In process, on a tiny model: a fresh adapter (B = 0) gives the base's logits bit for bit;
merged (W + (alpha/r) A B) and unmerged adapters give the same logits; training changes
the adapters only (the base bitwise unchanged) and the optimizer state holds adapter
leaves only; the PEFT tensor names and layouts. End to end (slow): bin/train with
lora.rank on a base run, SIGKILL and --resume bitwise exact, best/ and latest/ holding
the adapters only, bin/chat and bin/eval on the LoRA run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jitted_vjp
from jaxsft import config, lora, model, quant, runs, steps
from jaxsft.batching import make_batch
from jaxsft.config import LoraConfig, ModelConfig, TrainConfig, UserError

MC = ModelConfig(vocab_size=40, max_seq_len=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)
ALL = LoraConfig(rank=4, alpha=8.0)
TINY = dataclasses.replace(MC, d_model=16, d_ff=32, n_layers=1)  # training tests: compiles in seconds


def _base(seed=0):
    return model.init(MC, seed)


APPLY = jax.jit(lambda graphdef, params, tokens: model.apply(graphdef, params, tokens)[0], static_argnums=0)
MERGE = jax.jit(lora.merge, static_argnums=2)  # one program, not one per op and kernel shape


def _tokens(seed=1, shape=(3, 16)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, MC.vocab_size)


def _random_b(adapters, seed=2):
    """Adapters whose B is not 0 (as after training)."""
    flat = nnx.to_flat_state(adapters)
    out = []
    for i, (path, var) in enumerate(flat):
        if path[-1] == "lora_b":
            var = var.replace(0.05 * jax.random.normal(jax.random.PRNGKey(seed + i), var.get_value().shape))
        out.append((path, var))
    return nnx.from_flat_state(out)


@pytest.mark.parametrize("targets", [config.TARGETS, ("wq", "wv"), ("w1", "w2"), ("up_proj",)],
                         ids=["all", "attention", "mlp", "hf-name"])
def test_fresh_adapters_give_the_base_logits_exactly(targets):
    plain, base = _base()
    lc = dataclasses.replace(ALL, targets=targets)
    graphdef, frozen, adapters = lora.init(MC, lc, seed=0, base=base)
    b_leaves = [v for p, v in nnx.to_flat_state(adapters) if p[-1] == "lora_b"]
    assert b_leaves and all(not np.any(np.asarray(v.get_value())) for v in b_leaves)  # B = 0
    tokens = _tokens()
    want = jax.jit(lambda p, t: model.apply(plain, p, t)[0])(base, tokens)
    got = jax.jit(lambda f, a, t: model.apply(graphdef, lora.combine(f, a), t)[0])(frozen, adapters, tokens)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_adapter_shapes_init_and_count():
    _, base = _base()
    _, _, adapters = lora.init(MC, ALL, seed=0, base=base)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(adapters)}
    D, F, r = MC.d_model, MC.d_ff, ALL.rank
    shapes = {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "w1": (D, F), "w3": (D, F), "w2": (F, D)}
    assert len(flat) == 2 * 7 * MC.n_layers
    for (_, layer, module, proj, which), a in flat.items():
        d_in, d_out = shapes[proj]
        assert module == ("attn" if proj.startswith("w") and proj in ("wq", "wk", "wv", "wo") else "mlp")
        if which == "lora_a":
            assert a.shape == (d_in, r) and 0 < np.abs(a).max() <= 1 / np.sqrt(d_in)
        else:
            assert a.shape == (r, d_out) and not a.any()
    assert lora.count(adapters) == MC.n_layers * r * sum(i + o for i, o in shapes.values())


def test_merged_and_unmerged_give_the_same_logits():
    _, base = _base()
    graphdef, frozen, adapters = lora.init(MC, ALL, seed=0, base=base)
    adapters = _random_b(adapters)
    tokens = _tokens()
    plain = model.init(MC, 0)[0]
    unmerged = APPLY(graphdef, lora.combine(frozen, adapters), tokens)
    merged_params = MERGE(frozen, adapters, ALL)
    merged = APPLY(plain, merged_params, tokens)
    base_logits = APPLY(plain, base, tokens)
    assert np.abs(np.asarray(unmerged) - np.asarray(base_logits)).max() > 1e-3  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)
    # merge touches the targeted kernels only, by exactly (alpha/r) A B
    flat_m = dict(nnx.to_flat_state(merged_params))
    flat_b = dict(nnx.to_flat_state(frozen))
    flat_a = dict(nnx.to_flat_state(adapters))
    for path, var in flat_b.items():
        if path[-1] == "kernel" and path[0] == "blocks":
            a, b = flat_a[path[:-1] + ("lora_a",)].get_value(), flat_a[path[:-1] + ("lora_b",)].get_value()
            np.testing.assert_allclose(flat_m[path].get_value(), var.get_value() + 2.0 * np.asarray(a) @ np.asarray(b), atol=1e-6)
        else:
            assert np.asarray(flat_m[path].get_value()).tobytes() == np.asarray(var.get_value()).tobytes(), path


def _batch(n=4, length=16):
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(n):
        x = rng.integers(1, MC.vocab_size, length).astype(np.int32)
        m = np.zeros(length, np.float32)
        m[length // 2:] = 1
        examples.append((x, np.roll(x, -1), m))
    return make_batch(examples, n, length)


def test_training_moves_the_adapters_only_and_the_optimizer_holds_adapter_leaves_only():
    tc = TrainConfig(batch_size=4, lr=1e-2, warmup_steps=0, weight_decay=0.01)
    _, base = model.init(TINY, 0)
    graphdef, frozen, adapters = lora.init(TINY, ALL, seed=0, base=base)
    before = jax.tree.map(lambda a: np.array(a), frozen)
    tx = steps.make_optimizer(tc, 10)
    state = steps.TrainState.create(adapters, tx)

    # the optimizer state: adamw's mu and nu for each adapter array, and step counters; nothing base-sized
    n_adapter_leaves = len(jax.tree.leaves(adapters))
    assert n_adapter_leaves == 2 * 7 * TINY.n_layers
    arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(arrays) == 2 * n_adapter_leaves
    assert sorted(x.shape for x in arrays) == sorted(2 * [x.shape for x in jax.tree.leaves(adapters)])
    assert sum(x.size for x in arrays) == 2 * lora.count(adapters)
    # the rest are step counters, at 0 now (they count steps below)
    counters = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
    assert counters and [int(x) for x in counters] == [0] * len(counters)

    step = steps.make_train_step(graphdef, tx, tc, frozen=frozen, combine=lora.combine)
    batch = _batch()
    losses = []
    for _ in range(5):
        state, m = step(state, batch, jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0] == [5] * len(counters)
    chex.assert_trees_all_equal_shapes_and_dtypes(state.params, adapters)  # the step keeps the adapters' layout
    chex.assert_tree_all_finite(state.params)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before)):  # the base: bitwise unchanged
        assert np.asarray(a).tobytes() == b.tobytes()
    b_after = [np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.params) if p[-1] == "lora_b"]
    assert all(b.any() for b in b_after)  # every adapter trained


def test_lora_trains_under_bfloat16_products_as_in_float32():
    """train.dtype=bfloat16 with adapters on some projections only: the untargeted ones take
    ops.products_in's bfloat16 products, the adapted ones their own float32 ones; the step
    compiles and runs, and five steps' losses follow float32's within bfloat16 rounding."""
    _, base = _base()
    lc = dataclasses.replace(ALL, targets=("wq", "wv"))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        tc = TrainConfig(batch_size=4, lr=1e-2, warmup_steps=0, dtype=dtype)
        graphdef, frozen, adapters = lora.init(MC, lc, seed=0, base=base)
        tx = steps.make_optimizer(tc, 10)
        state = steps.TrainState.create(adapters, tx)
        step = steps.make_train_step(graphdef, tx, tc, frozen=frozen, combine=lora.combine)
        losses[dtype] = []
        for _ in range(5):
            state, m = step(state, _batch(), jax.random.PRNGKey(0))
            losses[dtype].append(float(m["loss"]))
    assert losses["float32"][-1] < losses["float32"][0]
    # measured relative differences 2.9e-6..1.7e-5 over the five losses: a 6x margin
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-4)
    assert losses["bfloat16"] != losses["float32"]  # the products really were bfloat16


def test_new_vocabulary_rows_train_with_the_adapters():
    """Rows appended to the base's vocabulary (characters it lacks) are no part of the base: they
    are an adapters' entry, train, and are the merged model's rows; the base's rows stay."""
    MC = TINY  # noqa: N806
    n_old = MC.vocab_size - 4
    _, base = model.init(MC, 0)
    graphdef, frozen, adapters = lora.init(MC, ALL, seed=0, base=base, n_old=n_old)
    rows = dict(nnx.to_flat_state(adapters))[lora.NEW_ROWS].get_value()
    emb = np.asarray(dict(nnx.to_flat_state(base))[("embed", "embedding")].get_value())
    assert rows.shape == (4, MC.d_model) and np.asarray(rows).tobytes() == emb[n_old:].tobytes()
    assert lora.new_token_ids(adapters, MC.vocab_size) == list(range(n_old, MC.vocab_size))
    assert lora.new_token_ids(lora.init(MC, ALL, 0, base)[2], MC.vocab_size) is None
    tokens = _tokens()
    plain = model.init(MC, 0)[0]
    want = jax.jit(lambda p, t: model.apply(plain, p, t)[0])(base, tokens)
    got = jax.jit(lambda f, a, t: model.apply(graphdef, lora.combine(f, a), t)[0])(frozen, adapters, tokens)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()  # still the base at step 0
    tc = TrainConfig(batch_size=4, lr=1e-2, warmup_steps=0)
    tx = steps.make_optimizer(tc, 10)
    state = steps.TrainState.create(adapters, tx)
    step = steps.make_train_step(graphdef, tx, tc, frozen=frozen, combine=lora.combine)
    batch = _batch()
    batch = batch.replace(inputs=np.where(np.arange(batch.inputs.shape[1]) % 2 == 0, MC.vocab_size - 1, batch.inputs))
    for _ in range(2):
        state, _ = step(state, batch, jax.random.PRNGKey(0))
    new = np.asarray(dict(nnx.to_flat_state(state.params))[lora.NEW_ROWS].get_value())
    assert np.abs(new[-1] - emb[-1]).max() > 0  # the row of the token seen trained
    merged_tree = lora.merge(frozen, state.params, ALL)
    chex.assert_trees_all_equal_shapes_and_dtypes(merged_tree, base)  # merged: the plain model's tree
    merged = np.asarray(dict(nnx.to_flat_state(merged_tree))[("embed", "embedding")].get_value())
    assert merged[:n_old].tobytes() == emb[:n_old].tobytes() and merged[n_old:].tobytes() == new.tobytes()


def test_peft_names_and_layouts():
    _, base = _base()
    _, _, adapters = lora.init(MC, ALL, seed=0, base=base)
    sd = lora.peft_state_dict(_random_b(adapters))
    assert len(sd) == 2 * 7 * MC.n_layers
    D, F, r = MC.d_model, MC.d_ff, ALL.rank
    pre = "base_model.model.model.layers.1"
    assert sd[f"{pre}.self_attn.q_proj.lora_A.weight"].shape == (r, D)
    assert sd[f"{pre}.self_attn.q_proj.lora_B.weight"].shape == (D, r)
    assert sd[f"{pre}.mlp.gate_proj.lora_A.weight"].shape == (r, D)
    assert sd[f"{pre}.mlp.gate_proj.lora_B.weight"].shape == (F, r)
    assert sd[f"{pre}.mlp.down_proj.lora_A.weight"].shape == (r, F)
    flat = dict(nnx.to_flat_state(adapters))
    np.testing.assert_array_equal(sd[f"{pre}.mlp.up_proj.lora_A.weight"], np.asarray(flat[("blocks", 1, "mlp", "w3",
                                                                                             "lora_a")].get_value()).T)
    cfg = lora.adapter_config(dataclasses.replace(ALL, targets=("wq", "gate_proj")), "base")
    assert cfg["target_modules"] == ["gate_proj", "q_proj"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0


def _load(path, overrides=()):
    return config.load_config(path, list(overrides))


@pytest.mark.parametrize("override, message", [
    ("lora.targets=[wq, qq]", "--set lora.targets: unknown projection 'qq' (known: wq, wk, wv, wo, w1, w3, w2, "
                              "or transformers' q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
    ("lora.targets=[]", "--set lora.targets: must name at least one projection"),
    ("lora.dropout=0.1", "--set lora.dropout: only 0 is supported"),
    ("lora.alpha=0", "--set lora.alpha: must be positive, got 0.0"),
    ("lora.rank=-1", "--set lora.rank: must not be negative, got -1"),
    ("lora.rnak=8", "--set lora.rnak: no such key in section lora"),
])
def test_config_errors(tmp_path, override, message):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  init_from: base\nlora:\n  rank: 8\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        _load(str(p), [override])
    assert str(e.value).startswith(message), str(e.value)


def test_config_defaults_and_rank_needs_a_base(tmp_path):
    assert config.Config().lora.rank == 0  # off by default
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  rank: 8\n  targets: [q_proj, wv]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c.yaml:2: lora.rank: LoRA trains adapters on a frozen pretrained model; "
                                        r"set model.init_from"):
        _load(str(p))
    cfg = _load(str(p), ["model.init_from=runs/base"])
    assert config.target_names(cfg.lora.targets) == ("wq", "wv") and lora.enabled(cfg)
    assert config.lora_config_from_dict(json.loads(json.dumps(config.to_dict(cfg)))["lora"]) == cfg.lora
    assert config.lora_config_from_dict(None) == LoraConfig()  # a run from before LoRA


def test_a_changed_base_is_refused(tmp_path):
    _, base = _base()
    cfg = config.Config(model=dataclasses.replace(MC, init_from=str(tmp_path / "base")), lora=ALL)
    runs.write_base_ref(str(tmp_path), cfg, (base, MC.vocab_size))
    runs.check_base(str(tmp_path), base)  # the same arrays: fine
    def nudged(a):  # the first entry 1e-7 off, in numpy (no program per shape)
        a = np.array(a)
        a[(0,) * a.ndim] += np.float32(1e-7)
        return a
    changed = jax.tree.map(nudged, base)
    with pytest.raises(UserError, match="has changed since the adapters were trained"):
        runs.check_base(str(tmp_path), changed)


# ---------------------------------------------------------------------------
# end to end: bin/train with lora.rank on a base run (tests/test_reliability.py's tiny config and driver)

from test_reliability import Runs, assert_same_as_reference, load_tree  # noqa: E402
from test_reliability import reference  # noqa: E402,F401  (fixture: the tiny config's run, built once a session)
from test_reliability import steps as saved_steps  # noqa: E402


class LoraRuns(Runs):
    """Runs of the tiny config as LoRA (rank 4, every projection) on the base run `base`."""

    def __init__(self, d, cache, base, prod=False):
        super().__init__(d, cache, prod)
        self.args = self.args + ["--set", f"model.init_from={base}", "--set", "lora.rank=4", "--set",
                                 "lora.alpha=8", "--set", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def cache():
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (conftest.share_compilation_cache)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, cache, reference):
    """The base run (test_reliability's reference: 24 steps of the tiny config), then the
    uninterrupted LoRA run on it."""
    base = reference["runs"]
    base_best = {s: load_tree(base.path("best"), s) for s in saved_steps(base.path("best"))}
    r = LoraRuns(tmp_path_factory.mktemp("lora_reference"), cache, base.path())
    p = r.run()
    assert p.returncode == 0, p.stderr
    assert "LoRA rank 4, alpha 8 on wq, wk, wv, wo, w1, w3, w2" in p.stdout
    with open(r.path("metrics.jsonl")) as f:
        metrics = f.read()
    return {"runs": r, "base": base, "base_best": base_best, "total": 24, "saves": (5, 10, 12, 15, 20, 24),
            "latest": load_tree(r.path("latest"), 24), "metrics": metrics, "stdout": p.stdout,
            "best": {s: load_tree(r.path("best"), s) for s in saved_steps(r.path("best"))}}


@pytest.mark.slow
def test_lora_run_checkpoints_hold_the_adapters_only(lora_reference):
    ref, r = lora_reference, lora_reference["runs"]
    n_layers, rank, D, F = 1, 4, 32, 64  # the tiny config
    n_adapter = n_layers * rank * (4 * (D + D) + 2 * (D + F) + (F + D))
    for s, tree in ref["best"].items():
        assert all(k.endswith(("['lora_a']['value']", "['lora_b']['value']")) for k in tree), list(tree)
        assert len(tree) == 2 * 7 * n_layers and sum(a.size for a in tree.values()) == n_adapter
    latest = ref["latest"]
    params = {k: a for k, a in latest.items() if k.startswith("['state']['params']")}
    opt = {k: a for k, a in latest.items() if k.startswith("['state']['opt_state']") and a.ndim > 0}
    assert len(params) == 2 * 7 * n_layers and len(opt) == 2 * len(params)  # adam's mu and nu, per adapter
    assert sum(a.size for a in opt.values()) == 2 * n_adapter
    # the base run is untouched, its best checkpoint bitwise as it was
    for s, tree in ref["base_best"].items():
        assert load_tree(ref["base"].path("best"), s).keys() == tree.keys()
        for k, a in load_tree(ref["base"].path("best"), s).items():
            assert a.tobytes() == tree[k].tobytes(), k
    with open(r.path("lora_base.json")) as f:
        base_ref = json.load(f)
    assert base_ref["path"] == os.path.abspath(ref["base"].path()) and len(base_ref["sha256"]) == 64
    n_base = sum(a.size for a in next(iter(ref["base_best"].values())).values())
    assert n_adapter < n_base / 5  # (on disk, orbax's own files outweigh arrays this small: bench/lora_memory.py)
    # the losses fell: the adapters learn
    losses = [json.loads(l)["loss"] for l in ref["metrics"].splitlines() if '"loss"' in l]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


@pytest.mark.slow
def test_lora_sigkill_then_resume_is_bitwise_exact(tmp_path, cache, lora_reference, capsys, monkeypatch):
    r = LoraRuns(tmp_path, cache, lora_reference["base"].path())
    p = r.run(hook=("kill_before_latest", 12))  # best/12 committed, latest/12 not
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert saved_steps(r.path("best")) == [12] and saved_steps(r.path("latest")) == [5, 10]
    p = r.run("--resume", hook=("sigkill_at", 18))  # mid-step, a save perhaps in flight
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "resumed run at step 10" in p.stdout
    resumed_at = saved_steps(r.path("latest"))[-1]
    assert 12 <= resumed_at <= 15
    p = r.run_here(capsys, monkeypatch, "--resume")  # in this process
    assert p.returncode == 0, p.stderr
    assert f"resumed run at step {resumed_at} " in p.stdout
    assert_same_as_reference(r, lora_reference, resumed_at)


@pytest.mark.slow
def test_chat_and_eval_load_base_plus_adapters(lora_reference, tmp_path, capsys, monkeypatch):
    """bin/chat (in its own process) and bin/eval (main() in this process) on a LoRA run answer
    with the base + best adapters, merged: the same answers as the merged parameters give through
    the library; a moved base is reported."""
    from conftest import run_main, run_script
    from jaxsft import checkpoint
    from jaxsft.decode import Generator
    run = lora_reference["runs"].path()
    params, mc, tok = runs.restore(run)
    best = saved_steps(os.path.join(run, "best"))[-1]
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(model.abstract(mc)[1]))  # the plain model
    gen = Generator.from_run(run, max_new_tokens=12)
    want = gen.answer([[("user", "3加5等于多少？")]])[0]
    p = run_script("chat", "--checkpoint", run, "--max-new-tokens", "12", "3加5等于多少？")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == want
    rows = os.path.join(lora_reference["runs"].d, "val.jsonl")
    code, out, err = run_main("eval", ["--checkpoint", run, "--data", rows, "--max-new-tokens", "12"], capsys,
                              monkeypatch)
    assert code == 0, err
    from jaxsft import evaluate
    report = evaluate.score_rows(gen, evaluate.read_scored_rows(rows))  # the library's figures on base + adapters
    assert evaluate.score_table(report) in out, out
    # adapters restored by hand and merged equal what restore gives
    lc = LoraConfig(rank=4, alpha=8.0)
    _, base = runs.init_params_from(mc, 3, runs.load_base(lora_reference["base"].path(), mc))
    _, _, abstract = lora.graph(mc, lc)
    adapters = checkpoint.restore_params(os.path.join(run, "best"), abstract, "best")
    chex.assert_trees_all_equal_shapes_and_dtypes(adapters, abstract)  # the adapters' tree, as lora.graph lays it
    val = {r["step"]: r["val_loss"] for r in map(json.loads, lora_reference["metrics"].splitlines()) if "val_loss" in r}
    assert best == min(val, key=val.get), val  # best/ holds the lowest validation loss's adapters
    merged = lora.merge(base, adapters, lc)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # a copy of the run whose base is gone: one line, exit 2
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    with open(moved / "lora_base.json") as f:
        ref = json.load(f)
    with open(moved / "lora_base.json", "w") as f:
        json.dump(dict(ref, path=str(tmp_path / "gone"), init_from=str(tmp_path / "gone")), f)
    code, _, err = run_main("chat", ["--checkpoint", moved, "3加5等于多少？"], capsys, monkeypatch)
    assert code == 2 and err.strip() == (f"error: {moved}: its base model {tmp_path / 'gone'} "
                                         f"(model.init_from) is missing; a LoRA run holds its adapters only")


def test_swiglu_lora_gradient_is_autodiffs():
    """lora.swiglu_lora's hand-written backward pass against autodiff of the same function."""
    N, D, F, r, s = 6, 8, 12, 3, 1.5
    rng = np.random.default_rng(0)  # numpy's draws: no program compiled per shape, as jax.random's are
    shapes = [(N, D), (D, F), (D, F), (F, D), (D, r), (r, F), (D, 0), (0, F), (F, r), (r, D)]  # w3: no adapter
    args = [rng.standard_normal(sh, np.float32) for sh in shapes]

    def plain(x, w1, w3, w2, a1, b1, a3, b3, a2, b2):
        h = jax.nn.silu(x @ w1 + s * (x @ a1) @ b1) * (x @ w3 + s * (x @ a3) @ b3)
        return h @ w2 + s * (h @ a2) @ b2

    g = rng.standard_normal((N, D), np.float32)
    want = jitted_vjp(plain, args, g)
    ours = lambda x, w1, w3, w2, *ad: lora.swiglu_lora(s, x, (w1,), (w3,), (w2,), *ad)  # noqa: E731
    got = jitted_vjp(ours, args, g)
    np.testing.assert_allclose(jax.jit(ours)(*args), jax.jit(plain)(*args), rtol=1e-5, atol=1e-5)
    for w, h in zip(want, got):
        np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-4)
    # kernels stored as int8: the gradient of x and the adapters is autodiff's with the dequantised kernels
    stored = [quant.quantize_int8(w) for w in args[1:4]]
    deq = [jax.jit(quant.dequantize)(st) for st in stored]
    x, ad = args[0], args[4:]
    want = jitted_vjp(lambda x, *ad: plain(x, *deq, *ad), (x, *ad), g)
    got = jitted_vjp(lambda x, *ad: lora.swiglu_lora(s, x, *stored, *ad), (x, *ad), g)
    for w, h in zip(want, got):
        np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-4)


def _transformers_llama(params, mc: ModelConfig):
    """transformers' LlamaForCausalLM holding our parameters (torch's (out, in) layout = kernel.T).
    (Until the Llama-format exporter lands, the conversion is spelled out here.)"""
    import torch
    import transformers
    hf_cfg = transformers.LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.d_ff,
        num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads, num_key_value_heads=mc.n_heads,
        max_position_embeddings=mc.max_seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=mc.tie_embeddings,
        hidden_act="silu", attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    flat = {p: np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(params)}
    sd = {"model.embed_tokens.weight": flat[("embed", "embedding")], "model.norm.weight": flat[("norm", "scale")]}
    for i in range(mc.n_layers):
        pre = f"model.layers.{i}"
        sd[f"{pre}.input_layernorm.weight"] = flat[("blocks", i, "norm1", "scale")]
        sd[f"{pre}.post_attention_layernorm.weight"] = flat[("blocks", i, "norm2", "scale")]
        for ours, theirs in config.HF_NAMES.items():
            module = "self_attn" if ours in ("wq", "wk", "wv", "wo") else "mlp"
            sub = "attn" if module == "self_attn" else "mlp"
            sd[f"{pre}.{module}.{theirs}.weight"] = flat[("blocks", i, sub, ours, "kernel")].T
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if mc.tie_embeddings else flat[("lm_head", "kernel")].T
    m = transformers.LlamaForCausalLM(hf_cfg)
    m.load_state_dict({k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in sd.items()}, strict=True)
    return m.eval()


@pytest.mark.parametrize("targets, n_new, tied", [(config.TARGETS, 5, True), (("wq", "wv", "w2"), 0, True),
                                                  (("wq", "w1"), 3, False)], ids=["all+rows", "some", "untied+rows"])
def test_peft_loads_our_adapter_and_gives_our_logits(tmp_path, targets, n_new, tied):
    """A real client: peft.PeftModel.from_pretrained on transformers' Llama holding our base and
    the adapter directory lora.save_peft writes computes our (unmerged) logits within 1e-4
    (with n_new trained embedding rows: PEFT's trainable tokens, tied to the head)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    mc = dataclasses.replace(MC, n_layers=2, tie_embeddings=tied)
    lc = dataclasses.replace(ALL, targets=targets)
    _, base = model.init(mc, 0)
    graphdef, frozen, adapters = lora.init(mc, lc, seed=0, base=base, n_old=mc.vocab_size - n_new or None)
    adapters = _random_b(adapters)
    if n_new:  # trained new rows: not the base's
        adapters = lora._with(adapters, {lora.NEW_ROWS: nnx.LoRAParam(jax.random.normal(
            jax.random.PRNGKey(5), (n_new, mc.d_model)))})
        if not tied:
            adapters = lora._with(adapters, {lora.NEW_COLS: nnx.LoRAParam(0.1 * jax.random.normal(
                jax.random.PRNGKey(6), (mc.d_model, n_new)))})
    tokens = np.array(_tokens())
    tokens[:, ::3] = mc.vocab_size - 1  # a new token now and then
    ours = APPLY(graphdef, lora.combine(frozen, adapters), tokens)
    files = lora.save_peft(str(tmp_path / "adapter"), adapters, lc, mc.vocab_size)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        ids = list(range(mc.vocab_size - n_new, mc.vocab_size))
        assert json.load(f)["trainable_token_indices"] == (None if not n_new else ids if tied else
                                                            {"embed_tokens": ids, "lm_head": ids})
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted(files)
    hf = _transformers_llama(base, mc)
    with torch.no_grad():
        plain = hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
        np.testing.assert_allclose(plain, APPLY(model.abstract(mc)[0], base, tokens), atol=1e-4, rtol=0)
        adapted = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
        theirs = adapted(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    assert np.abs(np.asarray(ours) - plain).max() > 1e-3  # the adapter changes the logits ...
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)  # ... as PEFT applies it too


@pytest.mark.slow
def test_bin_export_merged_and_adapter_load_in_transformers_and_peft(lora_reference, tmp_path, capsys, monkeypatch):
    """bin/export of a LoRA run: merged (in its own process), transformers' Llama gives the run's
    logits (what bin/chat answers with); --adapter (main() in this process), PEFT on transformers'
    Llama of the exported base gives them too."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    from conftest import run_main, run_script
    run = lora_reference["runs"].path()
    p = run_script("export", "--checkpoint", run, "--out", tmp_path / "merged")
    assert p.returncode == 0, p.stderr
    code, _, err = run_main("export", ["--checkpoint", run, "--out", tmp_path / "adapter", "--adapter"], capsys,
                            monkeypatch)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter", "base"]
    assert sorted(os.listdir(tmp_path / "adapter" / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(tmp_path / "adapter" / "adapter" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(tmp_path / "adapter" / "base")
    assert sorted(cfg["target_modules"]) == sorted(config.HF_NAMES.values())
    merged, mc, tok = runs.restore(run)
    tokens = jnp.asarray([tok.encode("3加5等于多少？") + tok.encode("8")], jnp.int32)
    ours = np.asarray(model.apply(model.abstract(mc)[0], merged, tokens)[0])
    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        np.testing.assert_allclose(plain(ids).logits.numpy(), ours, atol=1e-4, rtol=0)
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter" / "base"))
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter" / "adapter")).eval()
        np.testing.assert_allclose(adapted(ids).logits.numpy(), ours, atol=1e-4, rtol=0)
    code, _, err = run_main("export", ["--checkpoint", lora_reference["base"].path(), "--out", tmp_path / "x",
                                       "--adapter"], capsys, monkeypatch)
    assert code == 2 and "not a LoRA run" in err


@pytest.mark.slow
def test_lora_on_an_imported_llama_trains_chats_and_exports_for_peft(tmp_path, capsys, monkeypatch):
    """LoRA on a Llama-format base (transformers-built: grouped-query attention, untied head, BPE
    with the ChatML markers appended): the new markers' embedding rows and head columns train
    with the adapters, bin/chat answers, and bin/export --adapter gives PEFT the run's logits.
    The programs run in this process (each one's own process is tested elsewhere)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    from conftest import run_main
    from test_hf import build_llama, write_config
    src = tmp_path / "llama"
    src.mkdir()
    build_llama(str(src), num_hidden_layers=1)  # one block: the layers' names are the import and export tests'
    run = tmp_path / "run"
    config = write_config(str(tmp_path), run, steps=6, model_extra=f"  init_from: {json.dumps(str(src))}\n",
                          n_train=100)
    code, out, err = run_main("train", ["--config", config, "--no-progress", "--set", "lora.rank=4", "--set",
                                        "lora.targets=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"],
                              capsys, monkeypatch)
    assert code == 0, err
    assert "(with the 4 new characters' embedding rows)" in out, out
    best = saved_steps(run / "best")[-1]
    stored = load_tree(str(run / "best"), best)
    assert any("new_cols" in k for k in stored) and any("new_rows" in k for k in stored)
    code, out, err = run_main("chat", ["--checkpoint", run, "--max-new-tokens", "8", "你好"], capsys, monkeypatch)
    assert code == 0, err
    from jaxsft.decode import Generator
    assert out == Generator.from_run(str(run), max_new_tokens=8).answer([[("user", "你好")]])[0] + "\n"
    code, _, err = run_main("export", ["--checkpoint", run, "--out", tmp_path / "exported", "--adapter"],
                            capsys, monkeypatch)
    assert code == 0, err
    with open(tmp_path / "exported" / "adapter" / "adapter_config.json") as f:
        ids = json.load(f)["trainable_token_indices"]
    merged, mc, tok = runs.restore(str(run))
    assert mc.kv_heads == 2 and not mc.tie_embeddings and ids["lm_head"] == list(range(len(tok) - 4, len(tok)))
    tokens = jnp.asarray([tok.encode("3加5等于多少？") + [tok.user_id, tok.assistant_id, tok.end_id]], jnp.int32)
    ours = np.asarray(model.apply(model.abstract(mc)[0], merged, tokens)[0])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported" / "base"))
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "exported" / "adapter")).eval()
        theirs = adapted(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


MESH_SCRIPT = r'''
import os, sys
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from jaxsft import lora, model, parallel, steps
from jaxsft.batching import make_batch
from jaxsft.config import LoraConfig, MeshConfig, ModelConfig, TrainConfig
mc = ModelConfig(vocab_size=40, max_seq_len=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)
tc = TrainConfig(batch_size=4, lr=1e-2, warmup_steps=0)
rng = np.random.default_rng(0)
ex = [(x := rng.integers(1, 40, 16).astype(np.int32), np.roll(x, -1), np.r_[np.zeros(8), np.ones(8)].astype(np.float32))
      for _ in range(4)]
out = []
for data, fsdp in ((1, 1), (2, 1), (1, 2)):
    mesh = parallel.make_mesh(MeshConfig(data=data, fsdp=fsdp), jax.devices()[:data * fsdp])
    tx = steps.make_optimizer(tc, 10)
    graphdef, base, adapters = lora.init(mc, LoraConfig(rank=4, alpha=8.0), 0, model.init(mc, 0)[1])
    state = steps.TrainState.create(adapters, tx)
    shardings = parallel.state_shardings(state, mesh)
    state = parallel.shard_tree(state, shardings)
    step = steps.make_train_step(graphdef, tx, tc, mesh, shardings, parallel.place(base, parallel.param_shardings(base, mesh)),
                             lora.combine)
    for _ in range(3):
        state, m = step(state, parallel.host_batch_to_global(make_batch(ex, 4, 16), parallel.batch_sharding(mesh)),
                        jax.random.PRNGKey(0))
    out.append([np.asarray(x) for x in jax.tree.leaves(state.params)])
print(max(float(np.abs(a - b).max()) for other in out[1:] for a, b in zip(out[0], other)))
'''


@pytest.mark.slow
def test_lora_steps_on_data_parallel_and_fsdp_meshes_agree(tmp_path):
    """The adapters after 3 steps on one device, on 2 data-parallel devices, and with the base and
    adapters sharded over 2 (fsdp): the same to float rounding (5e-5)."""
    import subprocess
    import sys
    from conftest import REPO
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    p = subprocess.run([sys.executable, str(script), REPO], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr
    # the sums of gradients split over devices round apart: up to 1.2e-5 measured (a non-root venv run, 2026-12-06)
    assert float(p.stdout.strip().splitlines()[-1]) < 5e-5


@pytest.mark.slow
def test_resume_with_another_lora_section_is_refused(lora_reference, tmp_path, capsys, monkeypatch):
    """bin/train --resume in this process, through main()."""
    import shutil
    from conftest import run_main
    r = lora_reference["runs"]
    d = tmp_path / "copy"
    shutil.copytree(r.d, d)
    copy = LoraRuns(d, None, lora_reference["base"].path())
    monkeypatch.chdir(d)
    for change in (["--set", "lora.rank=8"], ["--set", "lora.targets=[wq]"], ["--set", "lora.rank=0"]):
        code, _, err = run_main("train", [*copy.args, "--resume", *change], capsys, monkeypatch)
        assert code == 2, err
        assert err.strip().splitlines()[-1] == ("error: run: was trained with another lora section (rank 4); "
                                                "cannot resume"), err


def test_linear_lora_gradient_is_autodiffs():
    N, D, O, r, s = 6, 8, 5, 3, 2.5
    rng = np.random.default_rng(1)  # numpy's draws: no program compiled per shape, as jax.random's are
    args = [rng.standard_normal(sh, np.float32) for sh in [(N, D), (D, O), (D, r), (r, O)]]
    g = rng.standard_normal((N, O), np.float32)
    plain = lambda x, w, a, b: x @ w + s * (x @ a) @ b  # noqa: E731
    ours = lambda x, w, a, b: lora.linear_lora(s, x, (w,), a, b)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(*args), jax.jit(plain)(*args), rtol=1e-5, atol=1e-5)
    for h, w in zip(jitted_vjp(ours, args, g), jitted_vjp(plain, args, g)):
        np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-4)
    # the kernel stored as packed int4: x's and the adapters' gradients are those of the dequantised kernel
    x, w, a, b = args
    st = quant.quantize_int4(np.concatenate([w, w]))  # an even number of rows
    x2, deq = np.concatenate([x, x], axis=1), jax.jit(quant.dequantize)(st)
    a2 = np.concatenate([a, a])
    got = jitted_vjp(lambda x, a, b: lora.linear_lora(s, x, st, a, b), (x2, a2, b), g)
    want = jitted_vjp(lambda x, a, b: plain(x, deq, a, b), (x2, a2, b), g)
    for h, w in zip(got, want):
        np.testing.assert_allclose(h, w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# QLoRA: the frozen base's projection kernels stored in fewer bits (lora.base_dtype, quant.py)

QUANTISED = ("bfloat16", "int8", "int4")


def test_int8_round_trip_is_within_half_a_scale_per_column():
    w = jax.random.normal(jax.random.PRNGKey(0), (96, 40)) * 0.02
    w = w.at[:, 3].set(0.0).at[5, 7].set(0.5)  # a zero column (scale 0) and an outlier in column 7
    q, scale = quant.quantize_int8(w)
    chex.assert_type([q, scale], [jnp.int8, jnp.float32])
    chex.assert_shape([q, scale], [(96, 40), (40,)])
    np.testing.assert_allclose(scale, np.abs(np.asarray(w)).max(axis=0) / 127, rtol=1e-6)
    err = np.abs(np.asarray(quant.dequantize((q, scale))) - np.asarray(w))
    assert (err <= np.asarray(scale)[None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert not err[:, 3].any() and err[5, 7] <= 1e-7  # zero stays zero; a column's largest weight is exact
    assert err.max() > 0  # (it is a quantisation)


def test_int4_round_trip_is_within_half_a_scale_per_group_of_64_rows():
    w = jax.random.normal(jax.random.PRNGKey(0), (256, 24)) * 0.02
    w = w.at[70, 2].set(0.3)  # an outlier: only its own group (rows 64-127 of column 2) gets the large scale
    p, scale = quant.quantize_int4(w)
    chex.assert_type([p, scale], [jnp.uint8, jnp.float32])
    chex.assert_shape([p, scale], [(128, 24), (4, 24)])
    want = np.abs(np.asarray(w)).reshape(4, 64, 24).max(axis=1) / 7
    np.testing.assert_allclose(scale, want, rtol=1e-6)
    err = np.abs(np.asarray(quant.dequantize((p, scale))) - np.asarray(w)).reshape(4, 64, 24)
    assert (err <= np.asarray(scale)[:, None] / 2 * (1 + 1e-5)).all()
    assert err[0, :, 2].max() < err[1, :, 2].max() / 4  # the outlier did not coarsen the other groups
    assert quant.group_size(96) == 48 and quant.group_size(32) == 32 and quant.group_size(4864) == 64


def test_int4_packing_round_trip_is_exact():
    q = np.random.default_rng(0).integers(-8, 8, (10, 7)).astype(np.int8)
    p = jax.jit(quant.pack_int4)(q)
    chex.assert_type(p, jnp.uint8)
    chex.assert_shape(p, (5, 7))
    assert np.asarray(jax.jit(quant.unpack_int4)(p)).tobytes() == q.tobytes()
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[5, 0]) + 8) << 4)  # rows i and i + in/2, low nibble first


@pytest.mark.parametrize("base_dtype", QUANTISED)
def test_the_base_is_stored_quantised_and_the_rest_as_it_was(base_dtype):
    _, base = _base()
    lc = dataclasses.replace(ALL, base_dtype=base_dtype, targets=("wq", "wv", "w1"))  # untargeted ones too
    _, frozen, _ = lora.init(MC, lc, seed=0, base=base)
    flat, plain = dict(nnx.to_flat_state(frozen)), dict(nnx.to_flat_state(base))
    kernels = [p for p in plain if lora.is_projection(p)]
    assert len(kernels) == 7 * MC.n_layers
    stored_bytes = 0
    for p in kernels:
        w, k = plain[p].get_value(), flat[p].get_value()
        d_in, d_out = w.shape
        if base_dtype == "bfloat16":
            chex.assert_type(k, jnp.bfloat16)
            assert p[:-1] + ("kernel_scale",) not in flat
        elif base_dtype == "int8":
            chex.assert_type([k, flat[p[:-1] + ("kernel_scale",)].get_value()], [jnp.int8, jnp.float32])
            chex.assert_shape(k, (d_in, d_out))
        else:
            chex.assert_type(k, jnp.uint8)
            chex.assert_shape([k, flat[p[:-1] + ("kernel_scale",)].get_value()], [(d_in // 2, d_out), (1, d_out)])
        scale = flat.get(p[:-1] + ("kernel_scale",))
        stored_bytes += k.nbytes + (0 if scale is None else scale.get_value().nbytes)
    f32_bytes = sum(plain[p].get_value().nbytes for p in kernels)
    assert stored_bytes <= f32_bytes * {"bfloat16": 0.5, "int8": 0.25 + 0.05, "int4": 0.125 + 0.07}[base_dtype]
    for p, var in plain.items():  # the embedding and the norms: the same arrays, bit for bit
        if not lora.is_projection(p):
            assert np.asarray(flat[p].get_value()).tobytes() == np.asarray(var.get_value()).tobytes(), p


# The logits of a fresh QLoRA model (B = 0: the base's function) against the float base's, at MC on
# _tokens() (logits' standard deviation 0.14), measured: bfloat16 4.8e-4, int8 1.8e-3, int4 3.6e-2.
# Tolerances: under 10x those.
LOGIT_TOL = {"bfloat16": 2e-3, "int8": 1e-2, "int4": 0.2}


@pytest.mark.parametrize("base_dtype", QUANTISED)
def test_qlora_logits_are_within_a_stated_tolerance_of_the_float_base(base_dtype):
    graphdef, base = _base()
    lc = dataclasses.replace(ALL, base_dtype=base_dtype)
    adapted, frozen, adapters = lora.init(MC, lc, seed=0, base=base)
    tokens = _tokens()
    want = np.asarray(APPLY(graphdef, base, tokens))
    got = np.asarray(APPLY(adapted, lora.combine(frozen, adapters), tokens))
    err = np.abs(got - want).max()
    assert 0 < err < LOGIT_TOL[base_dtype], err
    # merged (bin/chat, bin/export, evaluation): the dequantised base plus the adapters, as training computes
    adapters = _random_b(adapters)
    unmerged = np.asarray(APPLY(adapted, lora.combine(frozen, adapters), tokens))
    merged = np.asarray(APPLY(graphdef, MERGE(frozen, adapters, lc), tokens))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    as_trained = lora.as_trained(base, lc)  # the float base as training saw it (an adapter export's base)
    chex.assert_trees_all_equal_shapes_and_dtypes(as_trained, base)
    np.testing.assert_allclose(np.asarray(APPLY(graphdef, MERGE(as_trained, adapters, lc), tokens)),
                               unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("base_dtype", QUANTISED)
def test_qlora_trains_the_adapters_only_and_the_stored_base_stays_bitwise(base_dtype):
    tc = TrainConfig(batch_size=4, lr=1e-2, warmup_steps=0, weight_decay=0.01)
    _, base = model.init(TINY, 0)
    lc = dataclasses.replace(ALL, base_dtype=base_dtype)
    graphdef, frozen, adapters = lora.init(TINY, lc, seed=0, base=base)
    before = jax.tree.map(lambda a: np.array(a), frozen)
    tx = steps.make_optimizer(tc, 10)
    state = steps.TrainState.create(adapters, tx)
    # the gradient: float32, one per adapter array (B's first: A's is 0 while B is), none for the base
    grads = jax.jit(jax.grad(lambda ad: steps.loss_sums(lora.combine(frozen, ad), graphdef, _batch())[0]))(adapters)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, adapters)
    assert all(np.abs(np.asarray(g.get_value())).max() > 0 for p, g in nnx.to_flat_state(grads) if p[-1] == "lora_b")
    arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(arrays) == 2 * len(jax.tree.leaves(adapters)) and all(x.dtype == jnp.float32 for x in arrays)
    step = steps.make_train_step(graphdef, tx, tc, frozen=frozen, combine=lora.combine)
    losses = []
    for _ in range(5):
        state, m = step(state, _batch(), jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal_shapes_and_dtypes(state.params, adapters)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before)):
        assert np.asarray(a).tobytes() == b.tobytes()


@pytest.mark.slow  # XLA's memory plan of large compiled programs, never run (seconds of compiling each)
def test_the_widened_kernels_are_never_all_alive_at_once():
    """XLA's plan of a QLoRA step (int8 base, 4 layers, no remat) against the float32 base's: its
    temporaries exceed the float32 step's by the widened kernels of at most two and a half layers
    (measured: half a layer). Widened outside linear_lora/swiglu_lora's custom_vjp, or in their
    backward pass without ops.after (XLA merges it with the forward pass's), every layer's widened
    kernels live from the forward pass to the backward one: 3.6 layers more here (5.6 of 6 layers).
    (With train.remat block the recomputed forward pass hides a missing ops.after: measured, that
    case passes without it.)"""
    remat = "none"
    mc = dataclasses.replace(MC, d_model=64, d_ff=256, n_layers=4)
    tc = TrainConfig(batch_size=4, lr=1e-2, warmup_steps=0, remat=remat)
    tx = steps.make_optimizer(tc, 10)
    _, base = model.init(mc, 0)
    temps = {}
    for bd in ("float32", "int8"):
        graphdef, frozen, adapters = lora.init(mc, dataclasses.replace(ALL, base_dtype=bd), 0, base)
        step = steps.make_train_step(graphdef, tx, tc, frozen=frozen, combine=lora.combine)
        compiled = step.lower(steps.TrainState.create(adapters, tx), _batch(), jax.random.PRNGKey(0)).compile()
        temps[bd] = compiled.memory_analysis().temp_size_in_bytes
    layer = (4 * 64 * 64 + 3 * 64 * 256) * 4  # one layer's kernels in float32
    assert temps["int8"] - temps["float32"] < 2.5 * layer, (temps, layer)


def test_base_dtype_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  init_from: base\nlora:\n  rank: 8\n", encoding="utf-8")
    assert _load(str(p)).lora.base_dtype == "float32"  # the default
    assert _load(str(p), ["lora.base_dtype=int4"]).lora.base_dtype == "int4"
    with pytest.raises(UserError) as e:
        _load(str(p), ["lora.base_dtype=nf4"])
    assert str(e.value) == "--set lora.base_dtype: expected one of float32, bfloat16, int8, int4, got 'nf4'"
    with pytest.raises(UserError) as e:
        _load(str(p), ["lora.rank=0", "lora.base_dtype=int8"])
    assert str(e.value).startswith("--set lora.base_dtype: int8 needs lora.rank > 0"), str(e.value)
    assert config.lora_config_from_dict({"rank": 4}).base_dtype == "float32"  # a run from before QLoRA


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype, prod, memory", [
    ("int8", False, ("train.dtype=bfloat16",)),  # the plain path, under bfloat16 products
    # the production path (packing, the curriculum) with issue 36's other memory options on too:
    # this run is also remat's, blockwise attention's and the chunked head's resume test
    ("int4", True, ("train.remat=block", "model.attention=blockwise", "train.head_chunk=16")),
], ids=["int8-bfloat16", "int4-remat-blockwise-chunked-packed"])
def test_qlora_sigkill_then_resume_is_bitwise_exact(tmp_path, cache, lora_reference, base_dtype, prod, memory,
                                                  capsys, monkeypatch):
    """With lora.base_dtype on: an uninterrupted run, and one SIGKILLed mid-step then resumed
    (the base loaded and quantised again), end bitwise alike; lora_base.json keeps the float
    base's fingerprint. bfloat16's base is a cast, which the step test checks stays bitwise; the
    int8 run is also SFT's resume test under train.dtype bfloat16 (DPO's: tests/test_dpo.py).
    The uninterrupted and the resumed run are bin/train's main() in this process, the killed one
    bin/train in its own."""
    from test_reliability import PROD_SAVES, PROD_STEPS
    base = lora_reference["base"].path()
    options = [a for o in (f"lora.base_dtype={base_dtype}", *memory) for a in ("--set", o)]
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    ref = LoraRuns(tmp_path / "ref", cache, base, prod)
    ref.args += options
    env = {"TEST_HEAD_MIN_LOGITS": "0"} if prod else {}  # the head in chunks of 16 at this vocabulary too
    p = ref.run_here(capsys, monkeypatch, min_logits=0 if prod else None)  # in this process
    assert p.returncode == 0, p.stderr
    with open(ref.path("config.json")) as f:
        cfg = json.load(f)
    for option in (f"lora.base_dtype={base_dtype}", *memory):  # as the run recorded them
        (section, key), value = option.split("=")[0].split("."), option.split("=")[1]
        assert str(cfg[section][key]) == value, option
    total, saves = (PROD_STEPS, PROD_SAVES) if prod else (24, lora_reference["saves"])
    want = {"runs": ref, "total": total, "saves": saves, "latest": load_tree(ref.path("latest"), total),
            "best": {s: load_tree(ref.path("best"), s) for s in saved_steps(ref.path("best"))}}
    with open(ref.path("metrics.jsonl")) as f:
        want["metrics"] = f.read()
    if not prod:  # the adapters differ from the float base's run: the option acts
        assert any(a.tobytes() != lora_reference["latest"][k].tobytes() for k, a in want["latest"].items())
    with open(ref.path("lora_base.json")) as f, open(lora_reference["runs"].path("lora_base.json")) as g:
        assert json.load(f)["sha256"] == json.load(g)["sha256"]
    r = LoraRuns(tmp_path / "killed", cache, base, prod)
    r.args += options
    kill_at, saved = (18, (10, 15)) if prod else (13, (10, 12))  # after the save at 15 / 12, perhaps in flight
    p = r.run(hook=("sigkill_at", kill_at), env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr
    resumed_at = saved_steps(r.path("latest"))[-1]
    assert saved[0] <= resumed_at <= saved[1]
    p = r.run_here(capsys, monkeypatch, "--resume", min_logits=0 if prod else None)  # in this process
    assert p.returncode == 0, p.stderr
    assert f"resumed run at step {resumed_at} " in p.stdout and "will not match" not in p.stderr
    assert_same_as_reference(r, want, resumed_at)


@pytest.mark.slow
def test_qlora_int4_on_an_imported_llama_trains_and_exports_a_float_model(tmp_path, capsys, monkeypatch):
    """QLoRA (int4) on a Llama-format base built by transformers: bin/train runs, bin/export writes
    the merged model in float32, and transformers' Llama loading it gives the run's logits (the
    dequantised base plus the adapters), which differ from the float base's merge (the option acts)."""
    torch = pytest.importorskip("torch")
    import transformers
    from conftest import run_main
    from test_hf import build_llama, write_config
    src = tmp_path / "llama"
    src.mkdir()
    build_llama(str(src), num_hidden_layers=1)  # one block: the layers' names are the import and export tests'
    run = tmp_path / "run"
    config_path = write_config(str(tmp_path), run, steps=4, model_extra=f"  init_from: {json.dumps(str(src))}\n",
                               n_train=40)
    code, out, err = run_main("train", ["--config", config_path, "--no-progress", "--set", "lora.rank=4", "--set",
                                        "lora.base_dtype=int4"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_main("export", ["--checkpoint", run, "--out", tmp_path / "exported"], capsys, monkeypatch)
    assert code == 0, err
    merged, mc, tok = runs.restore(str(run))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(merged))
    tokens = jnp.asarray([tok.encode("3加5等于多少？") + [tok.user_id, tok.assistant_id, tok.end_id]], jnp.int32)
    ours = np.asarray(model.apply(model.abstract(mc)[0], merged, tokens)[0])
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
        theirs = theirs(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    base, adapters, _, _, lc = runs.restore_parts(str(run))
    assert lc.base_dtype == "int4"
    with open(run / "config.json") as f:
        seed = json.load(f)["train"]["seed"]
    float_base = runs.init_params_from(mc, seed, runs.lora_base(str(run), mc))[1]
    floated = np.asarray(model.apply(model.abstract(mc)[0], lora.merge(float_base, adapters, lc), tokens)[0])
    assert np.abs(floated - ours).max() > 1e-3  # the merge used the int4 base, not the float one
