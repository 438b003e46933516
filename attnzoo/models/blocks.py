"""The Transformer block shared by every model: self-attention, optional cross-attention, MLP.

``pre_norm=True``: x + Sublayer(Norm(x))   (GPT-2, LLaMA, T5)
``pre_norm=False``: Norm(x + Sublayer(x))  (the paper, section 3.1 / 5.4, post-LN)

The block reads its hyperparameters from the model config by field name (``d_model``,
``n_heads``, ``n_kv_heads``, ``head_dim``, ``d_ff``, ``activation``, ``gated_mlp``, ``norm``,
``norm_eps``, ``pre_norm``, ``use_bias``, ``qk_norm``, ``dropout``, ``attention_dropout``,
``sliding_window``, ``attention_scale``, ``attention_impl``, ``dtype``, ``param_dtype``), so
the decoder-only and encoder-decoder configs share one block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.models.activation_sharding import constrain
from attnzoo.models.layers import ACTIVATIONS, MLP, Norm
from attnzoo.models.masks import MaskSpec
from attnzoo.models.mha import KVCache, MultiHeadAttention
from attnzoo.models.positional import validate as validate_position
from attnzoo.models.remat import REMAT_POLICIES as REMAT_POLICIES  # re-exported
from attnzoo.models.remat import check_remat_policy


def validate_config(cfg: Any) -> None:
    """Rejects block hyperparameters that cannot build, naming the field and the fix."""
    if cfg.vocab_size < 1 or cfg.d_model < 1 or cfg.n_heads < 1 or cfg.d_ff < 1:
        raise ValueError(
            "vocab_size, d_model, n_heads and d_ff must all be >= 1; got "
            f"{cfg.vocab_size}, {cfg.d_model}, {cfg.n_heads}, {cfg.d_ff}"
        )
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ValueError(
            f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads}); "
            "change one of them or set head_dim explicitly"
        )
    if cfg.n_kv_heads is not None and (cfg.n_kv_heads < 1 or cfg.n_heads % cfg.n_kv_heads):
        raise ValueError(
            f"n_kv_heads ({cfg.n_kv_heads}) must divide n_heads ({cfg.n_heads}); "
            "use n_heads (MHA), 1 (MQA) or a divisor (GQA)"
        )
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg.activation!r}; valid: {sorted(ACTIVATIONS)}")
    if cfg.norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"unknown norm {cfg.norm!r}; valid: 'layernorm', 'rmsnorm'")
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(cfg, name))
        except TypeError:
            raise ValueError(
                f"{name}={getattr(cfg, name)!r} is not a dtype name (e.g. 'float32', 'bfloat16')"
            ) from None
    check_remat_policy(cfg.remat_policy)
    validate_position(cfg.position, head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads)


def make_norm(cfg: Any, rngs: nnx.Rngs) -> Norm:
    """The config's norm over ``d_model`` (also the final norm of pre-LN stacks)."""
    return Norm(
        cfg.d_model,
        kind=cfg.norm,
        eps=cfg.norm_eps,
        use_bias=None if cfg.norm == "rmsnorm" else cfg.norm_bias,
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


class Block(nnx.Module):
    """Self-attention, optional cross-attention and an MLP, each a residual sublayer.

    Args:
      cfg: the model config (fields listed in the module docstring).
      causal: decoder self-attention (keys after the query are masked).
      cross_attention: add a sublayer attending to the encoder output.
    """

    def __init__(self, cfg: Any, *, causal: bool, cross_attention: bool = False, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.pre_norm = cfg.pre_norm
        norm = lambda: make_norm(cfg, rngs)
        attn = lambda position, causal_: MultiHeadAttention(
            cfg.d_model,
            cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            position=position,
            causal=causal_,
            sliding_window=cfg.sliding_window if causal_ else None,
            use_bias=cfg.use_bias,
            qk_norm=cfg.qk_norm,
            dropout=cfg.attention_dropout,
            scale=cfg.attention_scale,
            implementation=cfg.attention_impl,
            norm_eps=cfg.norm_eps,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.self_attn_norm = norm()
        self.self_attn = attn(cfg.position, causal)
        self.cross_attn_norm = norm() if cross_attention else None
        self.cross_attn = attn(None, False) if cross_attention else None
        self.mlp_norm = norm()
        self.mlp = MLP(
            cfg.d_model,
            cfg.d_ff,
            activation=cfg.activation,
            gated=cfg.gated_mlp,
            use_bias=cfg.use_bias,
            dropout=cfg.activation_dropout,
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.residual_dropout = nnx.Dropout(cfg.dropout)

    def _sublayer(self, x, norm, fn, deterministic, rngs):
        """Residual connection with dropout around ``fn``, pre- or post-LN.

        The residual stream is pinned to ("batch", "length", "embed") under a sharding scope
        (``activation_sharding``; a no-op without one).
        """
        if self.pre_norm:
            y, aux = fn(norm(x))
            y = x + self.residual_dropout(y, deterministic=deterministic, rngs=rngs)
        else:
            y, aux = fn(x)
            y = norm(x + self.residual_dropout(y, deterministic=deterministic, rngs=rngs))
        return constrain(y, ("batch", "length", "embed")), aux

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: MaskSpec,
        bias: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        encoded: jax.Array | None = None,
        encoded_kv: tuple[jax.Array, jax.Array] | None = None,
        cross_mask: MaskSpec | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x: [B, T, D] -> ([B, T, D], updated self-attention cache).

        ``mask`` and ``bias`` describe the self-attention (see ``MultiHeadAttention``);
        ``encoded`` [B, S, D] or its projected ``encoded_kv`` and ``cross_mask`` the
        cross-attention.
        """
        x, cache = self._sublayer(
            x,
            self.self_attn_norm,
            lambda h: self.self_attn(
                h,
                mask=mask,
                bias=bias,
                cache=cache,
                cache_index=cache_index,
                deterministic=deterministic,
                rngs=rngs,
            ),
            deterministic,
            rngs,
        )
        cross_attn = self.cross_attn
        if cross_attn is not None:
            if encoded is None and encoded_kv is None:
                raise ValueError("a cross-attention block needs the encoder output")
            x, _ = self._sublayer(
                x,
                self.cross_attn_norm,
                lambda h: cross_attn(
                    h,
                    kv=encoded,
                    kv_projected=encoded_kv,
                    mask=cross_mask,
                    deterministic=deterministic,
                    rngs=rngs,
                ),
                deterministic,
                rngs,
            )
        x, _ = self._sublayer(
            x,
            self.mlp_norm,
            lambda h: (self.mlp(h, deterministic=deterministic, rngs=rngs), None),
            deterministic,
            rngs,
        )
        return x, cache
