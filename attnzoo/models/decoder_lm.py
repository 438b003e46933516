"""Decoder-only language models: one configurable family (GPT-2, LLaMA, the paper's block).

Pure functional API::

    cfg = decoder_lm.Config.gpt2_small()
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    logits = decoder_lm.apply(graphdef, params, tokens)          # [B, T] int32 -> [B, T, V]

``params`` is an ``nnx.State`` pytree: it jits, grads, vmaps and shards like any pytree, and each
leaf carries logical axis names (``nnx.get_partition_spec(params)``).

``scan_layers=True`` stores the blocks' params with a leading ``"layers"`` axis and runs them with
``jax.lax.scan`` (compile time independent of depth); ``relayout`` converts weights between the
two layouts. ``remat=True`` wraps each block in ``jax.checkpoint`` with ``remat_policy``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnzoo.models import masks
from attnzoo.models.blocks import Block, validate_config
from attnzoo.models.layers import Dense, Embed, LinearHead, Norm, normal
from attnzoo.models.mha import EMPTY_POSITION, KVCache, grow_slots, write_positions
from attnzoo.models.positional import PositionConfig, make_encoding
from attnzoo.models.stack import make_stack, relayout_layers, run_stack, take_layers


@dataclasses.dataclass(frozen=True)
class Config:
    """Decoder-only LM hyperparameters. Presets are classmethods; vary with ``replace``.

    Invalid combinations (d_model not divisible by n_heads, unknown activation or positional
    kind, ...) raise ``ValueError`` at construction, naming the field and the fix.
    """

    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 2048
    activation: str = "gelu"
    gated_mlp: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    pre_norm: bool = True
    use_bias: bool = True
    qk_norm: bool = False
    tie_embeddings: bool = True
    embed_scale: bool = False
    embed_init_std: float = 0.02
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    sliding_window: int | None = None
    attention_scale: float | None = None
    attention_impl: str | None = None
    position: PositionConfig = PositionConfig()
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "dots_with_no_batch_dims_saveable"
    scan_layers: bool = False

    def __post_init__(self):
        validate_config(self)
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 256) -> Config:
        """A few-hundred-k-parameter model for CPU demos and tests."""
        return cls(
            vocab_size=vocab_size,
            d_model=128,
            n_layers=2,
            n_heads=4,
            d_ff=512,
            position=PositionConfig(kind="sinusoidal"),
        )

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

    @classmethod
    def gpt2_small(cls) -> Config:
        """GPT-2 small, 124,439,808 parameters (as Hugging Face ``gpt2``)."""
        return cls._gpt2(768, 12, 12)

    @classmethod
    def gpt2(cls) -> Config:
        """Alias of ``gpt2_small``."""
        return cls.gpt2_small()

    @classmethod
    def gpt2_medium(cls) -> Config:
        return cls._gpt2(1024, 24, 16)

    @classmethod
    def gpt2_large(cls) -> Config:
        return cls._gpt2(1280, 36, 20)

    @classmethod
    def gpt2_xl(cls) -> Config:
        return cls._gpt2(1600, 48, 25)

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

    @classmethod
    def llama_small(cls, vocab_size: int = 32000) -> Config:
        """A ~110M LLaMA-style model with grouped-query attention (12 query, 4 key/value heads)."""
        return cls.llama(vocab_size).replace(
            d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Config:
        """A preset by name (``"gpt2_small"``, ``"llama"``, ...), then ``overrides`` applied."""
        names = presets()
        if name not in names:
            raise ValueError(f"unknown decoder_lm preset {name!r}; valid: {', '.join(names)}")
        return getattr(cls, name)().replace(**overrides)


def presets() -> tuple[str, ...]:
    return (
        "tiny",
        "vaswani_lm",
        "gpt2",
        "gpt2_small",
        "gpt2_medium",
        "gpt2_large",
        "gpt2_xl",
        "llama",
        "llama_small",
    )


@struct.dataclass
class Cache:
    """Decoding state: per-row next write slot, slot positions, and every layer's K/V.

    ``layers`` is a tuple of ``KVCache`` (one per layer) for unrolled models and a single
    ``KVCache`` with a leading layer axis ([L, B, K, S_max, H]) for ``scan_layers=True``.
    """

    index: jax.Array  # [B] int32
    positions: jax.Array  # [B, S_max] int32, EMPTY_POSITION where nothing was written
    layers: tuple[KVCache, ...] | KVCache

    def take(self, rows: jax.Array) -> Cache:
        """The cache of batch rows ``rows`` [B'] int (beam search: reorder / expand beams)."""
        return Cache(
            index=self.index[rows],
            positions=self.positions[rows],
            layers=take_layers(self.layers, rows),
        )

    def grow(self, max_len: int) -> Cache:
        """The same cache with ``max_len`` >= S_max slots; the new slots are empty.

        Generation runs its token loop in stages over a growing cache, so each step reads only
        the slots that can hold a token by the end of its stage (``attnzoo.decoding.stages``).
        """
        positions, layers = grow_slots(self.positions, self.layers, max_len)
        return self.replace(positions=positions, layers=layers)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens."""
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    dtype = jnp.dtype(dtype or cfg.dtype)
    kv = KVCache.zeros(batch, max_len, cfg.n_kv_heads or cfg.n_heads, head_dim, dtype)
    if cfg.scan_layers:
        layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.n_layers, *a.shape)), kv)
    else:
        layers = (kv,) * cfg.n_layers
    return Cache(
        index=jnp.zeros((batch,), jnp.int32),
        positions=jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
        layers=layers,
    )


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Per-segment positions 0, 1, 2, ... restarting at each new segment. [B, T] -> [B, T]."""
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def final_norm(cfg: Any, rngs: nnx.Rngs) -> Norm:
    return Norm(
        cfg.d_model,
        kind=cfg.norm,
        eps=cfg.norm_eps,
        use_bias=None if cfg.norm == "rmsnorm" else cfg.norm_bias,
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


class DecoderLM(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            init=normal(cfg.embed_init_std),
            param_dtype=pdtype,
            rngs=rngs,
        )
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.position = make_encoding(
            cfg.position,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            head_dim=head_dim,
            causal=True,
            rngs=rngs,
        )
        self.blocks = make_stack(
            lambda r: Block(cfg, causal=True, rngs=r), cfg.n_layers, scan=cfg.scan_layers, rngs=rngs
        )
        # post-LN blocks end in a norm already; pre-LN stacks need one before the head
        self.final_norm = final_norm(cfg, rngs) if cfg.pre_norm else None
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
        self.embed_dropout = nnx.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """tokens [B, T] int -> logits [B, T, V] (and the updated cache if one is given).

        ``positions`` default to 0..T-1 per row, per segment when ``segment_ids`` is given (id 0
        marks padding). With a ``cache``, ``positions`` are required (e.g. prompt lengths so
        far) and the new tokens are written at ``cache.index``. ``return_hidden`` gives the
        final hidden states [B, T, D] instead of logits (``output_head()`` maps them to logits).
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length] int, got shape {tokens.shape}")
        if positions is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs explicit positions [B, T]")
            positions = (
                positions_from_segments(segment_ids)
                if segment_ids is not None
                else jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            )
        dtype = jnp.dtype(cfg.dtype)
        x = self.embed(tokens, dtype)  # (B, T, D)
        if cfg.embed_scale:  # the paper, section 3.4
            x = x * jnp.sqrt(jnp.asarray(cfg.d_model, dtype))
        x = self.position.embed(x, positions)
        x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)

        mask = masks.segment(segment_ids, segment_ids) if segment_ids is not None else None
        k_positions, index = positions, None
        if cache is not None:
            index = cache.index
            k_positions = write_positions(cache.positions, positions, index)  # (B, S_max)
        bias = self.position.attention_bias(positions, k_positions)  # None or (B|1, N, T, S)

        x, layer_caches = run_stack(
            self.blocks,
            x,
            n_layers=cfg.n_layers,
            scan=cfg.scan_layers,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            per_layer={"cache": cache.layers if cache is not None else None},
            deterministic=deterministic,
            rngs=rngs,
            positions=positions,
            mask=mask,
            bias=bias,
            k_positions=k_positions,
            cache_index=index,
        )
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = x if return_hidden else self.output_head()(x)  # (B, T, V)
        if cache is None:
            return logits
        return logits, Cache(
            index=index + tokens.shape[1], positions=k_positions, layers=layer_caches
        )

    def output_head(self) -> LinearHead:
        """The output projection (the untied head, or the embedding table when tied)."""
        if self.head is None:
            return LinearHead(kernel=self.embed.embedding[...], tied=True)
        return LinearHead(
            kernel=self.head.kernel[...],
            bias=None if self.head.bias is None else self.head.bias[...],
            dtype=self.head.dtype,
        )


def init(cfg: Config, rng: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the model and splits it into a static graph definition and a params pytree."""
    model = DecoderLM(cfg, rngs=nnx.Rngs(params=rng))
    return nnx.split(model)


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    cache: Cache | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array | tuple[jax.Array, Cache]:
    """Pure forward pass: tokens [B, T] -> logits [B, T, V] (plus cache if given).

    ``return_hidden=True`` returns the final hidden states [B, T, D] instead, for losses that
    apply the head themselves (``losses.fused_cross_entropy`` with ``output_head``).

    ``nnx.merge`` runs here, inside whatever ``jax.jit`` the caller wraps around ``apply``, so the
    NNX graph work is paid once at trace time, not every step.
    """
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_rng) if dropout_rng is not None else None
    if not deterministic and rngs is None:
        raise ValueError("apply(deterministic=False) needs dropout_rng")
    return model(
        tokens,
        positions,
        segment_ids,
        cache=cache,
        deterministic=deterministic,
        rngs=rngs,
        return_hidden=return_hidden,
    )


def output_head(graphdef: nnx.GraphDef, params: nnx.State) -> LinearHead:
    """The output projection as arrays: ``apply(...) == output_head(...)(apply(...,
    return_hidden=True))``. Call it inside the differentiated function so gradients reach
    ``params``."""
    return nnx.merge(graphdef, params).output_head()


def param_count(cfg: Config) -> int:
    """Number of parameters, computed with ``jax.eval_shape`` (no memory is allocated)."""
    _, shapes = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def relayout(
    cfg: Config, params: nnx.State, *, scan_layers: bool
) -> tuple[Config, nnx.GraphDef, nnx.State]:
    """The same weights as a scanned (stacked) or unrolled model: -> (cfg, graphdef, params)."""
    return relayout_layers(
        lambda c: init(c, jax.random.key(0)),
        cfg,
        params,
        scan_layers=scan_layers,
        stacks={"blocks": cfg.n_layers},
    )
