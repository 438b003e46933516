"""The accelerator kernels behind ``dot_product_attention(implementation=...)``.

splash runs here in Pallas interpret mode, so its values and gradients are checked against the
independent einsum path for every mask kind and head grouping. cuDNN cannot run on a CPU host:
its checks (what it refuses, the default's logged fallback) run with the backend faked.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.models import attention, attention_kernels, decoder_lm
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.masks import MaskSpec, positions_from_segments

B, T, H = 2, 256, 32
BLOCK = 128  # splash blocks: 2 x 2 per [T, T], so block skipping and partial blocks both occur


def _qkv(n_heads, kv_heads, t=T, s=T, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, n_heads, H))
    k = rng.normal(size=(B, s, kv_heads, H))
    v = rng.normal(size=(B, s, kv_heads, H))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _packed_ids(t):
    """Row 0: segments of 100, 90, 40 tokens then 26 padding; row 1: one full segment."""
    row0 = np.concatenate([np.full(100, 1), np.full(90, 2), np.full(40, 3), np.zeros(t - 230)])
    return jnp.asarray(np.stack([row0, np.ones(t)]), jnp.int32)


def _key_valid(s):
    valid = np.ones((B, s), np.int32)
    valid[0, s - 37 :] = 0  # row 0: 37 padded keys
    return jnp.asarray(valid)


def _spec(kind: str, t: int, s: int) -> MaskSpec:
    if kind == "none":
        return MaskSpec()
    if kind == "causal":
        return MaskSpec(causal=True)
    if kind == "window":
        return MaskSpec(causal=True, sliding_window=50)
    if kind == "key_padding":
        return MaskSpec.key_padding(_key_valid(s).astype(bool))
    if kind == "packed":  # the model's spec: shared positions restarting per segment
        ids = _packed_ids(t)
        pos = positions_from_segments(ids)
        return MaskSpec(
            causal=True,
            sliding_window=64,
            q_positions=pos,
            k_positions=pos,
            q_segment_ids=ids,
            k_segment_ids=ids,
            positions_are_indices=True,
        )
    raise AssertionError(kind)


def _visible_rows(spec: MaskSpec, t: int, s: int) -> jax.Array:
    """[B, T] bool: query rows that see at least one key (others are path-specific)."""
    dense = spec.to_dense(t, s)
    if dense is None:
        return jnp.ones((B, t), bool)
    return jnp.broadcast_to(dense, (B, 1, t, s)).any(-1)[:, 0]


def _value_and_grads(impl, q, k, v, spec, weight):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask=spec, implementation=impl, block_size=BLOCK)
        return (out * weight).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CASES = [
    # every mask kind with GQA (the vmapped MQA kernel), every grouping with the packed spec
    ("none", 4, 2, T, T),
    ("causal", 4, 2, T, T),
    ("window", 4, 2, T, T),
    ("key_padding", 4, 2, 128, T),  # cross-attention shape: q_len != k_len
    ("packed", 4, 4, T, T),  # MHA
    ("packed", 4, 2, T, T),  # GQA
    ("packed", 4, 1, T, T),  # MQA
]


@pytest.mark.parametrize("kind, n_heads, kv_heads, t, s", CASES)
def test_splash_values_and_gradients_equal_einsum(kind, n_heads, kv_heads, t, s):
    q, k, v = _qkv(n_heads, kv_heads, t, s)
    spec = _spec(kind, t, s)
    rows = _visible_rows(spec, t, s)
    rng = np.random.default_rng(1)
    weight = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * rows[:, :, None, None]
    out, grads = _value_and_grads("splash", q, k, v, spec, weight)
    ref_out, ref_grads = _value_and_grads("einsum", q, k, v, spec, weight)
    assert bool(jnp.isfinite(out).all())
    sel = np.asarray(rows)
    np.testing.assert_allclose(out[sel], ref_out[sel], rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_splash_block_is_the_largest_lane_multiple_dividing_the_length():
    assert attention_kernels.splash_block(256, 512) == 256
    assert attention_kernels.splash_block(1024, 512) == 512
    assert attention_kernels.splash_block(640, 512) == 128
    assert attention_kernels.splash_block(768, 512) == 384


def test_splash_lowers_the_mosaic_kernel_when_exported_for_tpu():
    """Interpret mode is only the CPU lowering: an export for TPU holds the compiled kernel."""
    q, k, v = _qkv(4, 2)

    def loss(q, k, v):
        return dot_product_attention(q, k, v, causal=True, implementation="splash").sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = jax.export.export(grad, platforms=["tpu"])(q, k, v).mlir_module()
    assert "tpu_custom_call" in text
    cpu_text = jax.export.export(grad, platforms=["cpu"])(q, k, v).mlir_module()
    assert "tpu_custom_call" not in cpu_text


def test_splash_in_the_model_equals_einsum():
    """The decoder's own MaskSpec (packed segments, derived positions) reaches the kernel."""
    base = decoder_lm.Config.tiny(vocab_size=64).replace(d_model=64, n_layers=1, n_heads=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (B, T)), jnp.int32)
    ids = _packed_ids(T)
    outs = {}
    for impl in ("einsum", "splash"):
        cfg = base.replace(attention_impl=impl)
        graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
        outs[impl] = decoder_lm.apply(graphdef, params, tokens, segment_ids=ids)
    real = np.asarray(ids != 0)
    np.testing.assert_allclose(outs["splash"][real], outs["einsum"][real], rtol=1e-4, atol=1e-4)


# ---- bad requests ----------------------------------------------------------------------------


def _call(impl, *, n_heads=4, kv_heads=2, t=T, dtype=jnp.float32, **kw):
    q, k, v = (x.astype(dtype) for x in _qkv(n_heads, kv_heads, t, t))
    return dot_product_attention(q, k, v, implementation=impl, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bias=jnp.zeros((1, 4, T, T))), "no logits bias"),
        (dict(rel_k=jnp.zeros((1, T, T, H))), "Shaw"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
        (dict(mask=jnp.ones((1, 1, T, T), bool)), "no dense mask"),
        (dict(t=200, causal=True), "multiples of 128"),
        (  # a KV cache's mask: causal over explicit positions
            dict(mask=MaskSpec(causal=True, q_positions=jnp.arange(T)[None] + 3)),
            "explicit positions",
        ),
    ],
)
def test_splash_refuses_what_it_cannot_compute(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        _call("splash", **kw)
    assert "'einsum', 'jax', 'blockwise'" in str(err.value)  # names what does run


def test_unknown_implementation_lists_every_path():
    with pytest.raises(ValueError, match="'cudnn', 'splash'"):
        _call("flash")


def test_splash_refuses_a_gpu_backend(monkeypatch):
    monkeypatch.setattr(attention_kernels.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="splash is a TPU kernel.*'gpu'"):
        _call("splash", causal=True)


def test_cudnn_refuses_a_cpu_backend():
    with pytest.raises(ValueError, match="cudnn needs a CUDA GPU; the backend is 'cpu'") as err:
        _call("cudnn", causal=True, dtype=jnp.bfloat16)
    assert "'einsum', 'jax', 'blockwise'" in str(err.value)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU of compute capability ``cc`` as far as the selection logic can tell."""
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")

    def set_cc(cc=(8, 0)):
        monkeypatch.setattr(attention_kernels, "_cuda_compute_capability", lambda: cc)

    set_cc()
    attention._logged_reasons.clear()
    return set_cc


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dtype=jnp.float32), "bfloat16 or float16 inputs, got float32"),
        (dict(n_heads=2, kv_heads=2, dtype=jnp.bfloat16, head=136), "head_dim a multiple of 8"),
        (dict(dtype=jnp.bfloat16, head=12), "head_dim a multiple of 8"),
        (dict(dtype=jnp.bfloat16, rel_k=True), "Shaw"),
    ],
)
def test_cudnn_refuses_unsupported_inputs(fake_gpu, kw, match):
    kw = dict(kw)
    dtype, head = kw.pop("dtype"), kw.pop("head", H)
    q = jnp.zeros((B, 16, kw.pop("n_heads", 4), head), dtype)
    k = jnp.zeros((B, 16, kw.pop("kv_heads", 2), head), dtype)
    if kw.pop("rel_k", False):
        kw["rel_k"] = jnp.zeros((1, 16, 16, head))
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, k, implementation="cudnn", **kw)
    # Hopper allows head_dim up to 256
    if head == 136:
        fake_gpu((9, 0))
        assert (
            attention_kernels.cudnn_unsupported(
                q, k, MaskSpec(), None, rel=False, dropout=False, structured_only=False
            )
            is None
        )


def test_gpu_default_is_cudnn_and_falls_back_with_one_log_per_reason(fake_gpu, caplog):
    bf16 = jnp.zeros((B, 16, 4, H), jnp.bfloat16)
    spec = MaskSpec(causal=True)
    resolve = attention._resolve
    assert resolve(None, bf16, bf16, spec, None, rel=False, dropout=False) == "cudnn"
    f32 = bf16.astype(jnp.float32)
    with caplog.at_level(logging.INFO, logger="attnzoo.models.attention"):
        for _ in range(3):
            assert resolve(None, f32, f32, spec, None, rel=False, dropout=False) == "jax"
            assert resolve(None, bf16, bf16, spec, None, rel=True, dropout=False) == "jax"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per reason
    assert "float32" in messages[0] and "'jax'" in messages[0]
    # the fallback really runs (XLA's jax.nn path) and equals einsum
    q, k, v = _qkv(4, 2, 16, 16)
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, causal=True),
        dot_product_attention(q, k, v, causal=True, implementation="einsum"),
        atol=1e-5,
    )


def test_gpu_default_avoids_cudnn_over_cache_positions(fake_gpu):
    bf16 = jnp.zeros((B, 1, 4, H), jnp.bfloat16)
    keys = jnp.zeros((B, 32, 4, H), jnp.bfloat16)
    cache_spec = MaskSpec(
        causal=True, q_positions=jnp.full((B, 1), 5), k_positions=jnp.arange(32)[None]
    )
    resolve = attention._resolve
    assert resolve(None, bf16, keys, cache_spec, None, rel=False, dropout=False) == "jax"


def test_tpu_default_is_splash_from_its_length_where_it_applies(monkeypatch):
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(attention_kernels.jax, "default_backend", lambda: "tpu")
    assert attention.default_implementation(attention.SPLASH_FROM - 1) == "einsum"
    assert attention.default_implementation(attention.SPLASH_FROM) == "splash"
    x = jnp.zeros((B, T, 4, H))
    resolve = attention._resolve
    assert resolve(None, x, x, _spec("packed", T, T), None, rel=False, dropout=False) == "splash"
    bias = jnp.zeros((1, 4, T, T))
    assert resolve(None, x, x, MaskSpec(causal=True), bias, rel=False, dropout=False) == "einsum"
    odd = jnp.zeros((B, 200, 4, H))
    assert resolve(None, odd, odd, MaskSpec(), None, rel=False, dropout=False) == "einsum"
    assert resolve(None, x, x, MaskSpec(), None, rel=False, dropout=True) == "einsum"
