"""Parameterised building blocks with logical axis names on every weight.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds *logical* axis names
(``"embed"``, ``"mlp"``, ``"heads"``, ...). They are only names: with no mesh the model builds
and runs unsharded; under a mesh a rules table (``attnzoo.training.sharding``) maps them to
mesh axes. ``eager_sharding=False`` keeps Flax from trying to shard at construction time.

Logical axis vocabulary: ``vocab, embed, mlp, heads, kv_heads, head_dim, norm, layers,
relpos, position``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnzoo import ops
from attnzoo.models.activation_sharding import constrain

Initializer = Callable[..., jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """Creates an ``nnx.Param`` annotated with logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {axes}")
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype),
        out_sharding=tuple(axes),
        eager_sharding=False,
    )


def normal(stddev: float) -> Initializer:
    """Normal(0, ``stddev``) initializer."""
    return jax.nn.initializers.normal(stddev)


def fan_in(in_dims: int = 1) -> Initializer:
    """Lecun-normal style init with fan-in = product of the first ``in_dims`` dimensions."""
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(in_dims)), out_axis=-1
    )


class Dense(nnx.Module):
    """A general linear map ``y = einsum(eqn, x, W) + b`` over named dimensions.

    ``Dense((d, n, h), ("embed", "heads", "head_dim"), "btd,dnh->btnh")`` is the query
    projection of a multi-head attention layer. Keeping heads as their own weight dimension
    (instead of reshaping ``d -> n*h``) is what lets a rules table shard heads.
    """

    def __init__(
        self,
        shape: Sequence[int],
        axes: Sequence[str | None],
        eqn: str,
        *,
        use_bias: bool = False,
        in_dims: int = 1,
        init: Initializer | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eqn = eqn
        self.dtype = dtype
        self.kernel = param(rngs, init or fan_in(in_dims), shape, axes, param_dtype)
        out_shape, out_axes = tuple(shape[in_dims:]), tuple(axes[in_dims:])
        self.bias = (
            param(rngs, jax.nn.initializers.zeros, out_shape, out_axes, param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = ops.linear(self.eqn, x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def dense_many(layers: Sequence[Dense], x: jax.Array) -> tuple[jax.Array, ...]:
    """``tuple(layer(x) for layer in layers)`` for Dense layers of one equation and shape.

    ``ops.linear_many`` may run them as one product (e.g. the q/k/v projections).
    """
    dtype = layers[0].dtype or x.dtype
    ys = ops.linear_many(
        layers[0].eqn, x.astype(dtype), [d.kernel[...].astype(dtype) for d in layers]
    )
    return tuple(
        y if d.bias is None else y + d.bias[...].astype(dtype)
        for y, d in zip(ys, layers, strict=True)
    )


class Embed(nnx.Module):
    """Token embedding table ``[vocab, embed]``; a tied output head uses it through
    ``LinearHead(kernel=table, tied=True)`` (the models' ``output_head``)."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        init: Initializer | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size = vocab_size
        self.embedding = param(
            rngs, init or normal(1.0), (vocab_size, d_model), ("vocab", "embed"), param_dtype
        )

    def __call__(self, tokens: jax.Array, dtype=jnp.float32) -> jax.Array:
        """tokens: [B, T] int -> [B, T, D]."""
        # Under a sharding scope the table is gathered whole along the model width first (as
        # FSDP gathers any weight), so the lookup splits rows like the batch; a vocabulary
        # split stays (masked local lookups, summed). Left alone, XLA splits the lookup's
        # output along the width and then has to replicate it to reach the batch layout.
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table.astype(dtype), tokens, axis=0)


@struct.dataclass
class LinearHead:
    """The output projection as plain arrays: ``logits = (x * scale) @ kernel + bias``.

    ``kernel`` is ``[D, V]``, or the tied embedding table ``[V, D]`` with ``tied=True``;
    ``bias`` is ``[V]`` or ``None``. Models hand it out (``output_head``) so that a loss can
    own the projection, e.g. ``losses.fused_cross_entropy``, which never materialises the
    ``[B, T, V]`` logits. Built from the parameters inside the differentiated function, its
    gradients flow back to them like any other use of the weights.
    """

    kernel: jax.Array
    bias: jax.Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    tied: bool = struct.field(pytree_node=False, default=False)
    dtype: Any = struct.field(pytree_node=False, default=None)

    def __call__(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:
        """x: [..., D] -> logits [..., V] (in ``dtype``, default ``x``'s)."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if self.scale != 1.0:
            x = x * jnp.asarray(self.scale, dtype)
        w = self.kernel.astype(dtype)
        if preferred_element_type is not None:  # chunked losses: float32 logits from bf16
            spec = "...d,vd->...v" if self.tied else "...d,dv->...v"
            y = jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
        else:
            rows = "abc"[: x.ndim - 1]
            y = ops.linear(f"{rows}d,{'vd' if self.tied else 'dv'}->{rows}v", x, w)
        if self.bias is not None:
            y = y + self.bias.astype(y.dtype)
        return y


class Norm(nnx.Module):
    """LayerNorm (``kind="layernorm"``, with bias) or RMSNorm (``kind="rmsnorm"``).

    Statistics are always computed in float32, also for bfloat16 activations.
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "layernorm",
        eps: float = 1e-5,
        use_bias: bool | None = None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm kind {kind!r}; valid: 'layernorm', 'rmsnorm'")
        self.kind, self.eps = kind, eps
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)
        use_bias = (kind == "layernorm") if use_bias is None else use_bias
        self.bias = (
            param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",), param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as Hendrycks & Gimpel (2016) write it: ``x/2 * (1 + erf(x / sqrt(2)))``.

    The same function as ``jax.nn.gelu(x, approximate=False)`` within float32 rounding; this
    form lowers to fewer operations (``benchmarks/README.md``).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Position-wise feed-forward: ``act(x W1) W2`` or gated ``(act(x Wg) * x W1) W2``.

    ``activation`` is one of ``ACTIVATIONS``; ``gated=True`` with ``"silu"`` is SwiGLU (LLaMA),
    with ``"gelu"`` GeGLU (T5 v1.1).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        gated: bool = False,
        use_bias: bool = True,
        dropout: float = 0.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
        self.activation = activation
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi = Dense((d_model, d_ff), ("embed", "mlp"), "btd,df->btf", **kw)
        self.wg = Dense((d_model, d_ff), ("embed", "mlp"), "btd,df->btf", **kw) if gated else None
        self.wo = Dense((d_ff, d_model), ("mlp", "embed"), "btf,fd->btd", **kw)
        self.dropout = nnx.Dropout(dropout)

    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = act(self.wg(x)) * self.wi(x) if self.wg is not None else act(self.wi(x))
        h = constrain(h, ("batch", "length", "mlp"))  # no-op without a mesh
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.wo(h)
