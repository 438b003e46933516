"""Learned absolute position embeddings (GPT-2, BERT): a trainable ``[max_len, d_model]`` table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.core import Tracer

from attnzoo.models import layers
from attnzoo.models.activation_sharding import constrain
from attnzoo.models.positional.base import Encoding, PositionConfig, register


class Learned(Encoding):
    """A learned [max_len, D] table added to the token embeddings (GPT-2)."""

    def __init__(
        self,
        config: PositionConfig,
        *,
        d_model: int,
        n_heads: int,
        head_dim: int,
        causal: bool,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            config, d_model=d_model, n_heads=n_heads, head_dim=head_dim, causal=causal, rngs=rngs
        )
        self.table = layers.param(
            rngs, layers.normal(0.02), (config.max_len, d_model), ("position", "embed")
        )

    def embed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T] int in [0, max_len) -> [B, T, D]."""
        max_len = self.config.max_len
        fix = "raise position.max_len or use a relative kind"
        if x.shape[1] > max_len:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds the learned position table "
                f"(max_len={max_len}); {fix}"
            )
        if not isinstance(positions, Tracer):  # concrete: check values eagerly
            top = int(jnp.max(positions)) if positions.size else 0
            if top >= max_len:
                raise ValueError(
                    f"position {top} is beyond the learned position table (max_len={max_len}); "
                    f"{fix}"
                )
        # under jit values are unknown: out-of-table rows read NaN instead of silently clamping
        # the table whole along the width under a sharding scope, as for ``layers.Embed``
        table = constrain(self.table[...], ("position", None))
        rows = jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)
        return x + rows.astype(x.dtype)


register("learned", Learned)
