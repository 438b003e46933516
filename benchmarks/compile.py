"""compile: first-step compile seconds of lm_train (4 layers) and of a 24-layer scanned model.

Compile time is what users wait for before the first step; scanning over layers keeps it
roughly independent of depth. Usage: python -m benchmarks.compile
"""

from __future__ import annotations

import time

import jax

from attnzoo import backends
from benchmarks import lm_train
from benchmarks.protocol import LM, emit


def compile_seconds(cfg) -> float:
    step, params, opt_state = lm_train.make_step(cfg)
    x = jax.random.randint(jax.random.key(1), (LM["batch"], LM["seq"] + 1), 0, LM["vocab"])
    t0 = time.perf_counter()
    step.lower(params, opt_state, x[:, :-1], x[:, 1:]).compile()
    return time.perf_counter() - t0


def main() -> None:
    for name, cfg in (
        ("lm_train_4_layers", lm_train.config()),
        ("scan_2_layers", lm_train.config(2, scan_layers=True)),
        ("scan_24_layers", lm_train.config(24, scan_layers=True)),
        ("unrolled_24_layers", lm_train.config(24, scan_layers=False)),
    ):
        emit(
            "attnzoo",
            "compile",
            "compile_s",
            compile_seconds(cfg),
            "s",
            extra=dict(
                model=name, n_layers=cfg.n_layers, scan_layers=getattr(cfg, "scan_layers", False)
            ),
        )


if __name__ == "__main__":
    backends.tune_for_platform()  # as the CLIs do; before the backend starts
    main()
