"""Runs attnzoo's benchmarks and the peers side by side and reports ratios.

The peers: PyTorch eager and ``torch.compile`` (``shared/bench/torch_peer.py``) and the Flax
Linen reference decoder (``benchmarks/flax_peer.py``, lm1b-style, for ``lm_train`` and
``lm_generate``).

    python -m benchmarks.run [--only lm_train,mt_train,lm_generate,attention,compile]
                             [--rounds 3] [--no-peers] [--markdown benchmarks/RESULTS.md]

The machine's float32 matmul peak is measured first (best library's median, as
``shared/bench/matmul_peak.py`` does) and exported as ``PEAK_GFLOPS`` so every record carries
MFU; it is measured again between tasks (the best library) and after them (all), and MFU is
against the highest reading. Each task runs ours and the peers alternately, ``--rounds``
times, each in a fresh process; the best round of each peer is kept (these machines are
shared and noisy: only ratios from one run are comparable). Every record is one JSON line,
also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
TASKS = ("lm_train", "mt_train", "lm_generate", "memory_floor", "attention", "compile")
OURS = {t: f"benchmarks.{t}" for t in TASKS}
PEER_TASKS = ("lm_train", "mt_train", "lm_generate")  # what torch_peer.py measures
FLAX_TASKS = ("lm_train", "lm_generate")  # what benchmarks/flax_peer.py measures
# The higher-is-better metric each task is compared on.
MAIN_METRIC = {
    "lm_train": "train_tokens_per_s",
    "mt_train": "train_tokens_per_s",
    "lm_generate": "gen_tokens_per_s",
}
TARGETS = {
    "lm_train": ("torch-eager", 1.1),
    "mt_train": ("torch-eager", 1.2),
    "lm_generate": ("flax-linen", 2.5),  # the 3,000 tokens/s = 2.5x the Flax reference
}
PEERS = ("attnzoo", "flax-linen", "torch-eager", "torch-eager+malloc", "torch-compile")
# attnzoo's CLIs and benchmarks keep freed memory in-process
# (attnzoo.backends.allocator.tune_host_allocator);
# the same glibc settings as environment variables, so the torch peer can be measured with them
# too ("torch-eager+malloc"): the ratio to the protocol's default-environment peer is the target,
# the ratio to this one shows what the allocator alone is worth to each framework.
PEER_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_MMAP_THRESHOLD_": str(2**25),
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    "MALLOC_TOP_PAD_": "0",
}


def _run(cmd: list[str], env: dict, timeout: int = 900) -> list[dict]:
    """Runs one benchmark process; returns its JSON-line records (errors become records)."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    try:
        out = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return [
            dict(
                peer="?",
                task=cmd[-1],
                metric="error",
                value=0.0,
                error=f"timed out after {timeout}s",
            )
        ]
    recs = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            recs.append(json.loads(line))
            print(line, flush=True)
    if out.returncode or not recs:
        recs.append(
            dict(
                peer="?",
                task=" ".join(cmd[-2:]),
                metric="error",
                value=0.0,
                error=out.stderr[-800:],
            )
        )
        print(out.stderr[-2000:], file=sys.stderr)
    return recs


def measure_peak(env: dict, libs: tuple[str, ...] = ("jax", "numpy", "torch")) -> tuple[float, str]:
    """Best median float32 matmul GFLOP/s over ``libs`` (2048^3), and the library that got it."""
    best, best_lib = 0.0, libs[0]
    for lib in libs:
        if SHARED.exists():
            recs = _run([sys.executable, str(SHARED / "matmul_peak.py"), lib, "float32"], env)
        else:
            recs = _run([sys.executable, "-m", "benchmarks.matmul_peak", lib], env)
        for r in recs:
            if r.get("metric") == "gflops_median" and r["value"] > best:
                best, best_lib = r["value"], lib
    return best, best_lib


def with_peak(records: list[dict], peak: float) -> list[dict]:
    """The records with MFU recomputed against ``peak`` GFLOP/s."""
    out = []
    for r in records:
        if r.get("flops_per_token") and r.get("unit") == "tokens/s":
            r = dict(r, mfu=round(r["value"] * r["flops_per_token"] / (peak * 1e9), 4))
            r["peak_gflops"] = round(peak, 1)
        out.append(r)
    return out


def _best(records: list[dict], peer: str, task: str) -> dict | None:
    metric = MAIN_METRIC.get(task)
    cands = [
        r
        for r in records
        if r.get("peer") == peer and r.get("task") == task and r.get("metric") == metric
    ]
    return max(cands, key=lambda r: r["value"]) if cands else None


def markdown(records: list[dict], peak: float, tasks: list[str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        f"One side-by-side run, {now}, on `{platform.node()}` ({os.cpu_count()} CPUs), float32.",
        f"Measured float32 matmul peak (best library median, the highest of the readings "
        f"before, between and after the tasks): **{peak:.1f} GFLOP/s**; MFU is against it. "
        "Produced by `make bench` (`python -m benchmarks.run`); raw records in "
        "`benchmarks/results.jsonl`. Only ratios within one run are comparable. "
        "`torch-eager+malloc` is the same PyTorch peer run with the glibc settings that "
        "attnzoo applies to itself (`attnzoo.backends.allocator`), for reference; "
        "targets are against the protocol's peer in its default environment. `flax-linen` is "
        "the Flax reference decoder (`benchmarks/flax_peer.py`, written as Flax's lm1b example).",
        "",
        "| task | peer | value | unit | MFU | ratio attnzoo / peer | target |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for task in tasks:
        if task not in MAIN_METRIC:
            continue
        ours = _best(records, "attnzoo", task)
        for peer in PEERS:
            r = _best(records, peer, task)
            if r is None:
                continue
            ratio = ""
            if peer != "attnzoo" and ours is not None:
                ratio = f"{ours['value'] / r['value']:.2f}x"
            tgt = TARGETS.get(task)
            target = f">= {tgt[1]}x" if tgt and tgt[0] == peer else ""
            if task == "lm_generate" and peer == "attnzoo":
                target = ">= 3000 tokens/s"
            if task == "lm_train" and peer == "torch-compile":
                target = ">= 1.0x"
            mfu = "" if r.get("mfu") is None else f"{r['mfu']:.2f}"
            lines.append(
                f"| {task} | {peer} | {r['value']:,.0f} | {r['unit']} | {mfu} | "
                f"{ratio} | {target} |"
            )
    other = [
        r
        for r in records
        if r.get("task") in ("memory_floor", "attention", "compile") and r.get("peer") == "attnzoo"
    ]
    if other:
        lines += ["", "| task | metric | value | unit | details |", "|---|---|---:|---|---|"]
        for r in other:
            details = ", ".join(
                f"{k}={v}"
                for k, v in r.items()
                if k
                not in (
                    "peer",
                    "task",
                    "metric",
                    "value",
                    "unit",
                    "params",
                    "flops_per_token",
                    "mfu",
                    "peak_gflops",
                )
            )
            lines.append(
                f"| {r['task']} | {r['metric']} | {r['value']} | {r['unit']} | {details} |"
            )
    errors = [r for r in records if r.get("metric") == "error"]
    if errors:
        lines += ["", "Errors:", ""] + [
            f"- {r.get('task')}: {r.get('error', '')[:300]}" for r in errors
        ]
    return "\n".join(lines) + "\n"


def kept_sections(old: str) -> str:
    """What follows this script's table in the results file being rewritten, kept after the
    new table: everything from the first ``## `` heading or ``<!-- `` marker line on (sections
    that benchmarks ``make bench`` does not run write: the fault soak, ``benchmarks.sharding``,
    ``benchmarks.positions``)."""
    m = re.search(r"^(## |<!-- )", old, re.MULTILINE)
    return "" if m is None else "\n" + old[m.start() :]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-peers", action="store_true", help="run only attnzoo")
    p.add_argument("--no-compile-peer", action="store_true", help="skip torch.compile")
    p.add_argument("--markdown", default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    if not args.no_peers and not SHARED.exists():
        print(f"note: {SHARED} not found, running attnzoo only", file=sys.stderr)
        args.no_peers = True

    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    first, lib = measure_peak(env)
    env["PEAK_GFLOPS"] = f"{first:.1f}"
    peaks = [first]
    records: list[dict] = []
    peer = [sys.executable, str(SHARED / "torch_peer.py")]
    for task in tasks:
        if task != tasks[0]:
            peaks.append(measure_peak(env, (lib,))[0])  # ~4 s
        for rnd in range(args.rounds if task in PEER_TASKS else 1):
            records += _run([sys.executable, "-m", OURS[task]], env)
            if args.no_peers or task not in PEER_TASKS:
                continue
            if task in FLAX_TASKS:
                records += _run([sys.executable, "-m", "benchmarks.flax_peer", task], env)
            if task != "lm_generate" or rnd == 0:  # torch generates without a cache: slow
                records += _run(peer + [task], env)
            if task != "lm_generate":
                recs = _run(peer + [task], {**env, **PEER_MALLOC_ENV})
                records += [dict(r, peer="torch-eager+malloc") for r in recs]
            # torch.compile spends ~45 s compiling per process: one round is enough, and none
            # for lm_generate, where the peer has no KV cache to compile (~120 tokens/s either way)
            if not args.no_compile_peer and rnd == 0 and task != "lm_generate":
                records += _run(peer + [task, "--compile"], env)
    # The peak again between tasks and at the end (all libraries): a neighbour's burst during
    # one measurement would otherwise inflate every MFU of the run (runs read 136 and 141
    # GFLOP/s at their start against ~180 on quiet minutes).
    peaks.append(measure_peak(env)[0])
    peak = max(peaks)
    print(f"float32 matmul peak readings (GFLOP/s): {', '.join(f'{p:.1f}' for p in peaks)}")
    records = with_peak(records, peak)
    with open(ROOT / "benchmarks" / "results.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    md = markdown(records, peak, tasks)
    print(md)
    if args.markdown:
        path = pathlib.Path(args.markdown)
        path.write_text(md + kept_sections(path.read_text() if path.exists() else ""))


if __name__ == "__main__":
    main()
