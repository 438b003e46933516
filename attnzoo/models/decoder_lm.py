"""Decoder-only language models: one configurable family (GPT-2, LLaMA, the paper's block).

Pure functional API::

    cfg = decoder_lm.Config.gpt2_small()
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    logits = decoder_lm.apply(graphdef, params, tokens)          # [B, T] int32 -> [B, T, V]

    cache = decoder_lm.init_cache(cfg, batch, max_len)
    logits, cache = decoder_lm.apply_cached(graphdef, params, tokens, positions, cache)

``params`` is an ``nnx.State`` pytree: it jits, grads, vmaps and shards like any pytree, and each
leaf carries logical axis names (``nnx.get_partition_spec(params)``).

``scan_layers=True`` stores the blocks' params with a leading ``"layers"`` axis and runs them with
``jax.lax.scan`` (compile time independent of depth); ``relayout`` converts weights between the
two layouts. ``remat_policy`` (``"full"``, ``"dots_saveable"``, ... ``attnzoo.models.remat``)
wraps each block in ``jax.checkpoint``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from attnzoo.models import core
from attnzoo.models._stack import make_stack, run_stack
from attnzoo.models.blocks import Block, make_norm
from attnzoo.models.core import Cache, init, init_cache, output_head, param_count, relayout
from attnzoo.models.layers import LinearHead
from attnzoo.models.positional import PositionConfig

# fmt: off
__all__ = [
    "Cache", "Config", "DecoderLM", "apply", "apply_cached", "init", "init_cache",
    "output_head", "param_count", "relayout",
]
# fmt: on


@dataclasses.dataclass(frozen=True)
class Config(core.ModelConfig):
    """Decoder-only LM hyperparameters (``core.ModelConfig`` fields plus ``n_layers``).

    Presets are classmethods (``Config.gpt2_small()``, ``Config.preset("llama")``); vary with
    ``replace``.
    """

    n_layers: int = 6

    STACKS: ClassVar[dict[str, str]] = {"blocks": "n_layers"}
    CACHED_STACK: ClassVar[str] = "blocks"

    def build(self, rngs: nnx.Rngs) -> DecoderLM:
        return DecoderLM(self, rngs=rngs)

    @core.register_preset
    @classmethod
    def tiny(cls, vocab_size: int = 256) -> Config:
        """A few-hundred-k-parameter model for demos and tests."""
        return cls(
            vocab_size=vocab_size,
            d_model=128,
            n_layers=2,
            n_heads=4,
            d_ff=512,
            position=PositionConfig(kind="sinusoidal"),
        )

    @core.register_preset
    @classmethod
    def vaswani_lm(cls, vocab_size: int = 32000) -> Config:
        """The paper's base block as a decoder-only LM: post-LN, ReLU, sinusoidal, sqrt(d) scale."""
        return cls(
            vocab_size=vocab_size,
            d_model=512,
            n_layers=6,
            n_heads=8,
            d_ff=2048,
            activation="relu",
            pre_norm=False,
            embed_scale=True,
            dropout=0.1,
            norm_eps=1e-6,
            position=PositionConfig(kind="sinusoidal"),
        )

    @classmethod
    def _gpt2(cls, d_model: int, n_layers: int, n_heads: int) -> Config:
        # GPT-2 (Radford et al. 2019): pre-LN with a final LayerNorm, gelu_new (tanh), biases
        # everywhere, learned positions, head tied to the token embedding.
        return cls(
            vocab_size=50257,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            d_ff=4 * d_model,
            activation="gelu_tanh",
            norm_eps=1e-5,
            position=PositionConfig(kind="learned", max_len=1024),
        )

    @core.register_preset
    @classmethod
    def gpt2_small(cls) -> Config:
        """GPT-2 small, 124,439,808 parameters (as Hugging Face ``gpt2``)."""
        return cls._gpt2(768, 12, 12)

    @core.register_preset
    @classmethod
    def gpt2(cls) -> Config:
        """Alias of ``gpt2_small``."""
        return cls.gpt2_small()

    @core.register_preset
    @classmethod
    def gpt2_medium(cls) -> Config:
        """GPT-2 medium: d_model 1024, 24 layers, 16 heads."""
        return cls._gpt2(1024, 24, 16)

    @core.register_preset
    @classmethod
    def gpt2_large(cls) -> Config:
        """GPT-2 large: d_model 1280, 36 layers, 20 heads."""
        return cls._gpt2(1280, 36, 20)

    @core.register_preset
    @classmethod
    def gpt2_xl(cls) -> Config:
        """GPT-2 xl: d_model 1600, 48 layers, 25 heads."""
        return cls._gpt2(1600, 48, 25)

    @core.register_preset
    @classmethod
    def llama(cls, vocab_size: int = 32000) -> Config:
        """LLaMA 7B (6,738,415,616 parameters): RoPE, RMSNorm, SwiGLU, no biases, untied head."""
        return cls(
            vocab_size=vocab_size,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            d_ff=11008,
            activation="silu",
            gated_mlp=True,
            norm="rmsnorm",
            norm_eps=1e-6,
            use_bias=False,
            tie_embeddings=False,
            position=PositionConfig(kind="rope", rope_base=10000.0, max_len=2048),
        )

    @core.register_preset
    @classmethod
    def llama_small(cls, vocab_size: int = 32000) -> Config:
        """A ~110M LLaMA-style model with grouped-query attention (12 query, 4 key/value heads)."""
        return cls.llama(vocab_size).replace(
            d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048
        )


class DecoderLM(nnx.Module):
    """Token embedding, positional encoding, a causal block stack and the output head."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = core.token_embedding(cfg, rngs)
        self.position = core.position_encoding(cfg, causal=True, rngs=rngs)
        self.blocks = make_stack(
            lambda r: Block(cfg, causal=True, rngs=r), cfg.n_layers, scan=cfg.scan_layers, rngs=rngs
        )
        # post-LN blocks end in a norm already; pre-LN stacks need one before the head
        self.final_norm = make_norm(cfg, rngs) if cfg.pre_norm else None
        self.head = core.untied_head(cfg, rngs)
        self.embed_dropout = nnx.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """tokens [B, T] int -> (hidden [B, T, D], the updated cache or None).

        ``positions`` default to 0..T-1 per row, per segment when ``segment_ids`` is given (id 0
        marks padding). With a ``cache``, ``positions`` are required and the new tokens are
        written at ``cache.index``. ``output_head()`` maps the hidden states to logits;
        dropout applies exactly when ``rngs`` are given.
        """
        cfg = self.cfg
        x, mask, bias, index = core.stack_inputs(
            cfg, self.embed, self.position, self.embed_dropout, tokens, segment_ids, positions,
            cache, rngs,
        )  # fmt: skip
        x, layer_caches = run_stack(
            self.blocks,
            x,
            cfg=cfg,
            per_layer={"cache": None if cache is None else cache.layers},
            rngs=rngs,
            mask=mask,
            bias=bias,
            cache_index=index,
        )
        if self.final_norm is not None:
            x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, cache.advance(tokens.shape[1], mask.k_positions, layer_caches)

    def output_head(self) -> LinearHead:
        """The output projection (the untied head, or the embedding table when tied)."""
        return core.linear_head(self.embed, self.head)


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Pure forward pass: tokens [B, T] int -> logits [B, T, V].

    Args:
      positions: [B, T] int; default 0..T-1, restarting per packed segment.
      segment_ids: [B, T] int packed-example ids (0 = padding); tokens attend only within
        their own segment.
      deterministic: ``False`` applies dropout, with ``dropout_rng``.
      dropout_rng: the dropout key.
      return_hidden: the final hidden states [B, T, D] instead of logits, for losses that
        apply the head themselves (``losses.fused_cross_entropy`` with ``output_head``).
    """
    model, rngs = core.merge(graphdef, params, deterministic=deterministic, dropout_rng=dropout_rng)
    hidden, _ = model(tokens, positions, segment_ids, rngs=rngs)
    return hidden if return_hidden else model.output_head()(hidden)


def apply_cached(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Cache,
    *,
    return_hidden: bool = False,
) -> tuple[jax.Array, Cache]:
    """Runs new tokens against a KV cache: a prompt (prefill) or one token per row (a step).

    Args:
      tokens: [B, T] int new tokens.
      positions: [B, T] int their positions (e.g. prompt length so far + 0..T-1).
      cache: from ``init_cache`` or a previous call; the tokens are written at ``cache.index``.
      return_hidden: hidden states [B, T, D] instead of logits.
    Returns:
      (logits [B, T, V], the updated cache).
    """
    model = nnx.merge(graphdef, params)
    hidden, new_cache = model(tokens, positions, cache=cache)
    assert new_cache is not None  # a cache in gives a cache out
    return (hidden if return_hidden else model.output_head()(hidden)), new_cache
