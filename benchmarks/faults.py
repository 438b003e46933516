"""fault_soak: one training run killed at random points and restarted until it completes; its
final parameters must be bit-identical to an uninterrupted run of the same config.

    python -m benchmarks.faults                      # 20 faults, seed 0, ~5 min on 2 CPU cores
    python -m benchmarks.faults --faults 50 --seed 3
    python -m benchmarks.faults --smoke              # 2 faults, few steps (a test runs this)

Each fault is SIGKILL or SIGTERM (seeded coin), delivered to the trainer's process group

- at startup: a random wall time between spawn and the first step (imports, data, restore,
  compile);
- in training: a random wall time after this attempt's first step;
- mid-save: just after an orbax temporary checkpoint directory appears (an async save in
  flight), with a random delay of up to 20 ms.

Training windows are sized from the uninterrupted reference run so that the faults spread over
the run rather than all landing early. After each fault the run is restarted with the same
command; after the last one it runs to the end. A restart that exits with an error is
restarted too, up to ``--max-crashes`` in a row (a recovery that never converges fails the
soak and prints the trainer's last error lines). The trainer is ``attnzoo-train`` itself, in a
subprocess: whatever it does on start (a workdir lock, moving a corrupt checkpoint aside) is
part of what is tested. Exits non-zero unless every fault was delivered and survived and the
parameters are bit-identical. Records: JSON lines as ``protocol.emit`` prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.protocol import emit

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_MARK = "orbax-checkpoint-tmp"  # orbax's suffix for a checkpoint being written
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

MODEL = [
    "--config.model_overrides.d_model=32",
    "--config.model_overrides.d_ff=64",
    "--config.model_overrides.n_layers=1",
    "--config.model_overrides.n_heads=2",
    "--config.batch_size=4",
    "--config.seq_len=32",
    "--config.warmup_steps=5",
    "--config.log_every=1",
    "--config.eval_batches=1",
]


def trainer_command(workdir: pathlib.Path, steps: int, checkpoint_every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "attnzoo.training.cli",
        "--config",
        str(ROOT / "configs" / "lm_tiny.py"),
        "--workdir",
        str(workdir),
        *MODEL,
        f"--config.steps={steps}",
        f"--config.checkpoint_every={checkpoint_every}",
        f"--config.eval_every={steps}",
    ]


def trainer_env(cache_dir: pathlib.Path) -> dict[str, str]:
    """The same environment for the reference and every restart. XLA:CPU skips LLVM's
    optimisation of the code it emits (as the tests do) so that a restart compiles quickly;
    the restarts load the reference's programs from the compilation cache."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": FAST_COMPILE,
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONFAULTHANDLER": "1",  # a stalled trainer is stopped with SIGABRT: thread dump
    }


def wait_or_stall(proc, progress: Progress, stall_s: float) -> bool:
    """Waits for ``proc`` to exit; True if it did, False if it logged no step for ``stall_s``
    seconds (then it is sent SIGABRT, so that its stderr holds every thread's stack)."""
    last, since = progress.poll(), time.monotonic()
    while proc.poll() is None:
        step = progress.poll()
        if step != last:
            last, since = step, time.monotonic()
        elif time.monotonic() - since > stall_s:
            os.killpg(proc.pid, signal.SIGABRT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False
        time.sleep(0.05)
    return True


class Progress:
    """The last step logged in ``metrics.jsonl``, read incrementally."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / "metrics.jsonl"
        self.offset = 0
        self.step = 0
        self.rows = 0  # rows read since the last mark()
        self.bad_lines = 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.step
        end = data.rfind(b"\n") + 1  # leave a partial last line for the next read
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if "train_loss" in row:
                self.step = int(row["step"])
                self.rows += 1
        self.offset += end
        return self.step

    def mark(self) -> None:
        self.poll()
        self.rows = 0


def committed_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def saving(workdir: pathlib.Path) -> bool:
    d = workdir / "checkpoints"
    try:
        return any(TMP_MARK in name for name in os.listdir(d))
    except FileNotFoundError:
        return False


def last_losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> train loss, the last value logged for each step (a re-run step overwrites)."""
    out: dict[int, float] = {}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "train_loss" in row:
                out[int(row["step"])] = row["train_loss"]
    return out


@dataclasses.dataclass
class Attempt:
    rc: int | None
    signal: str | None = None  # the fault delivered, if any
    phase: str | None = None
    at_s: float | None = None  # seconds after spawn
    step: int = 0  # last step logged when the fault was delivered
    mid_save: bool = False  # an orbax temporary directory existed when the signal went out
    trained: bool = False  # this attempt had logged a step when the signal went out
    startup_s: float | None = None  # spawn -> first step logged
    leftovers: bool = False  # processes of the group still alive after the trainer exited
    seconds: float = 0.0
    stderr_tail: str = ""


class Trainer:
    def __init__(
        self, workdir: pathlib.Path, cmd: list[str], env: dict[str, str], log_dir, stall_s
    ):
        self.workdir, self.cmd, self.env, self.log_dir = workdir, cmd, env, log_dir
        self.stall_s = stall_s
        self.n = 0

    def run(self, fault=None) -> Attempt:
        """One attempt; ``fault`` is None (run to the end) or (signal, phase, params)."""
        self.n += 1
        err_path = self.log_dir / f"attempt{self.n:03d}.stderr"
        progress = Progress(self.workdir)
        progress.mark()
        with open(err_path, "w") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group: a fault hits all of it
            )
            attempt = Attempt(rc=None)
            try:
                if fault is not None:
                    self._deliver(proc, t0, progress, fault, attempt)
                if wait_or_stall(proc, progress, self.stall_s):
                    attempt.rc = proc.returncode
                else:
                    attempt.rc = None  # a hang: reported by the caller (stacks in its log)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                attempt.leftovers = _group_alive(proc.pid)
                if attempt.leftovers:
                    os.killpg(proc.pid, signal.SIGKILL)
                    time.sleep(0.2)
            attempt.seconds = time.monotonic() - t0
        attempt.stderr_tail = _tail(err_path)
        return attempt

    def _deliver(self, proc, t0, progress: Progress, fault, attempt: Attempt) -> None:
        sig, phase, p = fault
        started = None  # when this attempt logged its first step
        saves_seen, in_save = 0, False
        while proc.poll() is None:
            now = time.monotonic()
            step = progress.poll()
            if started is None and progress.rows:
                started = now
                attempt.startup_s = now - t0
            fire = False
            if phase == "startup":
                fire = now - t0 >= p["delay"]
            elif phase == "training":
                fire = started is not None and now - started >= p["delay"]
            elif phase == "mid-save" and started is not None:
                s = saving(self.workdir)
                if s and not in_save:
                    saves_seen += 1
                    if saves_seen > p["skip_saves"]:
                        time.sleep(p["delay"])
                        fire = True
                in_save = s
            # never let the run finish with faults still to deliver
            guard = started is not None and step >= p["guard_step"]
            if fire or guard:
                attempt.mid_save = saving(self.workdir)
                attempt.trained = started is not None
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                attempt.signal = signal.Signals(sig).name
                attempt.phase = f"{phase}(guard)" if guard and not fire else phase
                attempt.at_s = round(time.monotonic() - t0, 3)
                attempt.step = step
                return
            time.sleep(0.002)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(path: pathlib.Path, lines: int = 6) -> str:
    text = path.read_text(errors="replace").splitlines()
    keep = [ln for ln in text if ln.strip() and "WARNING: All log messages before" not in ln]
    return "\n".join(keep[-lines:])


def compare(ref: pathlib.Path, soak: pathlib.Path) -> dict:
    """Restores both runs' final params and compares every leaf bit for bit."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # noqa: PLC0415  (only now: the soak itself stays light)
    import numpy as np  # noqa: PLC0415

    from attnzoo.training import load_for_inference  # noqa: PLC0415

    a, b = load_for_inference(str(ref)), load_for_inference(str(soak))
    la = jax.tree_util.tree_flatten_with_path(a.params)[0]
    lb = jax.tree_util.tree_flatten_with_path(b.params)[0]
    differing = []
    for (path, x), (path_b, y) in zip(la, lb, strict=True):
        assert path == path_b
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            diff = float(np.max(np.abs(x - y))) if x.shape == y.shape else None
            differing.append((jax.tree_util.keystr(path), diff))
    return dict(
        ref_step=a.step,
        soak_step=b.step,
        leaves=len(la),
        identical=not differing and a.step == b.step,
        differing=differing[:5],
        n_differing=len(differing),
    )


def plan_fault(rng: random.Random, ref: dict, left: int, done_step: int, args) -> tuple:
    """(signal, phase, params) for the next fault, sized so that the remaining faults spread
    over the remaining steps."""
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    phase = rng.choices(["startup", "training", "mid-save"], weights=[25, 45, 30])[0]
    remaining = max(args.steps - done_step, 1)
    share = 2 * remaining / (left + 1)  # steps this attempt may run, on average
    # the guard: signal at once past this step, so that the run cannot finish with faults left
    # (each fault there moves it on by a step or two)
    p = dict(guard_step=args.steps - max(2 * args.checkpoint_every, 3 * left))
    if phase == "startup":  # restarts start faster than the reference (compilation cache)
        p["delay"] = rng.uniform(0.0, ref["startup_s"])
    elif phase == "training":
        p["delay"] = rng.uniform(0.0, share / ref["steps_per_s"])
    else:
        p["skip_saves"] = rng.randint(0, max(int(share / args.checkpoint_every) - 1, 0))
        p["delay"] = rng.uniform(0.0, 0.02)
    return sig, phase, p


def reference_run(trainer: Trainer, args) -> dict:
    """The uninterrupted run, timed: startup (spawn -> first step) and steps per second."""
    progress = Progress(trainer.workdir)
    log = trainer.log_dir / "reference.stderr"
    t0 = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            trainer.cmd,
            env=trainer.env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        while proc.poll() is None and progress.poll() == 0:
            if time.monotonic() - t0 > trainer.stall_s:
                break
            time.sleep(0.01)
        first = time.monotonic()
        finished = wait_or_stall(proc, progress, trainer.stall_s)
    end = time.monotonic()
    if not finished or proc.returncode != 0:
        what = f"stalled at step {progress.poll()}" if not finished else "failed"
        sys.exit(
            f"fault_soak: the uninterrupted reference run {what} (rc {proc.returncode}); "
            f"its stderr (thread stacks on a stall): {log}\n{_tail(log, 40)}"
        )
    return dict(
        seconds=end - t0,
        startup_s=first - t0,
        steps_per_s=args.steps / max(end - first, 1e-3),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--faults", type=int, default=None, help="default 20 (--smoke: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default 600 (--smoke: 40)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="default 10 (smoke 5)")
    ap.add_argument("--smoke", action="store_true", help="2 faults, 40 steps")
    ap.add_argument("--max-crashes", type=int, default=3, help="failed restarts in a row")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the workdirs and logs")
    ap.add_argument(
        "--stall-s", type=float, default=120.0, help="a run with no new step this long is hung"
    )
    args = ap.parse_args(argv)
    if args.faults is None:
        args.faults = 2 if args.smoke else 20
    args.steps = args.steps or (40 if args.smoke else 600)
    args.checkpoint_every = args.checkpoint_every or (5 if args.smoke else 10)

    t_start = time.monotonic()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="attnzoo-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("ref", "soak", "logs"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "logs").mkdir()
    cache = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or root / "jax-cache")
    env = trainer_env(cache)

    def cmd(name):
        return trainer_command(root / name, args.steps, args.checkpoint_every)

    ref = reference_run(Trainer(root / "ref", cmd("ref"), env, root / "logs", args.stall_s), args)
    print(
        f"fault_soak: reference run {ref['seconds']:.1f} s (startup {ref['startup_s']:.1f} s, "
        f"{ref['steps_per_s']:.0f} steps/s); now {args.faults} faults",
        file=sys.stderr,
    )

    rng = random.Random(args.seed)
    trainer = Trainer(root / "soak", cmd("soak"), env, root / "logs", args.stall_s)
    delivered: list[Attempt] = []
    crashes: list[Attempt] = []
    in_a_row = 0
    failure = None
    final: Attempt | None = None
    while True:
        left = args.faults - len(delivered)
        done = committed_steps(root / "soak")
        fault = plan_fault(rng, ref, left, done[-1] if done else 0, args) if left else None
        a = trainer.run(fault)
        summary = _summary(root / "soak")
        completed = a.rc == 0 and summary.get("status") == "completed"
        if a.rc is None:
            failure = (
                f"attempt {trainer.n} stalled: no new step for {args.stall_s:.0f} s "
                f"(thread stacks in logs/attempt{trainer.n:03d}.stderr): "
                + a.stderr_tail.replace("\n", " | ")
            )
            break
        if a.signal:
            ok_rc = {-signal.SIGKILL} if a.signal == "SIGKILL" else {0, -signal.SIGTERM}
            print(
                f"fault {len(delivered) + 1}/{args.faults}: {a.signal} ({a.phase}) at {a.at_s} s "
                f"(trained {a.trained}, last step {a.step}, saving {a.mid_save}) -> rc {a.rc}"
                + (", leftover processes" if a.leftovers else ""),
                file=sys.stderr,
            )
            delivered.append(a)
            if a.startup_s is not None:
                ref["startup_s"] = a.startup_s  # the latest restart's, for the next plan
            if a.rc in ok_rc:
                in_a_row = 0
                continue
        if completed and left == 0:
            final = a
            break
        if completed:
            failure = (
                f"the run completed after {len(delivered)} of {args.faults} faults; "
                "use more --steps"
            )
            break
        crashes.append(a)
        in_a_row += 1
        print(f"attempt {trainer.n} failed (rc {a.rc}):\n{a.stderr_tail}", file=sys.stderr)
        if in_a_row >= args.max_crashes:
            failure = (
                f"{in_a_row} restarts in a row failed; the last (rc {a.rc}) said: "
                + a.stderr_tail.replace("\n", " | ")
            )
            break

    result = compare(root / "ref", root / "soak") if final else None
    ref_losses, soak_losses = last_losses(root / "ref"), last_losses(root / "soak")
    identical = bool(result and result["identical"])
    corrupt = [p.name for p in (root / "soak" / "checkpoints").glob("*") if "corrupt" in p.name]
    extra = dict(
        faults_planned=args.faults,
        restarts=trainer.n - 1,
        sigkill=sum(a.signal == "SIGKILL" for a in delivered),
        sigterm=sum(a.signal == "SIGTERM" for a in delivered),
        before_first_step=sum(not a.trained for a in delivered),
        while_training=sum(a.trained for a in delivered),
        while_saving=sum(a.mid_save for a in delivered),
        guard=sum("guard" in (a.phase or "") for a in delivered),
        failed_restarts=len(crashes),
        leftover_processes=sum(a.leftovers for a in delivered + crashes),
        checkpoints_moved_aside=len(corrupt),
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    survived = len(delivered) if final else 0
    emit("attnzoo", "fault_soak", "faults_survived", survived, "faults", extra=extra)
    emit(
        "attnzoo",
        "fault_soak",
        "bit_identical",
        float(identical),
        "bool",
        extra=dict(
            leaves=result and result["leaves"],
            differing=result and result["n_differing"],
            first_differing=result and result["differing"][:3],
            final_step=result and result["soak_step"],
            losses_identical=ref_losses == soak_losses and len(ref_losses) == args.steps,
        ),
    )
    emit(
        "attnzoo",
        "fault_soak",
        "wall_s",
        time.monotonic() - t_start,
        "s",
        extra=dict(reference_s=round(ref["seconds"], 1), workdir=str(root) if args.keep else None),
    )
    if failure:
        print(f"fault_soak: FAILED: {failure} (logs: {root / 'logs'})", file=sys.stderr)
    elif not identical:
        print(f"fault_soak: FAILED: parameters differ: {result}", file=sys.stderr)
    ok = failure is None and identical and survived == args.faults
    if not args.keep and ok and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def _summary(workdir: pathlib.Path) -> dict:
    try:
        return json.loads((workdir / "summary.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


if __name__ == "__main__":
    sys.exit(main())
