"""sharding: what each sharding strategy compiles the train step to, per device, on 8 devices.

    python -m benchmarks.sharding [--strategies dp,fsdp,fsdp_tp,tp] [--tasks lm,mt]
                                  [--grad-accum 4] [--optimizer adamw] [--no-fused-loss]
                                  [--position KIND] [--markdown FILE]

Compiles (does not run) ``experiment.build(config).train_step`` of a small model of each
family (``lm``: decoder-only, ``mt``: encoder-decoder; every dimension divides 8) for each
strategy on its mesh (``MESHES``), on 8 fake CPU devices when run as a module, and reads the
compiled executable:

* ``memory_analysis()``: per-device argument, output and temporary bytes;
* ``input_shardings``: per-device bytes of the train state (parameters + optimizer state,
  ``state_bytes``; ``state_bytes_total`` unsharded) and every weight matrix's mesh layout;
* ``cost_analysis()["flops"]``: XLA's per-device count, which counts a loop body once;
  ``dot_flops``: the matmul FLOPs of the optimized HLO with every ``while`` body multiplied
  by its trip count (gradient accumulation, scanned layers, the chunked loss): what a device
  computes per step;
* the optimized HLO (``as_text()``): each collective kind's ops (in the program), count
  (executed per step, loops unrolled) and bytes (their results per device, per step);
* whether XLA's SPMD partitioner logged "Involuntary full rematerialization" (a layout it
  could only reach by replicating a tensor) while compiling.

With ``--grad-accum K`` the ``dp`` strategy is compiled again with ``grad_accum_steps=K``:
the same per-device work and no new collective kind (strided micro-batches,
``steps.micro_batches``). Prints one JSON line per compile, then a markdown table; with
``--markdown FILE`` the table goes into FILE as the section ``## Sharding`` (replacing that
section only, so ``benchmarks/RESULTS.md`` keeps the rest).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported: 8 CPU devices and XLA's warnings
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # the partitioner's warnings are part of the report

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from attnzoo.training import experiment, schema  # noqa: E402

STRATEGIES = ("dp", "fsdp", "fsdp_tp", "tp")
MESHES: dict[str, dict[str, int]] = {
    "dp": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "fsdp_tp": dict(data=2, fsdp=2, tensor=2),  # DP x FSDP x TP
    "tp": dict(data=1, fsdp=1, tensor=8),
}
TASKS = ("lm", "mt")
VOCAB, BATCH, SEQ = 256, 32, 64
MODEL = dict(d_model=128, n_heads=8, d_ff=512)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
INVOLUNTARY = "Involuntary full rematerialization"
SECTION = "## Sharding"

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_PARAM = re.compile(r"(\S+): ([^,()]+(?:\[[0-9,]*\])(?:\{[^}]*\})?)")


def config(
    task: str,
    strategy: str,
    *,
    grad_accum_steps: int = 1,
    optimizer: str = "adamw",
    fused_loss: bool = True,
    position: str | None = None,
) -> schema.Config:
    """The experiment config this benchmark compiles (the ``tiny`` preset at ``MODEL`` size;
    ``position``: another positional encoding kind than the preset's sinusoids)."""
    c: schema.Config = schema.get_config()
    c.task = task
    c.model = "tiny"
    c.model_overrides.update(MODEL)
    if position is not None:
        c.model_overrides.position.kind = position
    c.update(
        batch_size=BATCH,
        seq_len=SEQ,
        sharding=strategy,
        optimizer=optimizer,
        fused_loss=fused_loss,
        grad_accum_steps=grad_accum_steps,
    )
    c.mesh.update(MESHES[strategy])
    return c


def abstract_batch(task: str, sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """A ``[BATCH, SEQ]`` batch of ``task`` as shapes placed with ``sharding``."""
    keys = (
        ("inputs", "targets", "segment_ids", "positions", "weights")
        if task == "lm"
        else (
            "src", "tgt_inputs", "tgt_targets", "src_segment_ids", "tgt_segment_ids",
            "src_positions", "tgt_positions", "tgt_weights",
        )
    )  # fmt: skip
    return {
        k: jax.ShapeDtypeStruct(
            (BATCH, SEQ), np.float32 if k.endswith("weights") else np.int32, sharding=sharding
        )
        for k in keys
    }


@contextlib.contextmanager
def _stderr_to(sink: list[str]) -> Iterator[None]:
    """Captures file descriptor 2 (XLA logs from C++) into ``sink``, then echoes it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            sink.append(f.read().decode(errors="replace"))
    sys.stderr.write(sink[-1])


def _shape_bytes(text: str) -> int:
    """Bytes of every array type in ``text`` (an HLO shape, possibly a tuple)."""
    return sum(
        _DTYPE_BYTES.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(text)
    )


def _dims(text: str) -> list[int]:
    m = _ARRAY.search(text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _split_result(rest: str) -> tuple[str, str, str]:
    """``"(f32[2], f32[3]) all-reduce(%a, %b), ..."`` -> (result type, opcode, the rest)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                shape, rest = rest[: i + 1], rest[i + 1 :].lstrip()
                break
        else:
            return rest, "", ""
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, args = rest.partition("(")
    return shape, opcode, args


def analyze_hlo(text: str) -> dict[str, Any]:
    """Collectives and matmul FLOPs of an optimized HLO module (``compiled.as_text()``).

    Each computation runs as often as its callers: ``while`` bodies ``known_trip_count`` times
    per execution of the computation holding the loop, fused and called computations once,
    conditional branches once (an upper bound). ``dot_flops`` = 2 x output elements x
    contracted elements of every ``dot``, so weighted; convolutions are not counted (the
    models have none).

    Returns:
      ``{"dot_flops": int, "collectives": {kind: {"ops", "count", "bytes"}}}``, ``bytes``
      being the per-device result bytes of every execution (``-done`` of async pairs).
    """
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    shapes: dict[str, dict[str, str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current], shapes[current] = [], dict(_PARAM.findall(header.group(2)))
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTR.match(line) if current else None
        if m and current:
            shape, opcode, args = _split_result(m.group(2))
            comps[current].append((m.group(1), shape, opcode, args))
            shapes[current][m.group(1)] = shape
    # how often each computation runs per step: callers before callees (a DAG)
    calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    for comp, instrs in comps.items():
        for _, _, opcode, args in instrs:
            if opcode == "while":
                body = re.search(r"body=%([^\s,]+)", args)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', args)
                if body:
                    calls[comp].append((body.group(1), int(trips.group(1)) if trips else 1))
            elif opcode in ("fusion", "call", "async-start", "custom-call"):
                for callee in re.findall(r"(?:calls|to_apply)=%([^\s,]+)", args):
                    calls[comp].append((callee, 1))
            elif opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", args)
                for callee in re.findall(r"%([^\s,]+)", branches.group(1) if branches else ""):
                    calls[comp].append((callee, 1))
    runs: dict[str, int] = {}

    def visit(comp: str, n: int) -> None:
        runs[comp] = runs.get(comp, 0) + n
        for callee, k in calls.get(comp, ()):
            if callee in comps:
                visit(callee, n * k)

    if entry is not None:
        visit(entry, 1)
    flops = 0
    coll = {k: dict(ops=0, count=0, bytes=0) for k in COLLECTIVES}
    for comp, instrs in comps.items():
        n = runs.get(comp, 0)
        for _, shape, opcode, args in instrs:
            kind = opcode.removesuffix("-done")
            if kind in coll and not opcode.endswith("-start"):
                coll[kind]["ops"] += 1
                coll[kind]["count"] += n
                coll[kind]["bytes"] += n * _shape_bytes(shape)
            elif opcode == "dot" and n:
                lhs = re.match(r"\s*%([^\s,)]+)", args)
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", args)
                lhs_dims = _dims(shapes[comp].get(lhs.group(1), "")) if lhs else []
                k = math.prod(
                    lhs_dims[int(i)]
                    for i in (contracting.group(1).split(",") if contracting else [])
                    if i and int(i) < len(lhs_dims)
                )
                flops += n * 2 * math.prod(_dims(shape)) * k
    return dict(dot_flops=flops, collectives=coll)


def _path(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _per_device_bytes(tree: Any, shardings: Any) -> int:
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def measure(
    task: str,
    strategy: str,
    *,
    grad_accum_steps: int = 1,
    optimizer: str = "adamw",
    fused_loss: bool = True,
    position: str | None = None,
) -> dict[str, Any]:
    """Compiles the train step of ``task`` under ``strategy`` -> one JSON-able record."""
    cfg = config(
        task,
        strategy,
        grad_accum_steps=grad_accum_steps,
        optimizer=optimizer,
        fused_loss=fused_loss,
        position=position,
    )
    exp = experiment.build(cfg, vocab_size=VOCAB)
    batch = abstract_batch(task, exp.batch_sharding)
    rng = jax.eval_shape(lambda: jax.random.key(0))  # as the loop passes steps.step_rng(...)
    log: list[str] = []
    t0 = time.perf_counter()
    with _stderr_to(log):
        compiled = exp.train_step.lower(exp.abstract_state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    state_shardings = compiled.input_shardings[0][0]
    state = exp.abstract_state
    hlo = analyze_hlo(compiled.as_text())
    params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    param_shardings = jax.tree.leaves(state_shardings.params)
    return dict(
        benchmark="sharding",
        task=task,
        strategy=strategy,
        mesh={k: v for k, v in MESHES[strategy].items() if v > 1},
        grad_accum_steps=grad_accum_steps,
        optimizer=optimizer,
        fused_loss=fused_loss,
        model=dict(MODEL, vocab=VOCAB, batch=BATCH, seq=SEQ, position=exp.model_cfg.position.kind),
        state_bytes=_per_device_bytes(state, state_shardings),
        state_bytes_total=sum(
            math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
        ),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        **hlo,
        involuntary_remat=INVOLUNTARY in log[0],
        param_specs={
            _path(path): [list(a) if isinstance(a, tuple) else a for a in s.spec]
            for (path, x), s in zip(params, param_shardings, strict=True)
            if len(x.shape) >= 2
        },
        compile_s=round(compile_s, 2),
    )


def runs(
    strategies: Sequence[str] = STRATEGIES,
    tasks: Sequence[str] = TASKS,
    *,
    grad_accum: int = 4,
    optimizer: str = "adamw",
    fused_loss: bool = True,
    position: str | None = None,
) -> list[dict[str, Any]]:
    """Every (task, strategy) record, plus ``dp`` with ``grad_accum_steps=grad_accum`` (> 1)."""
    plan = [(t, s, 1) for t in tasks for s in strategies]
    if grad_accum > 1 and "dp" in strategies:
        plan += [(t, "dp", grad_accum) for t in tasks]
    records = []
    for task, strategy, accum in plan:
        r = measure(
            task,
            strategy,
            grad_accum_steps=accum,
            optimizer=optimizer,
            fused_loss=fused_loss,
            position=position,
        )
        print(json.dumps(r), flush=True)
        records.append(r)
    return records


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The ``## Sharding`` section: one row per compile."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    r0 = records[0] if records else {}
    m = r0.get("model", {})
    lines = [
        SECTION,
        "",
        f"`python -m benchmarks.sharding`, {now}: the train step compiled (not run) on 8 fake "
        f"CPU devices, d_model {m.get('d_model')}, {m.get('n_heads')} heads, d_ff "
        f"{m.get('d_ff')}, vocab {m.get('vocab')}, {m.get('position')} positions, "
        "2 layers (lm) / 2+2 (mt), batch "
        f"{m.get('batch')} x {m.get('seq')} tokens, {r0.get('optimizer')}, fused loss "
        f"{'on' if r0.get('fused_loss') else 'off'}. Per device: train state (params + "
        "optimizer state; unsharded in brackets), arguments and temporaries "
        "(`memory_analysis()`), matmul GFLOP per step (loop bodies times their trip "
        "counts; XLA's `cost_analysis()` count, which counts a loop body once, in "
        "brackets); each collective: executed per step x, result MiB per step. "
        '"remat": XLA logged "Involuntary full rematerialization". Not part of `make bench`, '
        "which keeps this section.",
        "",
        "| family | strategy | mesh | accum | state | arguments | temp | GFLOP "
        "| all-gather | all-reduce | reduce-scatter | all-to-all | collective-permute | remat |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
        coll = [
            f"{c['count']} x, {c['bytes'] / 2**20:.2f}" if c["count"] else "-"
            for c in (r["collectives"][k] for k in COLLECTIVES)
        ]
        lines.append(
            f"| {r['task']} | {r['strategy']} | {mesh} | {r['grad_accum_steps']} "
            f"| {_size(r['state_bytes'])} ({_size(r['state_bytes_total'])}) "
            f"| {_size(r['argument_bytes'])} | {_size(r['temp_bytes'])} "
            f"| {r['dot_flops'] / 1e9:.3f} ({r['flops'] / 1e9:.3f}) | "
            + " | ".join(coll)
            + f" | {'yes' if r['involuntary_remat'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its ``## Sharding`` section (up to the next ``## ``) replaced by
    ``section``, or ``section`` appended."""
    start = text.find(SECTION + "\n")
    if start < 0:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    end = text.find("\n## ", start + len(SECTION))
    rest = text[end + 1 :] if end >= 0 else ""
    return text[:start] + section + ("\n" + rest if rest else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--grad-accum", type=int, default=4, help="dp again with this; 1: skip")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    p.add_argument("--no-fused-loss", action="store_true")
    p.add_argument(
        "--position", default=None, help="positional encoding kind (default: sinusoidal)"
    )
    p.add_argument("--markdown", default=None, help="write the table into this file's section")
    args = p.parse_args(argv)
    if len(jax.devices()) < 8:
        p.error(
            f"needs 8 devices, found {len(jax.devices())}: run it as `python -m "
            "benchmarks.sharding` (which asks XLA for 8 CPU devices) before jax starts"
        )
    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit logs nothing
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    records = runs(
        split(args.strategies),
        split(args.tasks),
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
        fused_loss=not args.no_fused_loss,
        position=args.position,
    )
    section = markdown(records)
    if args.markdown:
        path = pathlib.Path(args.markdown)
        path.write_text(replace_section(path.read_text() if path.exists() else "", section))
    else:
        print(section)


if __name__ == "__main__":
    main()
