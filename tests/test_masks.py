"""Masks: NumPy loop transcriptions of each definition, and their effect on attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.models import masks
from attnzoo.models.attention import IMPLEMENTATIONS, dot_product_attention
from attnzoo.models.masks import MaskSpec

ints = st.lists(st.integers(0, 12), min_size=1, max_size=10)


def _np_mask(rule, q, k):
    return np.array([[rule(i, j) for j in k] for i in q], bool)[None, None]


@settings(max_examples=30, deadline=None)
@given(ints, ints, st.integers(1, 6))
def test_mask_definitions(qp, kp, window):
    q, k = jnp.asarray([qp]), jnp.asarray([kp])
    np.testing.assert_array_equal(masks.causal(q, k), _np_mask(lambda i, j: j <= i, qp, kp))
    np.testing.assert_array_equal(
        masks.sliding_window(q, k, window), _np_mask(lambda i, j: 0 <= i - j < window, qp, kp)
    )
    np.testing.assert_array_equal(
        masks.segment(q, k), _np_mask(lambda i, j: i == j and j != 0, qp, kp)
    )
    np.testing.assert_array_equal(
        masks.padding(q > 3, k > 3), _np_mask(lambda i, j: i > 3 and j > 3, qp, kp)
    )
    np.testing.assert_array_equal(masks.padding(None, k > 3)[0, 0, 0], np.asarray(kp) > 3)


def test_causal_square_and_combine():
    np.testing.assert_array_equal(masks.causal_square(4)[0, 0], np.tril(np.ones((4, 4), bool)))
    a = jnp.array([[True, False, True]])
    b = jnp.array([[True, True, False]])
    np.testing.assert_array_equal(masks.combine(a, None, b), [[True, False, False]])
    assert masks.combine(None, None) is None
    with pytest.raises(ValueError, match="sliding window must be >= 1"):
        masks.sliding_window(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0)


@settings(max_examples=12, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.booleans(),
    st.one_of(st.none(), st.integers(1, 5)),
    st.sampled_from(["none", "packed", "key_padding"]),
    st.integers(0, 99),
)
def test_mask_spec_dense_and_blocks_match_the_definitions(T, S, causal, window, segments, seed):
    """to_dense == the and of the pure masks; every block == the slice of to_dense, and a block
    reported empty holds no allowed pair."""
    rng = np.random.default_rng(seed)
    qp, kp = rng.integers(0, 12, (2, T)), rng.integers(0, 12, (2, S))
    qs, ks = rng.integers(0, 3, (2, T)), rng.integers(0, 3, (2, S))
    dense = rng.random((1, 1, T, S)) < 0.7
    spec = MaskSpec(
        causal=causal,
        sliding_window=window,
        q_positions=jnp.asarray(qp),
        k_positions=jnp.asarray(kp),
        q_segment_ids=jnp.asarray(qs) if segments == "packed" else None,
        k_segment_ids=jnp.asarray(ks) if segments != "none" else None,
        dense=jnp.asarray(dense),
    )
    want = masks.combine(
        masks.causal(qp, kp) if causal else None,
        masks.sliding_window(qp, kp, window) if window else None,
        masks.segment(qs, ks) if segments == "packed" else None,
        masks.padding(None, ks != 0) if segments == "key_padding" else None,
        dense,
    )
    full = np.broadcast_to(spec.to_dense(T, S), (2, 1, T, S))
    np.testing.assert_array_equal(full, np.broadcast_to(want, (2, 1, T, S)))
    for q0 in range(T):
        for k0 in range(S):
            tq, tk = min(2, T - q0), min(3, S - k0)
            block = spec.block(q0, tq, k0, tk)
            np.testing.assert_array_equal(
                np.broadcast_to(block, (2, 1, tq, tk)), full[:, :, q0 : q0 + tq, k0 : k0 + tk]
            )
            empty = spec.block_is_empty(q0, tq, k0, tk)
            assert (empty is None) == (not causal and window is None)
            if empty is not None and bool(empty):
                assert not full[:, :, q0 : q0 + tq, k0 : k0 + tk].any()


def test_mask_spec_construction_and_pytree():
    pad = jnp.array([[True, True, False]])
    assert MaskSpec.of(None) == MaskSpec()
    assert MaskSpec.of(None, causal=True).causal
    assert MaskSpec.of(pad).dense is pad
    spec = MaskSpec(sliding_window=2, k_segment_ids=pad.astype(jnp.int32))
    assert MaskSpec.of(spec) is spec and MaskSpec.of(spec, causal=True).causal
    # Arrays are leaves, causal / sliding_window static: jit retraces on them, not on values.
    leaves, treedef = jax.tree.flatten(spec.replace(causal=True))
    assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves).sliding_window == 2
    assert MaskSpec.causal_self().to_dense(2, 3).tolist() == [[[[1, 0, 0], [1, 1, 0]]]]
    np.testing.assert_array_equal(
        MaskSpec.key_padding(pad).to_dense(2, 3), masks.padding(None, pad)
    )
    assert MaskSpec().to_dense(2, 3) is None
    with pytest.raises(TypeError):
        MaskSpec(True)  # keyword-only
    with pytest.raises(ValueError, match="q_segment_ids needs k_segment_ids"):
        MaskSpec(q_segment_ids=pad).validate(1, 1, 3, 3)


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 1, 1, 1]])
    np.testing.assert_array_equal(
        masks.positions_from_segments(seg), [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    )


# ---- properties of attention under each mask, on every path ------------------------------


def _qkv(seed, T, N=2, K=1, H=4, B=1):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (B, T, N, H)),
        jax.random.normal(keys[1], (B, T, K, H)),
        jax.random.normal(keys[2], (B, T, K, H)),
    )


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 12), st.data(), st.sampled_from(IMPLEMENTATIONS), st.integers(0, 99))
def test_causal_future_keys_never_change_the_past(T, data, impl, seed):
    t = data.draw(st.integers(0, T - 2))
    q, k, v = _qkv(seed, T)
    noise_k, noise_v = _qkv(seed + 1, T)[1:]
    k2 = k.at[:, t + 1 :].set(noise_k[:, t + 1 :] * 10)
    v2 = v.at[:, t + 1 :].set(noise_v[:, t + 1 :] * 10)
    a = dot_product_attention(q, k, v, causal=True, implementation=impl, block_size=4)
    b = dot_product_attention(q, k2, v2, causal=True, implementation=impl, block_size=4)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the test can fail: the future did move


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 12), st.data(), st.sampled_from(IMPLEMENTATIONS), st.integers(0, 99))
def test_padded_keys_get_zero_weight(T, data, impl, seed):
    n_valid = data.draw(st.integers(1, T - 1))
    q, k, _ = _qkv(seed, T)
    valid = jnp.arange(T)[None] < n_valid  # (1, T)
    # With v = one-hot of the key index, the output *is* the attention weight row.
    v = jnp.eye(T)[None, :, None, :]  # (1, T, 1, T) as [B, S, K, H]
    k = k[..., :1].repeat(T, -1)
    weights = dot_product_attention(
        q[..., :1].repeat(T, -1),
        k,
        v,
        mask=masks.padding(None, valid),
        implementation=impl,
        block_size=4,
    )
    np.testing.assert_array_equal(weights[..., n_valid:], 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=2, max_size=12), st.sampled_from(IMPLEMENTATIONS))
def test_packed_segments_never_see_each_other(seg_list, impl):
    T = len(seg_list)
    seg = jnp.asarray([sorted(seg_list)])  # packed: contiguous segments
    q, k, v = _qkv(T, T)
    noise = _qkv(T + 1, T)
    spec = MaskSpec(q_segment_ids=seg, k_segment_ids=seg)
    out = dot_product_attention(q, k, v, mask=spec, causal=True, implementation=impl, block_size=4)
    for s in np.unique(seg):
        other = (seg != s)[0]
        k2 = jnp.where(other[None, :, None, None], noise[1], k)
        v2 = jnp.where(other[None, :, None, None], noise[2], v)
        out2 = dot_product_attention(
            q, k2, v2, mask=spec, causal=True, implementation=impl, block_size=4
        )
        mine = np.asarray(~other)
        np.testing.assert_allclose(out[:, mine], out2[:, mine], atol=1e-6)
        # ... and each segment equals attention over that segment alone.
        alone = dot_product_attention(
            q[:, mine], k[:, mine], v[:, mine], causal=True, implementation="einsum"
        )
        np.testing.assert_allclose(out[:, mine], alone, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 12), st.integers(0, 8), st.sampled_from(IMPLEMENTATIONS))
def test_sliding_window_at_least_length_is_full_causal(T, extra, impl):
    q, k, v = _qkv(T, T)
    local = dot_product_attention(
        q,
        k,
        v,
        mask=MaskSpec(causal=True, sliding_window=T + extra),
        implementation=impl,
        block_size=4,
    )
    full = dot_product_attention(q, k, v, causal=True, implementation=impl, block_size=4)
    np.testing.assert_allclose(local, full, atol=1e-6)
    if T > 2:  # a shorter window must differ
        short = dot_product_attention(
            q, k, v, mask=MaskSpec.causal_self(sliding_window=1), implementation=impl, block_size=4
        )
        assert not np.allclose(short, full)
