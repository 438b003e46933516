"""Checkpoint averaging (Vaswani et al. 2017, section 6.1): the mean of the last N checkpoints.

"For the base models, we used a single model obtained by averaging the last 5 checkpoints,
which were written at 10-minute intervals. For the big models, we averaged the last 20."

``average_trees`` is the element-wise mean of float leaves (accumulated in float32, or float64
when JAX runs with ``jax_enable_x64``; cast back to each leaf's dtype); ``average_checkpoints``
streams the params of a workdir's last N checkpoints through it, holding one checkpoint and
the running sum at a time. ``attnzoo-eval --average_last N`` and ``attnzoo-translate
--average_last N`` evaluate the average; ``config.average_last = N`` makes training report
it at the end (``avg_eval_*`` metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["average_checkpoints", "average_trees", "last_steps"]


def _accumulator_dtype() -> Any:
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def average_trees(trees: Iterable[Any]) -> Any:
    """The element-wise mean of pytrees of the same structure.

    Floating-point leaves are summed in float32 (float64 with ``jax_enable_x64``), divided by
    the count and cast back to their own dtype, so bfloat16 params average without rounding
    at every addition. Other leaves (integer counters, keys) must be equal in every tree; the
    first tree's are kept.

    Args:
      trees: one or more pytrees (e.g. ``nnx.State`` params), consumed one at a time.
    Returns:
      A pytree like the first, each float leaf ``sum(leaf_i) / n`` (its original dtype and
      sharding kept by ``jnp`` ops).
    Raises:
      ValueError: no trees, trees of different structures or shapes, or non-float leaves that
        differ.
    """
    acc_dtype = _accumulator_dtype()
    total: list[Any] | None = None
    first: list[Any] = []
    treedef = None
    n = 0
    for tree in trees:
        leaves, this_def = jax.tree.flatten(tree)
        if treedef is None:
            treedef, first = this_def, leaves
            total = [
                jnp.asarray(x, acc_dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                else x
                for x in leaves
            ]  # fmt: skip
            n = 1
            continue
        assert total is not None
        if this_def != treedef:
            raise ValueError(
                f"cannot average pytrees of different structures (tree {n + 1} differs from the "
                "first): average checkpoints of the same model config"
            )
        for i, (x, ref) in enumerate(zip(leaves, first, strict=True)):
            if jnp.shape(x) != jnp.shape(ref):
                raise ValueError(
                    f"leaf {i} of tree {n + 1} has shape {jnp.shape(x)}, the first tree's "
                    f"{jnp.shape(ref)}: average checkpoints of the same model config"
                )
            if jnp.issubdtype(jnp.result_type(ref), jnp.floating):
                total[i] = total[i] + jnp.asarray(x, acc_dtype)
            elif not bool(jnp.array_equal(x, ref)):
                raise ValueError(
                    f"non-float leaf {i} differs between tree 1 and tree {n + 1}: only "
                    "floating-point leaves can be averaged"
                )
        n += 1
    if treedef is None or total is None:
        raise ValueError("average_trees needs at least one pytree, got none")
    out = [
        (t / n).astype(jnp.result_type(ref))
        if jnp.issubdtype(jnp.result_type(ref), jnp.floating)
        else ref
        for t, ref in zip(total, first, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def last_steps(steps: Sequence[int], n: int, *, where: str = "the workdir") -> list[int]:
    """The ``n`` newest of the checkpoint ``steps`` (oldest first).

    Raises:
      ValueError: ``n < 1``, or fewer than ``n`` checkpoints (the message names them and the
        fix: keep more with ``config.keep_checkpoints``, or lower N).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of checkpoints to average must be an integer >= 1, got {n!r}")
    ordered = sorted(steps)
    if len(ordered) < n:
        raise ValueError(
            f"averaging the last {n} checkpoints needs {n}, but {where} has {len(ordered)} "
            f"(steps {ordered or 'none'}): lower the number, or train with "
            f"config.keep_checkpoints >= {n} (config.average_last={n} raises it itself)"
        )
    return ordered[-n:]


def average_checkpoints(ckpt: Any, abstract_params: Any, n: int) -> tuple[list[int], Any]:
    """The mean params of the last ``n`` checkpoints of ``ckpt``.

    Args:
      ckpt: an open ``attnzoo.training.checkpoint.Checkpoints`` (read-only is enough).
      abstract_params: the params pytree as ``jax.ShapeDtypeStruct`` leaves (shapes, dtypes,
        target shardings), as for ``Checkpoints.restore_params``.
      n: how many of the newest checkpoints to average (``last_steps``).
    Returns:
      (the steps averaged, oldest first; the averaged params, laid out as ``abstract_params``).
    Raises:
      ValueError: fewer than ``n`` checkpoints, or one of them unreadable (named).
    """
    steps = last_steps(ckpt.steps(), n, where=str(ckpt.directory))

    def params_of_each():
        for s in steps:
            _, params, _ = ckpt.restore_params(abstract_params, s)
            yield params

    return steps, average_trees(params_of_each())
