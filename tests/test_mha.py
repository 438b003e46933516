"""MultiHeadAttention against torch.nn.functional.scaled_dot_product_attention, and its cache."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.models import masks
from attnzoo.models.masks import MaskSpec
from attnzoo.models.mha import EMPTY_POSITION, KVCache, MultiHeadAttention, write_positions

D, T, S = 32, 6, 9


def make(n_heads=4, n_kv_heads=None, seed=0, randomize=True, **kw):
    mha = MultiHeadAttention(D, n_heads, n_kv_heads=n_kv_heads, rngs=nnx.Rngs(seed), **kw)
    if randomize:  # biases and norm scales start at 0 / 1: make them matter
        graphdef, state = nnx.split(mha)
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
        noise = [0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        leaves = [x + n for x, n in zip(leaves, noise, strict=True)]
        mha = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
    return mha


def positions(B, L):
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


def torch_mha(mha, x, kv, mask, *, eps=1e-6):
    """The same layer from its weights, with torch's SDPA doing the attention."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    N, K = mha.n_heads, mha.n_kv_heads

    def proj(dense, inp):  # [B, L, D] @ [D, heads, H] -> [B, heads, L, H]
        y = torch.einsum("bld,dnh->bnlh", t(inp), t(dense.kernel[...]))
        return y + t(dense.bias[...])[None, :, None] if dense.bias is not None else y

    def rms(norm, y):
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        return y * t(norm.scale[...])

    q, k, v = proj(mha.q, x), proj(mha.k, kv), proj(mha.v, kv)
    if mha.q_norm is not None:
        q, k = rms(mha.q_norm, q), rms(mha.k_norm, k)
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if mask is None else torch.from_numpy(np.array(mask)),
        enable_gqa=K != N,
        scale=mha.scale,
    )
    out = torch.einsum("bnlh,nhd->bld", out, t(mha.o.kernel[...]))
    if mha.o.bias is not None:
        out = out + t(mha.o.bias[...])
    return out.numpy()


def inputs(B=2, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, T, D)), jax.random.normal(kk, (B, S, D))


@pytest.mark.parametrize("n_kv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("kind", ["causal", "padding", "cross"])
@pytest.mark.parametrize("extras", [{}, {"use_bias": True, "qk_norm": True}])
def test_matches_torch_sdpa(n_kv, kind, extras):
    x, src = inputs()
    mha = make(4, n_kv, causal=kind == "causal", **extras)
    q_pos = positions(2, T)
    if kind == "cross":
        valid = jnp.arange(S)[None] < jnp.array([[S], [4]])
        mask = masks.padding(None, valid)  # (B, 1, 1, S)
        out, _ = mha(x, mask=MaskSpec(q_positions=q_pos, dense=mask), kv=src)
        want = torch_mha(mha, x, src, mask)
    else:
        valid = jnp.arange(T)[None] < jnp.array([[T], [4]])
        mask = masks.padding(None, valid) if kind == "padding" else None
        out, _ = mha(x, mask=MaskSpec(q_positions=q_pos, dense=mask))
        dense = masks.combine(mask, masks.causal(q_pos, q_pos) if kind == "causal" else None)
        want = torch_mha(mha, x, x, dense)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=5, deadline=None)
@given(st.sampled_from([(4, 2), (4, 1), (2, 1), (6, 3)]), st.integers(0, 99))
def test_gqa_equals_mha_with_repeated_kv_weights(heads, seed):
    N, K = heads
    gqa = make(N, K, seed=seed, causal=True, head_dim=8)
    mha = make(N, N, seed=seed + 1, causal=True, head_dim=8)
    # Each query head n of the GQA layer reads kv head n // (N // K): repeat kv weights to match.
    mha.q.kernel[...] = gqa.q.kernel[...]
    mha.o.kernel[...] = gqa.o.kernel[...]
    mha.k.kernel[...] = jnp.repeat(gqa.k.kernel[...], N // K, axis=1)
    mha.v.kernel[...] = jnp.repeat(gqa.v.kernel[...], N // K, axis=1)
    x, _ = inputs(seed=seed)
    q_pos = positions(2, T)
    np.testing.assert_allclose(
        gqa(x, mask=MaskSpec(q_positions=q_pos))[0],
        mha(x, mask=MaskSpec(q_positions=q_pos))[0],
        atol=1e-5,
    )


def test_sliding_window_matches_torch():
    x, _ = inputs()
    mha = make(4, 2, causal=True, sliding_window=2)
    q_pos = positions(2, T)
    want = torch_mha(mha, x, x, masks.sliding_window(q_pos, q_pos, 2))
    np.testing.assert_allclose(mha(x, mask=MaskSpec(q_positions=q_pos))[0], want, atol=1e-5)


def test_kv_cache_decoding_with_per_example_write_index():
    """Prefill prompts of lengths (3, 5), decode 3 tokens: equals full causal attention."""
    B, L = 2, 8
    mha = make(4, 2, causal=True, seed=3)
    x = jax.random.normal(jax.random.key(4), (B, L, D))
    full, _ = mha(x, mask=MaskSpec(q_positions=positions(B, L)))  # (B, L, D)
    lengths = jnp.array([3, 5])

    cache = KVCache.zeros(B, L, 2, mha.head_dim)
    slot_pos = jnp.full((B, L), EMPTY_POSITION, jnp.int32)
    prompt_pos = positions(B, 5)  # row 0's slots 3, 4 get junk that decoding overwrites
    index = jnp.zeros((B,), jnp.int32)
    slot_pos = write_positions(slot_pos, prompt_pos, index)
    out, cache = mha(
        x[:, :5],
        mask=MaskSpec(q_positions=prompt_pos, k_positions=slot_pos),
        cache=cache,
        cache_index=index,
    )
    np.testing.assert_allclose(out[0, :3], full[0, :3], atol=1e-5)
    np.testing.assert_allclose(out[1], full[1, :5], atol=1e-5)

    index = lengths
    for _ in range(3):
        pos = index[:, None]  # (B, 1): each row at its own position
        x_t = jnp.take_along_axis(x, pos[..., None], axis=1)  # (B, 1, D)
        slot_pos = write_positions(slot_pos, pos, index)
        out, cache = mha(
            x_t,
            mask=MaskSpec(q_positions=pos, k_positions=slot_pos),
            cache=cache,
            cache_index=index,
        )
        want = jnp.take_along_axis(full, pos[..., None], axis=1)
        np.testing.assert_allclose(out, want, atol=1e-5)
        index = index + 1
    # The cache holds exactly the keys of every row's real tokens, at their write slots.
    k_full = mha.k(x)
    k_cached, _ = cache.keys_values()  # (B, S_max, K, H)
    np.testing.assert_allclose(
        cache.k[0, :, :6], jnp.swapaxes(k_full[0, :6], 0, 1), atol=1e-6, rtol=1e-6
    )
    np.testing.assert_allclose(k_cached[0, :6], k_full[0, :6], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(k_cached[1, :8], k_full[1, :8], atol=1e-6, rtol=1e-6)


def test_segment_ids_equal_dense_segment_mask():
    x, _ = inputs()
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 3, 3]])
    pos = jnp.array([[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]])
    for impl in ("einsum", "blockwise"):
        mha = make(4, 2, causal=True, implementation=impl)
        got, _ = mha(x, mask=MaskSpec(q_positions=pos, q_segment_ids=seg, k_segment_ids=seg))
        want = torch_mha(mha, x, x, masks.combine(masks.causal(pos, pos), masks.segment(seg, seg)))
        real = np.asarray(seg != 0)  # torch gives NaN on the fully masked padding row
        np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5, err_msg=impl)


def test_dropout():
    x, _ = inputs()
    q_pos = positions(2, T)
    mha = make(4, dropout=0.5)
    base = make(4)
    np.testing.assert_array_equal(
        mha(x, mask=MaskSpec(q_positions=q_pos))[0], base(x, mask=MaskSpec(q_positions=q_pos))[0]
    )
    a = mha(x, mask=MaskSpec(q_positions=q_pos), deterministic=False, rngs=nnx.Rngs(dropout=1))[0]
    b = mha(x, mask=MaskSpec(q_positions=q_pos), deterministic=False, rngs=nnx.Rngs(dropout=1))[0]
    c = mha(x, mask=MaskSpec(q_positions=q_pos), deterministic=False, rngs=nnx.Rngs(dropout=2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="needs rngs"):
        mha(x, mask=MaskSpec(q_positions=q_pos), deterministic=False)


def test_params_have_logical_axes():
    mha = make(4, 2, use_bias=True, qk_norm=True, randomize=False)
    axes = {
        "/".join(map(str, path)): p.out_sharding
        for path, p in nnx.to_flat_state(nnx.state(mha, nnx.Param))
    }
    assert axes["q/kernel"] == ("embed", "heads", "head_dim")
    assert axes["k/kernel"] == ("embed", "kv_heads", "head_dim")
    assert axes["v/bias"] == ("kv_heads", "head_dim")
    assert axes["o/kernel"] == ("heads", "head_dim", "embed")
    assert axes["q_norm/scale"] == ("norm",)


def test_bfloat16():
    x, _ = inputs()
    q_pos = positions(2, T)
    f32 = make(4, 2, causal=True)
    bf16 = make(4, 2, causal=True, dtype=jnp.bfloat16)
    out = bf16(x.astype(jnp.bfloat16), mask=MaskSpec(q_positions=q_pos))[0]
    assert out.dtype == jnp.bfloat16
    want = f32(x, mask=MaskSpec(q_positions=q_pos))[0]
    # bfloat16 keeps 8 mantissa bits: errors scale with the outputs' magnitude (~4 here).
    err = np.abs(np.asarray(out, np.float32) - want).max()
    assert err < 0.03 * np.abs(want).max(), err


class TestTransforms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_grad_vmap(self):
        x, _ = inputs()
        q_pos = positions(2, T)
        graphdef, params = nnx.split(make(4, 2, causal=True))
        apply = lambda p, x: nnx.merge(graphdef, p)(x, mask=MaskSpec(q_positions=q_pos))[0]
        want = apply(params, x)
        np.testing.assert_allclose(self.variant(apply)(params, x), want, atol=1e-6)
        per_row = jax.vmap(
            lambda xr, pr: nnx.merge(graphdef, params)(
                xr[None], mask=MaskSpec(q_positions=pr[None])
            )[0][0]
        )(x, q_pos)
        np.testing.assert_allclose(per_row, want, atol=1e-5)
        grads = self.variant(jax.grad(lambda p, x: (apply(p, x) ** 2).sum()))(params, x)
        # Finite differences along the gradient of one weight.
        eps = 1e-3
        g = grads["q"]["kernel"][...]
        bumped = jax.tree.map(lambda a: a, params)
        bumped["q"]["kernel"][...] = params["q"]["kernel"][...] + eps * g / jnp.linalg.norm(g)
        loss = lambda p: float((apply(p, x) ** 2).sum())
        np.testing.assert_allclose(
            (loss(bumped) - loss(params)) / eps, float(jnp.linalg.norm(g)), rtol=2e-2
        )


def test_bad_config_errors():
    with pytest.raises(ValueError, match=r"d_model \(32\) must be divisible by n_heads \(5\)"):
        MultiHeadAttention(D, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        MultiHeadAttention(D, 4, n_kv_heads=3, rngs=nnx.Rngs(0))
    mha = make(4, causal=True, randomize=False)
    x, _ = inputs()
    with pytest.raises(ValueError, match="needs k_positions and cache_index"):
        mha(x, mask=MaskSpec(q_positions=positions(2, T)), cache=KVCache.zeros(2, 8, 4, 8))
    with pytest.raises(ValueError, match="not broadcastable"):
        mha(x, mask=MaskSpec(q_positions=positions(2, T), dense=jnp.ones((2, 1, T, T + 1), bool)))
