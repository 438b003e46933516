"""Float32 matmul peak (2048^3) for a clone without ``shared/bench``.

Usage: python -m benchmarks.matmul_peak {jax|numpy}
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks.protocol import emit


def main(lib: str = "jax", n: int = 2048, iters: int = 20) -> None:
    if lib == "jax":
        import jax

        a = jax.random.normal(jax.random.key(0), (n, n))
        b = jax.random.normal(jax.random.key(1), (n, n))
        f = jax.jit(lambda x, y: x @ y)
        run = lambda: f(a, b).block_until_ready()
    elif lib == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        run = lambda: a @ b
    else:
        raise SystemExit(f"unknown library {lib!r}; valid: jax, numpy")
    for _ in range(3):
        run()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    emit(
        "matmul-" + lib,
        f"matmul_{n}_float32",
        "gflops_median",
        2 * n**3 / statistics.median(ts) / 1e9,
        "GFLOP/s",
    )


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["jax"]))
