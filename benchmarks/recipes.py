"""Recorded results of the two ~30-minute recipes: test BLEU and validation loss against minutes.

    attnzoo-train --config attnzoo:mt_bible --workdir runs/mt_bible
    attnzoo-train --config attnzoo:lm_shakespeare --workdir runs/lm_shakespeare
    python -m benchmarks.recipes       # evaluates their checkpoints; writes the section + plot

The recipes keep every 500th checkpoint (``config.keep_every``). For the translator, each kept
checkpoint is scored with ``attnzoo-eval --split test --max_sentences 678 --step S`` (the whole
test split: Mark, 678 verses; beam 4, alpha 0.6, sacreBLEU 13a), and the final step once more
with ``--average_last 5`` (the paper's checkpoint averaging). For the LM, the curve is the
validation (Hamlet) loss that training logged every 500 steps, and the final number is
``attnzoo-eval --average_last 5`` on the whole validation split, plus a sample for the README.
Minutes are training wall-clock (``train_elapsed_s`` in ``metrics.jsonl``), evaluation not
included.

Outputs, in ``--out`` (default ``benchmarks/``): ``recipes.jsonl`` (one JSON line per
evaluated point; a rerun reuses them, ``--force`` recomputes), ``recipes.png``, and the
section of ``--markdown`` (default ``benchmarks/RESULTS.md``) between ``<!-- recipes:begin
-->`` and ``<!-- recipes:end -->`` (``make bench`` keeps it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any

from benchmarks.positions import replace_section as _replace_between

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
MT_TEST_SENTENCES = 678  # the whole test split (Mark)
AVERAGE_LAST = 5
KEEP_EVERY = 500  # the recipes' config.keep_every: the points of the curve
LM_PROMPT = "ROMEO:"


def _bin(name: str) -> str:
    """The CLI next to this interpreter (the venv's), else the one on PATH."""
    local = pathlib.Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def run_json(cmd: list[str]) -> dict[str, Any]:
    """Runs an attnzoo CLI and returns its last stdout line, parsed as JSON."""
    print("recipes: $ " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"recipes: {shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_text(cmd: list[str]) -> str:
    """Runs an attnzoo CLI and returns its stdout."""
    print("recipes: $ " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"recipes: {shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The steps saved under ``workdir/checkpoints``."""
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def elapsed_seconds(workdir: pathlib.Path) -> dict[int, float]:
    """``{step: training seconds}`` from ``metrics.jsonl``; runs older than ``train_elapsed_s``
    get ``summary.json``'s seconds spread evenly over the steps."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    out = {r["step"]: r["train_elapsed_s"] for r in rows if "train_elapsed_s" in r}
    if out:
        return out
    summary = json.loads((workdir / "summary.json").read_text())
    steps = max(r["step"] for r in rows)
    return {r["step"]: summary["seconds"] * r["step"] / steps for r in rows}


def _minutes(elapsed: dict[int, float], step: int) -> float:
    known = min(elapsed, key=lambda s: abs(s - step))
    return elapsed[known] * step / known / 60 if known else 0.0


def mt_points(
    workdir: pathlib.Path, cache: dict[tuple, dict], *, every: int = KEEP_EVERY
) -> list[dict]:
    """Test BLEU at the checkpoints of steps that are multiples of ``every`` and at the final
    one, and of the mean of the last 5 at the final step."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise SystemExit(f"recipes: no checkpoints in {workdir}: train it first")
    elapsed = elapsed_seconds(workdir)
    final = steps[-1]
    kept = [s for s in steps if s % every == 0 or s == final]
    points = []
    for step, average in [(s, False) for s in kept] + [(final, True)]:
        key = ("mt", str(workdir), step, average)
        if key not in cache:
            cmd = [_bin("attnzoo-eval"), "--workdir", str(workdir), "--split", "test"]
            cmd += ["--max_sentences", str(MT_TEST_SENTENCES), "--step", str(step)]
            cmd += ["--average_last", str(AVERAGE_LAST)] if average else []
            r = run_json(cmd)
            cache[key] = {
                "recipe": "mt",
                "workdir": str(workdir),
                "step": step,
                "averaged": average,
                "minutes": _minutes(elapsed, step),
                "bleu": r["bleu"],
                "bleu_signature": r["bleu_signature"],
                "test_loss": r["nll_per_token"],
                "command": shlex.join(["attnzoo-eval", *cmd[1:]]),
            }
        points.append(cache[key])
    return points


def lm_points(workdir: pathlib.Path, cache: dict[tuple, dict]) -> list[dict]:
    """Validation loss logged during training, and of the mean of the last 5 checkpoints."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    elapsed = elapsed_seconds(workdir)
    points = [
        {
            "recipe": "lm",
            "workdir": str(workdir),
            "step": r["step"],
            "averaged": False,
            "minutes": _minutes(elapsed, r["step"]),
            "val_loss": r["eval_loss"],
            "command": "logged by attnzoo-train (eval_loss, config.eval_batches batches)",
        }
        for r in rows
        if "eval_loss" in r
    ]
    final = checkpoint_steps(workdir)[-1]
    key = ("lm", str(workdir), final, True)
    if key not in cache:
        cmd = [_bin("attnzoo-eval"), "--workdir", str(workdir), "--average_last", str(AVERAGE_LAST)]
        r = run_json(cmd)
        gen = [_bin("attnzoo-generate"), "--workdir", str(workdir), "--prompt", LM_PROMPT]
        gen += ["--max_new_tokens", "400", "--sampler", "top_k", "--top_k", "40"]
        gen += ["--temperature", "0.8", "--seed", "0"]
        sample = run_text(gen)
        cache[key] = {
            "recipe": "lm",
            "workdir": str(workdir),
            "step": final,
            "averaged": True,
            "minutes": _minutes(elapsed, final),
            "val_loss": r["nll_per_token"],
            "val_tokens": r["tokens"],
            "command": shlex.join(["attnzoo-eval", *cmd[1:]]),
            "sample": sample.strip(),
            "sample_command": shlex.join(["attnzoo-generate", *gen[1:]]),
        }
    return [*points, cache[key]]


def _train_minutes(workdir: pathlib.Path) -> float:
    return json.loads((workdir / "summary.json").read_text())["seconds"] / 60


def markdown(mt: list[dict], lm: list[dict], mt_dir: pathlib.Path, lm_dir: pathlib.Path) -> str:
    """The section: commands, one table per recipe, the plot."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Recipes: 30 minutes of training on 2 CPU cores",
        "",
        f"`python -m benchmarks.recipes`, {when} on `{platform.node()}` ({os.cpu_count()} "
        "CPUs), after the two training commands below (float32). Minutes are training "
        "wall-clock at that step (evaluation excluded).",
    ]
    if mt:
        avg = next(p for p in mt if p["averaged"])
        lines += [
            "",
            f"**Translation** (`configs/mt_bible.py`, Bible En->Es): `attnzoo-train --config "
            f"attnzoo:mt_bible --workdir {mt_dir}`, {_train_minutes(mt_dir):.1f} min of "
            "training. BLEU on the whole test split (Mark, 678 verses), beam 4, alpha 0.6; "
            f"sacreBLEU signature `{avg['bleu_signature']}`.",
            "",
            "| step | minutes | checkpoint | test BLEU | test loss | command |",
            "|---:|---:|---|---:|---:|---|",
        ]
        for p in mt:
            what = f"mean of last {AVERAGE_LAST}" if p["averaged"] else "single"
            lines.append(
                f"| {p['step']} | {p['minutes']:.1f} | {what} | {p['bleu']:.2f} | "
                f"{p['test_loss']:.3f} | `{p['command']}` |"
            )
    if lm:
        avg = next(p for p in lm if p["averaged"])
        lines += [
            "",
            f"**Language model** (`configs/lm_shakespeare.py`, bytes): `attnzoo-train --config "
            f"attnzoo:lm_shakespeare --workdir {lm_dir}`, {_train_minutes(lm_dir):.1f} min of "
            "training. Validation is Hamlet; loss in nats per byte.",
            "",
            "| step | minutes | checkpoint | validation loss | measured by |",
            "|---:|---:|---|---:|---|",
        ]
        for p in lm:
            what = f"mean of last {AVERAGE_LAST}" if p["averaged"] else "single"
            lines.append(
                f"| {p['step']} | {p['minutes']:.1f} | {what} | {p['val_loss']:.4f} | "
                f"`{p['command']}` |"
            )
        lines += ["", f"Sample (`{avg['sample_command']}`):", "", "```text", avg["sample"], "```"]
    lines += ["", "![the recipes' curves](recipes.png)"]
    return "\n".join(lines) + "\n"


def plot(mt: list[dict], lm: list[dict], path: pathlib.Path) -> bool:
    """BLEU and validation loss against minutes; False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("recipes: matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, (ax_mt, ax_lm) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, points, key, label, target in (
        (ax_mt, mt, "bleu", "test BLEU (Mark, beam 4)", 28.0),
        (ax_lm, lm, "val_loss", "validation loss (nats/byte, Hamlet)", 1.55),
    ):
        single = [p for p in points if not p["averaged"]]
        ax.plot(
            [p["minutes"] for p in single],
            [p[key] for p in single],
            marker="o",
            label="one checkpoint",
        )
        for p in points:
            if p["averaged"]:
                ax.plot(
                    p["minutes"],
                    p[key],
                    marker="*",
                    markersize=12,
                    linestyle="none",
                    label=f"mean of last {AVERAGE_LAST}",
                )
        ax.axhline(target, color="grey", linewidth=0.8, linestyle="--", label=f"target {target}")
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax_mt.set_title("mt_bible: En->Es")
    ax_lm.set_title("lm_shakespeare: bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def replace_section(path: pathlib.Path, section: str) -> None:
    """Puts ``section`` between the recipes markers in ``path``."""
    _replace_between(path, section, begin=BEGIN, end=END)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mt", default="runs/mt_bible", help="mt_bible workdir")
    p.add_argument("--lm", default="runs/lm_shakespeare", help="LM workdir")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="output directory")
    p.add_argument(
        "--markdown",
        default=str(ROOT / "benchmarks" / "RESULTS.md"),
        help="file whose recipes section to rewrite",
    )
    p.add_argument(
        "--every",
        type=int,
        default=KEEP_EVERY,
        help="MT: evaluate the checkpoints of multiples of this step (the run's "
        "config.keep_every; default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="recompute cached evaluations")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    cache_path = out / "recipes.jsonl"
    cache: dict[tuple, dict] = {}
    if cache_path.exists() and not args.force:
        for line in cache_path.read_text().splitlines():
            r = json.loads(line)
            cache[(r["recipe"], r["workdir"], r["step"], r["averaged"])] = r
    mt_dir, lm_dir = pathlib.Path(args.mt), pathlib.Path(args.lm)
    mt = mt_points(mt_dir, cache, every=args.every) if mt_dir.exists() else []
    lm = lm_points(lm_dir, cache) if lm_dir.exists() else []
    with open(cache_path, "w") as f:
        for r in cache.values():
            f.write(json.dumps(r) + "\n")
    plot(mt, lm, out / "recipes.png")
    section = markdown(mt, lm, mt_dir, lm_dir)
    (out / "recipes.md").write_text(section)
    replace_section(pathlib.Path(args.markdown), section)
    print(section)


if __name__ == "__main__":
    main()
