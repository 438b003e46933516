"""Maps logical axis names to mesh axes and places pytrees with ``NamedSharding``.

Every parameter carries logical names (``nnx.get_partition_spec``); the optimizer state built
by optax from the params inherits them, so the same rules shard both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnzoo.training.rules import Rules


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_mesh(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The mesh ``PartitionSpec`` of one array with logical axis ``names`` and ``shape``.

    A dimension is replicated when its mapping is unknown-free but does not divide it, or when
    its mesh axis is already used by an earlier dimension (a mesh axis can shard one dimension).
    """
    if len(names) != len(shape):
        # e.g. Adafactor's factored second moments: vectors that inherit a matrix's names.
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no entry in the sharding rules; "
                f"add it to the tables in attnzoo.training.rules"
            )
        axes = (
            tuple(a for a in _mesh_axes(rules.get(name)) if a not in used and mesh.shape[a] > 1)
            if name is not None
            else ()
        )
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            logging.info(
                "replicating %s dimension of size %d: not divisible by mesh axes %s",
                name,
                size,
                axes,
            )
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


# Model dimensions that tensor parallelism must split evenly: replicating one of them instead
# (what ``logical_to_mesh`` does for e.g. an odd vocabulary) would silently undo the strategy.
_SPLIT_DIMENSIONS = (("heads", "n_heads"), ("kv_heads", "kv_heads"), ("mlp", "d_ff"))


def check_model_axes(model_cfg: Any, mesh: Mesh, rules: Rules) -> None:
    """Fails before anything is compiled when a mesh axis the rules shard a model dimension
    over does not divide it (e.g. ``mesh.tensor=8`` with ``n_kv_heads=2``).

    Checked: query heads (``n_heads``), key/value heads (``n_kv_heads``, or ``n_heads``) and
    the MLP width (``d_ff``). The vocabulary and the model width may not divide and are then
    replicated (``logical_to_mesh``).

    Raises:
      ValueError: naming the config field, its size, the logical axis, the mesh axis and size,
        and what to change.
    """
    for logical, field in _SPLIT_DIMENSIONS:
        size = getattr(model_cfg, field)
        axes = tuple(a for a in _mesh_axes(rules.get(logical)) if mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            shown = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
            raise ValueError(
                f"model dimension {field}={size} (logical axis {logical!r}) is split over "
                f"{shown} by the sharding rules, which does not divide it; choose "
                f"config.mesh so that {ways} becomes a divisor of {size}, or change "
                f"{field} or config.sharding"
            )


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every array of ``tree`` (params, optimizer state, a TrainState).

    Leaves without logical names (step counters, rng) are replicated.
    """
    specs = nnx.get_partition_spec(tree)
    return jax.tree.map(
        lambda x, names: NamedSharding(
            mesh, logical_to_mesh(tuple(names), np.shape(x), mesh, rules)
        ),
        tree,
        specs,
    )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Batches ``[B, T]`` are split on B over the ``"batch"`` rule's mesh axes."""
    axes = tuple(a for a in _mesh_axes(rules.get("batch")) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None, None))


def batch_split(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (batch_size must divide by it)."""
    return math.prod(mesh.shape[a] for a in _mesh_axes(rules.get("batch")))


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays (``[B_global, T]``).

    Each process passes only its own ``B_global / process_count`` rows; with one process this
    is a plain sharded ``device_put``.
    """
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
