"""``python -m benchmarks.accelerator --smoke``: JSON lines in the shared protocol + a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"peer", "task", "metric", "value", "unit", "params", "flops_per_token", "mfu"}


@pytest.fixture
def accelerator(monkeypatch):
    """``benchmarks.accelerator`` (benchmarks/ is run from the repository root, not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.accelerator

    return benchmarks.accelerator


@pytest.fixture(scope="module")
def smoke_output() -> str:
    env = {**os.environ, "PEAK_GFLOPS": "100"}  # a CPU has no table entry: give MFU a peak
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerator", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_smoke_prints_protocol_json_lines(smoke_output, accelerator):
    recs = [json.loads(line) for line in smoke_output.splitlines() if line.startswith("{")]
    for r in recs:
        assert FIELDS <= r.keys(), r
        assert r["peer"] == "attnzoo"
    by_task: dict[str, list[dict]] = {}
    for r in recs:
        by_task.setdefault(r["task"], []).append(r)
    assert set(by_task) == {"lm_train", "mt_train", "attention", "lm_generate"}
    for task in ("lm_train", "mt_train"):
        (r,) = by_task[task]
        assert r["unit"] == "tokens/s" and r["value"] > 0 and r["flops_per_token"] > 0
        # MFU = tokens/s x FLOPs/token / peak, with PEAK_GFLOPS=100
        assert r["mfu"] == pytest.approx(r["value"] * r["flops_per_token"] / 100e9, rel=1e-2)
    attn = by_task["attention"]
    paths = {(r["path"], r["T"]) for r in attn}
    smoke = accelerator.SMOKE["attention"]["lengths"]
    assert paths == {(p, T) for p in ("default", "einsum", "jax", "blockwise") for T in smoke}
    assert all(r["value"] > 0 and "error" not in r for r in attn)
    assert [r["batch"] for r in by_task["lm_generate"]] == [1, 2]
    assert all(r["value"] > 0 for r in by_task["lm_generate"])


def test_smoke_prints_a_markdown_table(smoke_output):
    lines = smoke_output.splitlines()
    start = lines.index("| task | metric | config | value | unit | MFU |")
    rows = [line for line in lines[start + 2 :] if line.startswith("|")]
    assert len(rows) == sum(1 for line in lines if line.startswith("{"))
    assert any(r.startswith("| lm_train |") and r.endswith("% |") for r in rows)
    assert any("| blockwise T=256 |" in r for r in rows)


def test_chip_peaks(accelerator):
    assert dict(accelerator.PEAK_TFLOPS)["h100"] == 989.0
    for kind, tflops in [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v4", 275.0),
    ]:
        found = next(t for key, t in accelerator.PEAK_TFLOPS if key in kind.lower())
        assert found == tflops, kind
