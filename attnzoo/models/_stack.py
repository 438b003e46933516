"""Stacks of Transformer blocks: unrolled (an ``nnx.List``) or scanned (one block whose params
carry a leading ``"layers"`` axis, run with ``jax.lax.scan``).

Scanning keeps the compiled program at one block whatever the depth, so compile time stays flat
(a 24-layer model lowers to the same program as a 2-layer one). ``relayout_layers`` moves
weights between the two layouts; ``take_layers`` gathers batch rows of per-layer caches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.models.blocks import Block
from attnzoo.models.mha import KVCache
from attnzoo.models.remat import checkpoint_policy, effective_policy

# a tuple of per-layer KVCache, one stacked KVCache, or None
_Layers = TypeVar("_Layers", bound=tuple[KVCache, ...] | KVCache | None)


def make_stack(
    factory: Callable[[nnx.Rngs], Block], n_layers: int, *, scan: bool, rngs: nnx.Rngs
) -> Any:
    """``n_layers`` blocks from ``factory(rngs)``.

    ``scan=False``: an ``nnx.List`` of blocks. ``scan=True``: a single block whose params carry a
    leading ``"layers"`` axis (built with ``nnx.vmap``), so ``run_stack`` can ``lax.scan`` over
    it and the compiled program holds one block whatever the depth.
    """
    if not scan:
        return nnx.List([factory(rngs) for _ in range(n_layers)])

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return factory(rngs)

    return create(rngs)


def run_stack(
    blocks: Any,
    x: jax.Array,
    *,
    cfg: Any,
    per_layer: Any = None,
    rngs: nnx.Rngs | None = None,
    **shared: Any,
) -> tuple[jax.Array, Any]:
    """Runs ``x`` [B, T, D] through every block of a ``make_stack`` stack.

    Args:
      per_layer: a dict of per-layer inputs (``cache``, ``encoded_kv``): tuples of one entry per
        layer when unrolled, pytrees with a leading layer axis when scanned. ``None`` entries
        are fine.
      cfg: the model config: ``scan_layers`` says how the stack was built; ``remat_policy``
        (``attnzoo.models.remat``) how each block is checkpointed.
      rngs: apply dropout with these (``None``: deterministic).
      shared: keyword arguments every block receives unchanged (positions, masks, bias...).
    Returns:
      (x [B, T, D], the blocks' returned caches in the layout of ``per_layer["cache"]``).
    """
    scan, deterministic = cfg.scan_layers, rngs is None
    per_layer = dict(per_layer or {})
    # One dropout key per layer, split the same way in both layouts, so scanned and unrolled
    # stacks draw identical dropout masks.
    keys = None
    if rngs is not None:
        n_layers = jax.tree.leaves(nnx.state(blocks))[0].shape[0] if scan else len(blocks)
        keys = jax.random.split(rngs.dropout(), n_layers)

    def layer(graphdef, state, h, inputs, key):
        block = nnx.merge(graphdef, state)
        layer_rngs = nnx.Rngs(dropout=key) if key is not None else None
        return block(h, **shared, **inputs, deterministic=deterministic, rngs=layer_rngs)

    policy = effective_policy(cfg.remat, cfg.remat_policy)
    if policy != "none":
        # scan's loop boundary already stops the compiler from CSE-ing the recomputation away
        layer = jax.checkpoint(
            layer,
            static_argnums=(0,),
            policy=checkpoint_policy(policy),
            prevent_cse=not scan,
        )

    if scan:
        graphdef, state = nnx.split(blocks)

        def body(h, xs):
            layer_state, inputs, key = xs
            return layer(graphdef, layer_state, h, inputs, key)

        return jax.lax.scan(body, x, (state, per_layer, keys))

    caches = []
    for i, block in enumerate(blocks):
        graphdef, state = nnx.split(block)
        inputs = {k: (v[i] if v is not None else None) for k, v in per_layer.items()}
        x, cache = layer(graphdef, state, x, inputs, None if keys is None else keys[i])
        caches.append(cache)
    return x, tuple(caches)


def relayout_layers(
    init_fn: Callable[[Any], tuple[nnx.GraphDef, nnx.State]],
    cfg: Any,
    params: nnx.State,
    *,
    scan_layers: bool,
    stacks: dict[str, int],
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """Moves weights between the unrolled and scanned layouts of the same model.

    Args:
      init_fn: the model's ``init`` with the rng bound, ``cfg -> (graphdef, params)``.
      stacks: top-level state key of each block stack -> its number of layers.
    Returns:
      (cfg with ``scan_layers`` set, its graphdef, params holding the same weights).
    """
    target = cfg.replace(scan_layers=scan_layers)
    graphdef, out = jax.eval_shape(lambda: init_fn(target))  # shapes and metadata, no memory
    pure = nnx.to_pure_dict(params)
    for key, n in stacks.items():
        layers = pure[key]
        if scan_layers and not cfg.scan_layers:  # {0: tree, 1: tree, ...} -> stacked tree
            pure[key] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(n)))
        elif cfg.scan_layers and not scan_layers:  # stacked tree -> {i: tree}
            pure[key] = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)}
    nnx.replace_by_pure_dict(out, pure)
    return target, graphdef, out


def take_layers(layers: _Layers, rows: jax.Array) -> _Layers:
    """Batch rows ``rows`` [B'] of per-layer caches (a tuple of [B, ...] caches, or one stacked
    [L, B, ...] cache from a scanned stack). Beam search reorders and expands caches with it."""
    if layers is None:
        return layers
    axis = 1 if isinstance(layers, KVCache) else 0
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=axis), layers)
