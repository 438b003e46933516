"""Checkpoints: exact resume after SIGKILL, SIGTERM preemption, restore onto another mesh,
falling back from a corrupt latest checkpoint, and stopping on NaN."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnzoo.training import checkpoint, experiment, loop, schema

TINY = [
    "--config.model_overrides.d_model=32",
    "--config.model_overrides.d_ff=64",
    "--config.model_overrides.n_layers=1",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.schedule=constant",  # so that runs of different lengths share the lr at each step
    "--config.warmup_steps=2",
    "--config.log_every=1",
    "--config.eval_every=1000",
    "--config.eval_batches=1",
    "--config.checkpoint_every=5",
]


def _train(workdir, *flags):
    cmd = [
        sys.executable,
        "-m",
        "attnzoo.training.cli",
        "--config",
        str(schema.experiment_file("lm_tiny")),
        "--workdir",
        str(workdir),
        *TINY,
        *flags,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(workdir) -> dict[int, float]:
    """step -> train loss; a step logged twice (re-run after a resume) keeps its last value."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def _wait_until(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    reference = _train(tmp_path / "ref", "--config.steps=20")
    _finish(reference)
    ref = _losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 21))

    # A long run, killed hard once it has a checkpoint behind it (the schedule is constant, so
    # its first 20 steps are the reference's).
    killed = _train(tmp_path / "run", "--config.steps=100000")
    # Past step 12: checkpoints 5 and 10 were started; 10 may still be mid-write (async), in
    # which case orbax never committed it and the resume starts from 5.
    _wait_until(lambda: max(_losses(tmp_path / "run"), default=0) >= 12, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    before = _losses(tmp_path / "run")
    assert max(before) >= 10

    resumed = _train(tmp_path / "run", "--config.steps=20")
    _finish(resumed)
    after = _losses(tmp_path / "run")
    assert sorted(after) == list(range(1, 21))
    # Bit for bit: same floats, not merely close.
    assert after == ref
    assert {s: before[s] for s in before if s <= 20} == {s: ref[s] for s in before if s <= 20}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["start_step"] in (5, 10, 15) and summary["step"] == 20


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _train(tmp_path, "--config.steps=100000")
    _wait_until(lambda: max(_losses(tmp_path), default=0) >= 7, proc)
    proc.send_signal(signal.SIGTERM)
    _finish(proc, timeout=60)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted"
    ckpt = checkpoint.Checkpoints(tmp_path, read_only=True)
    assert ckpt.steps()[-1] == summary["step"] >= 7
    ckpt.close()


def _tiny_config(sizes, strategy):
    c = schema.get_config()
    c.model_overrides.update(d_model=32, n_heads=4, d_ff=64, n_layers=1)
    c.update(batch_size=8, seq_len=16, sharding=strategy, async_checkpoints=False)
    c.mesh.update(sizes)
    return c


def _save(workdir, state, config, data_state=None):
    ckpt = checkpoint.Checkpoints(workdir, async_save=False)
    ckpt.save(state, data_state=data_state or {"step": int(state.step)}, config=config, force=True)
    ckpt.wait()
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    c_fsdp = _tiny_config(dict(data=1, fsdp=8, tensor=1), "fsdp")
    exp_fsdp = experiment.build(c_fsdp, vocab_size=64)
    state = exp_fsdp.init_state()
    wi = state.params["blocks"][0]["mlp"]["wi"]["kernel"][...]
    assert wi.sharding.spec == P("fsdp", None)
    _save(tmp_path, state, c_fsdp)

    c_tp = _tiny_config(dict(data=2, fsdp=1, tensor=4), "fsdp_tp")
    exp_tp = experiment.build(c_tp, vocab_size=64)
    restored, data_state = checkpoint.Checkpoints(tmp_path).restore(exp_tp.abstract_state)
    assert data_state == {"step": 0}
    wi_tp = restored.params["blocks"][0]["mlp"]["wi"]["kernel"][...]
    assert wi_tp.sharding.spec == P(None, "tensor")
    mu = restored.opt_state[1][0].mu["blocks"][0]["mlp"]["wi"]["kernel"][...]
    assert mu.sharding.spec == P(None, "tensor")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_latest_checkpoint_falls_back_and_deletes_nothing(tmp_path, caplog):
    c = _tiny_config(dict(data=8, fsdp=1, tensor=1), "dp")
    exp = experiment.build(c, vocab_size=64)
    state = exp.init_state()
    _save(tmp_path, state, c, {"step": 0})
    later = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1.0, state.params))
    _save(tmp_path, later, c, {"step": 1})
    for f in (tmp_path / "checkpoints" / "1" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        restored, data_state = checkpoint.Checkpoints(tmp_path).restore(exp.abstract_state)
    assert "unreadable" in caplog.text and "falling back" in caplog.text
    assert int(restored.step) == 0 and data_state == {"step": 0}
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "checkpoints" / "1").exists()
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.Checkpoints(tmp_path).restore(exp.abstract_state, step=1)


def test_read_only_open_logs_no_orbax_warnings(tmp_path, caplog):
    # the inference CLIs open checkpoints read-only; orbax's notices about it are noise there
    checkpoint.Checkpoints(tmp_path).manager.close()  # creates workdir/checkpoints
    with caplog.at_level(logging.WARNING):
        checkpoint.Checkpoints(tmp_path, read_only=True).manager.close()
    assert "read only" not in caplog.text and "save_interval_steps" not in caplog.text
    drop = checkpoint._drop_read_only_notice
    assert drop not in logging.getLogger("absl").filters  # scoped to the open
    # and only that notice: any other warning orbax logs while opening still gets through
    record = lambda msg: logging.LogRecord("absl", logging.WARNING, __file__, 0, msg, (), None)
    assert not drop(record("Given directory is read only=/w/checkpoints"))
    assert drop(record("Checkpoint at step 3 is unreadable"))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.update(d_model=32, d_ff=64, n_layers=1)
    c.mesh.data = 1
    # An absurd learning rate: step 1 is finite, step 2 overflows.
    c.update(
        steps=10,
        batch_size=4,
        seq_len=16,
        learning_rate=1e30,
        schedule="constant",
        warmup_steps=0,
        clip_norm=0.0,
        checkpoint_every=1,
        eval_every=100,
        async_checkpoints=False,
    )
    with pytest.raises(loop.TrainingError, match=r"non-finite .* checkpoint \(step 1\) is kept"):
        loop.train(c, str(tmp_path))
    ckpt = checkpoint.Checkpoints(tmp_path, read_only=True)
    assert ckpt.steps() == [1]
    ckpt.close()


def test_keeps_the_latest_n_plus_the_best(tmp_path):
    c = _tiny_config(dict(data=8, fsdp=1, tensor=1), "dp")
    state = experiment.build(c, vocab_size=64).init_state()
    ckpt = checkpoint.Checkpoints(tmp_path, keep=2, async_save=False)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        metrics = None if loss is None else {"eval_loss": loss}
        ckpt.save(
            state.replace(step=state.step + step),
            data_state={},
            config=c,
            metrics=metrics,
            force=True,
        )
    ckpt.wait()
    assert ckpt.steps() == [2, 4, 5]  # the best (lowest eval loss) and the latest two
    ckpt.close()


def test_keep_every_also_keeps_the_multiples(tmp_path):
    c = _tiny_config(dict(data=8, fsdp=1, tensor=1), "dp")
    state = experiment.build(c, vocab_size=64).init_state()
    ckpt = checkpoint.Checkpoints(tmp_path, keep=1, keep_every=3, async_save=False)
    for step in range(1, 9):
        ckpt.save(state.replace(step=state.step + step), data_state={}, config=c, force=True)
    ckpt.wait()
    assert ckpt.steps() == [3, 6, 8]  # the multiples of 3 and the latest
    ckpt.close()


def test_keep_every_must_be_a_multiple_of_checkpoint_every():
    c = _tiny_config(dict(data=8, fsdp=1, tensor=1), "dp")
    c.update(checkpoint_every=2, keep_every=3)
    with pytest.raises(ValueError, match="keep_every=3 is not a multiple of .*checkpoint_every=2"):
        schema.validate(c)
    c.keep_every = 4
    schema.validate(c)
