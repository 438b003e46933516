"""Blockwise (online-softmax, recomputing backward) attention == the einsum path, in O(T) memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.models.attention import dot_product_attention
from attnzoo.models.blockwise import blockwise_attention
from attnzoo.models.masks import MaskSpec


def _compare(block_size, q, k, v, bias, dout, spec):
    """Outputs and (dq, dk, dv, dbias) of the einsum and blockwise paths, in one compile.

    ``spec`` goes through jit as a pytree (causal and sliding_window are static in it)."""

    def run(impl):
        def loss(q, k, v, bias):
            out = dot_product_attention(
                q, k, v, mask=spec, bias=bias, implementation=impl, block_size=block_size
            )
            return (out * dout).sum(), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            q, k, v, bias
        )
        return out, grads

    return run("einsum"), run("blockwise")


_compare_jit = jax.jit(_compare, static_argnums=0)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    T, S = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    K = draw(st.sampled_from([1, 2]))
    N = K * draw(st.sampled_from([1, 2]))
    H = draw(st.sampled_from([4, 8]))
    opts = dict(block_size=draw(st.integers(1, 16)))
    opts["causal"] = draw(st.booleans())
    if draw(st.booleans()):
        opts["sliding_window"] = draw(st.integers(1, 30))
    if draw(st.booleans()):
        # Positions with gaps and offsets (a KV cache, left padding), shared by q and k if T==S.
        opts["q_positions"] = draw(st.lists(st.integers(0, 40), min_size=T, max_size=T))
        opts["k_positions"] = draw(st.lists(st.integers(0, 40), min_size=S, max_size=S))
    segments = draw(st.sampled_from(["none", "packed", "key_padding"]))
    if segments == "packed":
        opts["q_segment_ids"] = draw(st.lists(st.integers(0, 2), min_size=T, max_size=T))
    if segments != "none":  # alone: id 0 marks padded keys
        opts["k_segment_ids"] = draw(st.lists(st.integers(0, 2), min_size=S, max_size=S))
    # Dense mask / bias with any mix of broadcast dims; masks may leave rows fully masked.
    mask_shape = bias_shape = None
    if draw(st.booleans()):
        mask_shape = tuple(draw(st.sampled_from([1, d])) for d in (B, N, T, S))
    if draw(st.booleans()):
        bias_shape = tuple(draw(st.sampled_from([1, d])) for d in (B, N, T, S))
    seed = draw(st.integers(0, 2**16))
    return (B, T, S, N, K, H), opts, mask_shape, bias_shape, seed


@settings(max_examples=20, deadline=None)
@given(problems())
def test_blockwise_equals_einsum_values_and_grads(problem):
    (B, T, S, N, K, H), opts, mask_shape, bias_shape, seed = problem
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, S, K, H))
    v = jax.random.normal(keys[2], (B, S, K, H))
    dout = jax.random.normal(keys[3], (B, T, N, H))
    arrays = {}
    for name in ("q_positions", "k_positions", "q_segment_ids", "k_segment_ids"):
        if name in opts:
            ids = jnp.asarray(opts.pop(name), jnp.int32)
            arrays[name] = jnp.broadcast_to(ids, (B, ids.shape[0]))
    if mask_shape is not None:
        arrays["dense"] = jax.random.bernoulli(keys[4], 0.6, mask_shape)
    bias = None if bias_shape is None else jax.random.normal(keys[5], bias_shape)
    block_size = opts.pop("block_size")
    spec = MaskSpec(**opts, **arrays)
    (want, want_grads), (got, got_grads) = _compare_jit(block_size, q, k, v, bias, dout, spec)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkvb", got_grads, want_grads, strict=True):
        if w is not None:
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_skipped_blocks_and_fully_masked_rows_match_einsum():
    """Causal blocks wholly in the future are skipped; rows with no visible key still average v.

    Row 1 of the batch has queries at positions 0..15 but keys at 100..115 (a cache that does
    not contain them), so every one of its blocks is skipped and every row is fully masked.
    """
    keys = jax.random.split(jax.random.key(7), 4)
    q, dout = (jax.random.normal(key, (2, 16, 2, 8)) for key in keys[:2])
    k, v = (jax.random.normal(key, (2, 16, 1, 8)) for key in keys[2:])
    q_pos = jnp.stack([jnp.arange(16), jnp.arange(16)])
    k_pos = jnp.stack([jnp.arange(16), jnp.arange(16) + 100])
    spec = MaskSpec(causal=True, sliding_window=6, q_positions=q_pos, k_positions=k_pos)
    kw = dict(mask=spec, block_size=4)

    def run(impl):
        f = lambda q, k, v: dot_product_attention(q, k, v, implementation=impl, **kw)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(dout)

    (want, want_grads), (got, got_grads) = run("einsum"), run("blockwise")
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[1], jnp.broadcast_to(v[1].mean(0), (16, 2, 8)), atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_bfloat16_and_vmap():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 20, 2, 8), jnp.bfloat16) for key in keys)
    got = blockwise_attention(q, k, v, causal=True, q_block=8, k_block=8)
    want = dot_product_attention(q, k, v, causal=True, implementation="einsum")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    per_example = jax.vmap(
        lambda q, k, v: blockwise_attention(q[None], k[None], v[None], causal=True, q_block=8)[0]
    )(q, k, v)
    want = blockwise_attention(q, k, v, causal=True, q_block=8)
    np.testing.assert_allclose(per_example, want, atol=1e-6)


def test_bad_options():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        blockwise_attention(q, q, q, mask=MaskSpec(sliding_window=0))
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        blockwise_attention(q, q, q, q_block=0)
    with pytest.raises(ValueError, match="q_segment_ids needs k_segment_ids"):
        blockwise_attention(q, q, q, mask=MaskSpec(q_segment_ids=jnp.ones((1, 4), jnp.int32)))
    with pytest.raises(ValueError, match="mask of shape .* not broadcastable"):
        blockwise_attention(q, q, q, mask=jnp.ones((1, 1, 4, 5), bool))


# ---- 16k tokens: the point of the blockwise path -----------------------------------------

LONG, PREFIX = 16384, 512


def _fwd_bwd(impl):
    def step(q, k, v, dout):
        out, vjp = jax.vjp(
            lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation=impl),
            q,
            k,
            v,
        )
        return out, *vjp(dout)

    return jax.jit(step)


def _planned_bytes(impl, T):
    spec = jax.ShapeDtypeStruct((1, T, 1, 16), jnp.float32)
    m = _fwd_bwd(impl).lower(spec, spec, spec, spec).compile().memory_analysis()
    return m.temp_size_in_bytes


def test_16k_causal_forward_backward_in_a_fraction_of_naive_memory():
    naive, blockwise = _planned_bytes("einsum", LONG), _planned_bytes("blockwise", LONG)
    # The einsum path holds [T, T] float32 logits/weights (1 GiB each); blockwise O(T * block).
    assert naive > 2 * LONG * LONG * 4
    assert blockwise < naive / 100, (blockwise, naive)

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, dout = (jax.random.normal(key, (1, LONG, 1, 16)) for key in keys)
    out, dq, dk, dv = _fwd_bwd("blockwise")(q, k, v, dout)
    # Causality makes the first PREFIX outputs (and their dq) a function of the first PREFIX
    # tokens only, so a small einsum run checks the 16k result exactly.
    p = slice(0, PREFIX)
    ref_out, ref_dq, _, _ = _fwd_bwd("einsum")(q[:, p], k[:, p], v[:, p], dout[:, p])
    np.testing.assert_allclose(out[:, p], ref_out, atol=1e-5)
    np.testing.assert_allclose(dq[:, p], ref_dq, atol=1e-5)
    # The last key is seen only by the last query: dk/dv there are a one-token computation.
    np.testing.assert_allclose(dv[0, -1], dout[0, -1] * _last_weight(q, k), atol=1e-5)
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()


def _last_weight(q, k):
    """Softmax weight of the last key in the last query's row (float64)."""
    qn, kn = np.asarray(q[0, -1, 0], np.float64), np.asarray(k[0, :, 0], np.float64)
    logits = kn @ qn / 4.0  # 1 / sqrt(16)
    w = np.exp(logits - logits.max())
    return (w / w.sum())[-1]
