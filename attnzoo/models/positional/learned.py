"""Learned absolute position embeddings (GPT-2, BERT): a trainable ``[max_len, d_model]`` table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.models import layers
from attnzoo.models.positional.base import Encoding, PositionConfig, register


class Learned(Encoding):
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
        if x.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds the learned position table "
                f"(max_len={self.config.max_len}); raise position.max_len or use a relative kind"
            )
        return x + jnp.take(self.table[...], positions, axis=0).astype(x.dtype)


register("learned", Learned)
