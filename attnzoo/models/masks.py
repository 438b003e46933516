"""Attention masks as small pure functions.

Every mask is boolean, ``True`` where a query may attend to a key, and broadcastable to
``[batch, heads, q_len, k_len]``. Combine masks with ``combine`` (logical and).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
