"""The training loop: mesh, sharded state, jitted steps, eval, checkpoints, logs.

``train(config, workdir)`` is everything ``attnzoo-train`` does after flag parsing. The same
function runs on one CPU, a TPU slice or several hosts; only ``config.mesh`` and
``config.sharding`` change where things live.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pathlib
import signal
import socket
import time
from collections.abc import Callable
from typing import IO, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import attnzoo.data
from attnzoo import evaluation
from attnzoo.data import locking
from attnzoo.training import (
    averaging,
    checkpoint,
    experiment,
    init_from,
    input_pipeline,
    progress,
    schema,
    sharding,
    steps,
)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says what to do."""


class WorkdirInUse(TrainingError):
    """Another run holds the workdir's lock; the message names its PID and host."""


def validate_config(config: schema.Config) -> None:
    """Rejects, before anything expensive happens, keys the defaults do not have (typos) and
    values no run can use (``schema.validate``: intervals, sizes, learning rate, task).

    Independent of the machine; ``attnzoo-train`` also checks that a step fits in its memory
    (``schema.check_memory``)."""

    def walk(c, ref, prefix):
        for key in c:
            if key == "model_overrides":
                continue  # checked against the model Config's fields
            if key not in ref:
                raise ValueError(
                    f"unknown config key '{prefix}{key}'; valid keys: {', '.join(sorted(ref))}"
                )
            if isinstance(c[key], ml_collections.ConfigDict):
                walk(c[key], ref[key], f"{prefix}{key}.")

    walk(config, schema.get_config(), "")
    schema.validate(config)


class _RewrittenFile:
    """An append-only text file on a store that cannot append (``gs://``): each ``flush``
    rewrites it whole, with what it held when opened first."""

    def __init__(self, path: epath.Path):
        self.path, self.name = path, str(path)
        self.text = path.read_text() if path.exists() else ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        self.path.write_text(self.text)

    def close(self) -> None:
        pass


class _Logger:
    """metrics.jsonl + TensorBoard event files, written by process 0 only.

    In a remote workdir (``gs://...``) metrics.jsonl is rewritten whole at each write (object
    stores cannot append; the file is small) and no TensorBoard events are written (logged).
    """

    def __init__(self, workdir: epath.Path, enabled: bool):
        self.enabled = enabled
        self.tb: Any = None
        if enabled and not checkpoint.is_local(workdir):
            logging.info(
                "workdir %s is remote: metrics.jsonl is rewritten at each log and TensorBoard "
                "events are not written (train in a local workdir for them)",
                workdir,
            )
            self.jsonl: Any = _RewrittenFile(workdir / "metrics.jsonl")
        elif enabled:
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy, process 0 only)

            self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        except OSError as e:  # a full disk often shows here first, before a checkpoint save
            what = "the disk is full" if e.errno == errno.ENOSPC else "the write failed"
            raise TrainingError(
                f"writing the metrics of step {step} to {self.jsonl.name} failed: {what} "
                f"({type(e).__name__}: {e}); the checkpoints are kept: fix that, then rerun "
                "the same command to resume"
            ) from e
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            # each write was flushed: only a write that failed (and was reported) is left over
            with contextlib.suppress(OSError):
                self.jsonl.close()
            try:
                if self.tb is not None:
                    self.tb.close()
            except OSError as e:  # a full disk: the checkpoints and metrics.jsonl matter more
                logging.warning("TensorBoard events not written (%s: %s)", type(e).__name__, e)
                # tensorboardX would retry the flush at exit and print the error again
                for writer in (getattr(self.tb, "all_writers", None) or {}).values():
                    with contextlib.suppress(AttributeError):
                        writer.event_writer._closed = True


class _Preemption:
    """SIGTERM (preemption notice) -> a final save and a clean exit, on every process.

    One process: a signal handler sets a flag checked between steps. Several: JAX's own
    preemption sync (``jax.distributed`` watches SIGTERM) picks the same step on every host, so
    all of them join the final, collective checkpoint instead of deadlocking.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.requested = False
        if not self.multi_process:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if not self.multi_process:
            signal.signal(signal.SIGTERM, self._previous)


def _to_host(x: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(x).items()}


def evaluate(
    config: schema.Config,
    params: nnx.State,
    *,
    eval_fn: Callable[[nnx.State, dict[str, jax.Array]], dict[str, jax.Array]],
    tokenizer: attnzoo.data.Tokenizer,
    batch_sharding: NamedSharding,
    split: str = "validation",
) -> dict[str, float]:
    """Token-weighted eval loss, perplexity and accuracy over ``config.eval_batches`` batches.

    ``eval_fn(params, batch)`` sums ``nll``, ``correct`` and ``weight`` over a global batch
    (dict of ``[batch_size, seq_len]`` arrays placed with ``batch_sharding``), e.g. an
    ``Experiment.eval_step``. Every process must call this (the eval steps are collective).
    """
    it = input_pipeline.batches(
        config,
        split,
        tokenizer=tokenizer,
        batch_size=config.batch_size // jax.process_count(),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_epochs=1,
    )
    totals, empty = None, None
    for _ in range(config.eval_batches):
        batch = next(it, None)
        if batch is None:
            if empty is None:
                raise ValueError(
                    f"the {split} split of {config.dataset!r} produced no batch; lower "
                    "config.batch_size or config.seq_len"
                )
            # Every process must run every (collective) eval step: a process whose shard ran
            # out contributes zero-weight rows.
            batch = empty
        empty = jax.tree.map(np.zeros_like, batch)
        sums = eval_fn(params, sharding.put_batch(batch, batch_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError(f"config.eval_batches must be >= 1, got {config.eval_batches}")
    t = _to_host(totals)
    loss = t["nll"] / max(t["weight"], 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_accuracy": t["correct"] / max(t["weight"], 1.0),
    }


def evaluate_bleu(
    config: schema.Config,
    params: nnx.State,
    *,
    graphdef: nnx.GraphDef,
    model_cfg: Any,
    tokenizer: attnzoo.data.Tokenizer,
    split: str = "validation",
) -> float:
    """Corpus sacreBLEU of beam-search translations of ``config.bleu_sentences`` eval pairs."""
    pairs = attnzoo.data.text_pairs(
        config.dataset, split, data_dir=config.data_dir, text_keys=schema.text_keys(config)
    )
    _, bleu = evaluation.translation_bleu(
        graphdef,
        params,
        model_cfg,
        tokenizer,
        pairs[: config.bleu_sentences],
        max_len=config.seq_len,
        max_src_len=config.get("eval_source_len") or config.seq_len,
        max_len_offset=config.get("eval_max_len_offset"),
    )
    return bleu.score


def evaluate_average(
    config: schema.Config,
    ckpt: checkpoint.Checkpoints,
    *,
    exp: experiment.Experiment,
    tokenizer: attnzoo.data.Tokenizer,
) -> dict[str, float]:
    """The eval metrics of the mean params of the last ``config.average_last`` checkpoints.

    Keys are ``avg_eval_loss``, ``avg_eval_perplexity``, ``avg_eval_accuracy`` (``evaluate``),
    ``avg_eval_bleu`` (MT with ``bleu_sentences``, one process) and ``avg_checkpoints`` (how
    many were averaged: fewer than asked when the run saved fewer, which is logged). Every
    process must call this (restoring and evaluating are collective).
    """
    saved = ckpt.steps()
    n = min(config.average_last, len(saved))
    if n < config.average_last:
        logging.warning(
            "config.average_last=%d but the run has %d checkpoints: averaging those",
            config.average_last,
            n,
        )
    steps_used, params = averaging.average_checkpoints(ckpt, exp.abstract_state.params, n)
    logging.info("averaged the params of checkpoints %s", steps_used)
    metrics = evaluate(
        config,
        params,
        eval_fn=exp.eval_step,
        tokenizer=tokenizer,
        batch_sharding=exp.batch_sharding,
    )
    if config.task == "mt" and config.bleu_sentences and jax.process_count() == 1:
        metrics["eval_bleu"] = evaluate_bleu(
            config, params, graphdef=exp.graphdef, model_cfg=exp.model_cfg, tokenizer=tokenizer
        )
    out = {f"avg_{k}": v for k, v in metrics.items()}
    out["avg_checkpoints"] = float(n)
    return out


def _broadcast_text(text: str, size: int = 1024) -> str:
    """Process 0's ``text`` on every process (a collective: all of them must call it)."""
    buf = np.zeros(size, np.uint8)
    data = text.encode()[:size]
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out).rstrip(b"\0").decode(errors="replace")


def lock_workdir(workdir: str | os.PathLike[str]) -> IO[str] | None:
    """Takes ``workdir/.lock`` for this run (process 0 holds it; all processes agree).

    Returns the lock file on process 0 (close it to release; the kernel releases it when the
    process dies, ``kill -9`` included), ``None`` on the others. Raises ``WorkdirInUse`` on
    every process, naming the holder, when another run has it.

    A remote workdir (``gs://...``) has no ``flock``: it is not locked (logged), and ``None``
    is returned; keeping one run per remote workdir is then up to the user.
    """
    if not checkpoint.is_local(workdir):
        logging.info(
            "workdir %s is remote: it cannot be locked against a second run writing to it; "
            "start one run per workdir",
            workdir,
        )
        return None
    path = pathlib.Path(workdir).absolute()
    handle, message = None, ""
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        note = f"pid {os.getpid()} on host {socket.gethostname()} (started {started})"
        try:
            handle = locking.hold_lock(path / ".lock", note)
        except locking.LockHeld as e:
            message = (
                f"workdir {workdir} is in use by {e.holder or 'another run'}; wait for it or "
                "use another --workdir"
            )
    if jax.process_count() > 1:
        message = _broadcast_text(message)
    if message:
        if handle is not None:
            handle.close()
        raise WorkdirInUse(message)
    return handle


def train(config: schema.Config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns a summary.

    One run per workdir: ``workdir/.lock`` is held throughout (``WorkdirInUse`` otherwise). A
    resume first checks the new config against the checkpoint's (``ConfigMismatch`` names what
    may not change), then restores the newest readable checkpoint: unreadable newer ones are
    moved aside (``checkpoints/<step>.corrupt-<time>``). A failed save ends the run at the next
    step with a ``TrainingError`` that names the step; the last good checkpoint is kept.
    """
    validate_config(config)
    workdir_path = checkpoint.workdir_path(workdir)  # epath: gs://... stays a URL
    lock = lock_workdir(workdir)
    try:
        if (workdir_path / "checkpoints").is_dir():
            # before the data, the tokenizer and any compile; read-only: a config refused
            # leaves the workdir as it was
            saved = checkpoint.Checkpoints(workdir_path, read_only=True)
            try:
                saved.check_config(config)
            finally:
                saved.close()
        return _train(config, workdir_path)
    finally:
        if lock is not None:
            lock.close()


def _train(config: schema.Config, workdir_path: epath.Path) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    if is_main:
        workdir_path.mkdir(parents=True, exist_ok=True)

    tokenizer = input_pipeline.get_tokenizer(config)
    n_proc = jax.process_count()
    # Data first: a missing or misnamed dataset fails before anything is compiled or written.
    train_iter = input_pipeline.batches(
        config,
        "train",
        tokenizer=tokenizer,
        batch_size=config.batch_size // n_proc,
        shard_index=jax.process_index(),
        shard_count=n_proc,
    )
    exp = experiment.build(config, vocab_size=tokenizer.vocab_size)

    # checkpoint averaging needs the last average_last checkpoints kept
    keep = max(config.keep_checkpoints, config.get("average_last", 0))
    ckpt = checkpoint.Checkpoints(
        workdir_path,
        keep=keep,
        keep_every=config.get("keep_every", 0),
        async_save=config.async_checkpoints,
    )
    try:
        if ckpt.steps():
            state, data_state = ckpt.restore(exp.abstract_state, config=config, move_aside=True)
            train_iter.set_state(data_state)
            logging.info("resumed from step %d", int(state.step))
        else:  # a new run: config.init_from's params, if set (a resume ignores it)
            state = init_from.initial_state(config, exp)
    except BaseException:
        ckpt.close()
        raise

    logger = _Logger(workdir_path, enabled=is_main)
    preemption = _Preemption()
    start = int(jax.device_get(state.step))
    # a bar on a terminal, else a plain line every log_every steps (stderr; stdout is the summary)
    bar = progress.Progress(config.steps, start, enabled=is_main)
    summary: dict[str, Any] = {"start_step": start, "status": "completed"}
    eval_metrics: dict[str, float] | None = None
    t_start = t_last = time.perf_counter()
    tokens_since = 0.0

    def report(step: int, metrics: dict[str, jax.Array]) -> None:
        """Host side of one step: the NaN check, the progress bar and the logs."""
        nonlocal t_last, tokens_since
        m = _to_host(metrics)
        if not m.pop("finite"):
            good = ckpt.steps()
            raise TrainingError(
                f"non-finite loss or gradients at step {step} (loss {m['loss']}, grad norm "
                f"{m['grad_norm']}); the update was not applied and the last good checkpoint "
                f"(step {good[-1] if good else 'none'}) is kept. Lower config.learning_rate "
                f"(now {config.learning_rate}) or use more config.warmup_steps (now "
                f"{config.warmup_steps}); "
                + (
                    f"gradients are already clipped to global norm {config.clip_norm} "
                    "(config.clip_norm), so also check the data and the model's dtype"
                    if config.clip_norm
                    else "gradient clipping is off (config.clip_norm=0): set e.g. "
                    "config.clip_norm=1.0"
                )
            )
        tokens_since += m["tokens"]
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            m["learning_rate"] = float(np.asarray(exp.schedule(step - 1)))
            m["tokens_per_s"] = tokens_since / (now - t_last)
            m["elapsed_s"] = now - t_start  # since this process started training
            t_last, tokens_since = now, 0.0
            bar.log(
                step,
                loss=m["loss"],
                learning_rate=m["learning_rate"],
                tokens_per_s=m["tokens_per_s"],
            )
            logger.write(step, {f"train_{k}": v for k, v in m.items()})
            summary["train_loss"] = m["loss"]

    pending = None  # (step, metrics) not yet read back from the device
    try:
        step = start
        while step < config.steps:
            batch = sharding.put_batch(next(train_iter), exp.batch_sharding)
            state, metrics = exp.train_step(state, batch, steps.step_rng(state))
            step += 1
            ckpt.poll()  # a failed async save ends the run now, not at the next save
            # Read the previous step's metrics while this one runs: in steady state the host
            # never waits for the device.
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            eval_due = step % config.eval_every == 0 or step == config.steps
            preempted = preemption.reached(step)
            save_due = step % config.checkpoint_every == 0 or step == config.steps or preempted
            if eval_due or save_due:
                report(*pending)  # never evaluate or save a state that failed the NaN check
                pending = None
            if eval_due:
                eval_metrics = evaluate(
                    config,
                    state.params,
                    eval_fn=exp.eval_step,
                    tokenizer=tokenizer,
                    batch_sharding=exp.batch_sharding,
                )
                if config.task == "mt" and config.bleu_sentences and n_proc == 1:
                    # Beam search gathers its output on one host; multi-host runs evaluate
                    # BLEU afterwards with attnzoo-eval.
                    eval_metrics["eval_bleu"] = evaluate_bleu(
                        config,
                        state.params,
                        graphdef=exp.graphdef,
                        model_cfg=exp.model_cfg,
                        tokenizer=tokenizer,
                    )
                logger.write(step, eval_metrics)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
                bar.write(f"step {step}: {shown}")  # stderr, on process 0
                summary.update(eval_metrics)
            if save_due:
                ckpt.save(
                    state,
                    data_state=train_iter.get_state(),
                    config=config,
                    metrics=eval_metrics if eval_due else None,
                    force=True,
                )
            if preempted:
                summary["status"] = "preempted"
                break
        if pending is not None:
            report(*pending)
        if config.get("average_last", 0) and summary["status"] == "completed":
            ckpt.wait()
            averaged = evaluate_average(config, ckpt, exp=exp, tokenizer=tokenizer)
            logger.write(step, averaged)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in averaged.items()))
            summary.update(averaged)
        ckpt.close()  # the last save is on disk (or its failure reported) before "completed"
        summary.update(step=step, seconds=time.perf_counter() - t_start)
    except checkpoint.SaveError as e:
        raise TrainingError(str(e)) from e
    finally:
        bar.close()
        # on the way out of an error, that error is the one to report, not a save it cut short
        with contextlib.suppress(checkpoint.SaveError):
            ckpt.close()
        logger.close()
        preemption.restore()
    if is_main:
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
