"""memory_floor: how fast one decode-step matmul can stream its weight on this machine.

A generated token reads every weight once (``[8, d] x [d, out]`` products), so the step is bound
by memory bandwidth, not FLOPs. This times the lm_generate head's shape, an 8 MiB
``[8192, 256]`` weight against 8 rows, as the weight-stationary dot the decoder uses, inside a
``fori_loop`` in two settings:

* ``l3_hot``: the loop reuses two weights (16 MiB), which stay in the 32 MiB L3;
* ``dram``: it cycles through four (32 MiB plus the rest of the process), so every step streams
  from DRAM, as the real decode step does (its weights + KV cache are ~30 MiB).

Usage: python -m benchmarks.memory_floor
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.protocol import emit

ROWS, D, V, STEPS = 8, 256, 8192, 64


def _loop(n_weights: int):
    @jax.jit
    def run(h, *ws):
        def body(_, h):  # h: [D, ROWS]; each dot reads one [V, D] weight
            for w in ws:
                y = jnp.einsum("vd,dr->vr", w, h)  # (V, ROWS)
                h = jnp.tanh(y.reshape(V // D, D, ROWS).sum(0))  # (D, ROWS), uses all of y
            return h

        return jax.lax.fori_loop(0, STEPS, body, h)

    return run


def main(peer: str = "attnzoo") -> list[dict]:
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((V, D), np.float32) / D) for _ in range(4)]
    h = jnp.asarray(rng.standard_normal((D, ROWS), np.float32))
    out = []
    for name, n in (("l3_hot", 2), ("dram", 4)):
        run = _loop(n)
        jax.block_until_ready(run(h, *ws[:n]))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(run(h, *ws[:n]))
            ts.append((time.perf_counter() - t0) / (STEPS * n))
        s = float(np.median(ts))
        out.append(
            emit(
                peer,
                "memory_floor",
                f"weight_gb_per_s_{name}",
                V * D * 4 / s / 1e9,
                "GB/s",
                V * D,
                None,
                dict(dot_ms=round(s * 1e3, 3), rows=ROWS, weight_mib=V * D * 4 / 2**20),
            )
        )
    return out


if __name__ == "__main__":
    main()
