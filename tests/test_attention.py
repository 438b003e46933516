"""dot_product_attention: every path against a NumPy float64 transcription of the paper."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.models import attention, masks
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.masks import MaskSpec

IMPLS = attention.IMPLEMENTATIONS


def reference(q, k, v, *, mask=None, bias=None, scale=None, rel_k=None, rel_v=None):
    """Vaswani et al. eq. 1 (+ Shaw et al. eqs. 3, 5) in float64, one head at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H**-0.5 if scale is None else scale
    mask = np.ones((B, N, T, S), bool) if mask is None else np.broadcast_to(mask, (B, N, T, S))
    bias = np.zeros((B, N, T, S)) if bias is None else np.broadcast_to(bias, (B, N, T, S))
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)  # query head n reads kv head n // G
            logits = q[b, :, n] @ k[b, :, kv].T
            if rel_k is not None:
                logits += np.einsum("th,tsh->ts", q[b, :, n], np.asarray(rel_k, np.float64)[b])
            logits = logits * scale + bias[b, n]
            logits = np.where(mask[b, n], logits, -1e30)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[b, :, n] = w @ v[b, :, kv]
            if rel_v is not None:
                out[b, :, n] += np.einsum("ts,tsh->th", w, np.asarray(rel_v, np.float64)[b])
    return out


def qkv(B=2, T=7, S=7, N=4, K=2, H=8, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, T, N, H), dtype),
        jax.random.normal(kk, (B, S, K, H), dtype),
        jax.random.normal(kv, (B, S, K, H), dtype),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_kv", [4, 2, 1])  # MHA, GQA, MQA
def test_matches_float64_reference(impl, n_kv):
    q, k, v = qkv(K=n_kv, T=6, S=9)
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 1, 6, 9))
    bias = jax.random.normal(jax.random.key(6), (1, 4, 6, 9))
    out = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=impl, block_size=4)
    np.testing.assert_allclose(out, reference(q, k, v, mask=mask, bias=bias), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_structured_masks_equal_dense_masks(impl):
    q, k, v = qkv(T=9, S=9)
    pos = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    dense = masks.combine(
        masks.causal(pos, pos), masks.sliding_window(pos, pos, 3), masks.segment(seg, seg)
    )
    spec = MaskSpec.causal_self(pos, segment_ids=seg, sliding_window=3)
    got = dot_product_attention(q, k, v, mask=spec, implementation=impl, block_size=4)
    np.testing.assert_allclose(got, reference(q, k, v, mask=dense), atol=1e-5)
    np.testing.assert_array_equal(spec.to_dense(9, 9), dense)


@pytest.mark.parametrize("impl", IMPLS)
def test_key_segment_ids_alone_mask_padded_keys(impl):
    """Only k_segment_ids: id 0 marks padded keys (cross-attention over a padded source)."""
    q, k, v = qkv(T=5, S=9)
    src_seg = jnp.array([[1, 1, 2, 2, 2, 3, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    dense = masks.padding(None, src_seg != 0)
    spec = MaskSpec(k_segment_ids=src_seg, dense=jnp.ones((1, 1, 5, 1), bool))
    got = dot_product_attention(q, k, v, mask=spec, implementation=impl, block_size=4)
    np.testing.assert_allclose(got, reference(q, k, v, mask=dense), atol=1e-5)
    np.testing.assert_array_equal(spec.to_dense(5, 9), jnp.broadcast_to(dense, (2, 1, 5, 9)))
    want = dot_product_attention(q, k, v, mask=dense, implementation=impl, block_size=4)
    np.testing.assert_array_equal(
        dot_product_attention(
            q, k, v, mask=MaskSpec.key_padding(src_seg != 0), implementation=impl, block_size=4
        ),
        want,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_flag_and_spec_are_anded(impl):
    q, k, v = qkv(T=6, S=6)
    pad = masks.padding(None, jnp.arange(6)[None] < 4)
    want = reference(q, k, v, mask=masks.combine(masks.causal_square(6), pad))
    for kw in (
        dict(mask=pad, causal=True),
        dict(mask=MaskSpec(dense=pad), causal=True),
        dict(mask=MaskSpec(causal=True, dense=pad)),
        dict(mask=MaskSpec(causal=True, dense=pad), causal=True),
    ):
        got = dot_product_attention(q, k, v, implementation=impl, block_size=4, **kw)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(kw))


def test_scale_and_shaw_relative_terms():
    q, k, v = qkv(T=5, S=5)
    rel_k = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
    rel_v = jax.random.normal(jax.random.key(2), (2, 5, 5, 8))
    out = dot_product_attention(q, k, v, scale=0.3, rel_k=rel_k, rel_v=rel_v)
    want = reference(q, k, v, scale=0.3, rel_k=rel_k, rel_v=rel_v)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_default_implementation_on_cpu_is_einsum_then_blockwise():
    assert jax.default_backend() == "cpu"
    assert attention.default_implementation() == "einsum"
    assert attention.default_implementation(512) == "einsum"
    assert attention.default_implementation(1024) == "blockwise"


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_softmax_runs_in_float32(impl):
    q, k, v = qkv(T=16, S=16, dtype=jnp.bfloat16)
    # Large logits: a bfloat16 softmax would lose the small weights entirely.
    out = dot_product_attention(q * 4, k, v, causal=True, implementation=impl, block_size=8)
    assert out.dtype == jnp.bfloat16
    want = reference(q * 4, k, v, mask=masks.causal_square(16))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def test_fully_masked_row_is_mean_of_values_not_nan():
    q, k, v = qkv(T=3, S=4)
    mask = jnp.ones((1, 1, 3, 4), bool).at[:, :, 1].set(False)
    for impl in IMPLS:
        out = dot_product_attention(q, k, v, mask=mask, implementation=impl, block_size=2)
        want = jnp.repeat(v.mean(1), 2, axis=1)  # query heads (0, 1) read kv head 0, ...
        np.testing.assert_allclose(out[:, 1], want, atol=1e-5, err_msg=impl)
        grads = jax.grad(lambda q: dot_product_attention(q, k, v, mask=mask).sum())(q)
        assert np.isfinite(np.asarray(grads)).all()


def test_dropout():
    q, k, v = qkv()
    key = jax.random.key(3)
    a = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
    b = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
    c = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Inverted dropout keeps the expected weights: averaging many draws recovers the output.
    keys = jax.random.split(key, 2000)
    mean = jax.vmap(lambda r: dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r))(
        keys
    ).mean(0)
    np.testing.assert_allclose(mean, reference(q, k, v), atol=0.12)
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, dropout_rate=0.1)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_grad_vmap(self):
        q, k, v = qkv(T=5, S=5)
        want = reference(q, k, v, mask=masks.causal_square(5))
        for impl in IMPLS:
            fn = self.variant(
                lambda q, k, v, impl=impl: dot_product_attention(
                    q, k, v, causal=True, implementation=impl, block_size=2
                )
            )
            np.testing.assert_allclose(fn(q, k, v), want, atol=1e-5, err_msg=impl)
            # vmap over the batch: attention is per-example.
            per_example = jax.vmap(lambda q, k, v: fn(q[None], k[None], v[None])[0])(q, k, v)
            np.testing.assert_allclose(per_example, want, atol=1e-5, err_msg=impl)
            grads = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
            ref_grads = jax.grad(
                lambda q, k, v: (dot_product_attention(q, k, v, causal=True) ** 2).sum(),
                argnums=(0, 1, 2),
            )(q, k, v)
            for g, r in zip(grads, ref_grads, strict=True):
                np.testing.assert_allclose(g, r, atol=1e-5, err_msg=impl)


def test_bad_input_errors():
    q, k, v = qkv(N=4, K=3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dot_product_attention(q, k, v)
    q, k, v = qkv(T=5, S=6)
    with pytest.raises(ValueError, match="mask of shape .* not broadcastable"):
        dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 6, 5), bool))
    with pytest.raises(ValueError, match="bias of shape .* not broadcastable"):
        dot_product_attention(q, k, v, bias=jnp.ones((2, 1, 1, 1, 6)))
    with pytest.raises(ValueError, match=r"\[batch, length, heads, head_dim\]"):
        dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="mask of shape .* not broadcastable"):
        dot_product_attention(q, k, v, mask=MaskSpec(dense=jnp.ones((1, 1, 6, 5), bool)))
    with pytest.raises(ValueError, match="q_segment_ids needs k_segment_ids"):
        dot_product_attention(q, k, v, mask=MaskSpec(q_segment_ids=jnp.ones((2, 5), jnp.int32)))
    with pytest.raises(ValueError, match=r"k_positions of shape \(2, 5\) is not broadcastable"):
        dot_product_attention(q, k, v, mask=MaskSpec(k_positions=jnp.ones((2, 5), jnp.int32)))
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        dot_product_attention(q, k, v, mask=MaskSpec(sliding_window=0))
