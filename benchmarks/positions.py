"""Positional-encoding study: one small byte-level LM per kind, perplexity vs evaluation length.

    python -m benchmarks.positions            # or: make study  (26 min measured on 2 CPU cores)
    python -m benchmarks.positions --smoke    # tiny sizes, seconds: checks the plumbing

Trains the same decoder LM (``configs/lm_tiny.py`` with d_model/layers/steps below) once per
positional kind, all 8 (sinusoidal, learned, shaw, t5, rope, alibi, xpos, none), on the
bundled Shakespeare with the same seed, steps, batches and training length (256), then
evaluates validation (Hamlet) perplexity at 256, 512, 1024 and 2048 tokens per window
(``attnzoo.length_eval``: the same first ``--max_tokens`` tokens at every length). RoPE is
evaluated again with three scalings applied at inference, without retraining:

* ``linear`` (position interpolation) and ``yarn`` with ``factor = L / 256`` at length L (1 at
  the training length: no change there);
* ``dynamic`` (NTK-aware) with ``factor = 1``: its base grows with each window's own length,
  ``base * (L / 256) ** (d / (d - 2))``.

The learned table has ``max_len = 256`` rows (the training length): longer lengths are not
applicable (``null``). Outputs, in ``--out`` (default ``benchmarks/``): ``positions.jsonl``
(one JSON line per kind, scaling and length), ``positions.md`` (the table), ``positions.png``
(perplexity vs length, one line per kind, log scale), and, with ``--markdown FILE`` (default
``benchmarks/RESULTS.md`` unless ``--smoke``), the table as a section of FILE between
``<!-- positions:begin -->`` and ``<!-- positions:end -->`` (``benchmarks/run.py`` keeps such
sections when ``make bench`` rewrites the file). Workdirs go to ``--workdir_root``; a rerun
resumes or reuses finished runs there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = ("sinusoidal", "learned", "shaw", "t5", "rope", "alibi", "xpos", "none")
SCALINGS = ("linear", "dynamic", "yarn")
BEGIN, END = "<!-- positions:begin -->", "<!-- positions:end -->"
COMMAND = "python -m benchmarks.positions"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one study run trains and evaluates."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256  # the training length
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    max_tokens: int = 65536  # validation tokens scored at every length (32 windows of 2048)
    tokens_per_batch: int = 8192  # rows per eval batch: tokens_per_batch // length
    seed: int = 0


FULL = Sizes()
SMOKE = Sizes(
    steps=3,
    batch_size=8,  # divisible by the test suite's 8 fake devices
    seq_len=32,
    d_model=32,
    n_layers=1,
    n_heads=2,
    d_ff=64,
    lengths=(32, 64, 128),
    max_tokens=256,
    tokens_per_batch=256,
)


def experiment_config(kind: str, sizes: Sizes) -> Any:
    """``configs/lm_tiny.py`` with position ``kind`` and ``sizes`` (the learned table: exactly
    the training length)."""
    from attnzoo.training import schema  # noqa: PLC0415

    c: Any = schema.load_experiment(str(ROOT / "configs" / "lm_tiny.py"))
    o = c.model_overrides
    o.d_model, o.n_layers, o.n_heads = sizes.d_model, sizes.n_layers, sizes.n_heads
    o.d_ff = sizes.d_ff
    o.position.kind = kind
    if kind == "learned":
        o.position.max_len = sizes.seq_len
    c.steps, c.batch_size, c.seq_len = sizes.steps, sizes.batch_size, sizes.seq_len
    c.seed = sizes.seed
    c.warmup_steps = min(c.warmup_steps, max(1, sizes.steps // 10))
    c.eval_every = c.checkpoint_every = sizes.steps
    c.eval_batches = 4
    c.log_every = max(1, min(50, sizes.steps))
    return c


def _rows(kind: str, scaling: str | None, results: dict[str, dict], extra: dict) -> list[dict]:
    return [
        {"kind": kind, "scaling": scaling, "length": int(length), **extra, **r}
        for length, r in results.items()
    ]


def study(sizes: Sizes, workdir_root: pathlib.Path, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """Trains and evaluates every kind; returns one record per (kind, scaling, length)."""
    import attnzoo.data  # noqa: PLC0415  (jax only once the arguments are parsed)
    from attnzoo import length_eval  # noqa: PLC0415
    from attnzoo.training import load_for_inference, train  # noqa: PLC0415

    documents = attnzoo.data.texts("shakespeare", "validation")
    records: list[dict] = []
    for kind in kinds:
        t0 = time.perf_counter()
        summary = train(experiment_config(kind, sizes), str(workdir_root / kind))
        train_s = time.perf_counter() - t0
        r = load_for_inference(str(workdir_root / kind))
        ids = length_eval.token_stream(r.tokenizer, documents)
        common: dict[str, Any] = dict(
            pad_id=r.tokenizer.pad_id,
            tokens_per_batch=sizes.tokens_per_batch,
            max_tokens=sizes.max_tokens,
        )
        t1 = time.perf_counter()
        results = length_eval.length_perplexity(r.model_cfg, r.params, ids, sizes.lengths, **common)
        extra = {
            "train_s": round(train_s, 1),
            "train_loss": summary.get("train_loss"),
            "eval_loss_at_train_len": summary.get("eval_loss"),
            "steps": sizes.steps,
            "train_seq_len": sizes.seq_len,
        }
        records += _rows(kind, None, results, extra)
        if kind == "rope":
            for scaling in SCALINGS:
                for length in sizes.lengths:
                    factor = 1.0 if scaling == "dynamic" else max(1.0, length / sizes.seq_len)
                    spec = length_eval.parse_rope_scaling(f"{scaling}:factor={factor}")
                    cfg = length_eval.with_rope_scaling(
                        r.model_cfg, spec, original_max_len=sizes.seq_len
                    )
                    res = length_eval.length_perplexity(cfg, r.params, ids, [length], **common)
                    records += _rows(kind, scaling, res, {**extra, "factor": factor})
        print(
            f"positions: {kind}: trained {train_s:.0f} s, evaluated "
            f"{time.perf_counter() - t1:.0f} s, "
            + ", ".join(
                f"{rec['length']}: {_fmt(rec['perplexity'])}"
                for rec in records
                if rec["kind"] == kind and rec["scaling"] is None
            ),
            file=sys.stderr,
            flush=True,
        )
    return records


def _fmt(ppl: float | None) -> str:
    return "n/a" if ppl is None else f"{ppl:.2f}"


def _label(kind: str, scaling: str | None) -> str:
    return kind if scaling is None else f"{kind} + {scaling}"


def series(records: list[dict]) -> dict[str, dict[int, float | None]]:
    """``{label: {length: perplexity or None}}`` in study order (kinds, then RoPE scalings)."""
    out: dict[str, dict[int, float | None]] = {}
    for rec in records:
        out.setdefault(_label(rec["kind"], rec["scaling"]), {})[rec["length"]] = rec["perplexity"]
    return out


def markdown(records: list[dict], sizes: Sizes, *, seconds: float, smoke: bool) -> str:
    """The results table with the command and the setup above it."""
    lengths = sorted({rec["length"] for rec in records})
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        tree = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        tree = "?"
    cmd = COMMAND + (" --smoke" if smoke else "")
    lines = [
        "## Positional encodings: perplexity vs evaluation length",
        "",
        f"`{cmd}` (`make study`), {when} on `{platform.node()}` ({os.cpu_count()} CPUs), "
        f"tree at `{tree or '?'}`, {seconds / 60:.1f} min. One byte-level decoder LM per kind "
        f"(d_model {sizes.d_model}, {sizes.n_layers} layers, {sizes.n_heads} heads, d_ff "
        f"{sizes.d_ff}), {sizes.steps} steps of {sizes.batch_size} x {sizes.seq_len} bytes of "
        f"Shakespeare, seed {sizes.seed}; validation (Hamlet) perplexity per byte over the "
        f"same first {sizes.max_tokens} bytes at each length, in windows of that length. "
        f"Learned positions have a {sizes.seq_len}-row table: n/a past it. RoPE scalings are "
        f"applied at inference only (linear, yarn: factor L/{sizes.seq_len}; dynamic: "
        "factor 1, NTK base grown by L/train length).",
        "",
        "| kind | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for label, values in series(records).items():
        lines.append(f"| {label} | " + " | ".join(_fmt(values.get(n)) for n in lengths) + " |")
    lines += ["", "![perplexity vs evaluation length](positions.png)"]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: pathlib.Path, *, train_len: int) -> bool:
    """Perplexity vs evaluation length, one line per kind (and RoPE scaling); False without
    matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("positions: matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tab20 = plt.get_cmap("tab20")  # 11+ series: the default colour cycle repeats after 10
    for i, (label, values) in enumerate(series(records).items()):
        points = [(n, v) for n, v in sorted(values.items()) if v is not None]
        ax.plot(
            [n for n, _ in points],
            [v for _, v in points],
            marker="o",
            color=tab20(((2 * i) if i < 10 else (2 * i + 1)) % 20),
            linestyle="--" if "+" in label else "-",
            label=label,
        )
    ax.axvline(train_len, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (bytes per window)")
    ax.set_ylabel("validation perplexity (per byte)")
    ax.set_title(f"Trained at {train_len}: perplexity vs evaluation length")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def replace_section(
    path: pathlib.Path, section: str, *, begin: str = BEGIN, end: str = END
) -> None:
    """Puts ``section`` between the markers in ``path`` (appended when they are absent)."""
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, not minutes")
    p.add_argument("--steps", type=int, default=None, help="training steps per kind")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="output directory")
    p.add_argument(
        "--markdown",
        default=None,
        help="file whose positions section to rewrite (default: benchmarks/RESULTS.md, none "
        "with --smoke)",
    )
    p.add_argument(
        "--workdir_root",
        default=None,
        help="training workdirs, one per kind (default: runs/positions_study; a temporary "
        "directory with --smoke)",
    )
    args = p.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kind(s) {unknown}; valid: {', '.join(KINDS)}")
    sizes = SMOKE if args.smoke else FULL
    if args.steps is not None:
        sizes = dataclasses.replace(sizes, steps=args.steps)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown_path = args.markdown
    if markdown_path is None and not args.smoke:
        markdown_path = str(ROOT / "benchmarks" / "RESULTS.md")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnzoo_positions_") as tmp:
        if args.workdir_root is not None:
            root = pathlib.Path(args.workdir_root)
        else:
            root = pathlib.Path(tmp) if args.smoke else ROOT / "runs" / "positions_study"
        records = study(sizes, root, kinds)
    seconds = time.perf_counter() - t0
    with open(out / "positions.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    md = markdown(records, sizes, seconds=seconds, smoke=args.smoke)
    (out / "positions.md").write_text(md)
    plot(records, out / "positions.png", train_len=sizes.seq_len)
    if markdown_path:
        replace_section(pathlib.Path(markdown_path), md)
    print(md)


if __name__ == "__main__":
    main()
