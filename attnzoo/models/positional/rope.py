"""Rotary position embedding (Su et al. 2021, "RoFormer") and its context-extension scalings.

Each pair of dims ``(x1, x2)`` of a query/key at position ``m`` is rotated by ``m * theta_i``:

    (x1, x2) -> (x1 cos(m theta_i) - x2 sin(m theta_i),  x2 cos(m theta_i) + x1 sin(m theta_i))
    theta_i = base^(-2i / R),  i = 0 .. R/2 - 1,  R = rotary dims = int(head_dim * fraction)

so ``q(m) . k(n)`` depends only on ``m - n``. Layouts differ in which dims form a pair:
``"half"`` pairs ``i`` with ``i + R/2`` (GPT-NeoX, LLaMA), ``"interleaved"`` pairs ``2i`` with
``2i + 1`` (GPT-J, RoFormer). Dims past ``R`` pass through unrotated (partial rotary, GPT-NeoX).

Scalings change ``theta_i`` (and, for YaRN, the cos/sin amplitude) to stretch a model trained on
``original_max_len`` tokens to longer contexts. They follow Hugging Face's ``ROPE_INIT_FUNCTIONS``:

* ``linear``: position interpolation (Chen et al. 2023), ``theta_i / factor``.
* ``dynamic``: NTK-aware base rescaled from the current length (``max(positions) + 1``).
* ``yarn``: NTK-by-parts ramp between interpolation and extrapolation plus the attention factor
  ``0.1 ln(factor) + 1`` on cos/sin (Peng et al. 2023).
* ``llama3``: Llama 3.1's band-wise interpolation (low frequencies / factor, high kept,
  smooth blend between).

``dynamic`` reads the length from the positions of each call (``max(positions) + 1``, as Hugging
Face does), so with a KV cache the keys written earlier keep the frequencies of their own step:
incremental decoding past ``rope_original_max_len`` differs from a full forward pass. Every
other scaling is static and caches exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnzoo.models.positional.base import LayerEncoding, PositionConfig, register

SCALINGS = (None, "linear", "dynamic", "yarn", "llama3")
LAYOUTS = ("half", "interleaved")


def rotary_dims(head_dim: int, fraction: float) -> int:
    """Number of rotated dims R (as Hugging Face: ``int(head_dim * fraction)``)."""
    rot = int(head_dim * fraction)
    if rot <= 0 or rot % 2:
        raise ValueError(
            f"rotary embeddings rotate pairs of dims: head_dim * fraction = {head_dim} * "
            f"{fraction} = {rot} must be even and > 0; change head_dim or rope_fraction"
        )
    return rot


def rope_inv_freq(
    config: PositionConfig, head_dim: int, *, seq_len: int | jax.Array | None = None
) -> tuple[jax.Array, float]:
    """Inverse frequencies ``theta_i`` after the configured scaling.

    Args:
      config: ``rope_base``, ``rope_fraction``, ``rope_scaling`` and its options are read.
      head_dim: H; frequencies cover the first ``int(H * rope_fraction)`` dims.
      seq_len: current length, only read by ``dynamic`` (may be traced); default
        ``rope_original_max_len`` (no stretch).
    Returns:
      (inv_freq [R/2] float32, attention_factor): the factor multiplies cos and sin (YaRN's
      mscale; 1.0 for every other scaling).
    """
    scaling, factor = config.rope_scaling, config.rope_factor
    if scaling not in SCALINGS:
        raise ValueError(f"unknown rope_scaling {scaling!r}; valid: {SCALINGS}")
    if scaling is not None and factor < 1.0:
        raise ValueError(f"rope_factor must be >= 1 for {scaling!r} scaling, got {factor}")
    dim = rotary_dims(head_dim, config.rope_fraction)
    base = config.rope_base
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim  # [R/2]: 2i / R
    original = config.rope_original_max_len

    if scaling == "dynamic":
        # NTK-aware: grow the base once the sequence outgrows the original context
        seq_len = original if seq_len is None else jnp.maximum(seq_len, original)
        stretch = factor * jnp.asarray(seq_len, jnp.float32) / original - (factor - 1)
        base = base * stretch ** (dim / (dim - 2))
    inv_freq = 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)

    if scaling == "linear":
        return inv_freq / factor, 1.0
    if scaling == "yarn":
        return _yarn(config, inv_freq, dim)
    if scaling == "llama3":
        return _llama3(config, inv_freq), 1.0
    return inv_freq, 1.0


def _yarn(config: PositionConfig, inv_freq: jax.Array, dim: int) -> tuple[jax.Array, float]:
    factor, base, original = config.rope_factor, config.rope_base, config.rope_original_max_len

    def correction_dim(rotations: float) -> float:
        # the dim index whose wavelength fits ``rotations`` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(config.yarn_beta_fast), correction_dim(config.yarn_beta_slow)
    if config.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low (interpolated)
    inv_freq = inv_freq / factor * (1.0 - extrapolate) + inv_freq * extrapolate
    attention_factor = config.yarn_attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def _llama3(config: PositionConfig, inv_freq: jax.Array) -> jax.Array:
    factor, original = config.rope_factor, config.rope_original_max_len
    low, high = config.llama3_low_freq_factor, config.llama3_high_freq_factor
    if high <= low:
        raise ValueError(
            f"llama3 scaling needs llama3_high_freq_factor ({high}) > "
            f"llama3_low_freq_factor ({low})"
        )
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(is_medium, blended, scaled)


def apply_rope(
    inputs: jax.Array,
    positions: jax.Array,
    *,
    inv_freq: jax.Array | None = None,
    attention_factor: float | jax.Array | None = None,
    layout: str = "half",
    base: float = 10000.0,
    fraction: float = 1.0,
    scaling: str | None = None,
    factor: float = 1.0,
    original_max_len: int = 2048,
    **scaling_options: float,
) -> jax.Array:
    """Rotary embedding of queries or keys (both get the same rotation): the RoPE primitive.

    Rotates pair ``i`` of the first R dims of every head by ``positions * inv_freq[i]``; dims
    past R pass through. Computed in float32.

    Args:
      inputs: [B, T, N, H] queries or keys.
      positions: [B, T] int positions.
      inv_freq: [R/2] float32 frequencies theta_i (``rope_inv_freq``), ``R <= H``. When given,
        the frequency options (``base`` ... ``scaling_options``) are not read.
      attention_factor: scalar or [B, T, R/2] multiplier of cos and sin (YaRN's mscale, xPos's
        decay); default the scaling's own (YaRN) or 1.0.
      layout: ``"half"`` (GPT-NeoX/LLaMA) or ``"interleaved"`` (GPT-J) pairing.
      base: theta base.
      fraction: share of H that rotates (partial rotary); the rest passes through.
      scaling: ``None``, ``"linear"``, ``"dynamic"``, ``"yarn"`` or ``"llama3"``; ``dynamic``
        reads the length as ``max(positions) + 1``.
      factor: context-extension factor of the scaling.
      original_max_len: context length the model was trained on.
      scaling_options: further ``PositionConfig`` fields (``yarn_beta_fast``,
        ``llama3_low_freq_factor``, ...).
    Returns:
      [B, T, N, H] in ``inputs.dtype``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown rope_layout {layout!r}; valid: {LAYOUTS}")
    if inv_freq is None:
        explicit = ("kind", "rope_base", "rope_fraction", "rope_layout", "rope_scaling")
        clash = sorted(set(scaling_options) & {*explicit, "rope_factor", "rope_original_max_len"})
        if clash:
            raise ValueError(f"pass {clash} as apply_rope's own arguments, not scaling options")
        config = PositionConfig(
            kind="rope",
            rope_base=base,
            rope_fraction=fraction,
            rope_layout=layout,
            rope_scaling=scaling,
            rope_factor=factor,
            rope_original_max_len=original_max_len,
        ).replace(**scaling_options)
        inv_freq, scaling_factor = rope_frequencies(config, inputs.shape[-1], positions)
        attention_factor = scaling_factor if attention_factor is None else attention_factor
    elif scaling is not None or scaling_options:
        raise ValueError("give either inv_freq or the scaling options that compute it, not both")
    if attention_factor is None:
        attention_factor = 1.0
    R = 2 * inv_freq.shape[-1]
    if R > inputs.shape[-1]:
        raise ValueError(f"{R} rotary dims exceed head_dim {inputs.shape[-1]}")
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, R/2)
    xr, x_pass = inputs[..., :R].astype(jnp.float32), inputs[..., R:]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]  # (B, T, 1, R/2)
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    if layout == "half":
        x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        # (B, T, N, R/2, 2) -> (B, T, N, R): pairs back in place
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(inputs.dtype), x_pass], axis=-1)


def rope_frequencies(
    config: PositionConfig, head_dim: int, positions: jax.Array
) -> tuple[jax.Array, float]:
    """``rope_inv_freq`` for a call at ``positions`` [B, T]: (inv_freq [R/2], attention_factor).

    Only ``dynamic`` scaling reads the positions (length ``max(positions) + 1``).
    """
    seq_len = jnp.max(positions) + 1 if config.rope_scaling == "dynamic" else None
    return rope_inv_freq(config, head_dim, seq_len=seq_len)


class Rope(LayerEncoding):
    """Rotary embedding of queries and keys (Su et al. 2021) with the config's scaling."""

    def rotate(self, x: jax.Array, positions: jax.Array, *, is_key: bool) -> jax.Array:
        """x: [B, T, N, H] queries or keys, positions [B, T] -> rotated [B, T, N, H]."""
        c = self.config
        inv_freq, attention_factor = rope_frequencies(c, x.shape[-1], positions)
        return apply_rope(
            x,
            positions,
            inv_freq=inv_freq,
            attention_factor=attention_factor,
            layout=c.rope_layout,
        )


register("rope", layer=Rope)
