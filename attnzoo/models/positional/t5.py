"""T5 relative attention bias (Raffel et al. 2020, section 2.1): a learned scalar per head for
each bucket of key-minus-query distance, shared by every layer of a stack.

Half the buckets (all of them when causal) are exact small distances; the rest grow
logarithmically up to ``max_distance``, beyond which distances share the last bucket. Encoders
are bidirectional (sign gets its own half of the buckets); decoders causal (only j <= i counts).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.models import layers
from attnzoo.models.positional.base import Encoding, PositionConfig, register


def t5_bucket(
    relative_position: jax.Array,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """relative_position = k_pos - q_pos, int [...] -> bucket ids int32 [...], < num_buckets."""
    n = -relative_position.astype(jnp.int32)  # (q - k): > 0 for keys in the past
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(jnp.int32) * num_buckets  # future keys: upper half
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    # log-spaced buckets for n >= max_exact; the clamp keeps log() finite where it is unused
    scaled = jnp.log(jnp.maximum(n, max_exact).astype(jnp.float32) / max_exact)
    large = max_exact + (
        scaled / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(n < max_exact, n, large)


class T5Bias(Encoding):
    """Holds the ``[num_buckets, n_heads]`` table (logical axes ``("relpos", "heads")``)."""

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
        if config.num_buckets < 2 or config.max_distance <= config.num_buckets // 2:
            raise ValueError(
                f"t5 needs num_buckets >= 2 and max_distance > num_buckets // 2, got "
                f"num_buckets={config.num_buckets}, max_distance={config.max_distance}"
            )
        self.causal = causal
        self.table = layers.param(
            rngs, layers.normal(d_model**-0.5), (config.num_buckets, n_heads), ("relpos", "heads")
        )

    def attention_bias(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        rel = k_positions[:, None, :] - q_positions[:, :, None]  # (B, T, S)
        buckets = t5_bucket(
            rel,
            bidirectional=not self.causal,
            num_buckets=self.config.num_buckets,
            max_distance=self.config.max_distance,
        )
        values = jnp.take(self.table[...], buckets, axis=0)  # (B, T, S, N)
        return jnp.transpose(values, (0, 3, 1, 2)).astype(jnp.float32)  # (B, N, T, S)


register("t5", T5Bias)
