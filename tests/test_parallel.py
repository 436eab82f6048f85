"""Data parallel, FSDP, gradient accumulation and bfloat16 against one device.

The 8-device checks run once, in a subprocess started with
JAX_NUM_CPU_DEVICES=8 (this file run as a script, see `worker`): JAX fixes its
device count when it starts, and the rest of the suite keeps one device. The
worker writes its measurements to a JSON file that the tests below check.

Measured on 2 CPU cores (tiny GPT, 4 steps, lr 3e-3, float32, dropout 0.1): per-step
losses of 8-way data parallel, 2x4 FSDP and of train() with 1x8 FSDP differ from
one device by at most 7.2e-7 (same dropout masks: they hash each element's global
index, whatever the sharding); accumulation over k=4 (one device) and k=2 (8 devices) micro-batches
differs from the large batch by at most 7.2e-7 (dropout 0); bfloat16 products
(float32 accumulation, autocast) differ from float32 by 1.2e-6 to 2.1e-5 (losses ~3.4).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDED_TOL = 1e-5  # float32 losses, one device vs 8 (measured <= 7.2e-7: summation order only)
ACCUM_TOL = 1e-5  # k micro-batches vs one batch k times larger (measured <= 7.2e-7)
BF16_TOL = 1e-4  # bfloat16 products vs float32 (measured 2.1e-5 on losses ~3.4: a 4.7x margin)
STEPS = 4

WORDS = ["猫", "狗", "天", "水", "山", "火", "木", "人", "口", "日"]


def write_data(d: str) -> None:
    """64 training and 16 validation rows of random characters (answers 3-11 long)."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 64), ("val", 16)):
        with open(os.path.join(d, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(n):
                q = "".join(rng.choice(WORDS, 5))
                a = "".join(rng.choice(WORDS, int(rng.integers(3, 12))))
                f.write(json.dumps({"instruction": q, "response": a}, ensure_ascii=False) + "\n")


def tiny_config(d: str, *sets):
    from jaxsft.config import load_config
    return load_config(None, [
        f"data.train={d}/train.jsonl", f"data.val={d}/val.jsonl", "data.test=",
        "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "model.max_seq_len=48",
        "model.dropout=0.0", "train.batch_size=16", f"train.max_steps={STEPS}", "train.lr=0.003",
        "train.warmup_steps=1", "train.sample_questions=0", "train.buckets=[48]", f"out_dir={d}/run", *sets])


# ---------------------------------------------------------------------------------------------
# the worker: runs under JAX_NUM_CPU_DEVICES=8


def worker(d: str) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxsft import checkpoint, model, parallel, runs, setup, steps, trainer
    from jaxsft.batching import BatchPlan
    from jaxsft.config import MeshConfig

    assert jax.device_count() == 8, jax.devices()
    write_data(d)
    cfg = tiny_config(d, "model.dropout=0.1")  # sharded runs must draw the same dropout masks
    prepared = setup.prepare(cfg, parallel.one_device_mesh(), log=lambda *a, **k: None)
    model_cfg, train_ex = prepared.model_cfg, prepared.train_examples
    no_dropout = dataclasses.replace(model_cfg, dropout=0.0)  # micro-batches draw their own masks
    out = {}

    def trajectory(tc, mesh_cfg=MeshConfig(data=1, fsdp=1), mcfg=model_cfg, examples=train_ex):
        """Per-step losses and final state of STEPS optimizer steps (one device by default): the
        trainer's own pieces, the batch plan of `tc` (packing and the shared prefix when set)."""
        graphdef, params = runs.init_params_from(mcfg, tc.seed)
        tx = steps.make_optimizer(tc, STEPS)
        state = steps.TrainState.create(params, tx)
        mesh = parallel.make_mesh(mesh_cfg)
        state_sh, rows = parallel.state_shardings(state, mesh), parallel.batch_sharding(mesh)
        state = parallel.shard_tree(state, state_sh)
        key = parallel.shard_tree(jax.random.PRNGKey(tc.seed), parallel.replicated(mesh))
        step = steps.make_train_step(graphdef, tx, tc, mesh, state_sh)
        plan = setup.run_plan(dataclasses.replace(cfg, train=tc, model=mcfg), prepared.tok, examples, [],
                              multiple=tc.grad_accum_steps * mesh.size)
        losses = []
        for s in range(STEPS):
            state, m = step(state, parallel.host_batch_to_global(plan.batch(s), rows), key)
            losses.append(float(m["loss"]))
        return losses, state

    tc = cfg.train
    one, one_state = trajectory(tc)
    out["one"] = one
    out["dp"], _ = trajectory(tc, MeshConfig())
    out["fsdp"], fsdp_state = trajectory(tc, MeshConfig(fsdp=4))
    out["fsdp_param_diff"] = max(float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b))))
                                 for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(fsdp_state.params)))
    w1 = fsdp_state.params["blocks"][0]["mlp"]["w1"]["kernel"][...]
    opt_leaves = jax.tree.leaves(fsdp_state.opt_state)
    out["fsdp_w1_spec"] = [str(a) for a in w1.sharding.spec]
    out["fsdp_w1_shard_shape"] = list(w1.addressable_shards[0].data.shape)
    out["fsdp_opt_sharded"] = sum(1 for x in opt_leaves if x.ndim >= 2 and not x.sharding.is_fully_replicated)
    out["accum1_single"], _ = trajectory(tc, mcfg=no_dropout)
    out["accum4_single"], _ = trajectory(dataclasses.replace(tc, grad_accum_steps=4), mcfg=no_dropout)
    out["accum2_dp"], _ = trajectory(dataclasses.replace(tc, grad_accum_steps=2), MeshConfig(), no_dropout)
    # packed rows with the shared system prompt (the default config's path): on one device the output
    # head runs at answer positions only; on 8 devices the rows are padded to a multiple of 8 and
    # the head runs everywhere. Dropout 0: masks depend on the number of packed rows.
    packed = dataclasses.replace(tc, pack_len=48, share_prefix=True)
    one_plan = setup.run_plan(dataclasses.replace(cfg, train=packed), prepared.tok, train_ex, [])
    out["packed_uses_prefix_and_head"] = [one_plan.batch(s).prefix is not None and one_plan.batch(s).answer_at
                                          is not None for s in range(STEPS)]
    out["packed_one"], _ = trajectory(packed, mcfg=no_dropout)
    out["packed_dp"], _ = trajectory(packed, MeshConfig(), no_dropout)
    out["packed_fsdp"], _ = trajectory(packed, MeshConfig(fsdp=4), no_dropout)
    out["packed_accum2_dp"], _ = trajectory(dataclasses.replace(packed, grad_accum_steps=2), MeshConfig(), no_dropout)
    out["packed_accum4_one"], _ = trajectory(dataclasses.replace(packed, grad_accum_steps=4), mcfg=no_dropout)
    # the output head in chunks of 8 positions (train.head_chunk, head.MIN_LOGITS lowered to this
    # vocabulary), on one device (the answer positions) and on 2x4 FSDP (every position of its shard)
    from jaxsft import head
    min_logits, token_nll, chunks = head.MIN_LOGITS, head.token_nll, []
    head.MIN_LOGITS = 0
    head.token_nll = lambda x, w, t, chunk, *a: chunks.append(chunk) or token_nll(x, w, t, chunk, *a)
    chunked = dataclasses.replace(packed, head_chunk=8)
    out["packed_chunk_one"], _ = trajectory(chunked, mcfg=no_dropout)
    out["packed_chunk_fsdp"], _ = trajectory(chunked, MeshConfig(fsdp=4), no_dropout)
    head.MIN_LOGITS, head.token_nll = min_logits, token_nll
    out["chunks_traced"] = sorted(set(chunks))
    out["bf16"], bf16_state = trajectory(dataclasses.replace(tc, dtype="bfloat16"))
    out["bf16_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves((bf16_state.params, bf16_state.opt_state))
                                 if jnp.issubdtype(x.dtype, jnp.floating)})

    # the whole loop with fsdp over all 8 devices: train() writes metrics and a sharded checkpoint
    run_cfg = dataclasses.replace(cfg, mesh=MeshConfig(fsdp=8))
    trainer.train(run_cfg, log=lambda *a, **k: None, progress=False)
    with open(os.path.join(d, "run", "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    out["train_fsdp"] = [r["loss"] for r in records if "loss" in r]
    mesh = parallel.make_mesh(run_cfg.mesh)
    _, abstract = model.abstract(model_cfg)
    params, _, _ = runs.restore(os.path.join(d, "run"), parallel.param_shardings(abstract, mesh))
    w1 = params["blocks"][0]["mlp"]["w1"]["kernel"][...]
    out["restored8_w1_spec"] = [str(a) for a in w1.sharding.spec]
    out["restored8_w1_shard_shape"] = list(w1.addressable_shards[0].data.shape)
    out["restored8_devices"] = len(w1.sharding.device_set)
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(d, "best8.npz"), **flat)

    # the full training state saved with fsdp=8 resumes onto another layout: 8-way data parallel
    _, params0 = runs.init_params_from(model_cfg, tc.seed)
    fresh = steps.TrainState.create(params0, steps.make_optimizer(tc, STEPS))
    dp = parallel.make_mesh(MeshConfig())
    target = {"state": parallel.shard_tree(fresh, parallel.state_shardings(fresh, dp)),
              "best_val_loss": parallel.shard_tree(np.float32(0), parallel.replicated(dp))}
    ckpt = checkpoint.RunCheckpoints(os.path.join(d, "run"))
    state = ckpt.restore_latest(target)["state"]
    ckpt.close()
    out["latest_on_dp_step"] = int(state.step)
    out["latest_on_dp_replicated"] = all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
                                         for x in jax.tree.leaves(state))
    out["latest_on_dp_equal"] = all(np.array_equal(np.asarray(x), flat[jax.tree_util.keystr(p)])
                                    for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0])
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("parallel"))
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # XLA_FLAGS from conftest
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), d], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(d, "result.json")) as f:
        res = json.load(f)
    res["dir"] = d
    res["stderr"] = proc.stderr
    return res


def _maxdiff(a, b) -> float:
    assert len(a) == len(b) == STEPS
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.slow
def test_losses_move(measured):
    # the comparisons below mean something only if training changes the loss
    one = measured["one"]
    assert all(np.isfinite(one)) and one[-1] < one[0] - 0.05, one


@pytest.mark.slow
def test_data_parallel_matches_one_device(measured):
    assert _maxdiff(measured["dp"], measured["one"]) < SHARDED_TOL


@pytest.mark.slow
def test_fsdp_matches_one_device(measured):
    assert _maxdiff(measured["fsdp"], measured["one"]) < SHARDED_TOL
    assert measured["fsdp_param_diff"] < 1e-5


@pytest.mark.slow
def test_fsdp_splits_parameters_and_optimizer_state(measured):
    # w1 (d_model=32, d_ff=64): its largest axis, 64, split over fsdp=4 -> (32, 16) per device
    assert measured["fsdp_w1_spec"] == ["None", "fsdp"]
    assert measured["fsdp_w1_shard_shape"] == [32, 16]
    # both Adam moments of every matrix are split too (8 matrices x mu, nu)
    assert measured["fsdp_opt_sharded"] == 16


@pytest.mark.slow
def test_accumulation_equals_large_batch(measured):
    assert _maxdiff(measured["accum4_single"], measured["accum1_single"]) < ACCUM_TOL
    assert _maxdiff(measured["accum2_dp"], measured["accum1_single"]) < ACCUM_TOL


@pytest.mark.slow
def test_bfloat16_close_to_float32_with_float32_state(measured):
    diff = _maxdiff(measured["bf16"], measured["one"])
    assert 0 < diff < BF16_TOL  # > 0: the products really take bfloat16 operands
    assert measured["bf16_dtypes"] == ["float32"]


@pytest.mark.slow
def test_train_loop_on_fsdp_mesh_matches_one_device(measured):
    assert _maxdiff(measured["train_fsdp"], measured["one"]) < SHARDED_TOL
    # XLA warns when a layout forces it to copy a whole array to every device (seen before
    # the loss constrained weights to be gathered): none of the sharded runs may trigger it
    assert "Involuntary full rematerialization" not in measured["stderr"]


@pytest.mark.slow
def test_checkpoint_saved_on_8_devices_restores_on_8_and_on_1(measured):
    import jax

    from jaxsft import runs
    assert measured["restored8_w1_spec"] == ["None", "fsdp"] and measured["restored8_devices"] == 8
    assert measured["restored8_w1_shard_shape"] == [32, 8]  # (32, 64) split 8 ways
    assert jax.device_count() == 1
    params, _, _ = runs.restore(os.path.join(measured["dir"], "run"))
    saved = np.load(os.path.join(measured["dir"], "best8.npz"))
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(flat) == sorted(saved.files)
    for k, x in flat.items():
        assert len(x.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(x), saved[k])


@pytest.mark.slow
def test_full_state_saved_with_fsdp_resumes_data_parallel(measured):
    assert measured["latest_on_dp_step"] == STEPS
    assert measured["latest_on_dp_replicated"] and measured["latest_on_dp_equal"]


@pytest.mark.slow
def test_full_state_saved_on_8_devices_resumes_on_1(measured):
    import jax
    import jax.numpy as jnp

    from jaxsft import checkpoint, parallel, setup, steps
    d = measured["dir"]
    cfg = tiny_config(d)
    prepared = setup.prepare(cfg, parallel.one_device_mesh(), log=lambda *a, **k: None)
    _, params = prepared.init_params()
    target = {"state": steps.TrainState.create(params, prepared.tx), "best_val_loss": jnp.float32(0)}
    ckpt = checkpoint.RunCheckpoints(os.path.join(d, "run"))
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    assert int(restored["state"].step) == STEPS
    saved = np.load(os.path.join(d, "best8.npz"))
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored["state"].params)[0]}
    for k, x in flat.items():
        np.testing.assert_array_equal(np.asarray(x), saved[k])
    with open(os.path.join(d, "run", "metrics.jsonl"), encoding="utf-8") as f:
        val = [json.loads(line)["val_loss"] for line in f if "val_loss" in line]
    assert float(restored["best_val_loss"]) == pytest.approx(val[-1], rel=1e-6)


def test_mesh_shape_and_errors():
    from jaxsft.config import MeshConfig, UserError
    from jaxsft.parallel import mesh_shape
    assert mesh_shape(MeshConfig(), 8) == (8, 1)
    assert mesh_shape(MeshConfig(fsdp=4), 8) == (2, 4)
    assert mesh_shape(MeshConfig(data=2, fsdp=4), 8) == (2, 4)
    with pytest.raises(UserError, match="mesh.fsdp: 3 does not divide the 8 devices"):
        mesh_shape(MeshConfig(fsdp=3), 8)
    with pytest.raises(UserError, match=r"mesh: data=4 x fsdp=4 = 16 devices, but there are 8"):
        mesh_shape(MeshConfig(data=4, fsdp=4), 8)


def test_fsdp_rule():
    from jax.sharding import PartitionSpec as P

    from jaxsft.parallel import leaf_spec
    assert leaf_spec((50, 32), 4) == P(None, "fsdp")  # vocab 50 is not divisible: split d_model
    assert leaf_spec((256, 32), 4) == P("fsdp", None)  # the largest divisible axis
    assert leaf_spec((32, 32), 4) == P("fsdp", None)
    assert leaf_spec((32,), 4) == P()  # vectors stay whole
    assert leaf_spec((), 4) == P()
    assert leaf_spec((6, 10), 4) == P()  # nothing divisible: replicated
    assert leaf_spec((64, 32), 1) == P()  # data parallel only


@pytest.mark.slow
def test_packed_rows_with_shared_prefix_match_one_device(measured):
    """The production path (packing, shared system prompt, answer-only head on one device)
    on 8-way data parallel, 2x4 FSDP, and with gradient accumulation."""
    assert all(measured["packed_uses_prefix_and_head"])
    one = measured["packed_one"]
    assert one[-1] < one[0]
    for name in ("packed_dp", "packed_fsdp", "packed_accum2_dp", "packed_accum4_one"):
        assert _maxdiff(measured[name], one) < SHARDED_TOL, name


@pytest.mark.slow
def test_the_head_in_chunks_matches_the_whole_head_on_one_device_and_fsdp(measured):
    """train.head_chunk on the production path: chunked (traced so) on one device and on 2x4
    FSDP, the losses are the whole head's on one device (measured: equal on one device, 4.8e-7
    on FSDP, as the whole head's FSDP run)."""
    assert measured["chunks_traced"] == [8]
    for name in ("packed_chunk_one", "packed_chunk_fsdp"):
        assert _maxdiff(measured[name], measured["packed_one"]) < SHARDED_TOL, name


def test_single_device_run_is_a_one_by_one_mesh():
    # one code path: a single device is a 1 x 1 mesh
    from jaxsft.config import MeshConfig
    from jaxsft.parallel import setup
    mesh = setup(MeshConfig())
    assert mesh.size == 1 and dict(mesh.shape) == {"data": 1, "fsdp": 1}


def test_a_placed_state_is_donated_in_place():
    """shard_tree's arrays are XLA's own: a donated step writes into them. Arrays built from host
    memory (make_array_from_callback on a CPU) are copied instead, and the first train step held
    two states (bench/README.md)."""
    import jax
    import jax.numpy as jnp
    from jaxsft import parallel
    mesh = parallel.one_device_mesh()
    tree = {"fresh": jnp.ones((1 << 16,)), "host": np.zeros((1000,), np.float32)}
    placed = parallel.shard_tree(tree, jax.tree.map(lambda _: parallel.replicated(mesh), tree))
    before = {k: a.unsafe_buffer_pointer() for k, a in placed.items()}
    after = jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t), donate_argnums=0)(placed)
    assert {k: a.unsafe_buffer_pointer() for k, a in after.items()} == before


def test_batch_must_split_over_devices():
    from jaxsft.config import UserError
    from jaxsft.parallel import check_batch
    fake = type("Mesh", (), {"size": 8})()  # check_batch only reads the device count
    check_batch(8, 1, fake)
    check_batch(16, 2, fake)
    with pytest.raises(UserError, match="train.batch_size = 12 rows is not a multiple of the 8 devices"):
        check_batch(12, 1, fake)
    with pytest.raises(UserError, match=r"train.batch_size / train.grad_accum_steps = 4 rows"):
        check_batch(16, 4, fake)


if __name__ == "__main__":
    worker(sys.argv[1])
