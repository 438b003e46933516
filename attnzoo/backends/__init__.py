"""Backend-specific tuning, kept out of model code and switched on in one call.

Model code is plain JAX (``attnzoo.ops``: ``jnp.einsum`` by default). What buys speed on one
backend only lives here:

* ``cpu``: XLA:CPU dot layouts for training and decoding products (``cpu.enable()``).
* ``allocator``: glibc settings that stop XLA:CPU's per-step buffers from page-faulting.

``tune_for_platform()`` switches on what fits the platform JAX will run on; ``attnzoo-train``,
``attnzoo-generate``, ``attnzoo-translate``, ``attnzoo-eval`` and the benchmarks call it first
thing (``--nocpu_tuning`` opts out). Library users call it themselves, before their first
computation.
"""

from __future__ import annotations

from attnzoo.backends import allocator, cpu, memory

__all__ = ["allocator", "cpu", "memory", "tune_for_platform"]


def tune_for_platform(*, host_allocator: bool = True) -> str | None:
    """Switches on the tuning for the platform JAX will run on. Idempotent.

    Call it before JAX starts its backend (the first computation or ``jax.devices()``): the
    allocator setting reaches only threads that have not allocated yet.

    Args:
      host_allocator: on CPU, also tune glibc's allocator (``allocator.tune_host_allocator``).
    Returns:
      ``"cpu"`` when the CPU tuning was switched on; ``None`` on accelerators, where XLA picks
      dot layouts itself and nothing needs tuning.
    """
    if not allocator.runs_on_cpu():
        return None
    if host_allocator:
        allocator.tune_host_allocator()
    cpu.enable()
    return "cpu"
