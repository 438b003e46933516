"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE whose rotation also
scales queries up and keys down exponentially with position, so scores decay with distance.

    q_m -> R(m) q_m * zeta^(m / gamma),   k_n -> R(n) k_n * zeta^(-n / gamma)
    zeta_i = (2i / R + 0.4) / 1.4  (i = 0 .. R/2 - 1),   gamma = xpos_scale_base

so ``q_m . k_n`` carries ``zeta^((m - n) / gamma)``: a function of the offset only, like RoPE.
Rotation pairs, base and partial rotary follow the ``rope_*`` options (torchscale uses the
interleaved layout). Positions are used as given (torchscale centres them per call, which only
shifts both scales by reciprocal constants); with zeta >= 2/7, float32 holds the scale up to
positions of about ``70 * gamma``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.models.positional.base import LayerEncoding, PositionConfig, register
from attnzoo.models.positional.rope import apply_rope, rope_inv_freq, rotary_dims


def xpos_scale(positions: jax.Array, rot_dim: int, *, scale_base: float, is_key: bool) -> jax.Array:
    """positions [B, T] -> per-pair amplitude [B, T, R/2] float32 (inverse for keys)."""
    zeta = (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) + 0.4 * rot_dim) / (1.4 * rot_dim)
    power = positions.astype(jnp.float32)[..., None] / scale_base  # (B, T, 1)
    return zeta ** (-power if is_key else power)


def apply_xpos(
    x: jax.Array,
    positions: jax.Array,
    *,
    is_key: bool,
    base: float = 10000.0,
    scale_base: float = 512.0,
    fraction: float = 1.0,
    layout: str = "interleaved",
) -> jax.Array:
    """x: [B, T, N, H] queries (``is_key=False``) or keys, positions [B, T] -> [B, T, N, H]."""
    config = PositionConfig(
        kind="xpos",
        rope_base=base,
        rope_fraction=fraction,
        rope_layout=layout,
        xpos_scale_base=scale_base,
    )
    return _xpos(config, x, positions, is_key=is_key)


def _xpos(config: PositionConfig, x: jax.Array, positions: jax.Array, *, is_key: bool) -> jax.Array:
    if config.rope_scaling is not None:
        raise ValueError(
            f"xpos has no context-extension scalings (got rope_scaling="
            f"{config.rope_scaling!r}); use kind='rope' for them or drop the scaling"
        )
    rot = rotary_dims(x.shape[-1], config.rope_fraction)
    inv_freq, _ = rope_inv_freq(config, x.shape[-1])
    scale = xpos_scale(positions, rot, scale_base=config.xpos_scale_base, is_key=is_key)
    return apply_rope(
        x, positions, inv_freq=inv_freq, attention_factor=scale, layout=config.rope_layout
    )


class XPos(LayerEncoding):
    """RoPE with an exponential decay of query/key scale (Sun et al. 2022)."""

    def rotate(self, x: jax.Array, positions: jax.Array, *, is_key: bool) -> jax.Array:
        return _xpos(self.config, x, positions, is_key=is_key)


register("xpos", layer=XPos)
