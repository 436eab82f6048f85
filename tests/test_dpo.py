"""DPO (jaxsft/dpo.py, train.objective: dpo).

In process, on a tiny model: the loss, rewards and accuracy of a packed and of a padded pair
batch against a hand computation (each answer run alone, its log-probs summed in numpy);
the reference log-probs computed once equal the frozen model's on every training batch; with
LoRA the reference (adapters off) is the base exactly; pair rows in both forms, and each bad
one refused in one line. End to end (slow): bin/train DPO from an SFT run, SIGKILL and
--resume bit for bit without computing the reference again.
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

from conftest import QA, assert_events_are_metrics, one_line_error, run_main, write_tiny_config
from jaxsft import chatml, dpo, head, lora, model
from jaxsft.batching import BatchPlan, PairBatch
from jaxsft.config import Config, DataConfig, DpoConfig, LoraConfig, ModelConfig, TrainConfig, UserError
from jaxsft.data import Pair, parse_pair, read_pairs
from jaxsft.tokenizer import Tokenizer

MC = ModelConfig(max_seq_len=48, d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)

# pairs of different lengths, one with a two-turn context (only its last answer counts)
PAIRS = [
    Pair((("user", "1+1等于几？"),), "等于2。", "等于3。"),
    Pair((("user", "你好"),), "你好！有什么可以帮你？", "走开"),
    Pair((("system", "简短回答。"), ("user", "天空"), ("assistant", "蓝色"), ("user", "草地呢？")), "绿色的。", "红"),
    Pair((("user", "什么是机器学习？"),), "让计算机从数据中学习规律。", "不知道。"),
]


def _tok():
    return Tokenizer.build([c for p in PAIRS for _, c in p.prompt] + [p.chosen + p.rejected for p in PAIRS]
                           + [chatml.DEFAULT_SYSTEM_PROMPT, "\n"])


def _setup(seed=0):
    tok = _tok()
    mc = dataclasses.replace(MC, vocab_size=len(tok))
    graphdef, params = model.init(mc, seed)
    examples, dropped = chatml.encode_pairs(PAIRS, tok, None, mc.max_seq_len)
    assert dropped == 0 and len(examples) == len(PAIRS)
    return tok, mc, graphdef, params, examples


def _hand_logps(graphdef, params, examples, length=48) -> np.ndarray:
    """log p of each answer (K, 2): each example in a row of its own (right-padded: the causal
    model's logits at its positions are its own), log-softmax in float64 at its targets, summed
    over its loss mask in numpy."""
    flat = [e for pair in examples for e in pair]
    x = np.zeros((len(flat), length), np.int32)
    for i, (xi, _, _) in enumerate(flat):
        x[i, :len(xi)] = xi
    logits = np.asarray(jax.jit(lambda p, t: model.apply(graphdef, p, t)[0])(params, x), np.float64)
    out = []
    for row, (xi, y, m) in zip(logits, flat):
        z = row[:len(xi)] - row[:len(xi)].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        out.append(np.sum(logp[np.arange(len(y)), y] * m))
    return np.array(out).reshape(len(examples), 2)


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, model config, graphdef, parameters, examples of PAIRS, their hand log-probs)."""
    tok, mc, graphdef, params, examples = _setup()
    return tok, mc, graphdef, params, examples, _hand_logps(graphdef, params, examples)


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


@pytest.mark.parametrize("pack_len,loss,eps,sft", [(0, "sigmoid", 0.0, 0.0), (48, "sigmoid", 0.2, 0.0),
                                                   (48, "ipo", 0.0, 0.0), (48, "sigmoid", 0.0, 0.7)],
                         ids=["padded", "packed-smoothed", "packed-ipo", "packed-sft-weight"])
def test_loss_rewards_and_accuracy_equal_a_hand_computation(pack_len, loss, eps, sft, tiny):
    _, mc, graphdef, params, examples, hand = tiny  # hand: (4, 2)
    # a reference that ranks pairs 1 and 3 right, 0 and 2 wrong
    # (log-ratio differences -2, 3, -0.5, 0.25: not symmetric, so a sign error changes the sum)
    reference = (hand + [[1, -1], [-1, 2], [0.5, 0], [0, 0.25]]).astype(np.float32)
    # batch of 5 pairs holding 4: the fifth slot is empty and must count for nothing
    plan = BatchPlan(examples, 5, 0, (16, 32, 48), mc.max_seq_len, pack_len=pack_len, pairs=True,
                     reference=reference)
    batch = plan.batch_of(np.arange(len(examples)))
    assert isinstance(batch, PairBatch)
    if pack_len:  # several answers share a row
        assert batch.inputs.shape[0] < 2 * len(examples)
    chex.assert_equal_shape([batch.inputs, batch.pair, batch.sign, batch.reference])
    dc = DpoConfig(beta=0.5, loss=loss, label_smoothing=eps, sft_weight=sft)
    s, n, extras = jax.jit(lambda p, b: dpo.loss_sums(p, graphdef, b, dc=dc, pairs=5))(params, batch)

    pol, ref = hand, reference.astype(np.float64)
    lengths = np.array([[np.sum(e[2]) for e in pair] for pair in examples])
    nll = -hand[:, 0] / lengths[:, 0]  # the chosen answer's, per token
    if loss == "ipo":  # per-token means
        pol, ref = pol / lengths, ref / lengths
    chosen, rejected = pol[:, 0] - ref[:, 0], pol[:, 1] - ref[:, 1]
    h = chosen - rejected
    if loss == "ipo":
        want = (h - 1 / (2 * 0.5)) ** 2
    else:
        want = -(1 - eps) * _log_sigmoid(0.5 * h) - eps * _log_sigmoid(-0.5 * h) + sft * nll
    assert float(n) == 4
    np.testing.assert_allclose(float(s), want.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(extras["rewards/chosen"]), 0.5 * chosen.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(extras["rewards/rejected"]), 0.5 * rejected.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(extras["rewards/margin"]), 0.5 * h.sum(), rtol=1e-5, atol=1e-4)
    assert float(extras["rewards/accuracy"]) == np.sum(chosen > rejected)
    np.testing.assert_array_equal(chosen > rejected, [False, True, False, True])
    np.testing.assert_allclose(float(extras["logps/chosen"]), pol[:, 0].sum(), rtol=1e-5)


def test_only_the_last_answer_of_a_context_has_loss(tiny):
    tok, mc, _, _, examples, _ = tiny
    chosen = examples[2][0]  # the two-turn context: "蓝色" is in it, "绿色的。" is the answer
    ids = np.concatenate([chosen[0], chosen[1][-1:]])
    masked = tok.decode(ids[1:][chosen[2] == 1])
    assert masked == "绿色的。"
    mask = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(chatml.last_answer_only(mask), [0, 0, 0, 0, 0, 1, 1, 1, 0])


def test_precomputed_reference_equals_the_frozen_model_on_every_training_batch(tiny):
    """The reference pass (padded, pairs in length order) and the training batches (packed, the
    answer-only head) compute the same log-probs: at step 0 the policy's equal the reference's,
    so each pair's log-ratio is 0 (within float32 summation order)."""
    _, mc, graphdef, params, examples, _ = tiny
    examples = examples * 3
    plan = BatchPlan(examples, 4, 0, (16, 32, 48), mc.max_seq_len, pack_len=48, pairs=True).settled(steps=3)
    step = dpo.make_logps_step(graphdef, 2)
    reference = dpo.reference_logps(step, params, plan, 2)
    chex.assert_shape(reference, (len(examples), 2))
    plan = dataclasses.replace(plan, reference=reference)
    logps = jax.jit(lambda p, b: dpo.answer_logps(p, graphdef, b, 4))
    for s in range(3):
        batch = plan.batch(s)
        pc, pr, rc, rr, nc, nr = logps(params, batch)
        assert np.all(np.asarray(nc) > 0) and np.all(np.asarray(nr) > 0)
        np.testing.assert_allclose(pc, rc, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(pr, rr, rtol=1e-5, atol=1e-4)
    s, n, extras = jax.jit(lambda p, b: dpo.loss_sums(p, graphdef, b, dc=DpoConfig(), pairs=4))(params, plan.batch(0))
    np.testing.assert_allclose(float(s) / float(n), np.log(2), rtol=1e-5)  # the first step's loss: ln 2


def test_the_reference_pass_computes_the_head_in_chunks_as_the_step_does(tiny, monkeypatch):
    """make_logps_step(head_chunk=n) traces the head n positions at a time where head.chunk_for
    says so (here: MIN_LOGITS lowered to this vocabulary), as the train step does under
    train.head_chunk; the log-probs stay those of the whole head (measured: 3.8e-6 absolute on sums
    of up to 59 nats, 9e-8 relative; checked at 10x)."""
    _, mc, graphdef, params, examples, _ = tiny
    plan = BatchPlan(examples, 2, 0, (16, 32, 48), mc.max_seq_len, pairs=True)
    whole = dpo.reference_logps(dpo.make_logps_step(graphdef, 2), params, plan, 2)
    monkeypatch.setattr(head, "MIN_LOGITS", 0)
    chunks = []
    real = head.token_nll
    monkeypatch.setattr(head, "token_nll", lambda x, w, t, chunk, *a: chunks.append(chunk) or real(x, w, t, chunk, *a))
    chunked = dpo.reference_logps(dpo.make_logps_step(graphdef, 2, head_chunk=4), params, plan, 2)
    assert chunks and set(chunks) == {4}, chunks  # traced chunked: each batch shape once
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=4e-5)


def test_lora_reference_with_the_adapters_off_is_the_base_exactly(tiny):
    _, mc, graphdef, base, examples, _ = tiny
    cfg = Config(model=dataclasses.replace(mc, init_from="base"), lora=LoraConfig(rank=4, alpha=8.0))
    parts = lora.transform(cfg, graphdef, base)
    start = parts.for_eval(parts.frozen)(parts.trainable)  # the plain model at step 0: the trainer's reference
    chex.assert_trees_all_equal(start, base)
    plan = BatchPlan(examples, 2, 0, (16, 32, 48), mc.max_seq_len, pairs=True)
    step = dpo.make_logps_step(parts.plain_graphdef, 2)
    np.testing.assert_array_equal(dpo.reference_logps(step, start, plan, 2), dpo.reference_logps(step, base, plan, 2))


def test_both_row_forms_read_alike(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "你好", "chosen": "好", "rejected": "坏", "category": "问候", "system": "简短。"},
            {"messages": [{"role": "system", "content": "简短。"}, {"role": "user", "content": "你好"}],
             "chosen": {"role": "assistant", "content": "好"}, "rejected": [{"role": "assistant", "content": "坏"}],
             "category": "问候"}]
    path.write_text("\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", "utf-8")
    a, b = read_pairs(str(path))
    assert (a.prompt, a.chosen, a.rejected, a.category, a.line) == ((("system", "简短。"), ("user", "你好")), "好", "坏",
                                                                  "问候", 1)
    assert dataclasses.replace(b, line=1) == a


BAD_PAIRS = [
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "q", "rejected": "b"}, "missing 'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same answer"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "assistant message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"}, "a list of 2"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "must end with a user turn"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "category": 1}, "'category' must be a string"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("row,message", BAD_PAIRS, ids=[m for _, m in BAD_PAIRS])
def test_bad_pair_rows_are_one_line_naming_file_and_line(row, message, tmp_path, capsys, monkeypatch):
    """The pairs are read before the base (which is not there) is looked at."""
    good = json.dumps({"prompt": "你好", "chosen": "你好！", "rejected": "走开"}, ensure_ascii=False)
    path = tmp_path / "pairs.jsonl"
    path.write_text(good + "\n" + json.dumps(row, ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "run"
    config = write_tiny_config(str(tmp_path), out)
    code, _, err = run_main("train", ["--config", config, "--set", "train.objective=dpo", "--set",
                                      f"model.init_from={tmp_path / 'base'}", "--set", f"data.train={path}",
                                      "--set", f"data.val={path}"], capsys, monkeypatch)
    one_line_error(code, err, f"{path}:2", message)
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("sets,message", [
    (["train.objective=ppo"], "expected sft or dpo"),
    (["dpo.beta=0"], "dpo.beta: must be positive"),
    (["dpo.loss=hinge"], "expected sigmoid or ipo"),
    (["dpo.label_smoothing=0.5"], "must be in [0, 0.5)"),
    (["train.objective=dpo"], "set model.init_from"),
    (["train.objective=dpo", "model.init_from=x", "train.grad_accum_steps=2"], "only 1 is supported"),
])
def test_dpo_config_keys_are_validated(sets, message):
    from jaxsft.config import load_config
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, sets)


def test_sft_rows_refuse_a_pairs_file(tmp_path):
    from jaxsft.data import read_jsonl
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: a preference pair .* train.objective: dpo"):
        read_jsonl(str(path))


# end to end


def _pairs_file(path, repeats=6) -> str:
    """QA's questions, each with its answer preferred to another question's answer."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(QA * repeats):
            f.write(json.dumps({"prompt": q, "chosen": a, "rejected": QA[(i + 1) % len(QA)][1],
                                "category": f"c{i % 2}"}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.mark.slow
def test_dpo_run_sigkill_then_resume_is_bitwise_and_keeps_its_reference(tmp_path, trained_run, capsys, monkeypatch):
    from test_reliability import DRIVER, _env, assert_bitwise_equal, load_tree, steps
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    train = _pairs_file(tmp_path / "train_pairs.jsonl", repeats=20)  # 80 pairs: 10 steps an epoch
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    from conftest import REPO

    def args(out, *extra):
        return ["--config", trained_run["config"], "--set", "train.objective=dpo", "--set",
                f"model.init_from={trained_run['run_dir']}", "--set", f"data.train={train}", "--set",
                f"data.val={pairs}", "--set", "train.max_steps=20", "--set", "train.epochs=null", "--set",
                "train.lr=1e-3", "--set", "train.pack_len=64", "--set", "train.eval_every=10", "--set",
                "train.save_every=5", "--set", "train.sample_questions=1", "--set", f"out_dir={out}",
                "--set", "train.dtype=bfloat16", "--no-progress", *extra]  # bitwise under bfloat16 products too

    def killed(out, at):  # bin/train in its own process, SIGKILLed while step `at` runs
        import subprocess
        import sys
        cmd = [sys.executable, str(driver), REPO, "sigkill_at", str(at), *args(out)]
        return subprocess.run(cmd, env=_env(os.environ["JAX_COMPILATION_CACHE_DIR"]), capture_output=True,
                              text=True, timeout=300)

    # the uninterrupted run and the resumed one in this process (bin/train's main)
    code, stdout, err = run_main("train", args(tmp_path / "ref"), capsys, monkeypatch)
    assert code == 0, err
    assert "reference: the log-probs of 80 training and 24 validation pairs" in stdout
    records = [json.loads(l) for l in open(tmp_path / "ref" / "metrics.jsonl")]
    first = records[0]
    assert first["pairs"] == 8 and abs(first["loss"] - np.log(2)) < 1e-4 and abs(first["rewards/margin"]) < 1e-3
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_rewards/accuracy"] == 1.0 and evals[-1]["val_loss"] < 0.5  # it learned (ln 2 = 0.69 at the start)

    p = killed(tmp_path / "run", 12)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert steps(tmp_path / "run" / "latest")[-1] in (5, 10)  # killed mid-run, after a save
    code, stdout, err = run_main("train", args(tmp_path / "run", "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert "resumed" in stdout and "reference:" not in stdout  # read back, not computed again
    assert_bitwise_equal(load_tree(str(tmp_path / "run" / "latest"), 20), load_tree(str(tmp_path / "ref" / "latest"), 20))
    assert_bitwise_equal(load_tree(str(tmp_path / "run" / "best"), steps(tmp_path / "ref" / "best")[-1]),
                         load_tree(str(tmp_path / "ref" / "best"), steps(tmp_path / "ref" / "best")[-1]))
    assert open(tmp_path / "run" / "metrics.jsonl").read() != ""
    resumed = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(records)
    # TensorBoard shows the same figures (pairs, rewards/*, logps/*, val_rewards/*), each step once
    assert {"pairs", "rewards/margin", "val_rewards/accuracy"} <= set(assert_events_are_metrics(tmp_path / "ref"))
    assert_events_are_metrics(tmp_path / "run")


@pytest.mark.slow
def test_dpo_on_an_imported_llama_base(tmp_path, capsys, monkeypatch):
    """A Llama-format directory (transformers-built, a BPE tokenizer: nothing new to embed but
    ChatML's markers) as model.init_from: the first step's loss is ln 2 (the reference is the
    start) and the run learns to rank the pairs. (LoRA-DPO: test_preference_eval.py, on a jaxsft base.)"""
    pytest.importorskip("torch")
    from test_hf import build_llama
    (tmp_path / "llama").mkdir()
    build_llama(str(tmp_path / "llama"), num_hidden_layers=1)  # one block: the layers' names are test_hf's
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    yaml = tmp_path / "dpo.yaml"
    yaml.write_text(f"""model: {{init_from: {json.dumps(str(tmp_path / 'llama'))}, max_seq_len: 64, dropout: 0.0}}
data: {{train: {json.dumps(pairs)}, val: {json.dumps(pairs)}, test: null}}
train: {{objective: dpo, batch_size: 4, epochs: null, max_steps: 12, lr: 3.0e-3, warmup_steps: 2, pack_len: 64,
        sample_questions: 0, eval_every: 12}}
out_dir: {json.dumps(str(out))}
""", "utf-8")
    code, stdout, err = run_main("train", ["--config", str(yaml), "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "reference: the log-probs of 24 training and 24 validation pairs" in stdout
    records = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert abs(records[0]["loss"] - np.log(2)) < 1e-4 and abs(records[0]["rewards/margin"]) < 1e-3
    final = records[-1]
    assert final["step"] == 12 and final["val_rewards/accuracy"] > 0.9 and final["val_loss"] < np.log(2)
