"""Compact kept-block lists: round trips and the padding convention."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from oracles import check_lists
from pallas_kernels import block_index_to_mask, block_index_to_mask_transposed, mask_to_block_index


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(1, 9)),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_and_lists(shape, density, seed):
    mask = np.random.default_rng(seed).random(shape) < density
    index = mask_to_block_index(jnp.asarray(mask))
    for name in ("kv_indices", "kv_counts", "q_indices", "q_counts"):
        assert getattr(index, name).dtype == jnp.int32
    check_lists(mask, np.asarray(index.kv_indices), np.asarray(index.kv_counts))
    check_lists(np.swapaxes(mask, -1, -2), np.asarray(index.q_indices), np.asarray(index.q_counts))
    np.testing.assert_array_equal(np.asarray(block_index_to_mask(index)), mask)
    np.testing.assert_array_equal(np.asarray(block_index_to_mask_transposed(index)), mask)


def test_rejects_wrong_rank():
    import pytest

    with pytest.raises(ValueError, match="block_mask"):
        mask_to_block_index(jnp.ones((3, 4), bool))


def test_jit_matches_eager(rng):
    mask = jnp.asarray(rng.random((2, 3, 5, 11)) < 0.4)
    eager, jitted = mask_to_block_index(mask), jax.jit(mask_to_block_index)(mask)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_edge_rows_and_ragged_sizes(rng):
    """Empty, full, first-only and last-only rows, at block counts of ragged lengths (N=75600: 591 x 1182)."""
    for nq, nk in [(1, 1), (3, 2), (7, 13), (591, 1182)]:
        mask = rng.random((1, 2, nq, nk)) < rng.uniform(0.05, 0.95)
        mask[0, 0, 0] = False
        if nq > 1:
            mask[0, 0, 1] = True
        if nq > 2:
            mask[0, 0, 2] = False
            mask[0, 0, 2, -1] = True
        mask[0, 1, -1] = False
        mask[0, 1, -1, 0] = True
        index = jax.jit(mask_to_block_index)(jnp.asarray(mask))
        check_lists(mask, np.asarray(index.kv_indices), np.asarray(index.kv_counts))
        check_lists(np.swapaxes(mask, -1, -2), np.asarray(index.q_indices), np.asarray(index.q_counts))


def test_forward_lists_alone_skip_the_transposed_ones():
    """Under jit, the transposed (backward) lists are dead code when only the forward lists are used."""
    mask = jnp.zeros((1, 2, 4, 8), bool)
    hlo = lambda fn: jax.jit(fn).lower(mask).compile().as_text()
    assert hlo(lambda m: mask_to_block_index(m)[:2]).count(" scatter(") == 1
    assert hlo(mask_to_block_index).count(" scatter(") == 2
