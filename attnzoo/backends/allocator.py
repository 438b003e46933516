"""Host allocator tuning for CPU jobs: keep XLA's per-step buffers out of the page-fault path.

XLA:CPU allocates a fresh temporary buffer for every run of a compiled program and frees it
afterwards; glibc serves large blocks with ``mmap``, so every step faults all of it back in.
Keeping freed memory inside the process (one arena, no mmap, no trimming) lets the next step
reuse the mapped pages, as ``LD_PRELOAD``-ing tcmalloc does for other frameworks, with glibc's
own ``mallopt``. Numerics are untouched; the numbers are in ``benchmarks/README.md``
("Where each CPU measure lives").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = (
    # XLA's worker threads would otherwise get arenas of their own, and those serve any block
    # over 64 MB with mmap whatever the thresholds say.
    (_M_ARENA_MAX, 1),
    (_M_MMAP_MAX, 0),  # big blocks come from the heap and go back to it
    (_M_MMAP_THRESHOLD, 2**25),  # glibc's maximum (32 MiB on 64-bit)
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # freed heap stays mapped for the next step
    (_M_TOP_PAD, 0),  # measured: with glibc's default pad ~11k faults per step remain
)
_ACCELERATOR_DISTRIBUTIONS = ("libtpu", "jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")

_tuned: bool | None = None


def accelerator_plugin_installed() -> bool:
    """Whether a TPU or GPU runtime for JAX is installed (JAX would then not run on the CPU)."""
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().startswith(_ACCELERATOR_DISTRIBUTIONS) for n in names)


def runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting a backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugin_installed()


def tune_host_allocator(*, only_on_cpu: bool = True) -> bool:
    """Makes glibc keep and reuse large freed blocks instead of unmapping them. Idempotent.

    Call it before JAX starts its backend (before the first computation or ``jax.devices()``):
    the single-arena setting reaches only threads that have not allocated yet, and XLA creates
    its worker threads with the backend. ``attnzoo.backends.tune_for_platform()`` calls it
    (the CLIs and benchmarks, first thing).

    Args:
      only_on_cpu: leave the allocator alone when JAX will run on an accelerator (there the
        device allocator handles step buffers, and host threads are better off with their own
        arenas).
    Returns:
      Whether the allocator was tuned: ``False`` off glibc Linux (macOS, musl), on accelerator
      hosts with ``only_on_cpu``, or when the environment already sets ``MALLOC_ARENA_MAX``
      (the user's choice wins).

    The cost is memory held rather than returned to the OS: the process keeps its high-water
    mark of heap for reuse, which is what a training job does with it anyway.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    if only_on_cpu and not runs_on_cpu():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = [mallopt(param, value) == 1 for param, value in _SETTINGS]  # apply them all
    _tuned = all(accepted)
    return _tuned
