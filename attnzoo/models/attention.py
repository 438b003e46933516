"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1) as a pure function.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias) V

Shapes use ``B`` batch, ``T`` query length, ``S`` key length, ``N`` query heads, ``K`` key/value
heads (``N % K == 0``: MHA when equal, GQA when smaller, MQA when 1) and ``H`` head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("einsum", "jax", "blockwise")

# einsum is the fastest path on CPU; on GPU jax.nn.dot_product_attention can dispatch to cuDNN
# flash attention. Users override per call with ``implementation=``.
_DEFAULT_BY_BACKEND = {"cpu": "einsum", "gpu": "jax", "cuda": "jax", "rocm": "jax", "tpu": "einsum"}

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_implementation() -> str:
    return _DEFAULT_BY_BACKEND.get(jax.default_backend(), "einsum")


def _check_shapes(q, k, v, mask, bias):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [batch, length, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    for name, t in (("mask", mask), ("bias", bias)):
        if t is None:
            continue
        try:
            jnp.broadcast_shapes(t.shape, full)
        except ValueError:
            raise ValueError(
                f"{name} of shape {t.shape} is not broadcastable to [batch, heads, q_len, k_len] = "
                f"{full}; build it with attnzoo.models.masks (e.g. masks.causal(...))") from None


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
        ``"blockwise"`` (online softmax over key blocks, O(T * block) memory); default per
        backend (``default_implementation()``).
    Returns:
      [B, T, N, H], in the dtype of ``q``. Softmax runs in float32 for every input dtype.
    """
    _check_shapes(q, k, v, mask, bias)
    impl = implementation or default_implementation()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    needs_einsum = rel_k is not None or rel_v is not None or dropout_rate > 0.0
    if impl == "jax" and not needs_einsum:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    if impl == "blockwise" and not needs_einsum:
        from attnzoo.models import blockwise  # noqa: PLC0415  (optional path)

        return blockwise.blockwise_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                                             block_size=block_size)
    return _einsum_attention(q, k, v, mask=mask, bias=bias, scale=scale, rel_k=rel_k,
                             rel_v=rel_v, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _einsum_attention(q, k, v, *, mask, bias, scale, rel_k, rel_v, dropout_rate, dropout_rng):
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H)  # (B, T, K, G, H): query heads grouped by their kv head
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    if rel_k is not None:  # Shaw: q_i . a^K_ij
        logits += jnp.einsum("btkgh,btsh->bkgts", qg, rel_k.astype(q.dtype),
                             preferred_element_type=jnp.float32)
    logits = logits * scale
    if bias is not None:
        logits += _group(bias, K, G).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(_group(mask, K, G), logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs dropout_rng")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    if rel_v is not None:  # Shaw: sum_j w_ij a^V_ij
        out += jnp.einsum("bkgts,btsh->btkgh", weights, rel_v.astype(v.dtype))
    return out.reshape(B, T, N, H)


def _group(x: jax.Array, K: int, G: int) -> jax.Array:
    """[B, N, T, S] (N = K*G, or 1) -> [B, K, G, T, S] (broadcast dims kept at size 1)."""
    if x.ndim != 4:
        x = jnp.broadcast_to(x, (1,) * (4 - x.ndim) + x.shape)
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], K, G, x.shape[2], x.shape[3])
