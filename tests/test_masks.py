"""The attention masks, each against a table written out by hand (1: the query row sees the key column).
Each is bool (B|1, T, S) (masks.py's contract), checked with chex before its table."""
import chex
import jax.numpy as jnp
import numpy as np

from jaxsft import masks


def _table(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in r.split()] for r in rows.strip().splitlines()])


def test_causal():
    chex.assert_shape(masks.causal(3), (1, 3, 3))
    chex.assert_type(masks.causal(3), bool)
    np.testing.assert_array_equal(masks.causal(3)[0], _table("""
        1 0 0
        1 1 0
        1 1 1"""))


def test_segment_causal_keeps_packed_examples_apart():
    # one row: example 1 (3 tokens), example 2 (2 tokens), one pad (segment 0)
    m = masks.segment_causal(jnp.array([[1, 1, 1, 2, 2, 0]]))
    chex.assert_shape(m, (1, 6, 6))
    chex.assert_type(m, bool)
    np.testing.assert_array_equal(m[0], _table("""
        1 0 0 0 0 0
        1 1 0 0 0 0
        1 1 1 0 0 0
        0 0 0 1 0 0
        0 0 0 1 1 0
        0 0 0 0 0 1"""))


def test_with_prefix_lets_flagged_tokens_see_the_shared_prompt():
    # 2 prefix keys, then the row's own 3 keys; tokens 0-1 share the prefix, token 2 does not
    m = masks.with_prefix(masks.causal(3), jnp.array([[1, 1, 0]]), P=2)
    chex.assert_shape(m, (1, 3, 2 + 3))  # (B, T, P + T)
    chex.assert_type(m, bool)
    np.testing.assert_array_equal(m[0], _table("""
        1 1 1 0 0
        1 1 1 1 0
        0 0 1 1 1"""))


def test_prefill_never_sees_left_padding():
    # prompts left-padded to P=3 in a cache of S=5 slots: row 0 holds 2 tokens, row 1 all 3
    m = masks.prefill(jnp.array([2, 3]), P=3, S=5)
    chex.assert_shape(m, (2, 3, 5))  # (B, P, S)
    chex.assert_type(m, bool)
    np.testing.assert_array_equal(m[0], _table("""
        0 0 0 0 0
        0 1 0 0 0
        0 1 1 0 0"""))
    np.testing.assert_array_equal(m[1], _table("""
        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0"""))


def test_decode_step_sees_every_filled_slot_up_to_its_own():
    # the token written at slot 3 (P=3, answer token 1): prompt slots (not pads) and itself
    m = masks.decode_step(jnp.array([2, 3]), P=3, S=5, index=3)
    chex.assert_shape(m, (2, 1, 5))  # (B, 1, S)
    chex.assert_type(m, bool)
    np.testing.assert_array_equal(m[:, 0], _table("""
        0 1 1 1 0
        1 1 1 1 0"""))
