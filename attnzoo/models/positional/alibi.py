"""ALiBi (Press et al. 2022, "Train Short, Test Long"): a per-head linear penalty on distance.

    logits_ij += -m_h * |i - j|

Slopes ``m_h`` form a geometric sequence starting at ``2^(-8/n)`` with that same ratio. For a head
count that is not a power of two the paper takes the slopes of the closest smaller power of two
``c`` and then every other slope of ``2c`` (what BLOOM ships). For a causal decoder the allowed
entries (``j <= i``) get ``m_h * (j - i)``, the paper's form; bidirectional encoders use the
symmetric ``-m_h |i - j|`` (the same formula, unmasked).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.models.positional.base import Encoding, PositionConfig, register


def alibi_slopes(n_heads: int) -> list[float]:
    """The paper's head slopes ``m_h`` (h = 0 .. n_heads - 1), largest first."""
    if n_heads < 1:
        raise ValueError(f"ALiBi needs n_heads >= 1, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    if closest == n_heads:
        return power_of_two(n_heads)
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]


def alibi_bias(q_positions: jax.Array, k_positions: jax.Array, slopes: jax.Array) -> jax.Array:
    """q_positions [B, T], k_positions [B, S], slopes [N] -> bias [B, N, T, S] float32."""
    # int distance first (exact for any position); float32 only for the product
    distance = jnp.abs(q_positions[:, :, None] - k_positions[:, None, :])  # (B, T, S)
    return -slopes[None, :, None, None] * distance[:, None].astype(jnp.float32)


class Alibi(Encoding):
    """No parameters: the slopes are fixed by the head count."""

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
        self.slopes = tuple(alibi_slopes(n_heads))  # static Python floats, not a param

    def attention_bias(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return alibi_bias(q_positions, k_positions, jnp.asarray(self.slopes, jnp.float32))


register("alibi", Alibi)
