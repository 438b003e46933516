"""What remat needs from the backend to save memory: compiler options and host offload.

* **XLA:CPU schedules for concurrency by default**, and that scheduler hoists the recomputation
  of a rematerialised block next to its forward pass, so an unrolled stack
  (``scan_layers=False``) kept its full activation memory under every policy
  (``benchmarks/README.md``, "Remat"). ``remat_compiler_options`` selects XLA:CPU's
  memory-optimising scheduler instead; ``attnzoo.training.experiment`` jits the train step with
  it.
* **Host offload** (``remat_policy="offload"``) needs a device with a separate
  ``pinned_host`` memory (GPU, TPU). CPU devices list one too, but it is the same RAM, so
  ``training_remat_policy`` falls back to ``"dots_with_no_batch_dims_saveable"`` there (the
  same values kept, in place) and logs that it did.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

_CPU_MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_OFFLOAD_FALLBACK = "dots_with_no_batch_dims_saveable"
_warned_offload_fallback = False


def supports_host_offload(device: Any = None) -> bool:
    """Whether ``device`` (default: the first) has a host memory apart from its own."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return False
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # a backend without memory kinds
        return False
    return "pinned_host" in kinds


def training_remat_policy(policy: str, *, device: Any = None) -> str:
    """``policy``, or its in-place fallback where ``"offload"`` has no host memory to go to
    (logged once)."""
    global _warned_offload_fallback
    if policy != "offload" or supports_host_offload(device):
        return policy
    if not _warned_offload_fallback:
        _warned_offload_fallback = True
        logging.warning(
            "remat_policy='offload' needs a device with separate host memory (GPU/TPU); on "
            "%s it falls back to %r (the same values kept, on the device). Set remat_policy "
            "to silence this.",
            (device or jax.devices()[0]).platform,
            _OFFLOAD_FALLBACK,
        )
    return _OFFLOAD_FALLBACK


def remat_compiler_options(policy: str, backend: str | None = None) -> dict[str, Any] | None:
    """``jax.jit(..., compiler_options=...)`` that let remat ``policy`` save memory on
    ``backend`` (default: JAX's default backend); ``None`` when nothing is needed."""
    backend = jax.default_backend() if backend is None else backend
    if policy == "none" or backend != "cpu":
        return None
    return dict(_CPU_MEMORY_SCHEDULER)
