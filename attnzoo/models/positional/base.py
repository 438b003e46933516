"""The one interface every positional encoding plugs into.

A kind is two small classes, registered under its name:

* ``Encoding`` (one per stack, owned by the model): ``embed`` adds absolute encodings to the
  token embeddings; ``attention_bias`` returns logits biases shared by every layer (ALiBi, T5).
* ``LayerEncoding`` (one per attention layer): ``rotate`` rotates queries/keys (RoPE, xPos);
  ``relative`` returns relative key/value terms (Shaw et al.).

Every hook defaults to a no-op, so a kind overrides only where it acts. Adding a kind is one file
in this package (plus its test) that calls ``register``; ``positional/__init__.py`` imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class PositionConfig:
    """Which positional encoding to use, and its options (frozen; vary with ``replace``).

    Attributes:
      kind: one of ``positional.KINDS`` (``sinusoidal``, ``learned``, ``shaw``, ``t5``, ``rope``,
        ``alibi``, ``xpos``, ``none``).
      max_len: rows of the ``learned`` table; positions must stay below it.
      rope_base: RoPE base frequency theta.
      rope_fraction: fraction of each head's dims that rotate (partial rotary, e.g. GPT-NeoX 0.25).
      rope_layout: ``"half"`` (rotate-half, GPT-NeoX/LLaMA) or ``"interleaved"`` (GPT-J pairs).
      rope_scaling: ``None``, ``"linear"``, ``"dynamic"`` (NTK), ``"yarn"`` or ``"llama3"``.
      rope_factor: context-extension factor of the scaling.
      rope_original_max_len: pre-extension context length the scalings refer to.
      yarn_beta_fast: YaRN ramp boundary, in rotations (high-frequency end).
      yarn_beta_slow: YaRN ramp boundary, in rotations (low-frequency end).
      yarn_attention_factor: YaRN cos/sin amplitude; ``None`` = ``0.1 ln(rope_factor) + 1``.
      yarn_truncate: round the YaRN ramp boundaries to whole dims (as Hugging Face's default).
      llama3_low_freq_factor: Llama-3 scaling band edge (low-frequency side).
      llama3_high_freq_factor: Llama-3 scaling band edge (high-frequency side).
      xpos_scale_base: xPos decay base gamma.
      num_buckets: number of T5 relative-position buckets.
      max_distance: T5 relative distance from which on all distances share a bucket.
      shaw_max_distance: Shaw clipping distance k (2k+1 relative embeddings).
    """

    kind: str = "sinusoidal"
    max_len: int = 2048
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    rope_layout: str = "half"
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_original_max_len: int = 2048
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = None
    yarn_truncate: bool = True
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    xpos_scale_base: float = 512.0
    num_buckets: int = 32
    max_distance: int = 128
    shaw_max_distance: int = 16

    def replace(self, **kw: Any) -> PositionConfig:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **kw)


class Encoding(nnx.Module):
    """Stack-level hooks (no-ops by default).

    Args (all kinds receive the same): config, d_model, n_heads, head_dim, causal (decoder
    self-attention vs bidirectional encoder), rngs.
    """

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
        self.config = config

    def embed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T] int -> [B, T, D]."""
        return x

    def attention_bias(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array | None:
        """q_positions [B, T], k_positions [B, S] -> None or logits bias [B or 1, N, T, S]."""
        return None


class LayerEncoding(nnx.Module):
    """Per-attention-layer hooks (no-ops by default)."""

    def __init__(
        self, config: PositionConfig, *, n_heads: int, head_dim: int, causal: bool, rngs: nnx.Rngs
    ):
        self.config = config

    def rotate(self, x: jax.Array, positions: jax.Array, *, is_key: bool) -> jax.Array:
        """x: [B, T, N, H] queries (``is_key=False``) or keys, positions [B, T] -> [B, T, N, H]."""
        return x

    def relative(
        self, q_positions: jax.Array, k_positions: jax.Array
    ) -> tuple[jax.Array | None, jax.Array | None]:
        """-> (rel_k, rel_v), each None or [B, T, S, H] (see ``dot_product_attention``)."""
        return None, None


_REGISTRY: dict[str, tuple[type[Encoding], type[LayerEncoding]]] = {}


def register(
    kind: str, encoding: type[Encoding] = Encoding, layer: type[LayerEncoding] = LayerEncoding
) -> None:
    """Registers a positional kind (called once, in the kind's own module)."""
    _REGISTRY[kind] = (encoding, layer)


def kinds() -> tuple[str, ...]:
    """Registered positional kinds, sorted."""
    return tuple(sorted(_REGISTRY))


def _lookup(kind: str):
    if kind not in _REGISTRY:
        raise ValueError(f"unknown position kind {kind!r}; valid kinds: {', '.join(kinds())}")
    return _REGISTRY[kind]


def validate(config: PositionConfig, *, head_dim: int) -> None:
    """Raises a clear error for a config that cannot work (unknown kind, odd rotary dims...)."""
    _lookup(config.kind)
    if config.kind in ("rope", "xpos"):
        rot = int(head_dim * config.rope_fraction)
        if rot % 2 or rot == 0:
            raise ValueError(
                f"{config.kind} rotates pairs of dims: head_dim * rope_fraction = {head_dim} * "
                f"{config.rope_fraction} = {rot} must be even and > 0; change head_dim or "
                "rope_fraction"
            )


def make_encoding(
    config: PositionConfig,
    *,
    d_model: int,
    n_heads: int,
    head_dim: int,
    causal: bool,
    rngs: nnx.Rngs,
) -> Encoding:
    """The stack-level hooks of ``config.kind`` (validated first)."""
    validate(config, head_dim=head_dim)
    cls, _ = _lookup(config.kind)
    return cls(
        config, d_model=d_model, n_heads=n_heads, head_dim=head_dim, causal=causal, rngs=rngs
    )


def make_layer_encoding(
    config: PositionConfig, *, n_heads: int, head_dim: int, causal: bool, rngs: nnx.Rngs
) -> LayerEncoding:
    """The per-attention-layer hooks of ``config.kind``."""
    _, cls = _lookup(config.kind)
    return cls(config, n_heads=n_heads, head_dim=head_dim, causal=causal, rngs=rngs)
