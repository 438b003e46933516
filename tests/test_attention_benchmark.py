"""`python -m benchmarks.attention`: the JSON-line records it prints, on tiny lengths."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIELDS = {"peer", "task", "metric", "value", "unit", "path", "T", "peak_bytes"}


def test_records_and_memory_prediction():
    cmd = [sys.executable, "-m", "benchmarks.attention", "--lengths", "64", "--long", "4096"]
    run = subprocess.run(
        [*cmd, "--iters", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
    )
    records = [json.loads(line) for line in run.stdout.splitlines()]
    short = [r for r in records if r["T"] == 64]
    assert [r["path"] for r in short] == ["naive", "einsum", "jax", "blockwise"]
    for r in records:
        assert FIELDS <= r.keys()
        assert (r["peer"], r["task"], r["unit"]) == ("attnzoo", "attention", "s")
        assert r["peak_bytes"] > 0
        assert (r["value"] is not None) == r["ran"]
    assert all(r["ran"] and r["value"] > 0 for r in short)
    long = {r["path"]: r for r in records if r["T"] == 4096}
    assert long["blockwise"]["ran"] and not long["naive"]["ran"]
    # The naive path holds [T, T] float32 logits and weights: more than 2 * 4096^2 * 4 bytes.
    assert long["naive"]["peak_bytes"] > 2 * 4096 * 4096 * 4 > 10 * long["blockwise"]["peak_bytes"]
