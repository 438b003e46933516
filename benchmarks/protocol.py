"""The shared benchmark protocol: shapes, FLOP formulas and the JSON-line record.

Mirrors ``shared/bench/common.py`` (the peers' side) so results compare as ratios; kept here so
the suite runs from a clone that lacks ``shared/``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

LM = dict(
    vocab=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq=256, batch=8, prompt=16, gen=128
)
MT = dict(
    vocab=8192,
    d_model=256,
    enc_layers=3,
    dec_layers=3,
    n_heads=4,
    d_ff=1024,
    src=128,
    tgt=128,
    batch=16,
)
LR = 3e-4


def lm_flops_per_token(c: dict = LM) -> tuple[int, int]:
    """6N + 12 L d T, N = per-layer 4d^2 + 2 d d_ff matmul weights plus the d V output head."""
    d, L, f, V, T = c["d_model"], c["n_layers"], c["d_ff"], c["vocab"], c["seq"]
    n = L * (4 * d * d + 2 * d * f) + d * V
    return 6 * n + 12 * L * d * T, n


def mt_flops_per_tgt_token(c: dict = MT) -> tuple[int, int]:
    """6N + 12 d (Le S + Ld T + Ld S) per target token (S == T)."""
    d, Le, Ld, f, V = c["d_model"], c["enc_layers"], c["dec_layers"], c["d_ff"], c["vocab"]
    S, T = c["src"], c["tgt"]
    n = Le * (4 * d * d + 2 * d * f) + Ld * (8 * d * d + 2 * d * f) + d * V
    return 6 * n + 12 * d * (Le * S + Ld * T + Ld * S), n


def peak_flops() -> float | None:
    v = os.environ.get("PEAK_GFLOPS")
    return float(v) * 1e9 if v else None


def first_call(fn: Callable, sync=lambda r: r):
    """Runs ``fn`` once (the call that compiles) -> (its result, seconds it took)."""
    t0 = time.perf_counter()
    out = sync(fn())
    return out, time.perf_counter() - t0


def timeit(fn: Callable, warmup: int = 3, iters: int = 10, sync=lambda r: r):
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def emit(
    peer: str,
    task: str,
    metric: str,
    value: float,
    unit: str,
    params=None,
    flops_per_token=None,
    extra: dict | None = None,
) -> dict:
    """Prints one JSON line in the shared format and returns it."""
    pk = peak_flops()
    mfu = None
    if flops_per_token and pk and unit == "tokens/s":
        mfu = round(value * flops_per_token / pk, 4)
    rec = dict(
        peer=peer,
        task=task,
        metric=metric,
        value=round(value, 2),
        unit=unit,
        params=params,
        flops_per_token=flops_per_token,
        mfu=mfu,
    )
    if pk:
        rec["peak_gflops"] = round(pk / 1e9, 1)
    rec.update(extra or {})
    print(json.dumps(rec), flush=True)
    return rec
