"""Two processes x 4 CPU devices on JAX's distributed runtime train like one process x 8.

Each process runs the real CLI with ``--coordinator_address/--num_processes/--process_id``,
feeds only its half of every global batch and takes part in the collective checkpoint. The
reference is computed here, in one process over the 8 test devices, from the same two data
shards concatenated into the same global batches.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from attnzoo.training import checkpoint, experiment, input_pipeline, schema, sharding, steps

STEPS = 6
OVERRIDES = dict(
    steps=STEPS,
    batch_size=8,
    seq_len=32,
    schedule="constant",
    warmup_steps=2,
    log_every=1,
    eval_every=STEPS,
    eval_batches=2,
    checkpoint_every=3,
)
MODEL = dict(d_model=32, d_ff=64, n_layers=1)


def _config():
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.update(MODEL)
    c.update(OVERRIDES)
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    """(losses, final params) of one process over 8 devices fed [shard 0 rows; shard 1 rows]."""
    config = _config()
    tokenizer = input_pipeline.get_tokenizer(config)
    exp = experiment.build(config, vocab_size=tokenizer.vocab_size)
    shards = [
        input_pipeline.batches(
            config, "train", tokenizer=tokenizer, batch_size=4, shard_index=i, shard_count=2
        )
        for i in range(2)
    ]
    state, losses = exp.init_state(), []
    for _ in range(STEPS):
        parts = [next(it) for it in shards]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = exp.train_step(
            state, sharding.put_batch(batch, exp.batch_sharding), steps.step_rng(state)
        )
        losses.append(float(metrics["loss"]))
    return losses, state.params


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [
        f"--config.model_overrides.{k}={v}" for k, v in MODEL.items()
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "attnzoo.training.cli",
                "--config",
                str(schema.experiment_file("lm_tiny")),
                "--workdir",
                str(tmp_path),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *flags,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    ref_losses, ref_params = _reference()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    # Only process 0 logged (one row per step, not two) and printed the summary.
    assert len(losses) == STEPS
    assert '"status": "completed"' in outputs[0][0]
    assert "status" not in outputs[1][0] and "eval_loss" not in outputs[1][0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)

    # Both processes wrote their shards of the checkpoint; it restores to the reference.
    restored = checkpoint.load_for_inference(str(tmp_path))
    assert restored.step == STEPS
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_params))
    for path, a in jax.tree_util.tree_leaves_with_path(restored.params):
        name = jax.tree_util.keystr(path)
        if "['k']['bias']" in name:
            # Its true gradient is exactly zero (softmax ignores a per-query constant): Adam
            # turns the float32 noise, which depends on the reduction order, into updates.
            continue
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref[path]), atol=1e-5, err_msg=name)
    data_dir = tmp_path / "checkpoints" / str(STEPS) / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in data_dir.iterdir()}
