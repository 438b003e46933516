"""Encoder-decoder Transformers: the paper's translation model (Vaswani et al. 2017) and T5.

Pure functional API::

    cfg = encoder_decoder.Config.transformer_base()
    graphdef, params = encoder_decoder.init(cfg, jax.random.key(0))
    logits = encoder_decoder.apply(graphdef, params, src_tokens, tgt_tokens)   # -> [B, T, V]

    encoded = encoder_decoder.encode(graphdef, params, src_tokens, src_segment_ids)  # [B, S, D]
    cache = encoder_decoder.init_cache(cfg, batch, max_len)
    logits, cache = encoder_decoder.decode_cached(graphdef, params, encoded, src_segment_ids,
                                                  tgt_step, tgt_positions, cache)

Segment ids follow the data contract: 0 is padding, equal non-zero ids in source and target
are one packed example (target segment i attends only to source segment i).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from attnzoo.models import core, masks
from attnzoo.models._stack import make_stack, run_stack
from attnzoo.models.blocks import Block, make_norm
from attnzoo.models.core import Cache, init, init_cache, output_head, param_count, relayout
from attnzoo.models.layers import LinearHead, param
from attnzoo.models.mha import KVCache
from attnzoo.models.positional import PositionConfig

# fmt: off
__all__ = [
    "Cache", "Config", "EncoderDecoder", "apply", "decode", "decode_cached", "encode",
    "fill_cross_cache", "init", "init_cache", "output_head", "param_count", "relayout",
]
# fmt: on


@dataclasses.dataclass(frozen=True)
class Config(core.ModelConfig):
    """Encoder-decoder hyperparameters: ``core.ModelConfig`` fields (with the paper's
    defaults: post-LN, ReLU, dropout 0.1, scaled embeddings) plus:

    Attributes:
      n_encoder_layers, n_decoder_layers: depth of each stack.
      share_embeddings: one token table for source and target (a shared vocabulary).
      scale_tied_logits: multiply the decoder output by d_model**-0.5 before a tied head (T5).
      final_logits_bias: a learned (zero-initialised) per-token logits bias (Marian).
    """

    activation: str = "relu"
    norm_eps: float = 1e-6
    pre_norm: bool = False
    embed_scale: bool = True
    embed_init_std: float | None = None
    dropout: float = 0.1
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    share_embeddings: bool = True
    scale_tied_logits: bool = False
    final_logits_bias: bool = False

    STACKS: ClassVar[dict[str, str]] = {
        "encoder_blocks": "n_encoder_layers",
        "decoder_blocks": "n_decoder_layers",
    }
    CACHED_STACK: ClassVar[str] = "decoder_blocks"

    def build(self, rngs: nnx.Rngs) -> EncoderDecoder:
        return EncoderDecoder(self, rngs=rngs)

    @core.register_preset
    @classmethod
    def tiny(cls, vocab_size: int = 256) -> Config:
        """The paper's architecture at demo size (2+2 layers, d_model 128)."""
        return cls(
            vocab_size=vocab_size,
            d_model=128,
            n_encoder_layers=2,
            n_decoder_layers=2,
            n_heads=4,
            d_ff=512,
        )

    @core.register_preset
    @classmethod
    def transformer_base(cls, vocab_size: int = 37000) -> Config:
        """Table 3 "base": d 512, 6+6 layers, 8 heads, d_ff 2048, P_drop 0.1 (~63M params)."""
        return cls(vocab_size=vocab_size)

    @core.register_preset
    @classmethod
    def transformer_big(cls, vocab_size: int = 37000) -> Config:
        """Table 3 "big": d 1024, 16 heads, d_ff 4096, P_drop 0.3 (~213M params)."""
        return cls(vocab_size=vocab_size, d_model=1024, n_heads=16, d_ff=4096, dropout=0.3)

    @core.register_preset
    @classmethod
    def t5_small(cls, vocab_size: int = 32128) -> Config:
        """T5 v1.0 small (Raffel et al. 2020): pre-RMSNorm, no biases, relative position
        buckets, unscaled attention logits, tied head with d_model**-0.5 output scaling."""
        return cls(
            vocab_size=vocab_size,
            norm="rmsnorm",
            pre_norm=True,
            use_bias=False,
            attention_scale=1.0,
            embed_scale=False,
            embed_init_std=1.0,
            scale_tied_logits=True,
            position=PositionConfig(kind="t5", num_buckets=32, max_distance=128),
        )

    @core.register_preset
    @classmethod
    def t5_v1_1_small(cls, vocab_size: int = 32128) -> Config:
        """T5 v1.1 small: gated GELU (tanh), untied head, 8+8 layers, 6 heads of 64 dims."""
        return cls.t5_small(vocab_size).replace(
            n_encoder_layers=8,
            n_decoder_layers=8,
            n_heads=6,
            head_dim=64,
            d_ff=1024,
            activation="gelu_tanh",
            gated_mlp=True,
            tie_embeddings=False,
            scale_tied_logits=False,
        )


def _cross_spec(tgt_segment_ids: jax.Array | None, src_segment_ids: jax.Array | None):
    """Target segment i sees source segment i; source padding (id 0) is never seen."""
    if src_segment_ids is None:
        return masks.MaskSpec()
    return masks.MaskSpec(q_segment_ids=tgt_segment_ids, k_segment_ids=src_segment_ids)


class EncoderDecoder(nnx.Module):
    """A bidirectional encoder stack and a causal decoder stack with cross-attention.

    Methods apply dropout exactly when given ``rngs`` (the functional API passes them when
    ``deterministic=False``).
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = core.token_embedding(cfg, rngs)  # target table (source too when shared)
        self.src_embed = None if cfg.share_embeddings else core.token_embedding(cfg, rngs)
        self.encoder_position = core.position_encoding(cfg, causal=False, rngs=rngs)
        self.decoder_position = core.position_encoding(cfg, causal=True, rngs=rngs)
        stack = lambda n, **kw: make_stack(  # noqa: E731
            lambda r: Block(cfg, rngs=r, **kw), n, scan=cfg.scan_layers, rngs=rngs
        )
        self.encoder_blocks = stack(cfg.n_encoder_layers, causal=False)
        self.decoder_blocks = stack(cfg.n_decoder_layers, causal=True, cross_attention=True)
        # post-LN blocks end in a norm already; pre-LN stacks need one at the top
        self.encoder_norm = make_norm(cfg, rngs) if cfg.pre_norm else None
        self.decoder_norm = make_norm(cfg, rngs) if cfg.pre_norm else None
        self.head = core.untied_head(cfg, rngs)
        self.logits_bias = (
            param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), cfg.param_dtype)
            if cfg.final_logits_bias
            else None
        )
        self.dropout = nnx.Dropout(cfg.dropout)

    def encode(
        self,
        src_tokens: jax.Array,
        src_segment_ids: jax.Array | None = None,
        src_positions: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """src_tokens [B, S] int -> encoded [B, S, D]."""
        table = self.embed if self.src_embed is None else self.src_embed
        x, mask, bias, _ = core.stack_inputs(
            self.cfg, table, self.encoder_position, self.dropout, src_tokens, src_segment_ids,
            src_positions, None, rngs, name="src_tokens",
        )  # fmt: skip
        x, _ = run_stack(self.encoder_blocks, x, cfg=self.cfg, rngs=rngs, mask=mask, bias=bias)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def cross_kv(self, encoded: jax.Array) -> tuple[KVCache, ...] | KVCache:
        """Every decoder layer's cross-attention K/V of ``encoded`` [B, S, D], computed once."""
        if not self.cfg.scan_layers:
            return tuple(
                KVCache.from_keys_values(*b.cross_attn.project_kv(encoded))
                for b in self.decoder_blocks
            )
        graphdef, state = nnx.split(self.decoder_blocks)

        def project(layer_state):
            kv = nnx.merge(graphdef, layer_state).cross_attn.project_kv(encoded)
            return KVCache.from_keys_values(*kv)

        return jax.vmap(project)(state)  # leaves [L, B, K, S, H]

    def decode(
        self,
        encoded: jax.Array,
        src_segment_ids: jax.Array | None,
        tgt_tokens: jax.Array,
        tgt_segment_ids: jax.Array | None = None,
        tgt_positions: jax.Array | None = None,
        cache: Cache | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """encoded [B, S, D], tgt_tokens [B, T] -> (hidden [B, T, D], updated cache or None).

        ``output_head()`` maps the hidden states to logits.
        """
        cfg = self.cfg
        if encoded.ndim != 3 or encoded.shape[0] != tgt_tokens.shape[0]:
            raise ValueError(
                f"encoded must be [batch, src_len, d_model] with the targets' batch "
                f"{tgt_tokens.shape[0]}; got {encoded.shape}. Pass the output of encode()."
            )
        x, mask, bias, index = core.stack_inputs(
            cfg, self.embed, self.decoder_position, self.dropout, tgt_tokens, tgt_segment_ids,
            tgt_positions, cache, rngs, name="tgt_tokens",
        )  # fmt: skip
        cross = None
        if cache is not None:
            cross = cache.cross if cache.cross is not None else self.cross_kv(encoded)
        x, new_self_kv = run_stack(
            self.decoder_blocks,
            x,
            cfg=cfg,
            per_layer={
                "cache": None if cache is None else cache.layers,
                "encoded_kv": _as_pairs(cross, cfg.scan_layers),
            },
            rngs=rngs,
            mask=mask,
            bias=bias,
            cache_index=index,
            encoded=None if cross is not None else encoded,
            cross_mask=_cross_spec(tgt_segment_ids, src_segment_ids),
        )
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        if cache is None:
            return x, None
        new_cache = cache.advance(tgt_tokens.shape[1], mask.k_positions, new_self_kv)
        return x, new_cache.replace(cross=cross)

    def output_head(self) -> LinearHead:
        """The output projection: untied head or tied embedding table, plus the logits bias."""
        # T5 rescales the decoder output by d_model**-0.5 before its tied projection
        return core.linear_head(
            self.embed,
            self.head,
            bias=None if self.logits_bias is None else self.logits_bias[...],
            tied_scale=self.cfg.d_model**-0.5 if self.cfg.scale_tied_logits else 1.0,
        )


def _as_pairs(cross, scan: bool):
    """Cross K/V caches in the per-layer layout ``run_stack`` expects for ``encoded_kv``."""
    if cross is None:
        return None
    if scan:
        return cross.keys_values()  # scanned: each leaf [L, B, S, K, H]
    return tuple(c.keys_values() for c in cross)


# ---- pure functional API -------------------------------------------------------------------


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    src_tokens: jax.Array,
    tgt_tokens: jax.Array,
    src_segment_ids: jax.Array | None = None,
    tgt_segment_ids: jax.Array | None = None,
    *,
    src_positions: jax.Array | None = None,
    tgt_positions: jax.Array | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Teacher-forced forward pass: src [B, S], tgt [B, T] int -> logits [B, T, V].

    Args:
      src_tokens: [B, S] int source tokens.
      tgt_tokens: [B, T] int target inputs (shifted right).
      src_segment_ids: [B, S] packed-example ids (0 = padding).
      tgt_segment_ids: [B, T] packed-example ids, equal to their source's.
      src_positions: [B, S]; default 0..S-1, restarting per packed segment.
      tgt_positions: [B, T]; likewise.
      deterministic: ``False`` applies dropout, with ``dropout_rng``.
      dropout_rng: the dropout key.
      return_hidden: the decoder's final hidden states [B, T, D] instead, for losses that
        apply the head themselves (``losses.fused_cross_entropy`` with ``output_head``).
    """
    model, rngs = core.merge(graphdef, params, deterministic=deterministic, dropout_rng=dropout_rng)
    encoded = model.encode(src_tokens, src_segment_ids, src_positions, rngs)
    hidden, _ = model.decode(
        encoded, src_segment_ids, tgt_tokens, tgt_segment_ids, tgt_positions, None, rngs
    )
    return hidden if return_hidden else model.output_head()(hidden)


def encode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    src_tokens: jax.Array,
    src_segment_ids: jax.Array | None = None,
    *,
    src_positions: jax.Array | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """src_tokens [B, S] int -> encoded [B, S, D] (decoding reuses it every step)."""
    model, rngs = core.merge(graphdef, params, deterministic=deterministic, dropout_rng=dropout_rng)
    return model.encode(src_tokens, src_segment_ids, src_positions, rngs)


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    encoded: jax.Array,
    src_segment_ids: jax.Array | None,
    tgt_tokens: jax.Array,
    tgt_segment_ids: jax.Array | None = None,
    *,
    tgt_positions: jax.Array | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """encoded [B, S, D] (from ``encode``), tgt_tokens [B, T] int -> logits [B, T, V]."""
    model, rngs = core.merge(graphdef, params, deterministic=deterministic, dropout_rng=dropout_rng)
    hidden, _ = model.decode(
        encoded, src_segment_ids, tgt_tokens, tgt_segment_ids, tgt_positions, None, rngs
    )
    return model.output_head()(hidden)


def decode_cached(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    encoded: jax.Array,
    src_segment_ids: jax.Array | None,
    tgt_tokens: jax.Array,
    tgt_positions: jax.Array,
    cache: Cache,
) -> tuple[jax.Array, Cache]:
    """Decodes new target tokens against a KV cache (beam search, greedy translation).

    Args:
      encoded: [B, S, D] from ``encode``.
      src_segment_ids: [B, S] or None.
      tgt_tokens: [B, T] int new tokens.
      tgt_positions: [B, T] int their positions.
      cache: from ``init_cache`` or a previous call. The cross-attention K/V are projected
        from ``encoded`` on the first call (or up front by ``fill_cross_cache``).
    Returns:
      (logits [B, T, V], the updated cache).
    """
    model = nnx.merge(graphdef, params)
    hidden, new_cache = model.decode(
        encoded, src_segment_ids, tgt_tokens, None, tgt_positions, cache
    )
    assert new_cache is not None  # a cache in gives a cache out
    return model.output_head()(hidden), new_cache


def fill_cross_cache(
    graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, encoded: jax.Array
) -> Cache:
    """``cache`` with every layer's cross-attention K/V of ``encoded`` [B, S, D] filled in, so
    a decoding loop carries a fixed-shape cache from its first step."""
    return cache.replace(cross=nnx.merge(graphdef, params).cross_kv(encoded))
