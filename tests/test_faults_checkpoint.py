"""Runs that never lose work (issue 23, items 1-5): one writer per workdir, recovery from an
unreadable checkpoint that converges, config changes named on resume, inference falling back,
and a failed async save reported at the next step. Each test failed on the code before.

Tiny models trained in-process (one CPU device, batch 4 x 16 tokens) from one shared workdir
(``_ckpt_trained``: checkpoints at steps 2 and 4), copied per test. Private helpers are
``_ckpt_*`` so that this file merges into ``tests/test_faults.py`` without clashes.
"""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

from attnzoo.data import locking
from attnzoo.training import checkpoint, loop, schema


def _ckpt_config(**overrides):
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.update(d_model=32, d_ff=64, n_layers=1)
    c.mesh.data = 1
    c.update(
        steps=4,
        batch_size=4,
        seq_len=16,
        schedule="constant",
        warmup_steps=0,
        checkpoint_every=2,
        eval_every=1000,
        eval_batches=1,
        log_every=1,
        async_checkpoints=False,
    )
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def _ckpt_trained(tmp_path_factory):
    """A workdir trained for 4 steps: checkpoints 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    loop.train(_ckpt_config(), str(workdir))
    return workdir


def _ckpt_copy(src, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run


def _ckpt_truncate_params(run, step):
    """Truncates the largest file of ``step``'s params to half: a torn write."""
    files = [f for f in (run / "checkpoints" / str(step) / "params").rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim


def _ckpt_logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"] for r in rows if "train_loss" in r}


def _ckpt_cli(workdir, *flags, **kwargs):
    """``attnzoo-train`` on a tiny model in a subprocess (``Popen`` keywords in ``kwargs``)."""
    cmd = [
        sys.executable,
        "-m",
        "attnzoo.training.cli",
        "--config",
        str(schema.experiment_file("lm_tiny")),
        "--workdir",
        str(workdir),
        "--config.model_overrides.d_model=32",
        "--config.model_overrides.d_ff=64",
        "--config.model_overrides.n_layers=1",
        "--config.mesh.data=1",
        "--config.batch_size=4",
        "--config.seq_len=16",
        "--config.eval_batches=1",
        "--config.log_every=1",
        *flags,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(cmd, env=env, text=True, **kwargs)


def test_second_run_on_a_workdir_fails_at_once_naming_the_first(tmp_path):
    first = _ckpt_cli(
        tmp_path, "--config.steps=100000", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # the first run holds the workdir: its lock names it (or, before locks existed, it is
        # training)
        lock, deadline = tmp_path / ".lock", time.monotonic() + 90
        while not (
            (lock.exists() and f"pid {first.pid} " in lock.read_text())
            or (tmp_path / "metrics.jsonl").exists()
        ):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = _ckpt_cli(
            tmp_path, "--config.steps=2", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1, err[-3000:]
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"attnzoo-train: error: workdir {re.escape(str(tmp_path))} is in use by pid "
            rf"{first.pid} on host \S+ \(started [0-9-]+ [0-9:]+ UTC\); wait for it or use "
            r"another --workdir",
            last,
        ), last
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # kill -9 released it: the next run (here, its lock) needs no cleanup
    locking.hold_lock(tmp_path / ".lock", "next run").close()


def test_unreadable_checkpoint_is_moved_aside_and_restarts_converge(
    _ckpt_trained, tmp_path, caplog
):
    run = _ckpt_copy(_ckpt_trained, tmp_path)
    victim = _ckpt_truncate_params(run, 4)
    with caplog.at_level(logging.WARNING):
        first = loop.train(_ckpt_config(steps=4), str(run))  # falls back to 2, saves 4 again
    assert first["start_step"] == 2 and first["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint")]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    moved = list((run / "checkpoints").glob("4.corrupt-*"))
    assert len(moved) == 1
    # one line: the step, the file (or its item folder), the reason, what happened to it
    assert re.fullmatch(
        rf"checkpoint 4 is unreadable \({re.escape(str(run / 'checkpoints' / '4' / 'params'))}"
        rf"\S*: \w+: .+\); falling back to step 2; moved aside to {re.escape(str(moved[0]))}",
        warnings[0],
    ), warnings[0]
    # kept, never deleted, and not a step orbax lists
    assert (moved[0] / victim.relative_to(run / "checkpoints" / "4")).exists()
    ckpt = checkpoint.Checkpoints(run, read_only=True)
    assert ckpt.steps() == [2, 4]
    ckpt.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = loop.train(_ckpt_config(steps=6), str(run))  # the new 4 is good
    assert second["start_step"] == 4 and second["step"] == 6
    assert "unreadable" not in caplog.text
    assert len(list((run / "checkpoints").glob("*.corrupt-*"))) == 1


def test_model_change_on_resume_is_named_and_steps_change_is_allowed(
    _ckpt_trained, tmp_path, caplog
):
    run = _ckpt_copy(_ckpt_trained, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    changed = _ckpt_config(steps=6)
    changed.model_overrides.d_model = 64
    with pytest.raises(ValueError) as e:
        loop.train(changed, str(run))
    message = str(e.value)
    assert "\n" not in message and "unreadable" not in message
    assert re.fullmatch(
        rf"checkpoint 4 in {re.escape(str(run))} was trained with model_overrides\.d_model=32, "
        r"config says 64: use a new workdir or the original config",
        message,
    ), message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved

    with caplog.at_level(logging.WARNING):
        summary = loop.train(_ckpt_config(steps=5, eval_every=500), str(run))
    assert summary["start_step"] == 4 and summary["step"] == 5
    assert "config changes: eval_every 1000 -> 500, steps 4 -> 5" in caplog.text


def test_inference_falls_back_past_an_unreadable_latest_step(_ckpt_trained, tmp_path, caplog):
    run = _ckpt_copy(_ckpt_trained, tmp_path)
    _ckpt_truncate_params(run, 4)
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.load_for_inference(str(run))
    assert restored.step == 2
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint")]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert re.fullmatch(
        rf"checkpoint 4 is unreadable \({re.escape(str(run / 'checkpoints' / '4' / 'params'))}"
        r"\S*: \w+: .+\); falling back to step 2; left in place",
        warnings[0],
    ), warnings[0]
    assert (run / "checkpoints" / "4").is_dir()  # a read-only open moves nothing


def test_failed_async_save_ends_the_run_at_the_next_step(tmp_path, monkeypatch, caplog):
    # The background half of an async save fails as a full disk does, for step 10 only.
    original = async_checkpointer._background_wait_for_commit_futures

    def full_disk(directory, *args, **kwargs):
        if directory.name.split(".")[0] == "10":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return original(directory, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", full_disk)
    config = _ckpt_config(steps=20, checkpoint_every=5, async_checkpoints=True)
    with caplog.at_level(logging.WARNING), pytest.raises(loop.TrainingError) as e:
        loop.train(config, str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"saving the checkpoint of step 10 in {re.escape(str(tmp_path))} failed: the disk is "
        r"full \(OSError: \[Errno 28\] No space left on device: .+\); the last good "
        r"checkpoint \(step 5\) is kept: free space, then rerun the same command to resume from it",
        message,
    ), message
    # reported before the next save (step 15), where it surfaced before
    assert max(_ckpt_logged_steps(tmp_path)) < 15
    assert not any(r.exc_info for r in caplog.records)  # no orbax traceback in the logs
    time.sleep(0.2)  # the abandoned write of step 10 settles in its temporary folder
    ckpt = checkpoint.Checkpoints(tmp_path, read_only=True)
    assert ckpt.steps() == [5]
    ckpt.close()
