"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1) as a pure function.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias) V

Shapes use ``B`` batch, ``T`` query length, ``S`` key length, ``N`` query heads, ``K`` key/value
heads (``N % K == 0``: MHA when equal, GQA when smaller, MQA when 1) and ``H`` head dim.

Interchangeable paths compute the same function; ``implementation=`` is the one switch between
them, and the only place backend-specific attention code is reached from:

* ``"einsum"``: two einsums and a float32 softmax; XLA fuses mask + softmax. Default on CPU and
  wherever no kernel applies.
* ``"jax"``: ``jax.nn.dot_product_attention`` (its XLA implementation). The GPU fallback.
* ``"blockwise"``: online softmax over key blocks with a recomputing backward
  (``attnzoo.models.blockwise``), O(T * block) memory for long sequences. Default on CPU from
  1024 keys.
* ``"cudnn"``: cuDNN flash attention (``attention_kernels``). Default on CUDA GPUs where it
  applies (bf16/fp16, head_dim, no Shaw terms or dropout).
* ``"splash"``: the Pallas TPU splash kernel (``attention_kernels``; interpreted on CPU, for
  tests). Default on TPU from ``SPLASH_FROM`` keys where it applies (no bias, dense mask, Shaw
  terms or dropout; lengths multiples of 128).

``IMPLEMENTATIONS`` are the portable XLA paths (every backend, every shape); ``KERNELS`` the
accelerator kernels. The default is chosen at trace time from ``jax.default_backend()``: a
CPU host picks an XLA path, which lowers for every platform (``jax.export`` to TPU/CUDA).
When the backend's kernel cannot run a call, the default falls back to the XLA path and logs
why, once per reason; an explicit ``implementation=`` that cannot run raises ``ValueError``.
Rows whose every key is masked (padding queries) give finite values on every path; which
values is path-specific (losses weight such rows 0).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from attnzoo.models import attention_kernels
from attnzoo.models.blockwise import blockwise_attention
from attnzoo.models.masks import MASKED_LOGIT, MaskSpec

IMPLEMENTATIONS = ("einsum", "jax", "blockwise")
KERNELS = ("cudnn", "splash")
ALL_IMPLEMENTATIONS = IMPLEMENTATIONS + KERNELS

# Defaults are the fastest path measured per backend (CPU timings: benchmarks/README.md,
# "Attention paths on the dev CPU").
_DEFAULT_BY_BACKEND = {"cpu": "einsum", "gpu": "cudnn", "cuda": "cudnn", "tpu": "einsum"}
# Key lengths from which the default switches to "blockwise" (backends not listed: never).
_BLOCKWISE_FROM = {"cpu": 1024}
# Key length from which the TPU default is splash: MaxText's "autoselected" attention uses
# its splash kernel for every training length >= 128 (one lane-width block) and dot-product
# attention below; the kernel never materialises [T, S] scores and skips the blocks a causal
# or sliding-window mask rules out (about half the FLOPs of causal attention).
SPLASH_FROM = 128
# The XLA path a backend falls back to when its kernel cannot run a call.
_FALLBACK = {"gpu": "jax", "cuda": "jax"}

_log = logging.getLogger(__name__)
_logged_reasons: set[str] = set()


def default_implementation(k_len: int | None = None) -> str:
    """The attention path preferred by ``jax.default_backend()`` for ``k_len`` keys.

    ``dot_product_attention`` starts from this and falls back to an XLA path when the
    preferred kernel cannot run the call (dtype, head_dim, mask kind, bias...).
    """
    backend = jax.default_backend()
    if backend == "tpu" and k_len is not None and k_len >= SPLASH_FROM:
        return "splash"
    threshold = _BLOCKWISE_FROM.get(backend)
    if k_len is not None and threshold is not None and k_len >= threshold:
        return "blockwise"
    return _DEFAULT_BY_BACKEND.get(backend, "einsum")


def _log_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        _log.info("attention: %s", reason)


def _unsupported(impl, q, k, spec, bias, *, rel, dropout, explicit) -> str | None:
    """Why kernel ``impl`` cannot run this call, or None."""
    if impl == "cudnn":
        return attention_kernels.cudnn_unsupported(
            q, k, spec, bias, rel=rel, dropout=dropout, structured_only=not explicit
        )
    return attention_kernels.splash_unsupported(q, k, spec, bias, rel=rel, dropout=dropout)


def _resolve(implementation, q, k, spec, bias, *, rel, dropout) -> str:
    """The path to run: ``implementation`` checked, or the default with its fallback."""
    if implementation is not None:
        if implementation not in ALL_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention implementation {implementation!r}; valid: {ALL_IMPLEMENTATIONS}"
            )
        if implementation in KERNELS:
            reason = _unsupported(
                implementation, q, k, spec, bias, rel=rel, dropout=dropout, explicit=True
            )
            if reason:
                raise ValueError(
                    f"attention implementation {implementation!r} cannot run this call: "
                    f"{reason}. Implementations that run on every backend and shape: "
                    f"{IMPLEMENTATIONS}; leave implementation=None to pick one automatically"
                )
        return implementation
    S = k.shape[1]
    impl = default_implementation(S)
    if impl in KERNELS:
        reason = _unsupported(impl, q, k, spec, bias, rel=rel, dropout=dropout, explicit=False)
        if reason:
            backend = jax.default_backend()
            fallback = _FALLBACK.get(backend, "einsum")
            _log_once(f"{impl} not used ({reason}); using {fallback!r}")
            impl = fallback
    return impl


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
      implementation: ``"einsum"``, ``"jax"`` (``jax.nn.dot_product_attention``),
        ``"blockwise"`` (O(T * block) memory), ``"cudnn"`` or ``"splash"`` (accelerator
        kernels; see the module docstring); default: the backend's kernel where it applies,
        else an XLA path (``default_implementation``). On the XLA paths, Shaw terms and
        dropout always run on the einsum path; the kernels refuse them (``ValueError``).
      block_size: query and key block size of the blockwise path; the splash kernel's blocks
        are the largest multiple of 128 up to it that divides the length.
    Returns:
      [B, T, N, H], in the dtype of ``q``. Softmax runs in float32 for every input dtype.
    """
    _check_shapes(q, k, v, bias)
    B, T, N, _ = q.shape
    S = k.shape[1]
    spec = MaskSpec.of(mask, causal=causal).validate(B, N, T, S)
    rel = rel_k is not None or rel_v is not None
    impl = _resolve(implementation, q, k, spec, bias, rel=rel, dropout=dropout_rate > 0.0)
    logit_scale: float = q.shape[-1] ** -0.5 if scale is None else scale
    scale = logit_scale
    if impl == "splash":
        return attention_kernels.splash_attention(
            q, k, v, spec=spec, scale=logit_scale, block_size=block_size
        )
    if impl == "cudnn":
        return attention_kernels.cudnn_attention(q, k, v, spec=spec, bias=bias, scale=logit_scale)
    needs_einsum = rel or dropout_rate > 0.0
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
