"""Multi-head attention (MHA / GQA / MQA) with positional hooks and a functional KV cache.

The KV cache is a plain pytree passed in and returned (never hidden module state), so a whole
generation loop jits as one ``lax.while_loop``. Slots hold keys in write order; each slot also
records the *position* of its key (``Cache.positions``), and empty slots hold ``EMPTY_POSITION``
so the causal test ``k_pos <= q_pos`` excludes them with no separate validity mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attnzoo.models.activation_sharding import constrain
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.layers import Dense, Norm, dense_many
from attnzoo.models.masks import MaskSpec
from attnzoo.models.positional import PositionConfig, make_layer_encoding

EMPTY_POSITION = jnp.iinfo(jnp.int32).max


@struct.dataclass
class KVCache:
    """One layer's cached keys and values, stored heads-major: [B, K, S_max, H] each.

    Heads before slots is the layout the attention dots read directly, so no decode step
    transposes the whole cache. ``keys_values()`` gives the [B, S_max, K, H] view that
    ``dot_product_attention`` takes; that transpose folds into the dots.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32):
        """An empty cache: k and v zeros of [batch, n_kv_heads, max_len, head_dim]."""
        z = jnp.zeros((batch, n_kv_heads, max_len, head_dim), dtype)
        return cls(k=z, v=z)

    @classmethod
    def from_keys_values(cls, k: jax.Array, v: jax.Array) -> KVCache:
        """From keys and values [..., S, K, H] (e.g. projected encoder output)."""
        return cls(k=jnp.swapaxes(k, -3, -2), v=jnp.swapaxes(v, -3, -2))

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """Keys and values as [..., S_max, K, H]."""
        return jnp.swapaxes(self.k, -3, -2), jnp.swapaxes(self.v, -3, -2)

    def write(self, k_new: jax.Array, v_new: jax.Array, index: jax.Array) -> KVCache:
        """Writes k/v_new [B, T, K, H] at per-row slot ``index`` [B].

        Rows write at their own slots (prompts of different lengths decode in one batch).
        ``index + T`` must stay <= S_max: like ``lax.dynamic_update_slice``, a write past the
        end is clamped onto the last slots, so callers size the cache for prompt + new tokens.
        """
        put = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=1))
        return KVCache(
            k=put(self.k, jnp.swapaxes(k_new, 1, 2).astype(self.k.dtype), index),
            v=put(self.v, jnp.swapaxes(v_new, 1, 2).astype(self.v.dtype), index),
        )


def grow_slots(positions: jax.Array, layers, max_len: int):
    """A self-attention cache with ``max_len`` >= S_max slots, the new ones empty.

    positions [B, S_max] (padded with ``EMPTY_POSITION``) and ``layers``, any pytree of
    ``KVCache`` whose leaves are [..., S_max, H] (zero-padded) -> (positions, layers).
    """
    old = positions.shape[-1]
    if max_len < old:
        raise ValueError(f"a cache can only grow: {old} slots -> {max_len}")
    extra = max_len - old
    if not extra:
        return positions, layers
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, extra), (0, 0)])
    positions = jnp.pad(positions, ((0, 0), (0, extra)), constant_values=EMPTY_POSITION)
    return positions, jax.tree.map(pad, layers)


def write_positions(positions: jax.Array, new_positions: jax.Array, index: jax.Array) -> jax.Array:
    """positions [B, S_max], new_positions [B, T], index [B] -> updated positions [B, S_max]."""
    put = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))
    return put(positions, new_positions.astype(positions.dtype), index)


class MultiHeadAttention(nnx.Module):
    """Self- or cross-attention over ``[B, T, D]`` inputs.

    Args:
      d_model: model width D.
      n_heads: query heads N.
      n_kv_heads: key/value heads K (``None`` = N; 1 = MQA; otherwise GQA). Must divide N.
      head_dim: H, default D // N.
      position: positional config for self-attention (``None`` for cross-attention: no
        positional hooks, as in the paper and T5).
      causal: mask keys after the query position.
      sliding_window: attend only to the last ``sliding_window`` positions.
      use_bias: biases on the q/k/v/o projections.
      qk_norm: RMSNorm on queries and keys per head (Gemma, OLMo-2 style).
      dropout: attention-weight dropout.
      scale: logit scale, default 1/sqrt(H) (T5 uses 1.0).
      implementation: attention path (see ``dot_product_attention``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        position: PositionConfig | None = None,
        causal: bool = False,
        sliding_window: int | None = None,
        use_bias: bool = False,
        qk_norm: bool = False,
        dropout: float = 0.0,
        scale: float | None = None,
        implementation: str | None = None,
        norm_eps: float = 1e-6,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), "
                    "or set head_dim explicitly"
                )
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.sliding_window = causal, sliding_window
        self.dropout, self.scale, self.implementation = dropout, scale, implementation
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        N, K, H, D = n_heads, n_kv_heads, head_dim, d_model
        self.q = Dense((D, N, H), ("embed", "heads", "head_dim"), "btd,dnh->btnh", **kw)
        self.k = Dense((D, K, H), ("embed", "kv_heads", "head_dim"), "btd,dnh->btnh", **kw)
        self.v = Dense((D, K, H), ("embed", "kv_heads", "head_dim"), "btd,dnh->btnh", **kw)
        self.o = Dense((N, H, D), ("heads", "head_dim", "embed"), "btnh,nhd->btd", in_dims=2, **kw)
        self.q_norm = Norm(H, kind="rmsnorm", eps=norm_eps, rngs=rngs) if qk_norm else None
        self.k_norm = Norm(H, kind="rmsnorm", eps=norm_eps, rngs=rngs) if qk_norm else None
        self.position = (
            make_layer_encoding(position, n_heads=N, head_dim=H, causal=causal, rngs=rngs)
            if position is not None
            else None
        )

    def _project_self(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention q [B, T, N, H] and k, v [B, T, K, H] of ``x`` [B, T, D].

        The projections share their input, so they go through ``dense_many`` together (q with
        k and v when their shapes agree, i.e. not GQA/MQA).
        """
        if self.n_heads == self.n_kv_heads:
            q, k, v = dense_many((self.q, self.k, self.v), x)
        else:
            q = self.q(x)
            k, v = dense_many((self.k, self.v), x)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k, v

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of a cross-attention source [B, S, D] -> 2 x [B, S, K, H].

        Decoding computes these once from the encoder output and reuses them every step.
        """
        k, v = self.k(x), self.v(x)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: MaskSpec | None = None,
        kv: jax.Array | None = None,
        kv_projected: tuple[jax.Array, jax.Array] | None = None,
        bias: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attends from ``x`` [B, T, D] to itself, or to ``kv`` [B, S, D] (cross-attention).

        Args:
          mask: positions, segment ids and any dense mask of the queries and keys
            (``masks.MaskSpec``), built once per stack; this layer adds its own ``causal`` and
            ``sliding_window``. ``q_positions`` [B, T] also drive the positional encoding
            (default 0..T-1); with a cache, ``k_positions`` [B, S_max] are every slot's
            position after this write (``write_positions``).
          kv / kv_projected: cross-attention source, raw [B, S, D] or already projected keys
            and values (``project_kv``).
          bias: logits bias [B or 1, N, T, S] (ALiBi, T5), computed once per stack.
          cache, cache_index: this layer's KV cache and per-row write slot [B]; new keys are
            written at ``cache_index`` and attention runs over the whole cache.
        Returns:
          ([B, T, D] output, updated cache or None).
        """
        spec = mask if mask is not None else MaskSpec()
        is_self = kv is None and kv_projected is None
        if kv_projected is not None:
            q, (k, v) = self.q(x), kv_projected
        elif kv is not None:
            q, (k, v) = self.q(x), self.project_kv(kv)
        else:
            q, k, v = self._project_self(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        # heads split over "tensor" (when the rules say so), batch over the data axes
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        rel_k = rel_v = None
        if is_self:
            q_positions = spec.q_positions
            if q_positions is None:
                q_positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
            if cache is not None and spec.k_positions is None:
                raise ValueError(
                    "attention with a cache needs k_positions and cache_index: pass "
                    "mask=MaskSpec(k_positions=...), every slot's position (write_positions)"
                )
            k_positions = spec.k_positions if spec.k_positions is not None else q_positions
            spec = dataclasses.replace(
                spec,
                q_positions=q_positions,
                k_positions=k_positions,
                causal=spec.causal or self.causal,
                sliding_window=self.sliding_window or spec.sliding_window,
            )
            if self.position is not None:
                q = self.position.rotate(q, q_positions, is_key=False)
                k = self.position.rotate(k, q_positions, is_key=True)
                rel_k, rel_v = self.position.relative(q_positions, k_positions)
        if cache is not None:
            if cache_index is None:
                raise ValueError("attention with a cache needs k_positions and cache_index")
            cache = cache.write(k, v, cache_index)
            k, v = cache.keys_values()
        dropout_rng = None
        if not deterministic and self.dropout > 0.0:
            if rngs is None:
                raise ValueError("attention dropout needs rngs when deterministic=False")
            dropout_rng = rngs.dropout()
        out = dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask=spec,
            bias=bias,
            scale=self.scale,
            rel_k=rel_k,
            rel_v=rel_v,
            dropout_rate=0.0 if deterministic else self.dropout,
            dropout_rng=dropout_rng,
            implementation=self.implementation,
        )
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return self.o(out), cache
