"""Relative kinds against independent references (random inputs, 1e-5 in float32).

ALiBi: the paper's formula in NumPy float64 and BLOOM's ``build_alibi_tensor``; T5:
transformers' ``T5Attention`` with our table copied in; Shaw and xPos: NumPy float64
transcriptions of the papers' equations, run through ``dot_product_attention``.
"""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from transformers import T5Config
from transformers.models.bloom import modeling_bloom as hf_bloom
from transformers.models.t5 import modeling_t5 as hf_t5

from attnzoo.models import masks
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.positional import PositionConfig, make_encoding, make_layer_encoding
from attnzoo.models.positional.alibi import alibi_slopes
from attnzoo.models.positional.t5 import t5_bucket
from attnzoo.models.positional.xpos import apply_xpos


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _arange(batch, length, offset=0):
    return jnp.broadcast_to(jnp.arange(offset, offset + length, dtype=jnp.int32), (batch, length))


def _close(got, want, *, atol, label):
    """assert_allclose (absolute) printing the max abs error (``pytest -s | grep max_abs_err``)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
    print(f"max_abs_err {label}: {err:.1e}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def _encoding(kind, *, n_heads, causal, d_model=32, **options):
    return make_encoding(
        PositionConfig(kind=kind, **options),
        d_model=d_model,
        n_heads=n_heads,
        head_dim=d_model // n_heads,
        causal=causal,
        rngs=nnx.Rngs(0),
    )


def _softmax64(logits, mask):
    logits = np.where(mask, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- ALiBi ---------------------------------------------------------------------------------


def _paper_slopes(n: int) -> np.ndarray:
    """Press et al.: 2^(-8h/n), h = 1..n; otherwise the closest power of two plus every other
    slope of its double (the authors' reference code)."""
    if math.log2(n).is_integer():
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    c = 2 ** math.floor(math.log2(n))
    return np.concatenate([_paper_slopes(c), _paper_slopes(2 * c)[0::2][: n - c]])


@pytest.mark.parametrize("n_heads", [1, 2, 4, 6, 8, 12, 16, 24])
def test_alibi_slopes_match_paper_and_bloom(n_heads):
    got = np.asarray(alibi_slopes(n_heads))
    np.testing.assert_allclose(got, _paper_slopes(n_heads), rtol=1e-12)
    bloom = hf_bloom._get_alibi_slopes(n_heads, torch.device("cpu")).numpy()
    np.testing.assert_allclose(got, bloom, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_heads", [5, 8, 12])
def test_alibi_bias_matches_paper_formula(n_heads, causal):
    T = 17
    pos = _arange(2, T)
    got = _encoding("alibi", n_heads=n_heads, causal=causal, d_model=48).attention_bias(pos, pos)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    want = -_paper_slopes(n_heads)[:, None, None] * np.abs(i - j)  # (N, T, T)
    _close(
        got,
        np.broadcast_to(want, got.shape),
        atol=1e-5,
        label=f"alibi N={n_heads} causal={causal} vs paper",
    )
    if causal:  # the paper's causal form m * (j - i) on the allowed entries
        allowed = j <= i
        np.testing.assert_allclose(
            np.asarray(got)[0][:, allowed],
            (_paper_slopes(n_heads)[:, None, None] * (j - i))[:, allowed],
            atol=1e-5,
        )


@pytest.mark.parametrize("n_heads", [6, 12])
def test_alibi_matches_bloom_build_alibi_tensor_with_left_padding(n_heads):
    B, T = 2, 11
    attention_mask = np.ones((B, T), np.int64)
    attention_mask[1, :3] = 0  # left-padded row, as BLOOM batches prompts
    bloom = hf_bloom.build_alibi_tensor(torch.from_numpy(attention_mask), n_heads, torch.float32)
    bloom = bloom.reshape(B, n_heads, 1, T).numpy()  # slope * key position, same for every query
    pos = jnp.asarray(np.maximum(attention_mask.cumsum(-1) - 1, 0), jnp.int32)
    got = np.asarray(
        _encoding("alibi", n_heads=n_heads, causal=True, d_model=48).attention_bias(pos, pos)
    )
    allowed = np.asarray(masks.causal(pos, pos)) & (attention_mask[:, None, None, :] == 1)
    allowed = np.broadcast_to(allowed, got.shape)
    # BLOOM's bias is ours plus a per-query constant (softmax-invariant): equal after softmax
    logits = _random((B, n_heads, T, T))
    got_p = _softmax64(logits + got, allowed)
    want_p = _softmax64(logits + bloom, allowed)
    rows = allowed.any(-1)
    _close(got_p[rows], want_p[rows], atol=1e-6, label=f"alibi N={n_heads} probs vs bloom")
    diff = np.where(allowed, got - bloom, np.nan)
    spread = np.nanmax(diff, -1) - np.nanmin(diff, -1)
    np.testing.assert_allclose(spread[rows], 0.0, atol=1e-5)


# ---- T5 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 20)])
def test_t5_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    rel = np.arange(-400, 401)
    want = hf_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    ).numpy()
    got = t5_bucket(
        jnp.asarray(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > num_buckets // 2  # the log-spaced range is exercised


@pytest.mark.parametrize("causal", [True, False])
def test_t5_bias_matches_t5attention_compute_bias(causal):
    N, T = 4, 150  # longer than max_distance: the last bucket is reached
    enc = _encoding("t5", n_heads=N, causal=causal)
    cfg = T5Config(
        d_model=32,
        d_kv=8,
        num_heads=N,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        is_decoder=causal,
    )
    hf = hf_t5.T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0)
    with torch.no_grad():
        hf.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(enc.table[...])))
        want = hf.compute_bias(T, T).numpy()  # (1, N, T, T)
    pos = _arange(2, T)
    got = enc.attention_bias(pos, pos)
    assert got.shape == (2, N, T, T)
    _close(got, np.broadcast_to(want, got.shape), atol=1e-6, label=f"t5 causal={causal} vs hf")


@settings(max_examples=20, deadline=None)
@given(shift=st.integers(0, 5000), kind=st.sampled_from(["alibi", "t5"]), causal=st.booleans())
def test_relative_biases_are_translation_invariant(shift, kind, causal):
    enc = _encoding(kind, n_heads=4, causal=causal)
    pos = jnp.asarray([[0, 3, 4, 9, 30, 200]], jnp.int32)
    np.testing.assert_array_equal(
        enc.attention_bias(pos, pos), enc.attention_bias(pos + shift, pos + shift)
    )


# ---- Shaw ----------------------------------------------------------------------------------


def _shaw_reference(q, k, v, w_k, w_v, max_distance, causal):
    """Shaw et al. eqs. 3-5 in float64 over [B, T, N, H] arrays (tables shared by heads)."""
    q, k, v, w_k, w_v = (np.asarray(a, np.float64) for a in (q, k, v, w_k, w_v))
    T, H = q.shape[1], q.shape[-1]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    idx = np.clip(j - i, -max_distance, max_distance) + max_distance
    a_k, a_v = w_k[idx], w_v[idx]  # (T, T, H): a_ij
    e = (np.einsum("bind,bjnd->bnij", q, k) + np.einsum("bind,ijd->bnij", q, a_k)) / np.sqrt(H)
    alpha = _softmax64(e, (j <= i) if causal else np.ones((T, T), bool))
    return np.einsum("bnij,bjnd->bind", alpha, v) + np.einsum("bnij,ijd->bind", alpha, a_v)


@pytest.mark.parametrize("causal", [True, False])
def test_shaw_attention_matches_paper_equations(causal):
    B, T, N, H, kmax = 2, 13, 2, 8, 3
    layer = make_layer_encoding(
        PositionConfig(kind="shaw", shaw_max_distance=kmax),
        n_heads=N,
        head_dim=H,
        causal=causal,
        rngs=nnx.Rngs(0),
    )
    layer.rel_k[...] = jnp.asarray(_random((2 * kmax + 1, H), 7))
    layer.rel_v[...] = jnp.asarray(_random((2 * kmax + 1, H), 8))
    q, k, v = (_random((B, T, N, H), s) for s in (1, 2, 3))
    pos = _arange(B, T)
    rel_k, rel_v = layer.relative(pos, pos)
    assert rel_k.shape == rel_v.shape == (B, T, T, H)
    mask = masks.causal(pos, pos) if causal else None
    got = dot_product_attention(q, k, v, mask=mask, rel_k=rel_k, rel_v=rel_v)
    want = _shaw_reference(q, k, v, layer.rel_k[...], layer.rel_v[...], kmax, causal)
    _close(got, want, atol=1e-5, label=f"shaw causal={causal} vs paper")
    plain = dot_product_attention(q, k, v, mask=mask)
    assert not np.allclose(plain, want, atol=1e-2)  # the relative terms matter


# ---- xPos ----------------------------------------------------------------------------------


def _xpos_reference(x, positions, *, is_key, gamma, base=10000.0):
    """Sun et al. eq. (xPos) in complex form, float64: pairs (2i, 2i+1) as x_2i + i x_2i+1,
    times e^{i m theta_i} zeta_i^{+-m/gamma}, theta_i = base^(-2i/d), zeta_i = (2i/d + 0.4)/1.4."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    i = np.arange(d // 2)
    theta = base ** (-2.0 * i / d)
    zeta = (2.0 * i / d + 0.4) / 1.4
    m = np.asarray(positions, np.float64)[:, :, None, None]  # (B, T, 1, 1)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * m * theta)
    z *= zeta ** ((-m if is_key else m) / gamma)
    return np.stack([z.real, z.imag], -1).reshape(x.shape)


def test_xpos_matches_paper_and_attention_decays():
    B, T, N, H, gamma = 2, 24, 2, 16, 8.0  # small gamma: the decay is large over 24 positions
    q, k, v = (_random((B, T, N, H), s) for s in (4, 5, 6))
    pos = _arange(B, T, offset=3)
    got_q = apply_xpos(q, pos, is_key=False, scale_base=gamma)
    got_k = apply_xpos(k, pos, is_key=True, scale_base=gamma)
    np.testing.assert_allclose(
        got_q, _xpos_reference(q, pos, is_key=False, gamma=gamma), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        got_k, _xpos_reference(k, pos, is_key=True, gamma=gamma), rtol=1e-5, atol=1e-5
    )
    # full causal attention against the float64 transcription
    rq = _xpos_reference(q, pos, is_key=False, gamma=gamma)
    rk = _xpos_reference(k, pos, is_key=True, gamma=gamma)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    e = np.einsum("bind,bjnd->bnij", rq, rk) / np.sqrt(H)
    want = np.einsum("bnij,bjnd->bind", _softmax64(e, j <= i), v)
    got = dot_product_attention(got_q, got_k, v, mask=masks.causal(pos, pos))
    _close(got, want, atol=1e-5, label="xpos attention vs paper")


@settings(max_examples=20, deadline=None)
@given(m=st.integers(0, 300), n=st.integers(0, 300), shift=st.integers(0, 300))
def test_xpos_scores_depend_only_on_offset(m, n, shift):
    q, k = _random((1, 1, 1, 16), 9), _random((1, 1, 1, 16), 10)

    def score(a, b):
        rq = apply_xpos(q, jnp.full((1, 1), a), is_key=False, scale_base=64.0)
        rk = apply_xpos(k, jnp.full((1, 1), b), is_key=True, scale_base=64.0)
        return float(jnp.sum(rq * rk))

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)


def test_jit_grad_vmap_of_relative_kinds():
    pos = _arange(3, 9)
    for kind in ("alibi", "t5"):
        enc = _encoding(kind, n_heads=4, causal=True)
        graphdef, state = nnx.split(enc)
        f = jax.jit(lambda s, p: nnx.merge(graphdef, s).attention_bias(p, p))
        np.testing.assert_allclose(f(state, pos), enc.attention_bias(pos, pos), atol=1e-6)
        rows = jax.vmap(lambda p: nnx.merge(graphdef, state).attention_bias(p[None], p[None]))(pos)
        np.testing.assert_allclose(rows[:, 0], enc.attention_bias(pos, pos), atol=1e-6)
    enc = _encoding("t5", n_heads=4, causal=True)
    graphdef, state = nnx.split(enc)
    grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).attention_bias(pos, pos)))(state)
    counts = np.asarray(grads["table"][...])  # d sum / d table = how often each bucket is used
    np.testing.assert_array_equal(counts.sum(0), np.full(4, 3 * 9 * 9))
    x = jnp.asarray(_random((3, 9, 2, 16)))
    g = jax.grad(lambda x: jnp.sum(apply_xpos(x, pos, is_key=False, scale_base=4.0)))(x)
    assert np.isfinite(np.asarray(g)).all() and np.abs(g).max() > 0
