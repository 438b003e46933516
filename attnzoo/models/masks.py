"""Attention masks: ``MaskSpec``, the one mask description attention takes, and pure builders.

Every dense mask is boolean, ``True`` where a query may attend to a key, and broadcastable to
``[batch, heads, q_len, k_len]``; combine them with ``combine`` (logical and). ``MaskSpec``
holds the structured masks (causal, sliding window, packed segments, key padding) as integer
vectors plus an optional dense part; the attention paths read it with ``to_dense`` or, per
block, ``block``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import struct

# The logit of a masked (query, key) pair on every attention path. Large but finite, so a row
# with every key masked gets a uniform softmax (the mean of the values) instead of NaNs, which
# keeps padding rows harmless under grad.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Key position <= query position.

    Args:
      q_positions: [B, Tq] int positions of the queries.
      k_positions: [B, Tk] int positions of the keys.
    Returns:
      [B, 1, Tq, Tk] bool.
    """
    return k_positions[:, None, None, :] <= q_positions[:, None, :, None]


def causal_square(length: int) -> jax.Array:
    """[1, 1, T, T] lower-triangular mask for a plain unpacked sequence."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding(q_valid: jax.Array | None, k_valid: jax.Array) -> jax.Array:
    """Masks out padded keys (and, if ``q_valid`` is given, padded queries).

    Args:
      q_valid: [B, Tq] bool or None.
      k_valid: [B, Tk] bool, ``True`` for real tokens.
    Returns:
      [B, 1, Tq or 1, Tk] bool.
    """
    mask = k_valid[:, None, None, :]
    if q_valid is not None:
        mask = mask & q_valid[:, None, :, None]
    return mask


def segment(q_segment_ids: jax.Array, k_segment_ids: jax.Array) -> jax.Array:
    """Tokens attend only within their own packed segment; segment id 0 is padding.

    Args:
      q_segment_ids: [B, Tq] int.
      k_segment_ids: [B, Tk] int.
    Returns:
      [B, 1, Tq, Tk] bool.
    """
    same = q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :]
    return same & (k_segment_ids[:, None, None, :] != 0)


def sliding_window(q_positions: jax.Array, k_positions: jax.Array, window: int) -> jax.Array:
    """Local attention: ``0 <= q_pos - k_pos < window`` (causal window of ``window`` keys).

    Returns:
      [B, 1, Tq, Tk] bool.
    """
    if window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    delta = q_positions[:, None, :, None] - k_positions[:, None, None, :]
    return (delta >= 0) & (delta < window)


def combine(*masks: jax.Array | None) -> jax.Array | None:
    """Logical-and of the given masks, skipping ``None``; ``None`` if all are ``None``."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else jnp.logical_and(out, m)
    return out


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Per-segment positions 0, 1, 2, ... restarting at each new segment. [B, T] -> [B, T]."""
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


@overload
def block_slice(x: jax.Array, start: jax.Array | int, size: int, axis: int) -> jax.Array: ...
@overload
def block_slice(x: None, start: jax.Array | int, size: int, axis: int) -> None: ...
def block_slice(
    x: jax.Array | None, start: jax.Array | int, size: int, axis: int
) -> jax.Array | None:
    """Block ``[start, start + size)`` of ``x`` along ``axis``; a size-1 (broadcast) axis is
    kept as is. ``start`` may be traced."""
    if x is None or x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


@struct.dataclass(kw_only=True)
class MaskSpec:
    """Which (query, key) pairs may attend: the one mask description every attention path reads.

    The structured parts are functions of [B, T] / [B, S] integer vectors, so the blockwise path
    builds each block's mask inside its loop and no [T, S] array is materialised; ``dense`` is
    for anything else. Every given part is and-ed. A frozen pytree: arrays are leaves,
    ``causal`` and ``sliding_window`` are static (part of the tree structure, so jit-safe).
    Construct with keywords; ``validate`` checks shapes against q/k (dot_product_attention
    calls it).

    Attributes:
      causal: keep keys with ``k_pos <= q_pos`` (``causal``).
      sliding_window: keep keys with ``0 <= q_pos - k_pos < window`` (``sliding_window``).
      q_positions: [B|1, T] int query positions for ``causal`` / ``sliding_window``; default
        ``0..T-1``.
      k_positions: [B|1, S] int key positions; default ``0..S-1``.
      q_segment_ids: [B, T] int packed-segment ids; needs ``k_segment_ids``.
      k_segment_ids: [B, S] int. With ``q_segment_ids``: a query sees only keys of its own
        segment, never id 0 (``segment``). Alone: keys with id 0 are padding and masked, every
        other key is visible (key padding, e.g. cross-attention over a padded source).
      dense: bool broadcastable to [B, N, T, S], ``True`` = may attend (e.g. ``padding``).
      positions_are_indices: a promise that queries and keys share ``q_positions`` and they
        count up by one along each row or contiguous packed segment (what
        ``positions_from_segments`` builds; ``core.stack_inputs`` promises it for every stack
        run without a cache, the models' documented positions), so ``causal`` and
        ``sliding_window`` equal their index form (key index <= query index). The cuDNN and
        splash kernels compute only that form; without the promise they refuse masks over
        explicit positions. Static.
    """

    causal: bool = struct.field(pytree_node=False, default=False)
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
    positions_are_indices: bool = struct.field(pytree_node=False, default=False)
    q_positions: jax.Array | None = None
    k_positions: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    k_segment_ids: jax.Array | None = None
    dense: jax.Array | None = None

    # ---- construction ------------------------------------------------------------------------

    def replace(self, **changes: Any) -> MaskSpec:
        """A copy with ``changes`` applied (as ``dataclasses.replace``; flax sets the same)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, mask: MaskSpec | jax.Array | None = None, *, causal: bool = False) -> MaskSpec:
        """Normalises a ``mask=`` argument: a spec as is, a bool array as ``dense``, None empty.

        ``causal=True`` is and-ed in (``spec.causal or causal``).
        """
        if mask is None:
            spec = cls()
        elif isinstance(mask, MaskSpec):
            spec = mask
        else:
            spec = cls(dense=mask)
        return spec.replace(causal=True) if causal and not spec.causal else spec

    @classmethod
    def causal_self(
        cls,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        sliding_window: int | None = None,
    ) -> MaskSpec:
        """Causal self-attention over [B, T] ``positions`` (default 0..T-1), optionally packed
        into segments [B, T] and limited to a sliding window."""
        return cls(
            causal=True,
            sliding_window=sliding_window,
            q_positions=positions,
            k_positions=positions,
            q_segment_ids=segment_ids,
            k_segment_ids=segment_ids,
        )

    @classmethod
    def key_padding(cls, k_valid: jax.Array) -> MaskSpec:
        """Masks keys where ``k_valid`` [B, S] bool is False (as ``padding(None, k_valid)``)."""
        return cls(k_segment_ids=k_valid.astype(jnp.int32))

    def validate(self, batch: int, n_heads: int, q_len: int, k_len: int) -> MaskSpec:
        """Checks the options and static shapes (jit-safe: never reads array values).

        Raises ValueError naming the offending field. Returns ``self``.
        """
        if self.q_segment_ids is not None and self.k_segment_ids is None:
            raise ValueError(
                "q_segment_ids needs k_segment_ids: give both (packed segments) or "
                "k_segment_ids alone (key padding: id 0 is masked)"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        for name, x, length in (
            ("q_positions", self.q_positions, q_len),
            ("k_positions", self.k_positions, k_len),
            ("q_segment_ids", self.q_segment_ids, q_len),
            ("k_segment_ids", self.k_segment_ids, k_len),
        ):
            if x is not None and not _broadcasts(x.shape, (batch, length), ndim=2):
                raise ValueError(
                    f"{name} of shape {x.shape} is not broadcastable to [batch, length] = "
                    f"{(batch, length)}"
                )
        full = (batch, n_heads, q_len, k_len)
        if self.dense is not None and not _broadcasts(self.dense.shape, full):
            raise ValueError(
                f"mask of shape {self.dense.shape} is not broadcastable to [batch, heads, q_len,"
                f" k_len] = {full}; build it with attnzoo.models.masks (e.g. masks.causal(...))"
            )
        return self

    # ---- reading -----------------------------------------------------------------------------

    @property
    def uses_positions(self) -> bool:
        """Whether ``causal`` or ``sliding_window`` reads the positions."""
        return self.causal or self.sliding_window is not None

    def positions(self, q_len: int, k_len: int) -> tuple[jax.Array, jax.Array]:
        """(q_positions [B|1, T], k_positions [B|1, S]): as given, else ``0..T-1`` / ``0..S-1``."""
        qp, kp = self.q_positions, self.k_positions
        if qp is None:
            qp = jnp.arange(q_len, dtype=jnp.int32)[None]
        if kp is None:
            kp = jnp.arange(k_len, dtype=jnp.int32)[None]
        return qp, kp

    def to_dense(self, q_len: int, k_len: int) -> jax.Array | None:
        """Every part and-ed into one bool [B|1, N|1, T|1, S|1] mask (N only if ``dense`` has
        heads); None when nothing is masked. For paths that take a dense mask."""
        out = None
        if self.uses_positions:
            qp, kp = self.positions(q_len, k_len)
            if self.causal:
                out = combine(out, causal(qp, kp))
            if self.sliding_window is not None:
                out = combine(out, sliding_window(qp, kp, self.sliding_window))
        if self.k_segment_ids is not None:
            out = combine(out, _segments(self.q_segment_ids, self.k_segment_ids)[:, None])
        if self.dense is not None:
            out = combine(out, _as_4d(self.dense))
        return out

    def block(
        self, q_start: jax.Array | int, q_size: int, k_start: jax.Array | int, k_size: int
    ) -> jax.Array | None:
        """The mask of query rows ``[q_start, q_start + q_size)`` against key columns
        ``[k_start, k_start + k_size)``: bool [B|1, N|1, q_size, k_size], or None.

        Built from the block's slices of the integer vectors, so no [T, S] array exists. Needs
        a spec whose positions are filled in when ``uses_positions`` (``positions``) and whose
        arrays cover every block (the blockwise path pads them); starts may be traced.
        """
        allowed = None
        if self.uses_positions:
            q_positions, k_positions = self._given_positions("block")
            qp = block_slice(q_positions, q_start, q_size, 1)[:, :, None]  # (B, tq, 1)
            kp = block_slice(k_positions, k_start, k_size, 1)[:, None, :]  # (B, 1, tk)
            if self.causal:
                allowed = _and(allowed, kp <= qp)
            if self.sliding_window is not None:
                delta = qp - kp
                allowed = _and(allowed, (delta >= 0) & (delta < self.sliding_window))
        if self.k_segment_ids is not None:
            qs = block_slice(self.q_segment_ids, q_start, q_size, 1)
            ks = block_slice(self.k_segment_ids, k_start, k_size, 1)
            allowed = _and(allowed, _segments(qs, ks))
        if allowed is not None:
            allowed = allowed[:, None]  # (B, 1, tq|1, tk)
        if self.dense is not None:
            d = block_slice(block_slice(self.dense, q_start, q_size, 2), k_start, k_size, 3)
            allowed = _and(allowed, d)
        return allowed

    def block_is_empty(
        self, q_start: jax.Array | int, q_size: int, k_start: jax.Array | int, k_size: int
    ) -> jax.Array | None:
        """Scalar bool: ``causal`` / ``sliding_window`` masks *every* pair of the block (as in
        ``block``), so it can be skipped; None when these options cannot rule a block out.

        Conservative: rows or columns that only pad the arrays to whole blocks (position 0)
        can only prevent a skip, never cause one.
        """
        if not self.uses_positions:
            return None
        q_positions, k_positions = self._given_positions("block_is_empty")
        qpos = block_slice(q_positions, q_start, q_size, 1)  # (B, tq)
        kpos = block_slice(k_positions, k_start, k_size, 1)  # (B, tk)
        empty = qpos.max(1) < kpos.min(1)  # every key after every query; (B,)
        if self.sliding_window is not None:
            empty |= qpos.min(1) - kpos.max(1) >= self.sliding_window  # all out of the window
        return empty.all()

    def _given_positions(self, caller: str) -> tuple[jax.Array, jax.Array]:
        """(q_positions, k_positions) as given; ``caller`` needs both filled in."""
        if self.q_positions is None or self.k_positions is None:
            raise ValueError(
                f"MaskSpec.{caller} needs q_positions and k_positions when causal or "
                "sliding_window is set; fill them in first (MaskSpec.positions)"
            )
        return self.q_positions, self.k_positions


def _segments(q_ids: jax.Array | None, k_ids: jax.Array) -> jax.Array:
    """[B, T] and [B, S] segment ids -> [B, T, S] bool (or [B, 1, S] when ``q_ids`` is None)."""
    real = (k_ids != 0)[:, None, :]
    if q_ids is None:
        return real
    return (q_ids[:, :, None] == k_ids[:, None, :]) & real


def _and(a: jax.Array | None, b: jax.Array) -> jax.Array:
    return b if a is None else a & b


def _as_4d(x: jax.Array) -> jax.Array:
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _broadcasts(shape: tuple[int, ...], full: tuple[int, ...], ndim: int | None = None) -> bool:
    """Whether an array of ``shape`` broadcasts to ``full`` (and has ``ndim`` dims if given)."""
    if len(shape) > len(full) or (ndim is not None and len(shape) != ndim):
        return False
    try:
        return jnp.broadcast_shapes(shape, full) == full
    except ValueError:
        return False
