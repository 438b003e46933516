"""Relative position representations (Shaw et al. 2018): learned key and value terms per
clipped distance, added inside every attention layer.

    e_ij = q_i (k_j + a^K_ij)^T / sqrt(d),   z_i = sum_j softmax(e)_ij (v_j + a^V_ij)
    a^K_ij = w^K[clip(j - i, -k, k)],        a^V_ij = w^V[clip(j - i, -k, k)]

with ``k = shaw_max_distance``: 2k + 1 embeddings per table, one table pair per layer, shared by
the heads (as in the paper). ``dot_product_attention`` consumes the [B, T, S, H] terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.models import layers
from attnzoo.models.positional.base import LayerEncoding, PositionConfig, register


def relative_index(q_positions: jax.Array, k_positions: jax.Array, max_distance: int) -> jax.Array:
    """q_positions [B, T], k_positions [B, S] -> table rows clip(j - i, -k, k) + k, [B, T, S]."""
    rel = k_positions[:, None, :] - q_positions[:, :, None]  # (B, T, S): j - i
    return jnp.clip(rel, -max_distance, max_distance) + max_distance


class Shaw(LayerEncoding):
    """Per-layer ``[2k+1, head_dim]`` key and value tables (logical axes relpos, head_dim)."""

    def __init__(
        self, config: PositionConfig, *, n_heads: int, head_dim: int, causal: bool, rngs: nnx.Rngs
    ):
        super().__init__(config, n_heads=n_heads, head_dim=head_dim, causal=causal, rngs=rngs)
        if config.shaw_max_distance < 1:
            raise ValueError(f"shaw_max_distance must be >= 1, got {config.shaw_max_distance}")
        rows = 2 * config.shaw_max_distance + 1
        init = layers.normal(head_dim**-0.5)
        self.rel_k = layers.param(rngs, init, (rows, head_dim), ("relpos", "head_dim"))
        self.rel_v = layers.param(rngs, init, (rows, head_dim), ("relpos", "head_dim"))

    def relative(
        self, q_positions: jax.Array, k_positions: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        idx = relative_index(q_positions, k_positions, self.config.shaw_max_distance)
        rel_k = jnp.take(self.rel_k[...], idx, axis=0)  # (B, T, S, H)
        rel_v = jnp.take(self.rel_v[...], idx, axis=0)  # (B, T, S, H)
        return rel_k, rel_v


register("shaw", layer=Shaw)
