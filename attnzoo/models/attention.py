"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1) as a pure function.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias) V

Shapes use ``B`` batch, ``T`` query length, ``S`` key length, ``N`` query heads, ``K`` key/value
heads (``N % K == 0``: MHA when equal, GQA when smaller, MQA when 1) and ``H`` head dim.

Three interchangeable paths compute the same function:

* ``"einsum"``: two einsums and a float32 softmax; XLA fuses mask + softmax. Default on CPU/TPU.
* ``"jax"``: ``jax.nn.dot_product_attention``, which dispatches to cuDNN flash attention on
  GPU. Default on GPU.
* ``"blockwise"``: online softmax over key blocks with a recomputing backward
  (``attnzoo.models.blockwise``), O(T * block) memory for long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.models import masks
from attnzoo.models.blockwise import MASKED_LOGIT, blockwise_attention

IMPLEMENTATIONS = ("einsum", "jax", "blockwise")

# Measured on the shared 2-core dev CPU (forward + backward, float32, causal, N=4 H=64, best of
# 10-30 interleaved runs; `python -m benchmarks.attention` prints the same comparison):
#   B=8 T=256:  einsum 14.9 ms, naive einsum-softmax 15.6, jax.nn.dot_product_attention 19.9
#               (its XLA path vmaps over head groups), blockwise 27.0
#   B=1 T=512:  einsum 11.9 ms, naive 11.8, jax 12.1, blockwise 13.6
#   B=1 T=1024: blockwise 60 ms (skips the causal upper triangle, stays in cache), naive 102,
#               einsum 112, jax 120; at T=4096 blockwise 0.70 s vs einsum 3.6 s.
# On GPU jax.nn.dot_product_attention can use cuDNN flash attention.
_DEFAULT_BY_BACKEND = {"cpu": "einsum", "gpu": "jax", "cuda": "jax", "rocm": "jax", "tpu": "einsum"}
# Key lengths from which the default switches to "blockwise" (backends not listed: never).
_BLOCKWISE_FROM = {"cpu": 1024}


def default_implementation(k_len: int | None = None) -> str:
    """The attention path used when none is given, by ``jax.default_backend()`` and key length."""
    backend = jax.default_backend()
    threshold = _BLOCKWISE_FROM.get(backend)
    if k_len is not None and threshold is not None and k_len >= threshold:
        return "blockwise"
    return _DEFAULT_BY_BACKEND.get(backend, "einsum")


def _check_shapes(q, k, v, mask, bias):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, length, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}); "
            "use n_kv_heads = n_heads (MHA), 1 (MQA) or a divisor of n_heads (GQA)"
        )
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    for name, t in (("mask", mask), ("bias", bias)):
        if t is None:
            continue
        ok = t.ndim <= 4
        if ok:
            try:
                ok = jnp.broadcast_shapes(t.shape, full) == full
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(
                f"{name} of shape {t.shape} is not broadcastable to [batch, heads, q_len, k_len]"
                f" = {full}; build it with attnzoo.models.masks (e.g. masks.causal(...))"
            )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    rel_k: jax.Array | None = None,
    rel_v: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
    causal: bool = False,
    sliding_window: int | None = None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    block_size: int = 512,
) -> jax.Array:
    """Multi-head scaled dot-product attention.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys, ``N % K == 0``.
      v: [B, S, K, H] values.
      mask: bool, broadcastable to [B, N, T, S]; ``True`` = may attend.
      bias: float, broadcastable to [B, N, T, S], added to the logits (ALiBi, T5).
      scale: logit scale, default ``1/sqrt(H)``.
      rel_k: [B or 1, T, S, H] relative-position key terms (Shaw et al. 2018, eq. 5).
      rel_v: [B or 1, T, S, H] relative-position value terms (Shaw et al. 2018, eq. 3).
      dropout_rate: attention-weight dropout (needs ``dropout_rng``).
      implementation: ``"einsum"``, ``"jax"`` (``jax.nn.dot_product_attention``) or
        ``"blockwise"`` (O(T * block) memory); default ``default_implementation(S)``. Shaw terms
        and dropout always run on the einsum path.
      causal, sliding_window: structured masks over positions (``masks.causal``,
        ``masks.sliding_window``), and-ed with ``mask``. The blockwise path builds them per
        block, so no [T, S] mask is materialised.
      q_positions, k_positions: [B, T], [B, S] int positions for ``causal``/``sliding_window``;
        default ``0..T-1`` / ``0..S-1``.
      q_segment_ids, k_segment_ids: [B, T], [B, S] packed-segment ids (``masks.segment``).
      block_size: query and key block size of the blockwise path.
    Returns:
      [B, T, N, H], in the dtype of ``q``. Softmax runs in float32 for every input dtype.
    """
    _check_shapes(q, k, v, mask, bias)
    impl = implementation or default_implementation(k.shape[1])
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("give both q_segment_ids and k_segment_ids, or neither")
    needs_einsum = rel_k is not None or rel_v is not None or dropout_rate > 0.0
    if impl == "blockwise" and not needs_einsum:
        return blockwise_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            scale=scale,
            causal=causal,
            sliding_window=sliding_window,
            q_positions=q_positions,
            k_positions=k_positions,
            q_segment_ids=q_segment_ids,
            k_segment_ids=k_segment_ids,
            q_block=block_size,
            k_block=block_size,
        )
    mask = _dense_mask(
        mask,
        q.shape[:2],
        k.shape[:2],
        causal=causal,
        sliding_window=sliding_window,
        q_positions=q_positions,
        k_positions=k_positions,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
    )
    if impl == "jax" and not needs_einsum:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    return _einsum_attention(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        scale=scale,
        rel_k=rel_k,
        rel_v=rel_v,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )


def _dense_mask(
    mask,
    q_shape,
    k_shape,
    *,
    causal,
    sliding_window,
    q_positions,
    k_positions,
    q_segment_ids,
    k_segment_ids,
):
    """The structured options as one [B, 1, T, S] bool mask, and-ed with ``mask``."""
    if causal or sliding_window is not None:
        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(q_shape[1], dtype=jnp.int32), q_shape)
        if k_positions is None:
            k_positions = jnp.broadcast_to(jnp.arange(k_shape[1], dtype=jnp.int32), k_shape)
    if causal:
        mask = masks.combine(mask, masks.causal(q_positions, k_positions))
    if sliding_window is not None:
        mask = masks.combine(mask, masks.sliding_window(q_positions, k_positions, sliding_window))
    if q_segment_ids is not None:
        mask = masks.combine(mask, masks.segment(q_segment_ids, k_segment_ids))
    return mask


def _einsum_attention(q, k, v, *, mask, bias, scale, rel_k, rel_v, dropout_rate, dropout_rng):
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    grouped = G > 1
    if grouped:  # GQA/MQA: group query heads by the kv head they share, no kv copies
        q = q.reshape(B, T, K, G, H)  # (B, T, K, G, H)
        spec_q, spec_w = "btkgh", "bkgts"
    else:
        spec_q, spec_w = "btkh", "bkts"
    logits = jnp.einsum(f"{spec_q},bskh->{spec_w}", q, k, preferred_element_type=jnp.float32)
    if rel_k is not None:  # Shaw: q_i . a^K_ij
        logits += jnp.einsum(
            f"{spec_q},btsh->{spec_w}",
            q,
            rel_k.astype(q.dtype),
            preferred_element_type=jnp.float32,
        )
    logits = logits * scale
    if bias is not None:
        logits += _group(bias, K, G, grouped).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(_group(mask, K, G, grouped), logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(v.dtype)
    out = jnp.einsum(f"{spec_w},bskh->{spec_q}", weights, v)
    if rel_v is not None:  # Shaw: sum_j w_ij a^V_ij
        out += jnp.einsum(f"{spec_w},btsh->{spec_q}", weights, rel_v.astype(v.dtype))
    return out.reshape(B, T, N, H)


def _group(x: jax.Array, K: int, G: int, grouped: bool) -> jax.Array:
    """[B, N, T, S] (N = K*G, or 1) -> [B, K, G, T, S] when ``grouped`` (size-1 dims kept)."""
    if x.ndim != 4:
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if not grouped:
        return x
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], K, G, x.shape[2], x.shape[3])
