"""Memory-efficient attention: online softmax over key blocks (Rabe & Staats 2021; Dao et al. 2022).

Queries are cut into blocks of ``q_block`` rows (``lax.map``) and, for each, keys and values
into blocks of ``k_block`` columns (``lax.scan``). A running max ``m``, normaliser ``l`` and
unnormalised output ``acc`` are rescaled as each key block arrives, so no [T, S] array is ever
built. A ``jax.custom_vjp`` backward recomputes each block's probabilities from the saved
log-sum-exp (FlashAttention-2, Algorithm 2) instead of letting autodiff store them: forward
*and* backward memory is O(T * block).

The mask is a ``masks.MaskSpec``: causal, sliding window and packed segments are functions of
the query/key positions and segment ids, so each block's mask is built inside the loop from
[B, T] integer vectors (``MaskSpec.block``) and blocks that the causal / window structure masks
entirely are skipped (``MaskSpec.block_is_empty``). A dense mask and a ``bias`` broadcastable
to [B, N, T, S] are also accepted (sliced per block), for ALiBi/T5 biases or arbitrary masks.

Semantics match the einsum path exactly, including rows whose every key is masked (they average
all values, as softmax over equal ``MASKED_LOGIT`` logits does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnzoo.models.masks import MASKED_LOGIT, MaskSpec, block_slice

# Keys that only exist because S was padded to a multiple of k_block: below every real logit,
# including masked ones, so they get exactly zero weight even in fully masked rows.
_PAD_LOGIT = float(jnp.finfo(jnp.float32).min)


class _Static(NamedTuple):
    scale: float
    q_block: int
    k_block: int
    q_len: int  # T before padding
    k_len: int  # S before padding
    n_kv: int  # K


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec | jax.Array | None = None,
    causal: bool = False,
    bias: jax.Array | None = None,
    scale: float | None = None,
    q_block: int = 512,
    k_block: int = 512,
) -> jax.Array:
    """Attention in O(T * block) memory, forward and backward.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys, ``N % K == 0`` (MHA, GQA, MQA).
      v: [B, S, K, H] values, the shape of ``k``.
      mask: a ``MaskSpec``, a bool array broadcastable to [B, N, T, S] (``True`` = may attend;
        sliced per block), or None.
      causal: and-ed into ``mask`` (``MaskSpec.causal``).
      bias: float broadcastable to [B, N, T, S], added to the scaled logits (differentiable).
      scale: logit scale, default ``1/sqrt(H)``.
      q_block: query block size (clipped to T). Peak memory ~ B*N*q_block*k_block.
      k_block: key block size (clipped to S).
    Returns:
      [B, T, N, H] in the dtype of ``q``; softmax statistics are float32.
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"need q [B, T, N, H] and k, v [B, S, K, H] with N % K == 0; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    spec = MaskSpec.of(mask, causal=causal).validate(B, N, T, S)
    if q_block < 1 or k_block < 1:
        raise ValueError(f"block sizes must be >= 1, got q_block={q_block}, k_block={k_block}")
    tq, tk = min(q_block, T), min(k_block, S)
    Tp, Sp = -(-T // tq) * tq, -(-S // tk) * tk  # padded to whole blocks
    st = _Static(
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        q_block=tq,
        k_block=tk,
        q_len=T,
        k_len=S,
        n_kv=K,
    )
    pad_t = lambda x, n, axis: _pad_axis(x, axis, n) if x is not None else None
    qp = pad_t(q, Tp, 1)
    kp, vp = pad_t(k, Sp, 1), pad_t(v, Sp, 1)
    q_pos = k_pos = None
    if spec.uses_positions:
        q_pos, k_pos = spec.positions(T, S)
        q_pos = pad_t(jnp.broadcast_to(q_pos, (B, T)).astype(jnp.int32), Tp, 1)
        k_pos = pad_t(jnp.broadcast_to(k_pos, (B, S)).astype(jnp.int32), Sp, 1)
    seg = lambda x, n, L: None if x is None else pad_t(jnp.broadcast_to(x, (B, L)), n, 1)
    padded = spec.replace(
        q_positions=q_pos,
        k_positions=k_pos,
        q_segment_ids=seg(spec.q_segment_ids, Tp, T),
        k_segment_ids=seg(spec.k_segment_ids, Sp, S),
        dense=_pad_dense(spec.dense, T, S, Tp, Sp),
    )
    bias4 = _pad_dense(bias, T, S, Tp, Sp)
    out = _flash(st, qp, kp, vp, bias4, padded)  # (B, Tp, N, H)
    return out[:, :T]


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _pad_dense(x: jax.Array | None, T: int, S: int, Tp: int, Sp: int) -> jax.Array | None:
    """Broadcastable mask/bias -> 4-D [B|1, N|1, T|1, S|1], full dims padded to Tp / Sp."""
    if x is None:
        return None
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if x.shape[2] == T and T != 1:
        x = _pad_axis(x, 2, Tp)
    if x.shape[3] == S and S != 1:
        x = _pad_axis(x, 3, Sp)
    return x


# ---- per-block helpers ---------------------------------------------------------------------


def _group(x: jax.Array, K: int) -> jax.Array:
    """[B|1, N|1, tq, tk] -> [B|1, K|1, G|1, tq, tk], matching the grouped logits layout."""
    b, n, t, s = x.shape
    if n == 1:
        return x[:, :, None]
    return x.reshape(b, K, n // K, t, s)


def _ungroup_reduce(ds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Logit cotangent [B, K, G, tq, tk] -> summed over the axes a bias of ``shape`` broadcasts."""
    b, kk, g, t, s = ds.shape
    ds = ds.reshape(b, kk * g, t, s)
    axes = tuple(a for a in range(4) if shape[a] == 1 and ds.shape[a] != 1)
    return ds.sum(axes, keepdims=True) if axes else ds


def _block_logits(
    st: _Static,
    qi: jax.Array,
    kj: jax.Array,
    bias4: jax.Array | None,
    spec: MaskSpec,
    i: jax.Array,
    j: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Masked, scaled float32 logits of query block i against key block j.

    qi: [B, tq, K, G, H], kj: [B, tk, K, H] -> (logits [B, K, G, tq, tk], allowed mask).
    """
    tq, tk = st.q_block, st.k_block
    q0, k0 = i * tq, j * tk
    s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * st.scale
    if bias4 is not None:
        b = block_slice(block_slice(bias4, q0, tq, 2), k0, tk, 3)
        s = s + _group(b, st.n_kv).astype(jnp.float32)
    allowed = spec.block(q0, tq, k0, tk)  # (B|1, N|1, tq, tk) or None
    if allowed is not None:
        allowed = _group(allowed, st.n_kv)
        s = jnp.where(allowed, s, MASKED_LOGIT)
    real_key = (k0 + jnp.arange(tk)) < st.k_len  # (tk,)
    s = jnp.where(real_key, s, _PAD_LOGIT)
    keep = real_key if allowed is None else allowed & real_key
    return s, keep


def _block_is_empty(st: _Static, spec: MaskSpec, i: jax.Array, j: jax.Array) -> jax.Array | None:
    """Scalar bool: block (i, j) is wholly masked by causal / sliding-window structure."""
    return spec.block_is_empty(i * st.q_block, st.q_block, j * st.k_block, st.k_block)


def _skip_or(empty, compute, skipped, carry):
    """``compute(carry)`` unless the block is known to be fully masked."""
    if empty is None:
        return compute(carry)
    return jax.lax.cond(empty, lambda c: (c, skipped), compute, carry)


def _split_heads(q: jax.Array, K: int) -> jax.Array:
    B, T, N, H = q.shape
    return q.reshape(B, T, K, N // K, H)  # (B, T, K, G, H): query heads grouped by kv head


# ---- forward / backward ----------------------------------------------------------------------


def _flash_primal(
    st: _Static,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias4: jax.Array | None,
    spec: MaskSpec,
) -> jax.Array:
    return _forward(st, q, k, v, bias4, spec)[0]


# Wrapped by a call, not a functools.partial decorator: through the partial, type checkers
# type a call of the result as ``object``.
_flash = jax.custom_vjp(_flash_primal, nondiff_argnums=(0,))


def _forward(
    st: _Static,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias4: jax.Array | None,
    spec: MaskSpec,
) -> tuple[jax.Array, jax.Array]:
    """q: [B, Tp, N, H], k/v: [B, Sp, K, H] -> (out [B, Tp, N, H], stats [2, B, K, G, Tp]).

    ``stats`` holds each row's logit max and 1 / softmax normaliser, for the backward.
    """
    B, Tp, N, H = q.shape
    K, tq, tk = st.n_kv, st.q_block, st.k_block
    G, nk = N // K, k.shape[1] // tk
    qg = _split_heads(q, K)
    v_mean = v[:, : st.k_len].astype(jnp.float32).mean(1)  # (B, K, H)

    def q_step(i):
        qi = block_slice(qg, i * tq, tq, 1)

        def k_step(carry, j):
            def compute(carry):
                m, l, acc = carry
                kj, vj = block_slice(k, j * tk, tk, 1), block_slice(v, j * tk, tk, 1)
                s, _ = _block_logits(st, qi, kj, bias4, spec, i, j)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)  # rescales the earlier blocks to the new max
                l = l * corr + p.sum(-1)
                pv = jnp.einsum(
                    "bkgqs,bskh->bkgqh", p.astype(v.dtype), vj, preferred_element_type=jnp.float32
                )
                return (m_new, l, acc * corr[..., None] + pv), None

            return _skip_or(_block_is_empty(st, spec, i, j), compute, None, carry)

        init = (
            jnp.full((B, K, G, tq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, tq), jnp.float32),
            jnp.zeros((B, K, G, tq, H), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
        # A row that saw no allowed key (its max is still masked or -inf after skipped blocks)
        # is, as on the einsum path, the uniform average of all real values.
        empty = m <= MASKED_LOGIT
        out = jnp.where(empty[..., None], v_mean[:, :, None, None], acc / l[..., None])
        # m and 1/l, not lse = m + log l: in a fully masked row m = MASKED_LOGIT swallows log l.
        # Empty rows store 1/l = 0, so the backward's block loop gives them no weight.
        stats = jnp.stack([jnp.where(empty, 0.0, m), jnp.where(empty, 0.0, 1.0 / l)])
        return out.astype(q.dtype), stats  # (B, K, G, tq, H), (2, B, K, G, tq)

    # (nq, B, K, G, tq, H), (nq, 2, B, K, G, tq)
    outs, stats = jax.lax.map(q_step, jnp.arange(Tp // tq))
    out = jnp.transpose(outs, (1, 0, 4, 2, 3, 5)).reshape(B, Tp, N, H)
    stats = jnp.transpose(stats, (1, 2, 3, 4, 0, 5)).reshape(2, B, K, G, Tp)
    return out, stats


def _flash_fwd(st, q, k, v, bias4, spec):
    out, stats = _forward(st, q, k, v, bias4, spec)
    return out, (q, k, v, bias4, spec, out, stats)


def _flash_bwd(st, res, dout):
    q, k, v, bias4, spec, out, (row_max, inv_sum) = res
    B, Tp, N, H = q.shape
    K, tq, tk = st.n_kv, st.q_block, st.k_block
    nq, nk = Tp // tq, k.shape[1] // tk
    qg, dog = _split_heads(q, K), _split_heads(dout.astype(jnp.float32), K)
    # D_i = rowsum(dO * O) = sum_j P_ij dP_ij, the softmax-backward correction term.
    delta = jnp.einsum("btkgh,btkgh->bkgt", dog, _split_heads(out.astype(jnp.float32), K))

    # Zero bias cotangent of a skipped block, in the reduced shape of _ungroup_reduce.
    no_dbias = None
    if bias4 is not None:
        full = (B, N, tq, tk)
        no_dbias = jnp.zeros(
            tuple(1 if b == 1 else f for b, f in zip(bias4.shape, full, strict=True))
        )

    def k_step(dq, j):
        kj, vj = block_slice(k, j * tk, tk, 1), block_slice(v, j * tk, tk, 1)

        def compute(carry_i):
            (dq, dk, dv), i = carry_i
            qi, doi = block_slice(qg, i * tq, tq, 1), block_slice(dog, i * tq, tq, 1)
            s, keep = _block_logits(st, qi, kj, bias4, spec, i, j)
            m, inv_l = block_slice(row_max, i * tq, tq, 3), block_slice(inv_sum, i * tq, tq, 3)
            p = jnp.exp(s - m[..., None]) * inv_l[..., None]  # (B, K, G, tq, tk)
            dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p, doi)
            dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj.astype(jnp.float32))
            ds = p * (dp - block_slice(delta, i * tq, tq, 3)[..., None])
            ds = jnp.where(keep, ds, 0.0)  # masked logits are constants: no gradient
            dqi = jnp.einsum("bkgqs,bskh->bqkgh", ds, kj.astype(jnp.float32)) * st.scale
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, block_slice(dq, i * tq, tq, 1) + dqi, i * tq, axis=1
            )
            dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, qi.astype(jnp.float32)) * st.scale
            dbias = None if bias4 is None else _ungroup_reduce(ds, bias4.shape)
            return ((dq, dk, dv), i), dbias

        def q_step(carry, i):
            empty = _block_is_empty(st, spec, i, j)
            (carry, _), dbias = _skip_or(empty, compute, no_dbias, (carry, i))
            return carry, dbias

        zeros_kv = jnp.zeros((B, tk, K, H), jnp.float32)
        (dq, dk, dv), dbias = jax.lax.scan(q_step, (dq, zeros_kv, zeros_kv), jnp.arange(nq))
        return dq, (dk, dv, dbias)

    dq0 = jnp.zeros(qg.shape, jnp.float32)
    dq, (dks, dvs, dbias) = jax.lax.scan(k_step, dq0, jnp.arange(nk))
    # (nk, B, tk, K, H) -> (B, Sp, K, H)
    dk = jnp.transpose(dks, (1, 0, 2, 3, 4)).reshape(k.shape).astype(k.dtype)
    dv = jnp.transpose(dvs, (1, 0, 2, 3, 4)).reshape(v.shape)
    # Rows with no allowed key output mean(v): each real key gets 1/S of their dout.
    empty = inv_sum == 0.0  # (B, K, G, Tp)
    dv_empty = jnp.einsum("bkgt,btkgh->bkh", empty.astype(jnp.float32), dog) / st.k_len
    dv = dv.at[:, : st.k_len].add(dv_empty[:, None]).astype(v.dtype)
    dq = dq.reshape(q.shape).astype(q.dtype)
    if bias4 is not None and dbias is not None:
        dbias = _assemble_bias_grad(dbias, bias4.shape).astype(bias4.dtype)
    return dq, dk, dv, dbias, None  # the mask spec is integers/bools: no cotangent


def _assemble_bias_grad(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Per-block bias cotangents [nk, nq, b, n, tq|1, tk|1] -> ``shape`` [b, n, Tp|1, Sp|1]."""
    nk, nq, b, n, a, c = blocks.shape
    g = jnp.transpose(blocks, (2, 3, 1, 4, 0, 5)).reshape(b, n, nq * a, nk * c)
    if shape[2] == 1:
        g = g.sum(2, keepdims=True)
    if shape[3] == 1:
        g = g.sum(3, keepdims=True)
    return g


_flash.defvjp(_flash_fwd, _flash_bwd)
