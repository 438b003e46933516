"""Rematerialisation (activation checkpointing) of Transformer blocks by named policy.

A block's backward pass needs the activations of its forward pass. ``remat_policy`` says which
of them each block keeps; the rest are recomputed in the backward pass (``jax.checkpoint``):

=====================================  ==============================================
``"none"``                             no remat: every activation is kept (fastest)
``"full"``                             keep only each block's input; recompute the rest
``"dots_saveable"``                    keep every matmul output (incl. attention scores)
``"dots_with_no_batch_dims_saveable"`` keep the weight matmuls' outputs, recompute the
                                       attention scores/probabilities and nonlinearities
``"offload"``                          as the previous, but the kept values live in host
                                       memory (``pinned_host``) between the passes
=====================================  ==============================================

JAX's own names ``"nothing_saveable"`` (= ``"full"``) and ``"everything_saveable"`` are
accepted too. The legacy ``remat=True`` with ``remat_policy="none"`` means
``"dots_with_no_batch_dims_saveable"`` (``ModelConfig.effective_remat_policy``).

The model does what its policy says on every backend. Two backend details live in
the backend layer (``backends/memory.py``) and are applied where the train step is compiled
(``attnzoo.training.experiment``): XLA:CPU needs its memory-optimising scheduler for remat to
save memory in unrolled stacks, and ``"offload"`` needs a device with a separate host memory
(elsewhere training falls back to ``"dots_with_no_batch_dims_saveable"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "offload",
    "nothing_saveable",
    "everything_saveable",
)

# The legacy ``remat=True`` without a policy.
LEGACY_POLICY = "dots_with_no_batch_dims_saveable"


def check_remat_policy(name: str) -> None:
    """Raises a ``ValueError`` naming the valid policies unless ``name`` is one."""
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"unknown remat_policy {name!r}; valid: {', '.join(REMAT_POLICIES)} "
            "(set config.remat_policy / --config.model_overrides.remat_policy)"
        )


def effective_policy(remat: bool, policy: str) -> str:
    """The policy a config's ``remat`` and ``remat_policy`` select (``"none"``: no remat).

    ``remat_policy`` decides; the legacy switch ``remat=True`` only matters when the policy is
    ``"none"``, and then means ``LEGACY_POLICY``.
    """
    check_remat_policy(policy)
    if policy == "none" and remat:
        return LEGACY_POLICY
    return policy


def checkpoint_policy(name: str) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy of ``name``; ``None`` for ``"none"`` (no remat at all).

    ``"offload"`` is ``jax.checkpoint_policies.offload_dot_with_no_batch_dims`` from
    ``"device"`` to ``"pinned_host"`` memory; it compiles only where the device has such a
    memory (``supports_host_offload`` in ``backends/memory.py``).
    """
    check_remat_policy(name)
    policies = jax.checkpoint_policies
    if name == "none":
        return None
    if name in ("full", "nothing_saveable"):
        return policies.nothing_saveable
    if name == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return getattr(policies, name)
