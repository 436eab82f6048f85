"""Optimizer, schedule, loss and the jitted train step on a tiny model.

The `setup` train step keeps one compiled program per batch shape: (4, 32) and (4, 24).
"""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsft import batching, chatml, model, parallel, steps, trainer
from jaxsft.setup import prepare
from jaxsft.config import ModelConfig, TrainConfig
from jaxsft.data import Row
from jaxsft.tokenizer import Tokenizer

STEPS = 100
TC = TrainConfig(batch_size=4, lr=1e-2, weight_decay=0.0, warmup_steps=5, max_grad_norm=1.0, buckets=(24, 32))


@pytest.fixture(scope="module")
def setup(qa):
    """Tokenizer, the 4 QA rows as examples (input lengths 26, 18, 16, 20), a tiny
    model, its optimizer and one jitted train step."""
    tok = Tokenizer.build([t for pair in qa for t in pair] + ["\n"])
    rows = [Row((("user", q), ("assistant", a))) for q, a in qa]
    examples, dropped = chatml.encode_rows(rows, tok, None, max_seq_len=32)
    assert dropped == 0 and [len(x) for x, _, _ in examples] == [26, 18, 16, 20]
    cfg = ModelConfig(vocab_size=len(tok), max_seq_len=32, d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)
    graphdef, params = model.init(cfg, seed=0)
    tx = steps.make_optimizer(TC, STEPS)
    return dict(tok=tok, examples=examples, graphdef=graphdef, params=params, tx=tx,
                step=steps.make_train_step(graphdef, tx, TC), eval_step=steps.make_eval_step(graphdef),
                gradient_step=steps.make_train_step(graphdef, KEEP_GRADIENT, TC))


# an "optimizer" that moves no parameter and keeps, as its state, the mean gradient the train step
# hands it: one compiled train step gives the step's loss and the exact gradient it computed
KEEP_GRADIENT = optax.GradientTransformation(lambda p: jax.tree.map(np.zeros_like, p),
                                             lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


def _loss_and_gradient(step, params, batch) -> tuple[float, float, dict]:
    """(loss, answer tokens, mean gradient) of one call of a train step made with KEEP_GRADIENT."""
    state, m = step(steps.TrainState.create(params, KEEP_GRADIENT), batch, jax.random.PRNGKey(0))
    assert bool(m["ok"])
    return float(m["loss"]), float(m["tokens"]), _np(state.opt_state)


def _fresh_state(s):
    """A new state on the setup's parameters, not placed on the mesh (the step places it)."""
    return steps.TrainState.create(s["params"], s["tx"])


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def test_schedule_matches_seed_formula():
    tc = TrainConfig(lr=1e-3, warmup_steps=10)
    total = 110
    sched = jax.jit(steps.make_schedule(tc, total))  # one program (op by op: one a primitive)

    def seed(step):  # the seed notebook's LambdaLR factor times lr
        if step < tc.warmup_steps:
            return tc.lr * step / tc.warmup_steps
        return tc.lr * 0.5 * (1 + math.cos(math.pi * (step - tc.warmup_steps) / (total - tc.warmup_steps)))

    for step in (0, 1, 5, 10, 35, 60, 85, 109, 110):
        assert float(sched(step)) == pytest.approx(seed(step), rel=1e-5, abs=tc.lr * 1e-6), step
    assert float(sched(60)) == pytest.approx(tc.lr / 2, rel=1e-5)  # the middle of the cosine
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-12)


def _clipped_gradient(tc, grads):
    """The gradient the Adam part of make_optimizer receives: after one update,
    Adam's first moment is (1 - b1) * g with b1 = 0.9."""
    tx = steps.make_optimizer(tc, 100)
    # one program, the optimizer's state made in it (op by op, it compiled ~30); the rest in numpy
    state = jax.jit(lambda g: tx.update(g, tx.init(jax.tree.map(jnp.zeros_like, g)), g)[1])(grads)
    return jax.tree.map(lambda m: np.asarray(m) / 0.1, optax.tree_utils.tree_get(state, "mu"))


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree))))


def test_clipping_bounds_the_gradient():
    grads = {"a": np.full((3, 4), 1e6, np.float32), "b": np.arange(5, dtype=np.float32) * -1e5}
    norm = _norm(grads)
    clipped = _clipped_gradient(TC, grads)
    assert _norm(clipped) == pytest.approx(TC.max_grad_norm, rel=1e-4)
    for key in grads:  # same direction, scaled down
        np.testing.assert_allclose(clipped[key], grads[key] * TC.max_grad_norm / norm, rtol=1e-4, atol=1e-9)
    # a small gradient passes unchanged
    small = {"a": np.full((3, 4), 0.01, np.float32), "b": np.arange(5, dtype=np.float32) * 0.02}
    np.testing.assert_allclose(_clipped_gradient(TC, small)["b"], small["b"], rtol=1e-5)
    # max_grad_norm = 0 turns clipping off
    off = _clipped_gradient(dataclasses.replace(TC, max_grad_norm=0.0), grads)
    np.testing.assert_allclose(off["a"], grads["a"], rtol=1e-5)


def test_weight_decay_is_decoupled_at_the_scheduled_rate():
    """AdamW with a zero gradient: Adam's term is 0 / (sqrt(0) + eps) = 0, so update s only
    decays, p <- p - lr(s) * wd * p. With warmup_steps 2, lr(0) = 0 and lr(1) = lr / 2."""
    lr, wd = 0.1, 0.5
    tx = steps.make_optimizer(dataclasses.replace(TC, lr=lr, weight_decay=wd, warmup_steps=2), 10)
    w0 = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    p = {"w": jnp.asarray(w0)}
    state = tx.init(p)
    after = []
    update = jax.jit(lambda g, state, p: tx.update(g, state, p))
    for _ in range(2):
        updates, state = update({"w": jnp.zeros_like(p["w"])}, state, p)
        p = jax.jit(optax.apply_updates)(p, updates)
        after.append(np.asarray(p["w"]))
    np.testing.assert_array_equal(after[0], w0)  # lr(0) = 0: nothing moves
    np.testing.assert_allclose(after[1], w0 * (1 - lr / 2 * wd), rtol=1e-6)  # 0.975 * w0


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_fused_adamw_matches_optax(max_norm):
    """The train step's fused update (AdamW.apply) against optax's chain (update, then
    apply_updates): five steps past warmup with weight decay, clipping active on some; then
    a non-finite gradient norm leaves parameters and state exactly as they were."""
    tc = dataclasses.replace(TC, lr=0.1, weight_decay=0.1, warmup_steps=2, max_grad_norm=max_norm)
    tx = steps.make_optimizer(tc, 10)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    p = {"w": jax.random.normal(keys[0], (8, 16)), "b": {"c": jax.random.normal(keys[1], (16,))}}
    ref_p, ref_s, p_, s_ = p, tx.init(p), p, tx.init(p)
    apply = jax.jit(tx.apply)

    @jax.jit
    def reference(g, s, p):  # optax's chain, one program (op by op, it compiled ~30)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s
    for i in range(5):
        g_sum = jax.tree.map(lambda x: jax.random.normal(keys[2 + i], x.shape) * (0.2 + i), p)  # summed over 4 tokens
        mean = jax.tree.map(lambda x: x / 4, g_sum)
        ref_p, ref_s = reference(mean, ref_s, ref_p)
        gnorm = jax.jit(optax.tree.norm)(mean)
        p_, s_ = apply(g_sum, jnp.float32(0.25), gnorm, jnp.bool_(True), s_, p_)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), (p_, s_), (ref_p, ref_s))
    assert jax.tree.structure(s_) == jax.tree.structure(ref_s)  # optax's own state: old checkpoints read
    p2, s2 = apply(g_sum, jnp.float32(0.25), jnp.float32(jnp.nan), jnp.bool_(False), s_, p_)
    jax.tree.map(np.testing.assert_array_equal, (p2, s2), (p_, s_))


def test_tiny_model_overfits(setup):
    batch = batching.make_batch(setup["examples"], 4, 32)
    state = _fresh_state(setup)
    key = jax.random.PRNGKey(0)
    losses = []
    for _ in range(STEPS):
        state, m = setup["step"](state, batch, key)
        losses.append(m)
    losses = [float(m["loss"]) for m in jax.device_get(losses)]
    assert int(state.step) == STEPS
    chex.assert_tree_all_finite((state.params, state.opt_state))  # 100 steps at lr 1e-2: no overflow
    assert losses[0] > 2.5  # about ln(vocab) at the start
    assert losses[-1] < 0.05, losses[::10]
    # the eval step agrees with the last training loss's trend: the rows are memorised
    s, n = setup["eval_step"](state.params, batch)
    assert float(n) == sum(float(m.sum()) for _, _, m in setup["examples"])
    assert float(s) / float(n) < 0.05


def test_bfloat16_products_keep_float32_parameters_gradients_and_optimizer_state(setup):
    """train.dtype bfloat16 is autocast: the products take bfloat16 operands, while the
    gradients, the parameters after a step and AdamW's moments stay float32, and the loss moves
    off float32's by bfloat16 rounding only."""
    batch = batching.make_batch(setup["examples"], 4, 32)
    graphdef, params = setup["graphdef"], setup["params"]
    grads = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        grads[dtype] = jax.jit(jax.grad(lambda p: steps.loss_sums(p, graphdef, batch, dtype=dtype)[0]))(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads[jnp.bfloat16], params)  # float32, as the parameters
    diffs = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(grads[jnp.bfloat16]),
                                                                          jax.tree.leaves(grads[jnp.float32]))]
    assert max(diffs) > 0  # the products really were bfloat16
    tc = dataclasses.replace(TC, dtype="bfloat16")
    step = steps.make_train_step(graphdef, setup["tx"], tc)
    state, m = step(_fresh_state(setup), batch, jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(state.params, params)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(params))  # AdamW's mu and nu
    chex.assert_trees_all_equal_dtypes(moments, [jnp.zeros((), jnp.float32)] * len(moments))
    assert m["loss"].dtype == jnp.float32


def test_all_masked_batch_changes_nothing_through_the_loss(setup):
    state = _fresh_state(setup)
    batch = batching.make_batch(setup["examples"], 4, 32)
    key = jax.random.PRNGKey(0)
    for _ in range(3):  # nonzero Adam moments and learning rate
        state, _ = setup["step"](state, batch, key)
    before = _np(state)
    masked = batch.replace(loss_mask=np.zeros_like(batch.loss_mask))
    state, m = setup["step"](state, masked, key)
    assert float(m["loss"]) == 0.0 and float(m["tokens"]) == 0.0
    assert float(m["grad_norm"]) == 0.0 and bool(m["ok"])
    # the new parameters are exactly what the optimizer makes of a zero gradient

    @jax.jit
    def zero_gradient_update(params, opt_state):
        updates, _ = setup["tx"].update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        return optax.apply_updates(params, updates)

    expected = zero_gradient_update(before.params, before.opt_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), _np(state.params), _np(expected))
    # the gradient of the all-masked loss is exactly zero and finite
    g = jax.jit(jax.grad(lambda p: steps.loss_sums(p, setup["graphdef"], masked)[0]))(before.params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))


def test_non_finite_loss_leaves_state_unchanged(setup):
    """The whole state is kept exactly: step, parameters and the optimizer state (Adam's
    moments and counts, nonzero after two good steps), not only the parameters."""
    state = _fresh_state(setup)
    batch = batching.make_batch(setup["examples"], 4, 32)
    key = jax.random.PRNGKey(0)
    for _ in range(2):
        state, _ = setup["step"](state, batch, key)
    bad = batch.replace(loss_mask=batch.loss_mask * np.nan)
    before = _np(state)
    assert any(np.any(x != 0) for x in jax.tree.leaves(before.opt_state))
    state, m = setup["step"](state, bad, key)
    assert not bool(m["ok"])
    chex.assert_tree_all_finite(state)  # the NaN loss reached no parameter or moment
    assert int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, _np(state), before)  # every leaf, opt_state included


def test_batch_loss_is_token_weighted(setup):
    examples, ev = setup["examples"], setup["eval_step"]
    params = setup["params"]
    batch = batching.make_batch(examples, 4, 32)
    per_row = [ev(params, batching.make_batch([ex], 4, 32)) for ex in examples]  # each row alone
    sums = np.array([float(s) for s, _ in per_row])
    counts = np.array([float(n) for _, n in per_row])
    assert counts.tolist() == [14, 12, 5, 8]  # answer characters + <|endoftext|>
    s, n = ev(params, batch)
    chex.assert_shape([s, n], ())  # loss_sums: a scalar sum and a scalar count ...
    chex.assert_type([s, n], jnp.float32)  # ... both float32 (the count adds across micro-batches and devices)
    assert float(n) == counts.sum()
    assert float(s) == pytest.approx(sums.sum(), rel=1e-5)
    weighted = sums.sum() / counts.sum()
    assert abs(weighted - np.mean(sums / counts)) > 1e-4  # the weighting matters for these rows
    # the train step reports the same token-weighted loss
    loss, tokens, mean = _loss_and_gradient(setup["gradient_step"], params, batch)
    assert loss == pytest.approx(weighted, rel=1e-5)
    assert tokens == counts.sum()
    # and its summed gradient is the sum of the rows' (each row's mean gradient times its tokens)
    rows = [_loss_and_gradient(setup["gradient_step"], params, batching.make_batch([ex], 4, 32))[2] for ex in examples]
    summed = jax.tree.map(lambda *g: sum(c * x for c, x in zip(counts, g)), *rows)
    total = jax.tree.map(lambda x: x * counts.sum(), mean)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), total, summed)


def test_train_step_compiles_once_per_bucket(setup, monkeypatch):
    """Six steps over two bucket lengths trace the step twice, whatever ran before: the step is
    this test's own, and each trace of it traces loss_sums once (no gradient accumulation). The
    state starts unplaced (TrainState.create's): the step places it, or its first call would
    compile for unplaced arrays and the second again for the placed ones it returned."""
    chex.clear_trace_counter()
    monkeypatch.setattr(steps, "loss_sums", chex.assert_max_traces(steps.loss_sums, n=2))
    step = steps.make_train_step(setup["graphdef"], setup["tx"], TC)
    state = _fresh_state(setup)
    key = jax.random.PRNGKey(0)
    short = [ex for ex in setup["examples"] if len(ex[0]) <= 24]
    for i in range(6):
        batch = batching.make_batch(setup["examples"], 4, 32) if i % 2 else batching.make_batch(short, 4, 24)
        state, _ = step(state, batch, key)
    assert step.jitted._cache_size() == 2  # and two programs: a trace is not retraced at the next call
    assert int(state.step) == 6


def test_shared_system_prefix_trains_like_whole_rows(qa):
    """With the system prompt computed once per batch (train.share_prefix), the train step's loss
    and the gradient it hands the optimizer equal those of packing every row whole; a row with its
    own system prompt is packed whole beside them."""
    sysp = "你是助手"
    tok = Tokenizer.build([t for pair in qa for t in pair] + [sysp, "别的", "\n"])
    rows = [Row((("user", q), ("assistant", a))) for q, a in qa]
    rows.append(Row((("system", "别的"), ("user", qa[0][0]), ("assistant", qa[1][1]))))
    examples, _ = chatml.encode_rows(rows, tok, sysp, max_seq_len=64)
    pre = chatml.system_prefix(tok, sysp)
    whole, shared = batching.pack_batch(examples, 64), batching.pack_batch(examples, 64, prefix=pre)
    assert shared.inputs.size < whole.inputs.size and shared.shared.any()
    flagged = {(r, shared.segments[r, c]) for r, c in zip(*np.nonzero(shared.shared))}
    assert len(flagged) == len(qa)  # every row but the one with its own system prompt
    cfg = ModelConfig(vocab_size=len(tok), max_seq_len=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)
    graphdef, params = model.init(cfg, seed=0)
    step = steps.make_train_step(graphdef, KEEP_GRADIENT, TC)
    l1, n1, g1 = _loss_and_gradient(step, params, whole)
    l2, n2, g2 = _loss_and_gradient(step, params, shared)
    assert n1 == n2 == sum(m.sum() for _, _, m in examples)
    # measured: the loss 1.2e-7 apart (relative), the gradients 3.0e-8 at most (of entries up to 0.26)
    assert l2 == pytest.approx(l1, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-7), g1, g2)
    # the flags matter: rows that do not see the prefix get another loss (measured 8.5e-4 off; the step's program again)
    blind = _loss_and_gradient(step, params, shared.replace(shared=np.zeros_like(shared.shared)))[0]
    assert abs(blind - l1) > 2e-4


def test_packed_batch_trains_like_the_padded_batch(setup):
    """Packing the 4 rows into 2 rows of 48 tokens (26+20, 18+16) changes neither the train
    step's loss nor the gradient it hands the optimizer: packed rows never see each other."""
    examples, params = setup["examples"], setup["params"]
    padded = batching.make_batch(examples, 4, 32)
    packed = batching.pack_batch(examples, 48)
    assert packed.inputs.shape == (2, 48) and packed.segments.max() == 2
    l1, n1, g1 = _loss_and_gradient(setup["gradient_step"], params, padded)
    l2, n2, g2 = _loss_and_gradient(setup["gradient_step"], params, packed)
    assert n1 == n2 == 39
    # measured: the loss 1.2e-7 apart (relative), the gradients 3.7e-8 at most (of entries up to 0.17)
    assert l2 == pytest.approx(l1, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-7), g1, g2)
    # without the segment mask the rows would leak into each other: the loss changes (measured 4.3e-4)
    leaky = _loss_and_gradient(setup["gradient_step"], params, packed.replace(segments=np.ones_like(packed.segments)))
    assert abs(leaky[0] - l1) > 1e-4


def test_output_head_at_answer_positions_only_trains_the_same(setup):
    """answer_at: the head and loss at the answer positions only (padded with a loss-free
    position) give the train step's loss and gradient of the head everywhere; a batch with more
    answer tokens than slots, or slots near the batch's size, keeps the head everywhere."""
    examples, params = setup["examples"], setup["params"]
    full = batching.pack_batch(examples, 48)
    n = int(full.loss_mask.sum())  # 39 of 96 positions
    sel = batching.pack_batch(examples, 48, answer_slots=64)
    at = sel.answer_at
    assert at.shape == (64,) and at.dtype == np.int32
    flat = full.loss_mask.reshape(-1)
    assert sorted(at[:n].tolist()) == np.flatnonzero(flat).tolist() and not flat[at[n:]].any()
    assert batching.pack_batch(examples, 48, answer_slots=n).answer_at.tolist() == np.flatnonzero(flat).tolist()
    assert batching.pack_batch(examples, 48, answer_slots=n - 1).answer_at is None  # no room
    assert batching.pack_batch(examples, 48, answer_slots=72).answer_at is None  # 3/4 of 96: no gain
    l1, n1, g1 = _loss_and_gradient(setup["gradient_step"], params, full)
    l2, n2, g2 = _loss_and_gradient(setup["gradient_step"], params, sel)
    assert n1 == n2 == n
    # measured: the loss 6.2e-8 apart (relative), the gradients 1.5e-8 at most (of entries up to 0.17)
    assert l2 == pytest.approx(l1, rel=5e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), g1, g2)
    # the positions matter: shifted by one, the head predicts other tokens (measured 9.7e-3 off)
    wrong = _loss_and_gradient(setup["gradient_step"], params, sel.replace(answer_at=(at + 1) % flat.size))[0]
    assert abs(wrong - l1) > 2e-3


def test_answer_slots_hold_every_early_batch():
    """batching.answer_slots: the most answer tokens of the first batches, rounded up."""
    rng = np.random.default_rng(0)
    examples = [(np.zeros(10, np.int32), np.zeros(10, np.int32), (rng.random(10) < 0.3).astype(np.float32))
                for _ in range(50)]
    counts = [sum(int(examples[j][2].sum()) for j in batching.epoch_order(50, 3, s // 13)[(s % 13) * 4:(s % 13) * 4 + 4])
              for s in range(30)]
    slots = batching.answer_slots(examples, 4, 3, steps=30, quantum=8)
    assert slots % 8 == 0 and max(counts) <= slots < max(counts) + 8


@pytest.mark.slow  # a whole training loop, in this process (trainer.train)
def test_focus_steps_draw_from_one_category_then_the_whole_set(tmp_path):
    """train.focus_categories/focus_steps: the first steps train on that category's rows
    only (1-letter answers: 2 answer tokens a row), then step k is the whole set's
    step k - focus_steps, epochs counted from there; max_steps caps both together."""
    import json

    from conftest import write_tiny_config
    from jaxsft.config import load_config
    rows = [{"instruction": f"短{i}", "response": "是", "category": "短"} for i in range(8)] + \
           [{"instruction": f"长{i}", "response": "一二三四五六", "category": "长"} for i in range(24)]
    path = write_tiny_config(str(tmp_path), tmp_path / "run", val_pairs=[("短0", "是"), ("长0", "一二三四五六")])
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    sets = ["train.focus_categories=[短]", "train.focus_steps=3", "train.batch_size=4", "train.epochs=1",
            "train.max_steps=7", "train.pack_len=0",
            "model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.d_ff=32"]  # tiny: compiles in seconds
    cfg = load_config(path, sets)
    logged = []
    summary = trainer.train(cfg, log=lambda *a, **k: logged.append(" ".join(map(str, a))), progress=False)
    assert summary.steps == 7  # min(3 + 8 steps of one epoch, max_steps)
    assert "curriculum: steps 1-3 draw from the 8 rows of 短 only" in logged
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    tokens = [r["tokens"] for r in records if "tokens" in r]
    train_ex = prepare(cfg, parallel.one_device_mesh(), log=lambda *a, **k: None).train_examples
    plan = batching.BatchPlan(train_ex, 4, cfg.train.seed, cfg.train.buckets, 64)
    whole = [int(plan.batch(s).loss_mask.sum()) for s in range(4)]
    assert tokens == [8, 8, 8] + whole
    assert whole != [8, 8, 8, 8]  # the whole set's batches are told apart by their answer tokens
    assert [r["step"] for r in records if "val_loss" in r] == [7]  # 3 + 8 (the epoch's end) is past the cap
