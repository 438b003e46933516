"""Accelerator attention kernels behind ``dot_product_attention(..., implementation=...)``.

* ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention(implementation=
  "cudnn")``; CUDA GPUs, bf16/fp16, head_dim a multiple of 8 up to 128 (256 from Hopper).
* ``"splash"``: the Pallas TPU kernel ``jax.experimental.pallas.ops.tpu.splash_attention``
  (block-sparse flash attention: blocks that the causal / sliding-window mask rules out are
  skipped). On CPU it runs in Pallas interpret mode (slow; for tests); the choice between the
  interpreted and the compiled kernel is made per *lowering platform*
  (``lax.platform_dependent``), so ``jax.export(..., platforms=["tpu"])`` from a CPU host
  lowers the real Mosaic kernel.

Each kernel has a ``*_unsupported`` check that returns why it cannot run a call (``None`` when
it can); ``attention.dot_product_attention`` raises it for an explicit request and uses it to
fall back when choosing the default. This module is the only place that knows about either
kernel; model code never imports it.

Both kernels compute causal and sliding-window masks from *indices* (query ``i`` sees key
``j <= i``), while ``MaskSpec`` defines them by *positions*. They agree when the positions are
the defaults (``0..T-1`` / ``0..S-1``) or when ``MaskSpec.positions_are_indices`` says the
queries and keys share positions that count up by one along each row or packed segment (what
``core.stack_inputs`` promises for a stack run without a KV cache); ``index_masks`` checks
that. With a KV cache the masks are over explicit positions: cuDNN takes them as a dense mask
when asked explicitly, splash refuses them, and neither is the default there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnzoo.models.masks import MaskSpec

SPLASH_LANES = 128  # splash's sequence blocks are multiples of the TPU lane width


def index_masks(spec: MaskSpec, q_len: int, k_len: int) -> bool:
    """Whether ``spec``'s causal / sliding-window parts equal their index form."""
    if not spec.uses_positions:
        return True
    if spec.q_positions is None and spec.k_positions is None:
        return True
    return spec.positions_are_indices and q_len == k_len


def _common_unsupported(rel: bool, dropout: bool, name: str) -> str | None:
    if rel:
        return f"{name} has no Shaw relative-position terms (rel_k / rel_v)"
    if dropout:
        return f"{name} has no attention dropout"
    return None


# ---- cuDNN ------------------------------------------------------------------------------------


def _cuda_compute_capability() -> tuple[int, int] | None:
    """The first device's CUDA compute capability, or None when it is not a CUDA GPU."""
    if jax.default_backend() != "gpu":
        return None
    device = jax.devices()[0]
    version = getattr(device.client, "platform_version", "").lower()
    cc = getattr(device, "compute_capability", None)
    if "cuda" not in version or not cc:
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


def cudnn_unsupported(
    q: jax.Array,
    k: jax.Array,
    spec: MaskSpec,
    bias: jax.Array | None,
    *,
    rel: bool,
    dropout: bool,
    structured_only: bool,
) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None.

    ``structured_only``: also refuse masks that cuDNN would only take as a dense bias (causal
    over explicit positions, e.g. a KV cache) -- the default's rule; an explicit request
    accepts them.
    """
    cc = _cuda_compute_capability()
    if cc is None:
        return f"cudnn needs a CUDA GPU; the backend is {jax.default_backend()!r}"
    reason = _common_unsupported(rel, dropout, "cudnn")
    if reason:
        return reason
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cudnn takes bfloat16 or float16 inputs, got {q.dtype}"
    H = q.shape[-1]
    h_max = 256 if cc >= (9, 0) else 128
    if H % 8 or H > h_max:
        return f"cudnn needs head_dim a multiple of 8 and <= {h_max} on this GPU, got {H}"
    T, S = q.shape[1], k.shape[1]
    has_bias = bias is not None or spec.dense is not None or spec.k_segment_ids is not None
    if has_bias and (T % 2 or S % 2):
        return f"cudnn with a mask or bias needs even lengths, got q_len={T}, k_len={S}"
    if structured_only and spec.uses_positions and not (index_masks(spec, T, S) and T == S):
        return "causal / sliding-window mask over explicit positions (e.g. a KV cache)"
    return None


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    spec: MaskSpec,
    bias: jax.Array | None,
    scale: float,
) -> jax.Array:
    """cuDNN flash attention: causal / sliding window as cuDNN mask types where they equal
    their index form, everything else (segments, key padding, dense) as a boolean mask."""
    B, T, N, _ = q.shape
    S = k.shape[1]
    is_causal, window = False, None
    rest = spec
    if spec.uses_positions and index_masks(spec, T, S) and T == S:
        is_causal = spec.causal or spec.sliding_window is not None
        if spec.sliding_window is not None:
            window = (spec.sliding_window - 1, 0)
        rest = spec.replace(causal=False, sliding_window=None)
    mask = rest.to_dense(T, S)
    if mask is not None:  # cuDNN wants full q/k lengths on its bias
        mask = jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], T, S))
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], T, S)).astype(q.dtype)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        local_window_size=window,
        implementation="cudnn",
    )


# ---- splash (Pallas TPU) ----------------------------------------------------------------------


def splash_unsupported(
    q: jax.Array,
    k: jax.Array,
    spec: MaskSpec,
    bias: jax.Array | None,
    *,
    rel: bool,
    dropout: bool,
) -> str | None:
    """Why the splash kernel cannot run this call, or None."""
    backend = jax.default_backend()
    if backend not in ("tpu", "cpu"):
        return f"splash is a TPU kernel (interpreted on CPU); the backend is {backend!r}"
    reason = _common_unsupported(rel, dropout, "splash")
    if reason:
        return reason
    if bias is not None:
        return "splash takes no logits bias (ALiBi, T5)"
    if spec.dense is not None:
        return "splash takes no dense mask (use causal / sliding_window / segment ids)"
    T, S = q.shape[1], k.shape[1]
    if T % SPLASH_LANES or S % SPLASH_LANES:
        return f"splash needs q_len and k_len multiples of {SPLASH_LANES}, got q_len={T}, k_len={S}"
    if not index_masks(spec, T, S):
        return (
            "splash computes causal / sliding-window masks from indices, but this mask has "
            "explicit positions that are not known to be indices (e.g. a KV cache; see "
            "MaskSpec.positions_are_indices)"
        )
    return None


def splash_block(length: int, block_size: int) -> int:
    """The largest multiple of 128 that is <= ``block_size`` and divides ``length``."""
    block = max(SPLASH_LANES, min(block_size, length) // SPLASH_LANES * SPLASH_LANES)
    while length % block:
        block -= SPLASH_LANES
    return block


@functools.lru_cache(maxsize=64)
def _splash_kernels(
    heads: int,
    T: int,
    S: int,
    causal: bool,
    window: int | None,
    mqa: bool,
    block_q: int,
    block_kv: int,
):
    """(compiled, interpreted) splash kernels for one static configuration."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    if window is not None:  # 0 <= i - j < window
        head_mask = sm.LocalMask((T, S), window_size=(window - 1, 0), offset=0)
    elif causal:
        head_mask = sm.CausalMask((T, S))
    else:
        head_mask = sm.FullMask((T, S))
    mask = sm.MultiHeadMask([head_mask] * heads)
    blocks = sk.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    make = sk.make_splash_mqa if mqa else sk.make_splash_mha
    return tuple(
        make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
        for interpret in (False, True)
    )


def _splash_segment_ids(
    spec: MaskSpec, B: int, T: int, S: int
) -> tuple[jax.Array, jax.Array] | None:
    """MaskSpec segments -> splash's (q ids [B, T], kv ids [B, S]); splash keeps pairs with
    equal ids, MaskSpec also masks keys with id 0."""
    ks = spec.k_segment_ids
    if ks is None:
        return None
    ks = jnp.broadcast_to(ks, (B, S)).astype(jnp.int32)
    if spec.q_segment_ids is None:  # key padding: every query sees every real key
        return jnp.ones((B, T), jnp.int32), (ks != 0).astype(jnp.int32)
    qs = jnp.broadcast_to(spec.q_segment_ids, (B, T)).astype(jnp.int32)
    return qs, jnp.where(ks == 0, -1, ks)  # ids are >= 0, so -1 matches no query


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    spec: MaskSpec,
    scale: float,
    block_size: int,
) -> jax.Array:
    """Splash attention over [B, T, N, H] q and [B, S, K, H] k, v (MHA, GQA or MQA).

    MHA runs the multi-head kernel; GQA/MQA run the MQA kernel once per kv head (vmapped),
    over that head's group of query heads, so k and v are never repeated.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    mqa = K != N
    compiled, interpreted = _splash_kernels(
        G if mqa else N,
        T,
        S,
        spec.causal,
        spec.sliding_window,
        mqa,
        splash_block(T, block_size),
        splash_block(S, block_size),
    )
    q = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)  # splash does not scale the logits
    segments = _splash_segment_ids(spec, B, T, S)
    ids = None if segments is None else sk.SegmentIds(q=segments[0], kv=segments[1])
    if mqa:
        qh = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    else:
        qh = q.transpose(0, 2, 1, 3)  # (B, N, T, H)
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def run(kernel):
        def one_row(q1, k1, v1, ids1):
            if not mqa:
                return kernel(q1, k1, v1, segment_ids=ids1)
            per_kv_head = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids1))
            return per_kv_head(q1, k1, v1)

        return lambda qh, kh, vh, ids: jax.vmap(one_row)(qh, kh, vh, ids)

    out: jax.Array = jax.lax.platform_dependent(
        qh, kh, vh, ids, cpu=run(interpreted), tpu=run(compiled)
    )  # pyright: ignore[reportAssignmentType]  (no residuals: save_residuals=False)
    if mqa:
        out = out.transpose(0, 3, 1, 2, 4)  # (B, T, K, G, H)
    else:
        out = out.transpose(0, 2, 1, 3)
    return out.reshape(B, T, N, H).astype(q.dtype)


__all__ = [
    "cudnn_attention",
    "cudnn_unsupported",
    "index_masks",
    "splash_attention",
    "splash_block",
    "splash_unsupported",
]
