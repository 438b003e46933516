"""The paper's absolute encoding (Vaswani et al. 2017, section 3.5).

    PE(pos, 2i) = sin(pos / 10000^(2i/d)),   PE(pos, 2i+1) = cos(pos / 10000^(2i/d))

Computed from the positions on the fly (no table), so there is no maximum length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.models.positional.base import Encoding, register


def sinusoidal_table(positions: jax.Array, d_model: int, *, base: float = 10000.0) -> jax.Array:
    """positions: [...] int or float -> [..., d_model] float32, sin on even and cos on odd dims."""
    if d_model % 2:
        raise ValueError(f"sinusoidal encoding needs an even d_model, got {d_model}")
    i = jnp.arange(d_model // 2, dtype=jnp.float32)
    inv_freq = base ** (-2.0 * i / d_model)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    # interleave so dim 2i is sin and dim 2i+1 is cos, exactly as in the paper
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, d_model)


class Sinusoidal(Encoding):
    """The paper's fixed sinusoids (section 3.5) added to the token embeddings."""

    def embed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return x + sinusoidal_table(positions, x.shape[-1]).astype(x.dtype)


register("sinusoidal", Sinusoidal)
