"""The loss-mask view: the pure table function and bin/inspect."""
import numpy as np
import pytest

from conftest import QA, run_main, run_script, write_tiny_config
from jaxsft import chatml
from jaxsft.evaluate import mask_table, show_token
from jaxsft.tokenizer import Tokenizer

# the chatml docstring's example: {"instruction": "hi", "response": "ok"}, no system prompt
HI_OK_TABLE = """\
pos  token          target         loss
  0  <bos>          <|user|>       ✗
  1  <|user|>       h              ✗
  2  h              i              ✗
  3  i              <|endoftext|>  ✗
  4  <|endoftext|>  \\n             ✗
  5  \\n             <|assistant|>  ✗
  6  <|assistant|>  o              ✓
  7  o              k              ✓
  8  k              <|endoftext|>  ✓
positions: 9, counted in the loss: 3 (33.3%)"""


def hi_ok():
    tok = Tokenizer.build(["hiok\n"])
    ids, mask = chatml.render([("user", "hi"), ("assistant", "ok")], tok, None)
    _, _, loss_mask = chatml.to_example(ids, mask, 64)
    return tok, ids, loss_mask


def test_mask_table_matches_hand_aligned_table():
    tok, ids, loss_mask = hi_ok()
    assert mask_table(ids, loss_mask, tok.itos) == HI_OK_TABLE


def test_mask_table_with_token_losses():
    tok, ids, loss_mask = hi_ok()
    nll = [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.75]
    lines = mask_table(ids, loss_mask, tok.itos, nll).splitlines()
    assert lines[0] == "pos  token          target         loss    nll"
    assert lines[7] == "  6  <|assistant|>  o              ✓     0.500"
    assert lines[1].endswith("✗     2.000")
    # mean over the counted positions only: (0.5 + 0.25 + 0.75) / 3 = 0.5, perplexity e^0.5
    assert lines[-1] == "loss over counted positions: 0.5000 (perplexity 1.65)"


def test_mask_table_aligns_wide_characters():
    tok = Tokenizer.build(["你好a"])
    ids = np.array([tok.bos_id, tok.stoi["你"], tok.stoi["a"]])
    lines = mask_table(ids, [0, 1], tok.itos).splitlines()
    # 你 takes two terminal columns, so it gets one space less than a
    assert lines[1:3] == ["  0  <bos>  你      ✗", "  1  你     a       ✓"]


def test_show_token_escapes_invisible_characters():
    assert [show_token(t) for t in ["\n", "\t", " ", "你", "<|user|>"]] == ["\\n", "\\t", "␠", "你", "<|user|>"]


@pytest.mark.slow
def test_bin_inspect_prints_the_table_of_a_row(tmp_path):
    config = write_tiny_config(str(tmp_path), tmp_path / "run")
    proc = run_script("inspect", "--config", config, "--row", 1)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # row 1 is ("你好", "你好！有什么可以帮你？") after the default 13-character system prompt:
    # <bos> <|system|> 13 chars <|end|> \n <|user|> 你好 <|end|> \n <|assistant|> 11 chars <|end|> = 35 tokens
    assert lines[0] == f"{tmp_path / 'train.jsonl'} row 1 (line 2): 35 tokens, max_seq_len 64"
    assert lines[1].split() == ["pos", "token", "target", "loss"]
    table = [l.split() for l in lines[2:-1]]
    assert len(table) == 34
    assert table[0] == ["0", "<bos>", "<|system|>", "✗"]
    assert table[21] == ["21", "\\n", "<|assistant|>", "✗"]
    assert table[22] == ["22", "<|assistant|>", "你", "✓"]
    assert table[33] == ["33", "？", "<|endoftext|>", "✓"]
    assert [r[2] for r in table if r[3] == "✓"] == list(QA[1][1]) + ["<|endoftext|>"]
    assert all(r[3] == "✗" for r in table[:22])
    assert lines[-1] == "positions: 34, counted in the loss: 12 (35.3%)"


def test_bin_inspect_row_out_of_range(tmp_path, capsys, monkeypatch):
    """In this process, through main() (test_damaged_checkpoints.py runs bin/inspect's error in a real one)."""
    config = write_tiny_config(str(tmp_path), tmp_path / "run")
    code, _, err = run_main("inspect", ["--config", config, "--split", "val", "--row", 4], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == f"error: --row 4: {tmp_path / 'val.jsonl'} has rows 0 to 3"


@pytest.mark.slow
def test_bin_inspect_with_checkpoint_shows_the_training_loss(trained_run):
    """The mean of the printed per-token losses is the training loss of that row,
    computed independently with steps.loss_sums on the same example."""
    import jax.numpy as jnp
    from jaxsft import model, runs, steps
    from jaxsft.batching import Batch
    from jaxsft.data import read_jsonl

    proc = run_script("inspect", "--config", trained_run["config"], "--split", "val", "--row", 0,
                      "--checkpoint", trained_run["run_dir"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["pos", "token", "target", "loss", "nll"]
    table = [l.split() for l in lines[2:-2]]
    counted = [float(r[4]) for r in table if r[3] == "✓"]
    assert len(counted) == len(QA[0][1]) + 1

    params, model_cfg, tok = runs.restore(trained_run["run_dir"])
    row = read_jsonl(trained_run["rows"])[0]
    x, y, m = chatml.to_example(*chatml.render(row.messages, tok, "你是一个有帮助的AI助手。"), model_cfg.max_seq_len)
    s, n = steps.loss_sums(params, model.abstract(model_cfg)[0],
                           Batch(jnp.asarray(x[None]), jnp.asarray(y[None]), jnp.asarray(m[None], jnp.float32)))
    assert int(n) == len(counted)
    mean = float(s / n)
    assert lines[-1].startswith("loss over counted positions: ")
    assert float(lines[-1].split()[4]) == pytest.approx(mean, abs=1e-4)
    assert sum(counted) / len(counted) == pytest.approx(mean, abs=1e-3)  # printed to 3 decimals
    assert mean < 0.1  # the tiny model has memorised this answer
