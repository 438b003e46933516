"""What both model families share: config fields, presets, the decoding cache, the embedding
and head, and the functional helpers built on them.

A family (``decoder_lm``, ``encoder_decoder``) is a ``ModelConfig`` subclass that names its
block stacks and builds its module, plus that module. Everything here works for either::

    graphdef, params = core.init(cfg, rng)                # cfg of either family
    core.param_count(cfg); core.relayout(cfg, params, scan_layers=True)
    cache = core.init_cache(cfg, batch, max_len)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnzoo.models import masks
from attnzoo.models._stack import relayout_layers, take_layers
from attnzoo.models.activation_sharding import constrain
from attnzoo.models.blocks import validate_config
from attnzoo.models.layers import Dense, Embed, LinearHead
from attnzoo.models.mha import EMPTY_POSITION, KVCache, grow_slots, write_positions
from attnzoo.models.positional import Encoding, PositionConfig, make_encoding
from attnzoo.models.remat import effective_policy

_M = TypeVar("_M")


def register_preset(method: _M) -> _M:
    """Marks a ``Config`` classmethod as a named preset (``Config.preset(name)``).

    Stack it above ``@classmethod``; ``Config.presets()`` lists every marked method.
    """
    if not isinstance(method, classmethod):
        raise TypeError("register_preset goes above @classmethod")
    method.__func__._attnzoo_preset = True  # pyright: ignore[reportFunctionMemberAccess]
    return method


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters every family has. Frozen; vary with ``replace``.

    Invalid combinations (d_model not divisible by n_heads, unknown activation or positional
    kind, ...) raise ``ValueError`` at construction, naming the field and the fix.

    Attributes:
      vocab_size, d_model, d_ff: token vocabulary, model width, feed-forward width.
      n_heads, n_kv_heads, head_dim: query heads; key/value heads (None = n_heads, 1 = MQA,
        a divisor = GQA); per-head width (None = d_model // n_heads).
      activation, gated_mlp: MLP nonlinearity (``layers.ACTIVATIONS``) and GLU gating.
      norm, norm_eps, norm_bias, pre_norm: ``"layernorm"`` or ``"rmsnorm"``; pre- or post-LN.
      use_bias, qk_norm: biases on projections; RMSNorm of queries and keys per head.
      tie_embeddings, embed_scale, embed_init_std: head tied to the token table; multiply
        embeddings by sqrt(d_model) (section 3.4); token table init stddev.
      dropout, attention_dropout, activation_dropout: residual, attention-weight, MLP rates.
      sliding_window, attention_scale, attention_impl: local causal attention width; logit
        scale (None = 1/sqrt(head_dim)); ``dot_product_attention`` implementation.
      position: the positional encoding (``PositionConfig``).
      dtype, param_dtype: compute and parameter dtypes by name.
      remat_policy, remat: what each block keeps for the backward pass (``"none"``: all, no
        remat; ``"full"``, ``"dots_saveable"``, ``"dots_with_no_batch_dims_saveable"``,
        ``"offload"``: ``attnzoo.models.remat``). ``remat=True`` is the older switch: with
        ``remat_policy="none"`` it means ``"dots_with_no_batch_dims_saveable"``.
        ``effective_remat_policy`` is what runs.
      scan_layers: stack blocks on a leading ``"layers"`` axis and ``lax.scan`` over them.
    """

    vocab_size: int = 32000
    d_model: int = 512
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
    embed_init_std: float | None = 0.02
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
    remat_policy: str = "none"
    scan_layers: bool = False

    # Per family: each block stack's top-level state key -> the field holding its depth, and
    # the stack whose self-attention the decoding cache holds.
    STACKS: ClassVar[dict[str, str]] = {}
    CACHED_STACK: ClassVar[str] = ""
    _PRESETS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw: Any):
        super().__init_subclass__(**kw)
        own = tuple(
            k
            for k, v in vars(cls).items()
            if isinstance(v, classmethod) and getattr(v.__func__, "_attnzoo_preset", False)
        )
        cls._PRESETS = tuple(dict.fromkeys(cls._PRESETS + own))

    def __post_init__(self):
        validate_config(self)
        for field in self.STACKS.values():
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

    def replace(self, **kw: Any) -> Self:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **kw)

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        """The family's NNX module for this config."""
        raise NotImplementedError(f"{type(self).__name__} must define build()")

    @property
    def effective_remat_policy(self) -> str:
        """The remat policy that runs: ``remat_policy``, or for the legacy ``remat=True`` with
        ``remat_policy="none"``, ``"dots_with_no_batch_dims_saveable"``; ``"none"`` = off."""
        return effective_policy(self.remat, self.remat_policy)

    @property
    def head_size(self) -> int:
        """Per-head width H: ``head_dim``, or ``d_model // n_heads``."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads K: ``n_kv_heads``, or ``n_heads``."""
        return self.n_kv_heads or self.n_heads

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        """Names of the presets (every ``@register_preset`` classmethod)."""
        return cls._PRESETS

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """A preset by name (``"gpt2_small"``, ``"transformer_base"``, ...), then ``overrides``."""
        if name not in cls._PRESETS:
            raise ValueError(
                f"unknown {cls.__module__.rsplit('.', 1)[-1]} preset {name!r}; "
                f"valid: {', '.join(cls._PRESETS)}"
            )
        return getattr(cls, name)().replace(**overrides)


@struct.dataclass
class Cache:
    """Incremental decoding state of a decoder stack.

    ``layers`` holds each decoder layer's self-attention K/V: a tuple of ``KVCache`` for
    unrolled stacks, one ``KVCache`` with a leading layer axis ([L, B, K, S_max, H]) for
    ``scan_layers``. ``cross`` holds an encoder-decoder's cross-attention K/V, projected once
    from the encoder output (same layout; ``None`` for decoder-only models).
    """

    index: jax.Array  # [B] int32, next write slot
    positions: jax.Array  # [B, S_max] int32, EMPTY_POSITION where nothing was written
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

    def replace(self, **changes: Any) -> Cache:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def advance(self, n_new: int, positions: jax.Array | None, layers: Any) -> Cache:
        """The cache after writing ``n_new`` tokens per row: every slot's ``positions``
        [B, S_max] and the layers' updated K/V."""
        return self.replace(
            index=self.index + n_new,
            positions=self.positions if positions is None else positions,
            layers=layers,
        )

    def grow(self, max_len: int) -> Cache:
        """The same cache with ``max_len`` >= S_max self-attention slots, the new ones empty.

        Decoding loops run in stages over a growing cache, so each step reads only the slots
        its stage can have filled (``attnzoo.decoding.stages``); cross K/V keep their length.
        """
        positions, layers = grow_slots(self.positions, self.layers, max_len)
        return self.replace(positions=positions, layers=layers)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty cache for ``batch`` rows of up to ``max_len`` decoded tokens."""
    kv = KVCache.zeros(batch, max_len, cfg.kv_heads, cfg.head_size, jnp.dtype(dtype or cfg.dtype))
    n_layers = getattr(cfg, cfg.STACKS[cfg.CACHED_STACK])
    if cfg.scan_layers:
        layers = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_layers, *a.shape)), kv)
    else:
        layers = (kv,) * n_layers
    return Cache(
        index=jnp.zeros((batch,), jnp.int32),
        positions=jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
        layers=layers,
    )


def init(cfg: ModelConfig, rng: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the model and splits it into a static graph definition and a params pytree."""
    return nnx.split(cfg.build(nnx.Rngs(params=rng)))


def merge(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    *,
    deterministic: bool,
    dropout_rng: jax.Array | None,
) -> tuple[Any, nnx.Rngs | None]:
    """``(model, rngs)`` for a functional call; ``rngs`` is None when ``deterministic``.

    ``nnx.merge`` runs inside the caller's jit, so NNX's graph work is paid once at trace
    time, not every step. The modules apply dropout exactly when they are given ``rngs``.
    """
    if deterministic:
        return nnx.merge(graphdef, params), None
    if dropout_rng is None:
        raise ValueError("deterministic=False needs dropout_rng")
    return nnx.merge(graphdef, params), nnx.Rngs(dropout=dropout_rng)


def output_head(graphdef: nnx.GraphDef, params: nnx.State) -> LinearHead:
    """The output projection as arrays: ``apply(...) == output_head(...)(hidden)`` where
    ``hidden`` is ``apply(..., return_hidden=True)``. Call it inside the differentiated
    function so that gradients reach ``params``."""
    return nnx.merge(graphdef, params).output_head()


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, computed with ``jax.eval_shape`` (no memory is allocated)."""
    _, shapes = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def relayout(
    cfg: ModelConfig, params: nnx.State, *, scan_layers: bool
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """The same weights as a scanned (stacked) or unrolled model: -> (cfg, graphdef, params)."""
    return relayout_layers(
        lambda c: init(c, jax.random.key(0)),
        cfg,
        params,
        scan_layers=scan_layers,
        stacks={key: getattr(cfg, field) for key, field in cfg.STACKS.items()},
    )


# ---- pieces of the modules -----------------------------------------------------------------


def token_embedding(cfg: ModelConfig, rngs: nnx.Rngs) -> Embed:
    """The ``[vocab, d_model]`` token table (``embed_init_std`` None = ``d_model**-0.5``)."""
    std = cfg.d_model**-0.5 if cfg.embed_init_std is None else cfg.embed_init_std
    return Embed(
        cfg.vocab_size,
        cfg.d_model,
        init=jax.nn.initializers.normal(std),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def position_encoding(cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs) -> Encoding:
    """The stack-level positional encoding (``causal``: a decoder stack)."""
    return make_encoding(
        cfg.position,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        head_dim=cfg.head_size,
        causal=causal,
        rngs=rngs,
    )


def untied_head(cfg: ModelConfig, rngs: nnx.Rngs) -> Dense | None:
    """The ``[d_model, vocab]`` output projection, or ``None`` when tied to the embeddings."""
    if cfg.tie_embeddings:
        return None
    return Dense(
        (cfg.d_model, cfg.vocab_size),
        ("embed", "vocab"),
        "btd,dv->btv",
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def linear_head(
    embed: Embed,
    head: Dense | None,
    *,
    bias: jax.Array | None = None,
    tied_scale: float = 1.0,
) -> LinearHead:
    """The output projection: the untied ``head``, or ``embed``'s table transposed."""
    if head is not None:
        return LinearHead(kernel=head.kernel[...], bias=bias, dtype=head.dtype)
    return LinearHead(kernel=embed.embedding[...], bias=bias, scale=tied_scale, tied=True)


def stack_inputs(
    cfg: ModelConfig,
    table: Embed,
    encoding: Encoding,
    dropout: nnx.Dropout,
    tokens: jax.Array,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
    cache: Cache | None,
    rngs: nnx.Rngs | None,
    *,
    name: str = "tokens",
) -> tuple[jax.Array, masks.MaskSpec, jax.Array | None, jax.Array | None]:
    """What a block stack takes, built once per stack.

    Args:
      tokens: [B, T] int; ``name`` is how errors call them.
      segment_ids: [B, T] packed-example ids (0 = padding) or None.
      positions: [B, T] or None: 0..T-1 per row, restarting per segment (required with a
        cache).
      cache: with a cache, the keys are its slots after this write: their positions come from
        the cache, and empty slots hold ``EMPTY_POSITION`` so the causal test excludes them.
      rngs: dropout on the embeddings when given.
    Returns:
      (x [B, T, D] embedded tokens, the self-attention ``MaskSpec``, logits bias
      [B|1, N, T, S] or None, cache write slots [B] or None).
    """
    positions = _resolve_positions(name, tokens, segment_ids, positions, cache)
    dtype = jnp.dtype(cfg.dtype)
    x = table(tokens, dtype)  # (B, T, D)
    if cfg.embed_scale:  # section 3.4: embeddings multiplied by sqrt(d_model)
        x = x * jnp.sqrt(jnp.asarray(cfg.d_model, dtype))
    x = dropout(encoding.embed(x, positions), deterministic=rngs is None, rngs=rngs)
    x = constrain(x, ("batch", "length", "embed"))  # no-op without a sharding scope
    if cache is None:
        mask = masks.MaskSpec(
            q_positions=positions,
            k_positions=positions,
            q_segment_ids=segment_ids,
            k_segment_ids=segment_ids,
            # without a cache, positions count up by one along each row or packed segment
            # (the data pipeline's and positions_from_segments'), so the attention kernels
            # may compute causal / sliding-window masks from indices (MaskSpec docs)
            positions_are_indices=True,
        )
        return x, mask, encoding.attention_bias(positions, positions), None
    k_positions = write_positions(cache.positions, positions, cache.index)  # (B, S_max)
    mask = masks.MaskSpec(q_positions=positions, k_positions=k_positions)
    return x, mask, encoding.attention_bias(positions, k_positions), cache.index


def _resolve_positions(
    name: str,
    tokens: jax.Array,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
    cache: Cache | None,
) -> jax.Array:
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, length] int, got shape {tokens.shape}")
    for what, a in (("segment_ids", segment_ids), ("positions", positions)):
        if a is not None and a.shape != tokens.shape:
            raise ValueError(f"{name} {tokens.shape} and its {what} {a.shape} must match")
    if positions is not None:
        return positions
    if cache is not None:
        what = name.replace("tokens", "positions")
        raise ValueError(f"decoding with a cache needs explicit {what} [B, T]")
    if segment_ids is not None:
        return masks.positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
