"""The training loop: mesh, sharded state, jitted steps, eval, checkpoints, logs.

``train(config, workdir)`` is everything ``attnzoo-train`` does after flag parsing. The same
function runs on one CPU, a TPU slice or several hosts; only ``config.mesh`` and
``config.sharding`` change where things live.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import attnzoo.data
from attnzoo import evaluation
from attnzoo.training import checkpoint, experiment, input_pipeline, schema, sharding, steps


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says what to do."""


def validate_config(config: schema.Config) -> None:
    """Rejects keys the defaults do not have (typos) before anything expensive happens."""

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
    if config.steps < 1 or config.batch_size < 1 or config.seq_len < 1:
        raise ValueError("config.steps, config.batch_size and config.seq_len must be >= 1")


class _Logger:
    """metrics.jsonl + TensorBoard event files, written by process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy, process 0 only)

            self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


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
    pairs = attnzoo.data.text_pairs(config.dataset, split, data_dir=config.data_dir)
    _, bleu = evaluation.translation_bleu(
        graphdef,
        params,
        model_cfg,
        tokenizer,
        pairs[: config.bleu_sentences],
        max_len=config.seq_len,
        max_src_len=config.seq_len,
    )
    return bleu.score


def train(config: schema.Config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the experiment ``config`` in ``workdir``; returns a summary."""
    validate_config(config)
    workdir_path = pathlib.Path(workdir).absolute()
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

    ckpt = checkpoint.Checkpoints(
        workdir_path, keep=config.keep_checkpoints, async_save=config.async_checkpoints
    )
    if ckpt.steps():
        state, data_state = ckpt.restore(exp.abstract_state)
        train_iter.set_state(data_state)
        logging.info("resumed from step %d", int(state.step))
    else:
        state = exp.init_state()

    logger = _Logger(workdir_path, enabled=is_main)
    preemption = _Preemption()
    start = int(jax.device_get(state.step))
    bar = tqdm.tqdm(
        total=config.steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train"
    )
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
                f"(step {good[-1] if good else 'none'}) is kept. Lower config.learning_rate, "
                "set config.clip_norm, or use more warmup_steps"
            )
        tokens_since += m["tokens"]
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            m["learning_rate"] = float(np.asarray(exp.schedule(step - 1)))
            m["tokens_per_s"] = tokens_since / (now - t_last)
            t_last, tokens_since = now, 0.0
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                lr=f"{m['learning_rate']:.2e}",
                tok_s=f"{m['tokens_per_s']:.0f}",
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
                if is_main:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
                    bar.write(f"step {step}: {shown}")
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
        summary.update(step=step, seconds=time.perf_counter() - t_start)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        logger.close()
        preemption.restore()
    if is_main:
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
