"""The weight products of every model, behind one switch.

Model code multiplies activations by weights only through ``linear`` and ``linear_many``, and
marks incremental decoding with ``few_rows``. By default these are plain ``jnp.einsum`` calls
and a no-op context, which is what GPU and TPU compilers want: they choose dot layouts
themselves. A backend module can install other implementations of the same three functions
(``attnzoo.backends.cpu`` does, for XLA:CPU's dot kernels); the values stay the einsum's up to
float32 summation order.

The installed implementation is read when a function is traced, so install it before the first
``jax.jit`` call it should affect::

    from attnzoo import backends, ops
    backends.tune_for_platform()      # the CLIs and benchmarks do this
    with ops.use(ops.DEFAULT):        # or scope a choice to a block of tracing
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT", "Ops", "current", "few_rows", "install", "linear", "linear_many", "use"]


def _einsum(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(eqn, x, w)


def _einsum_many(eqn: str, x: jax.Array, ws: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(jnp.einsum(eqn, x, w) for w in ws)


def _no_hint(enabled: bool = True) -> AbstractContextManager[None]:
    del enabled
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Ops:
    """One implementation of the model's weight products.

    Attributes:
      name: shown in logs and ``repr``.
      linear: ``(eqn, x, w) -> jnp.einsum(eqn, x, w)`` for activation rows times a weight,
        e.g. ``"btd,dnh->btnh"``.
      linear_many: ``(eqn, x, ws) -> tuple(linear(eqn, x, w) for w in ws)``: weights of equal
        shape applied to one input (the q/k/v projections).
      few_rows: ``(enabled) -> context manager``: products traced inside multiply a handful of
        rows by weights that do not change inside the enclosing loop (incremental decoding).
    """

    name: str
    linear: Callable[[str, jax.Array, jax.Array], jax.Array] = _einsum
    linear_many: Callable[[str, jax.Array, Sequence[jax.Array]], tuple[jax.Array, ...]] = (
        _einsum_many
    )
    few_rows: Callable[[bool], AbstractContextManager[None]] = _no_hint


DEFAULT = Ops("einsum")

_installed: Ops = DEFAULT
_scoped: contextvars.ContextVar[Ops | None] = contextvars.ContextVar("attnzoo_ops", default=None)


def current() -> Ops:
    """The implementation in effect: the innermost ``use``, else the installed one."""
    return _scoped.get() or _installed


def install(ops: Ops) -> Ops:
    """Makes ``ops`` the process-wide implementation; returns the previous one."""
    global _installed
    previous, _installed = _installed, ops
    return previous


@contextlib.contextmanager
def use(ops: Ops) -> Iterator[Ops]:
    """Uses ``ops`` for what is traced inside the block (this thread and task only)."""
    token = _scoped.set(ops)
    try:
        yield ops
    finally:
        _scoped.reset(token)


def linear(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(eqn, x, w)`` for rows of ``x`` times a weight ``w``.

    Args:
      eqn: an einsum whose output keeps ``x``'s row labels and ``w``'s feature labels, e.g.
        ``"btd,dnh->btnh"`` (x: [B, T, D], w: [D, N, H] -> [B, T, N, H]).
    """
    return current().linear(eqn, x, w)


def linear_many(eqn: str, x: jax.Array, ws: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """``tuple(linear(eqn, x, w) for w in ws)``; the weights must have equal shapes."""
    return current().linear_many(eqn, x, ws)


def few_rows(enabled: bool = True) -> AbstractContextManager[None]:
    """Marks products traced inside as a few rows times loop-invariant weights.

    Decoding loops wrap their step in it. Pass ``enabled=False`` where the weights change
    inside the loop (a ``lax.scan`` over stacked layers), so no per-step weight copies are made.
    """
    return current().few_rows(enabled)
