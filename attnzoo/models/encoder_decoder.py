"""Encoder-decoder Transformers: the paper's translation model (Vaswani et al. 2017) and T5.

Pure functional API::

    cfg = encoder_decoder.Config.transformer_base()
    graphdef, params = encoder_decoder.init(cfg, jax.random.key(0))
    logits = encoder_decoder.apply(graphdef, params, src_tokens, tgt_tokens)   # -> [B, T, V]

    encoded = encoder_decoder.encode(graphdef, params, src_tokens, src_segment_ids)  # [B, S, D]
    cache = encoder_decoder.init_cache(cfg, batch, max_len)
    logits, cache = encoder_decoder.decode(graphdef, params, encoded, src_segment_ids,
                                           tgt_step, tgt_positions=pos, cache=cache)

Segment ids follow the data contract: 0 is padding, equal non-zero ids in source and target
are one packed example (target segment i attends only to source segment i).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnzoo.models import masks
from attnzoo.models.blocks import Block, validate_config
from attnzoo.models.decoder_lm import final_norm, positions_from_segments
from attnzoo.models.layers import Dense, Embed, LinearHead, normal, param
from attnzoo.models.mha import EMPTY_POSITION, KVCache, grow_slots, write_positions
from attnzoo.models.positional import PositionConfig, make_encoding
from attnzoo.models.stack import make_stack, relayout_layers, run_stack, take_layers


@dataclasses.dataclass(frozen=True)
class Config:
    """Encoder-decoder hyperparameters (field names shared with ``decoder_lm.Config``).

    Attributes beyond the decoder-only ones:
      n_encoder_layers, n_decoder_layers: depth of each stack.
      share_embeddings: one token table for source and target (a shared vocabulary).
      tie_embeddings: the pre-softmax projection is the (target) embedding table transposed.
      scale_tied_logits: multiply the decoder output by d_model**-0.5 before a tied head (T5).
      final_logits_bias: a learned (zero-initialised) per-token logits bias (Marian).
      embed_init_std: token embedding init stddev; ``None`` = d_model**-0.5 (the embeddings are
        then multiplied by sqrt(d_model), section 3.4, so they start at unit scale).
    """

    vocab_size: int = 32000
    d_model: int = 512
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 2048
    activation: str = "relu"
    gated_mlp: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    norm_bias: bool = True
    pre_norm: bool = False
    use_bias: bool = True
    qk_norm: bool = False
    share_embeddings: bool = True
    tie_embeddings: bool = True
    scale_tied_logits: bool = False
    final_logits_bias: bool = False
    embed_scale: bool = True
    embed_init_std: float | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    sliding_window: int | None = None
    attention_scale: float | None = None
    attention_impl: str | None = None
    position: PositionConfig = PositionConfig(kind="sinusoidal")
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "dots_with_no_batch_dims_saveable"
    scan_layers: bool = False

    def __post_init__(self):
        validate_config(self)
        if self.n_encoder_layers < 1 or self.n_decoder_layers < 1:
            raise ValueError(
                "n_encoder_layers and n_decoder_layers must be >= 1, got "
                f"{self.n_encoder_layers} and {self.n_decoder_layers}"
            )

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 256) -> Config:
        """The paper's architecture at CPU-demo size (2+2 layers, d_model 128)."""
        return cls(
            vocab_size=vocab_size,
            d_model=128,
            n_encoder_layers=2,
            n_decoder_layers=2,
            n_heads=4,
            d_ff=512,
        )

    @classmethod
    def transformer_base(cls, vocab_size: int = 37000) -> Config:
        """Table 3 "base": d 512, 6+6 layers, 8 heads, d_ff 2048, P_drop 0.1 (~63M params)."""
        return cls(vocab_size=vocab_size)

    @classmethod
    def transformer_big(cls, vocab_size: int = 37000) -> Config:
        """Table 3 "big": d 1024, 16 heads, d_ff 4096, P_drop 0.3 (~213M params)."""
        return cls(vocab_size=vocab_size, d_model=1024, n_heads=16, d_ff=4096, dropout=0.3)

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

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Config:
        """A preset by name (``"transformer_base"``, ``"t5_small"``, ...) with ``overrides``."""
        names = presets()
        if name not in names:
            raise ValueError(f"unknown encoder_decoder preset {name!r}; valid: {', '.join(names)}")
        return getattr(cls, name)().replace(**overrides)


def presets() -> tuple[str, ...]:
    return ("tiny", "transformer_base", "transformer_big", "t5_small", "t5_v1_1_small")


@struct.dataclass
class Cache:
    """Incremental decoding state.

    ``layers`` holds each decoder layer's self-attention K/V (a tuple, or one ``KVCache`` with a
    leading layer axis when ``scan_layers``). ``cross`` holds each layer's cross-attention K/V
    projected once from the encoder output (same layout; ``None`` until the first ``decode``
    call, or fill it up front with ``fill_cross_cache`` so a decoding loop has a fixed carry).
    """

    index: jax.Array  # [B] int32, next write slot
    positions: jax.Array  # [B, T_max] int32, EMPTY_POSITION where nothing was written
    layers: tuple[KVCache, ...] | KVCache
    cross: tuple[KVCache, ...] | KVCache | None = None

    def take(self, rows: jax.Array) -> Cache:
        """The cache of batch rows ``rows`` [B'] int (beam search: reorder / expand beams)."""
        return Cache(
            index=self.index[rows],
            positions=self.positions[rows],
            layers=take_layers(self.layers, rows),
            cross=take_layers(self.cross, rows),
        )

    def grow(self, max_len: int) -> Cache:
        """The same cache with ``max_len`` >= T_max self-attention slots, the new ones empty
        (the cross-attention K/V keep the source length). Beam search grows it between the
        stages of its loop (``attnzoo.decoding.stages``)."""
        positions, layers = grow_slots(self.positions, self.layers, max_len)
        return self.replace(positions=positions, layers=layers)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty decoder cache for ``batch`` rows of up to ``max_len`` target tokens."""
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv = KVCache.zeros(
        batch, max_len, cfg.n_kv_heads or cfg.n_heads, head_dim, jnp.dtype(dtype or cfg.dtype)
    )
    L = cfg.n_decoder_layers
    layers = (
        jax.tree.map(lambda a: jnp.broadcast_to(a, (L, *a.shape)), kv)
        if cfg.scan_layers
        else (kv,) * L
    )
    return Cache(
        index=jnp.zeros((batch,), jnp.int32),
        positions=jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
        layers=layers,
    )


def _default_positions(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    if segment_ids is not None:
        return positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _cross_mask(tgt_segment_ids: jax.Array | None, src_segment_ids: jax.Array | None):
    """[B, 1, T or 1, S] bool: target segment i sees source segment i; padding is never seen."""
    if src_segment_ids is None:
        return None
    if tgt_segment_ids is None:
        return masks.padding(None, src_segment_ids != 0)
    return masks.segment(tgt_segment_ids, src_segment_ids)


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        std = cfg.d_model**-0.5 if cfg.embed_init_std is None else cfg.embed_init_std
        embed = lambda: Embed(  # noqa: E731
            cfg.vocab_size, cfg.d_model, init=normal(std), param_dtype=pdtype, rngs=rngs
        )
        self.embed = embed()  # the target table (and the source table when shared)
        self.src_embed = None if cfg.share_embeddings else embed()
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        position = lambda causal: make_encoding(  # noqa: E731
            cfg.position,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            head_dim=head_dim,
            causal=causal,
            rngs=rngs,
        )
        self.encoder_position = position(False)
        self.decoder_position = position(True)
        self.encoder_blocks = make_stack(
            lambda r: Block(cfg, causal=False, rngs=r),
            cfg.n_encoder_layers,
            scan=cfg.scan_layers,
            rngs=rngs,
        )
        self.decoder_blocks = make_stack(
            lambda r: Block(cfg, causal=True, cross_attention=True, rngs=r),
            cfg.n_decoder_layers,
            scan=cfg.scan_layers,
            rngs=rngs,
        )
        # post-LN blocks end in a norm already; pre-LN stacks need one at the top
        self.encoder_norm = final_norm(cfg, rngs) if cfg.pre_norm else None
        self.decoder_norm = final_norm(cfg, rngs) if cfg.pre_norm else None
        self.head = (
            None
            if cfg.tie_embeddings
            else Dense(
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                "btd,dv->btv",
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=pdtype,
                rngs=rngs,
            )
        )
        self.logits_bias = (
            param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), pdtype)
            if cfg.final_logits_bias
            else None
        )
        self.dropout = nnx.Dropout(cfg.dropout)

    def _embed(self, table: Embed, tokens, positions, position_encoding, deterministic, rngs):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        x = table(tokens, dtype)  # (B, T, D)
        if cfg.embed_scale:  # section 3.4: embeddings multiplied by sqrt(d_model)
            x = x * jnp.sqrt(jnp.asarray(cfg.d_model, dtype))
        x = position_encoding.embed(x, positions)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)

    def encode(
        self,
        src_tokens: jax.Array,
        src_segment_ids: jax.Array | None = None,
        *,
        src_positions: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """src_tokens [B, S] int -> encoded [B, S, D]."""
        cfg = self.cfg
        _check_tokens("src_tokens", src_tokens, src_segment_ids, src_positions)
        if src_positions is None:
            src_positions = _default_positions(src_tokens, src_segment_ids)
        table = self.embed if self.src_embed is None else self.src_embed
        x = self._embed(
            table, src_tokens, src_positions, self.encoder_position, deterministic, rngs
        )
        mask = None if src_segment_ids is None else masks.segment(src_segment_ids, src_segment_ids)
        bias = self.encoder_position.attention_bias(src_positions, src_positions)
        x, _ = run_stack(
            self.encoder_blocks,
            x,
            n_layers=cfg.n_encoder_layers,
            scan=cfg.scan_layers,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            deterministic=deterministic,
            rngs=rngs,
            positions=src_positions,
            mask=mask,
            bias=bias,
        )
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
        *,
        tgt_positions: jax.Array | None = None,
        cache: Cache | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """encoded [B, S, D], tgt_tokens [B, T] -> logits [B, T, V] (and the updated cache).

        ``return_hidden``: the decoder's final hidden states [B, T, D] instead of logits.
        """
        cfg = self.cfg
        _check_tokens("tgt_tokens", tgt_tokens, tgt_segment_ids, tgt_positions)
        if encoded.ndim != 3 or encoded.shape[0] != tgt_tokens.shape[0]:
            raise ValueError(
                f"encoded must be [batch, src_len, d_model] with the targets' batch "
                f"{tgt_tokens.shape[0]}; got {encoded.shape}. Pass the output of encode()."
            )
        if tgt_positions is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs explicit tgt_positions [B, T]")
            tgt_positions = _default_positions(tgt_tokens, tgt_segment_ids)
        x = self._embed(
            self.embed, tgt_tokens, tgt_positions, self.decoder_position, deterministic, rngs
        )
        mask = None if tgt_segment_ids is None else masks.segment(tgt_segment_ids, tgt_segment_ids)
        k_positions, index, self_kv, cross = tgt_positions, None, None, None
        if cache is not None:
            index, self_kv = cache.index, cache.layers
            k_positions = write_positions(cache.positions, tgt_positions, index)  # (B, T_max)
            cross = cache.cross if cache.cross is not None else self.cross_kv(encoded)
        bias = self.decoder_position.attention_bias(tgt_positions, k_positions)
        x, new_self_kv = run_stack(
            self.decoder_blocks,
            x,
            n_layers=cfg.n_decoder_layers,
            scan=cfg.scan_layers,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            per_layer={"cache": self_kv, "encoded_kv": _as_pairs(cross, cfg.scan_layers)},
            deterministic=deterministic,
            rngs=rngs,
            positions=tgt_positions,
            mask=mask,
            bias=bias,
            k_positions=k_positions,
            cache_index=index,
            encoded=None if cross is not None else encoded,
            cross_mask=_cross_mask(tgt_segment_ids, src_segment_ids),
        )
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        logits = x if return_hidden else self.output_head()(x)  # (B, T, V)
        if cache is None:
            return logits
        new_cache = Cache(
            index=index + tgt_tokens.shape[1],
            positions=k_positions,
            layers=new_self_kv,
            cross=cross,
        )
        return logits, new_cache

    def output_head(self) -> LinearHead:
        """The output projection: untied head or tied embedding table, plus the logits bias."""
        bias = None if self.logits_bias is None else self.logits_bias[...]
        if self.head is not None:
            return LinearHead(kernel=self.head.kernel[...], bias=bias, dtype=self.head.dtype)
        # T5 rescales the decoder output by d_model**-0.5 before its tied projection
        scale = self.cfg.d_model**-0.5 if self.cfg.scale_tied_logits else 1.0
        return LinearHead(kernel=self.embed.embedding[...], bias=bias, scale=scale, tied=True)

    def __call__(
        self,
        src_tokens: jax.Array,
        tgt_tokens: jax.Array,
        src_segment_ids: jax.Array | None = None,
        tgt_segment_ids: jax.Array | None = None,
        *,
        src_positions: jax.Array | None = None,
        tgt_positions: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        encoded = self.encode(
            src_tokens,
            src_segment_ids,
            src_positions=src_positions,
            deterministic=deterministic,
            rngs=rngs,
        )
        return self.decode(
            encoded,
            src_segment_ids,
            tgt_tokens,
            tgt_segment_ids,
            tgt_positions=tgt_positions,
            deterministic=deterministic,
            rngs=rngs,
            return_hidden=return_hidden,
        )


def _as_pairs(cross, scan: bool):
    """Cross K/V caches in the per-layer layout ``run_stack`` expects for ``encoded_kv``."""
    if cross is None:
        return None
    if scan:
        return cross.keys_values()  # scanned: each leaf [L, B, S, K, H]
    return tuple(c.keys_values() for c in cross)


def _check_tokens(name, tokens, segment_ids, positions):
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, length] int, got shape {tokens.shape}")
    for what, a in (("segment_ids", segment_ids), ("positions", positions)):
        if a is not None and a.shape != tokens.shape:
            raise ValueError(f"{name} {tokens.shape} and its {what} {a.shape} must match")


# ---- pure functional API -------------------------------------------------------------------


def init(cfg: Config, rng: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the model and splits it into a static graph definition and a params pytree."""
    return nnx.split(EncoderDecoder(cfg, rngs=nnx.Rngs(params=rng)))


def _merge(graphdef, params, deterministic, dropout_rng):
    if not deterministic and dropout_rng is None:
        raise ValueError("deterministic=False needs dropout_rng")
    rngs = nnx.Rngs(dropout=dropout_rng) if dropout_rng is not None else None
    return nnx.merge(graphdef, params), rngs


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

    ``return_hidden=True``: the decoder's final hidden states [B, T, D] instead, for losses that
    apply the head themselves (``losses.fused_cross_entropy`` with ``output_head``).
    """
    model, rngs = _merge(graphdef, params, deterministic, dropout_rng)
    return model(
        src_tokens,
        tgt_tokens,
        src_segment_ids,
        tgt_segment_ids,
        src_positions=src_positions,
        tgt_positions=tgt_positions,
        deterministic=deterministic,
        rngs=rngs,
        return_hidden=return_hidden,
    )


def output_head(graphdef: nnx.GraphDef, params: nnx.State) -> LinearHead:
    """The output projection as arrays (see ``decoder_lm.output_head``)."""
    return nnx.merge(graphdef, params).output_head()


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
    """src_tokens [B, S] -> encoded [B, S, D]."""
    model, rngs = _merge(graphdef, params, deterministic, dropout_rng)
    return model.encode(
        src_tokens,
        src_segment_ids,
        src_positions=src_positions,
        deterministic=deterministic,
        rngs=rngs,
    )


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    encoded: jax.Array,
    src_segment_ids: jax.Array | None,
    tgt_tokens: jax.Array,
    tgt_segment_ids: jax.Array | None = None,
    *,
    tgt_positions: jax.Array | None = None,
    cache: Cache | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, Cache]:
    """encoded [B, S, D], tgt_tokens [B, T] -> logits [B, T, V], or (logits, cache) with a cache.

    With a cache, ``tgt_positions`` [B, T] are required and the new tokens are written at
    ``cache.index``; the cross-attention K/V are projected from ``encoded`` on the first call
    (or by ``fill_cross_cache``) and reused afterwards.
    """
    model, rngs = _merge(graphdef, params, deterministic, dropout_rng)
    return model.decode(
        encoded,
        src_segment_ids,
        tgt_tokens,
        tgt_segment_ids,
        tgt_positions=tgt_positions,
        cache=cache,
        deterministic=deterministic,
        rngs=rngs,
    )


def fill_cross_cache(
    graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, encoded: jax.Array
) -> Cache:
    """``cache`` with every layer's cross-attention K/V of ``encoded`` [B, S, D] filled in."""
    return cache.replace(cross=nnx.merge(graphdef, params).cross_kv(encoded))


def param_count(cfg: Config) -> int:
    """Number of parameters, computed with ``jax.eval_shape`` (no memory is allocated)."""
    _, shapes = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def relayout(
    cfg: Config, params: nnx.State, *, scan_layers: bool
) -> tuple[Config, nnx.GraphDef, nnx.State]:
    """The same weights as a scanned (stacked) or unrolled model: -> (cfg, graphdef, params)."""
    stacks = {"encoder_blocks": cfg.n_encoder_layers, "decoder_blocks": cfg.n_decoder_layers}
    return relayout_layers(
        lambda c: init(c, jax.random.key(0)), cfg, params, scan_layers=scan_layers, stacks=stacks
    )
