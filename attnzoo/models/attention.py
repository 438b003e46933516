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

from attnzoo.models.blockwise import blockwise_attention
from attnzoo.models.masks import MASKED_LOGIT, MaskSpec

IMPLEMENTATIONS = ("einsum", "jax", "blockwise")

# Defaults are the fastest path measured per backend (CPU timings: benchmarks/README.md,
# "Attention paths on the dev CPU"); on GPU jax.nn.dot_product_attention can use cuDNN flash.
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


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> None:
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
    if bias is None:
        return
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    ok = bias.ndim <= 4
    if ok:
        try:
            ok = jnp.broadcast_shapes(bias.shape, full) == full
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"bias of shape {bias.shape} is not broadcastable to [batch, heads, q_len, k_len]"
            f" = {full}"
        )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec | jax.Array | None = None,
    causal: bool = False,
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
      mask: which pairs may attend: a ``masks.MaskSpec`` (causal, sliding window, positions,
        packed segments / key padding, dense), or a bool array broadcastable to [B, N, T, S]
        (``True`` = may attend), or None. The blockwise path builds a spec's structured masks
        per block, so no [T, S] mask is materialised.
      causal: keys at positions <= the query's only; and-ed with ``mask``
        (``MaskSpec.causal``; positions default to ``0..T-1`` / ``0..S-1``).
      bias: float, broadcastable to [B, N, T, S], added to the logits (ALiBi, T5).
      scale: logit scale, default ``1/sqrt(H)``.
      rel_k: [B or 1, T, S, H] relative-position key terms (Shaw et al. 2018, eq. 5).
      rel_v: [B or 1, T, S, H] relative-position value terms (Shaw et al. 2018, eq. 3).
      dropout_rate: attention-weight dropout (needs ``dropout_rng``).
      dropout_rng: PRNG key of the dropout.
      implementation: ``"einsum"``, ``"jax"`` (``jax.nn.dot_product_attention``) or
        ``"blockwise"`` (O(T * block) memory); default ``default_implementation(S)``. Shaw terms
        and dropout always run on the einsum path.
      block_size: query and key block size of the blockwise path.
    Returns:
      [B, T, N, H], in the dtype of ``q``. Softmax runs in float32 for every input dtype.
    """
    _check_shapes(q, k, v, bias)
    B, T, N, _ = q.shape
    S = k.shape[1]
    spec = MaskSpec.of(mask, causal=causal).validate(B, N, T, S)
    impl = implementation or default_implementation(S)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    needs_einsum = rel_k is not None or rel_v is not None or dropout_rate > 0.0
    if impl == "blockwise" and not needs_einsum:
        return blockwise_attention(
            q, k, v, mask=spec, bias=bias, scale=scale, q_block=block_size, k_block=block_size
        )
    dense = spec.to_dense(T, S)
    if impl == "jax" and not needs_einsum:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense, scale=scale)
    return _einsum_attention(
        q,
        k,
        v,
        mask=dense,
        bias=bias,
        scale=scale,
        rel_k=rel_k,
        rel_v=rel_v,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )


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
