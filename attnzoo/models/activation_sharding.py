"""Logical sharding constraints on activations: ``constrain(x, ("batch", "length", "embed"))``.

Parameters carry logical axis names (``layers.param``); activations get them here, at the few
places where the layout matters (the residual stream, q/k/v, the MLP hidden layer). Without
them XLA's SPMD partitioner infers activation layouts from the weights alone, and under FSDP x
TP it may choose to split the model width of an activation over the axis that already splits
the batch, then fall back to replicating it ("Involuntary full rematerialization").

The names are mapped to mesh axes by the same rules table as the parameters
(``attnzoo.training.rules``), so a strategy stays one table. ``constrain`` is a no-op unless a
caller opened an ``activation_sharding(mesh, to_spec)`` scope around tracing, which the
training and eval steps do (``attnzoo.training.steps``); models run unchanged with no mesh.

Activation vocabulary: ``batch, length`` (query or key/value length), and the parameter names
``embed, heads, kv_heads, head_dim, mlp, vocab``. Where the rules map ``embed`` to the axis
that also splits ``batch`` (FSDP), the batch keeps it and ``embed`` stays whole: a mesh axis
shards one dimension of an array (``attnzoo.training.sharding.logical_to_mesh``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical names, shape) -> the mesh PartitionSpec of an array with those names
SpecFn = Callable[[Sequence[str | None], Sequence[int]], PartitionSpec]


@dataclasses.dataclass(frozen=True)
class _Scope:
    mesh: Mesh
    to_spec: SpecFn


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "attnzoo_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, to_spec: SpecFn | None) -> Iterator[None]:
    """Within this scope (while tracing), ``constrain`` pins activations to
    ``NamedSharding(mesh, to_spec(names, shape))``. ``mesh=None`` or ``to_spec=None`` turns
    constraints off, also inside an outer scope."""
    scope = None if mesh is None or to_spec is None else _Scope(mesh, to_spec)
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def active() -> bool:
    """Whether ``constrain`` currently constrains anything."""
    return _SCOPE.get() is not None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with its dimensions pinned to the mesh axes of logical ``names`` (one per
    dimension; ``None`` = replicated), or ``x`` unchanged outside ``activation_sharding``."""
    scope = _SCOPE.get()
    if scope is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: array of shape {x.shape} needs {x.ndim} names, got {names}")
    spec = scope.to_spec(tuple(names), x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(scope.mesh, spec))
