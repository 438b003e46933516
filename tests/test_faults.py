"""The fault suite of issue 23 ("Runs that never lose work"): one test per probe, each of
which failed on the code before it.

Items 1-5: one writer per workdir, recovery that converges, config changes named,
inference falls back, save failures at once:

Runs that never lose work (issue 23, items 1-5): one writer per workdir, recovery from an
unreadable checkpoint that converges, config changes named on resume, inference falling back,
and a failed async save reported at the next step. Each test failed on the code before.

Tiny models trained in-process (one CPU device, batch 4 x 16 tokens) from one shared workdir
(``_ckpt_trained``: checkpoints at steps 2 and 4), copied per test. Private helpers are
``_ckpt_*`` so that this file merges into ``tests/test_faults.py`` without clashes.

Items 6-7: every bad input a one-line error:

Every bad input a one-line error (issue 23, items 6 and 7): config values validated before
anything compiles, a memory estimate before anything is allocated, unwritable directories,
invalid UTF-8 and ``--max_len 0`` named, and a NaN message that says something true. Each test
failed on the code before.

The CLIs are called in-process with an argv list (``attnzoo-train`` through its absl flag
parser). Two tiny workdirs are trained in-process once per module: an LM (byte tokenizer;
its learning rate makes step 2 NaN, so it also yields the NaN message) and an MT model (byte
tokenizer, 128 bytes a side, 1 step). Private helpers are ``_inp_*`` so that this file merges into
``tests/test_faults.py`` without clashes.

Item 7: safe loading of Hugging Face checkpoints:

Safe loading of Hugging Face checkpoints (issue 23, item 7): every probe is refused with one
line that names the tensor, the layers or the path, instead of loading a different model.

Tiny random-init models built from configs, no download. Private helpers are ``_load_*`` so that
this file merges into ``tests/test_faults.py`` without clashes.
"""

import ast
import errno
import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from absl import flags
from flax import nnx
from orbax.checkpoint._src.checkpointers import async_checkpointer
from safetensors.numpy import load_file, save_file

from attnzoo.data import locking
from attnzoo.decoding import cli as decoding_cli
from attnzoo.models import convert
from attnzoo.training import checkpoint, loop, schema, tasks
from attnzoo.training import cli as train_cli

# Reading a corrupt checkpoint leaves orbax's per-array read coroutines un-awaited; Python
# reports them as unraisable when they are collected (the library already hides them from
# users, see checkpoint.py), so pytest's warning about them says nothing about these tests.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# ================================================================================================
# Items 1-5: workdir lock, recovery, config changes, inference fallback, save failures
# ================================================================================================


def _ckpt_config(**overrides):
    """The tiny LM of ``_inp_config``, 4 steps with a checkpoint every 2."""
    return _inp_config("lm", **{"steps": 4, "checkpoint_every": 2, **overrides})


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


# ================================================================================================
# Items 6-7: every bad input a one-line error
# ================================================================================================

_INP_TINY = dict(d_model=32, d_ff=64)


def _inp_config(task: str = "lm", **overrides):
    c: schema.Config = schema.load_experiment("lm_tiny" if task == "lm" else "mt_tiny")
    c.model_overrides.update(_INP_TINY)
    if task == "lm":
        c.model_overrides.n_layers = 1
    else:
        c.model_overrides.update(n_encoder_layers=1, n_decoder_layers=1)
        c.tokenizer, c.vocab_size = "byte", None
    c.mesh.data = 1
    c.update(
        steps=1,
        batch_size=4,
        seq_len=16,
        schedule="constant",
        warmup_steps=0,
        checkpoint_every=1,
        eval_every=1000,
        eval_batches=1,
        log_every=1,
        async_checkpoints=False,
    )
    c.update(overrides)
    return c


def _inp_train_cli(capsys, *argv: str) -> tuple[int | str | None, str]:
    """``attnzoo-train --config configs/lm_tiny.py --nocpu_tuning ARGV`` in this process ->
    (exit code, stderr)."""
    flags.FLAGS.unparse_flags()
    full = [
        "attnzoo-train",
        f"--config={schema.experiment_file('lm_tiny')}",
        "--nocpu_tuning",
        *argv,
    ]
    try:
        # ml_collections finds the --config.KEY overrides in sys.argv
        with mock.patch.object(sys, "argv", full), pytest.raises(SystemExit) as e:
            train_cli._main(train_cli._parse_flags(full))
    finally:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # registered per parse: the next one registers again
    return e.value.code, capsys.readouterr().err


def _inp_last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def _inp_lm_run(tmp_path_factory):
    """(workdir, NaN message): an LM whose absurd learning rate overflows at step 2, with
    clip_norm on (the default); checkpoint 1 is kept."""
    workdir = tmp_path_factory.mktemp("lm")
    c = _inp_config(steps=4, learning_rate=1e30)
    assert c.clip_norm == 1.0
    with pytest.raises(loop.TrainingError) as e:
        loop.train(c, str(workdir))
    return workdir, str(e.value)


@pytest.fixture(scope="module")
def _inp_mt_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mt")
    loop.train(_inp_config("mt", seq_len=128), str(workdir))  # bytes: verses need ~100
    return workdir


def _inp_unwritable(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory path that cannot be created: under a read-only directory, or under /sys
    when this runs as root (root writes through permission bits)."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    probe = parent / "probe"
    try:
        probe.mkdir()
    except PermissionError:
        return parent / "w"
    probe.rmdir()
    parent = pathlib.Path("/sys/attnzoo-unwritable")
    try:
        parent.mkdir()
    except OSError:
        return parent / "w"
    parent.rmdir()
    pytest.skip("no unwritable directory available")


def _inp_unwritable_error(path: pathlib.Path) -> str:
    """The pattern of attnzoo-train's line for ``path`` (or its parent) not being writable."""
    return (
        r"attnzoo-train: error: (Permission denied|Operation not permitted|Read-only file "
        rf"system): {re.escape(str(path.parent))}\S*; the workdir and the data directory "
        r"\(config\.data_dir, else \$ATTNZOO_DATA_DIR, else ~/attnzoo_data\) must be writable"
    )


# -- config values, before anything compiles ------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("eval_every", 0, "config.eval_every must be an integer >= 1 (steps between evaluations)"),
        ("checkpoint_every", 0, "config.checkpoint_every must be an integer >= 1"),
        ("log_every", -5, "config.log_every must be an integer >= 1"),
        ("steps", 0, "config.steps must be an integer >= 1"),
        ("batch_size", 0, "config.batch_size must be an integer >= 1"),
        ("seq_len", -1, "config.seq_len must be an integer >= 1"),
        ("eval_batches", 0, "config.eval_batches must be an integer >= 1"),
        ("keep_checkpoints", 0, "config.keep_checkpoints must be an integer >= 1"),
        ("learning_rate", -1.0, "config.learning_rate must be a number > 0, got -1.0"),
        ("learning_rate", 0.0, "config.learning_rate must be a number > 0, got 0.0"),
        ("learning_rate", float("nan"), "config.learning_rate must be a number > 0, got nan"),
        ("task", "foo", "unknown config.task 'foo': set --config.task to one of lm, mt"),
    ],
)
def test_bad_values_are_rejected_naming_key_and_fix(key, value, message):
    c = _inp_config()
    c[key] = value
    with pytest.raises(ValueError) as e:
        loop.validate_config(c)
    assert message in str(e.value)
    assert f"--config.{key}" in str(e.value)


@pytest.mark.parametrize(
    "flag, message",
    [
        # was a ZeroDivisionError traceback after step 1 had compiled and run
        (
            "--config.eval_every=0",
            "config.eval_every must be an integer >= 1 (steps between evaluations), got 0: "
            "set --config.eval_every=N (default 200)",
        ),
        ("--config.checkpoint_every=0", "config.checkpoint_every must be an integer >= 1"),
        # was a KeyError traceback
        ("--config.task=foo", "unknown config.task 'foo': set --config.task to one of lm, mt"),
        # trained by gradient ascent and exited 0
        ("--config.learning_rate=-1", "config.learning_rate must be a number > 0, got -1.0"),
    ],
)
def test_train_cli_bad_values_one_line_before_anything_is_written(tmp_path, capsys, flag, message):
    small = ["--config.steps=2", "--config.batch_size=8", "--config.seq_len=32"]  # if it runs
    code, err = _inp_train_cli(capsys, f"--workdir={tmp_path / 'w'}", *small, flag)
    assert code == 1
    assert _inp_last_line(err).startswith(f"attnzoo-train: error: {message}"), err[-2000:]
    assert not (tmp_path / "w").exists()


def test_train_cli_unwritable_workdir_is_one_line(tmp_path, capsys):
    workdir = _inp_unwritable(tmp_path)
    code, err = _inp_train_cli(capsys, f"--workdir={workdir}", "--config.steps=1")
    assert code == 1
    assert re.fullmatch(_inp_unwritable_error(workdir), _inp_last_line(err)), err[-2000:]


def test_train_cli_unwritable_data_dir_is_one_line(tmp_path, capsys, monkeypatch):
    data_dir = _inp_unwritable(tmp_path)
    monkeypatch.setenv("ATTNZOO_DATA_DIR", str(data_dir))
    code, err = _inp_train_cli(capsys, f"--workdir={tmp_path / 'w'}", "--config.steps=1")
    assert code == 1
    assert re.fullmatch(_inp_unwritable_error(data_dir), _inp_last_line(err)), err[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("error", [KeyError("foo"), ZeroDivisionError("division by zero")])
def test_train_cli_turns_stray_errors_into_one_line(tmp_path, capsys, monkeypatch, error):
    # the safety net behind validation, for whatever validation misses
    def fail(config, workdir):
        raise error

    monkeypatch.setattr(loop, "train", fail)
    code, err = _inp_train_cli(capsys, f"--workdir={tmp_path / 'w'}")
    assert code == 1
    assert _inp_last_line(err) == f"attnzoo-train: error: {type(error).__name__}: {error}"


# -- memory, before anything is allocated ---------------------------------------------------


def _inp_host_of(monkeypatch, gib: int) -> None:
    """Makes this a host of ``gib`` GiB, for the memory checks."""
    limit = (gib << 30, "physical memory of this host")
    monkeypatch.setattr(schema, "memory_limit", lambda *a: limit)


def test_train_memory_estimate_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    # the probe (seq_len=100000: XLA:CPU wants 52 GiB) on a host of 16 GiB
    _inp_host_of(monkeypatch, 16)
    code, err = _inp_train_cli(capsys, f"--workdir={tmp_path / 'w'}", "--config.seq_len=100000")
    assert code == 1
    assert _inp_last_line(err) == (
        "attnzoo-train: error: config.batch_size=16 x config.seq_len=100000 needs at least "
        "25.9 GiB for one training step (state 0.0 GiB, activations 25.9 GiB), more than the "
        "16.0 GiB physical memory of this host: lower config.batch_size or config.seq_len, or "
        "raise config.grad_accum_steps (set ATTNZOO_SKIP_MEMORY_CHECK=1 to skip this estimate)"
    )
    assert not (tmp_path / "w").exists()
    # the real limit: this host's physical memory, which no host has 2.5 TiB of
    monkeypatch.undo()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert schema.memory_limit() == (physical, "physical memory of this host")
    code, err = _inp_train_cli(capsys, f"--workdir={tmp_path / 'w'}", "--config.seq_len=10000000")
    assert code == 1
    assert "GiB physical memory of this host: lower config.batch_size" in _inp_last_line(err)
    assert not (tmp_path / "w").exists()


def test_memory_estimate_passes_every_shipped_and_test_config(monkeypatch):
    def check(c):
        schema.check_memory(c, tasks.model_config(c, c.vocab_size or 256))

    # conservative: the demo configs fit in 4 GiB; the WMT and LM1B ones in one host of 8
    # accelerators of 16 GiB
    for name in schema.experiment_names():
        _inp_host_of(monkeypatch, 4 if name.endswith("_tiny") else 128)
        check(schema.load_experiment(name))
    _inp_host_of(monkeypatch, 4)
    for c in (_inp_config(), _inp_config("mt"), _inp_config(seq_len=256, batch_size=64)):
        check(c)


def test_schema_tasks_are_the_task_modules():
    assert set(schema.TASKS) == set(tasks.TASKS)


def test_generate_memory_estimate_refuses_a_huge_kv_cache(_inp_lm_run, capsys, monkeypatch):
    _inp_host_of(monkeypatch, 16)
    with pytest.raises(SystemExit) as e:
        decoding_cli.generate_main(
            ["--workdir", str(_inp_lm_run[0]), "--prompt", "ROMEO:", "--max_new_tokens",
             "100000000"]
        )  # fmt: skip
    # was an out-of-memory traceback (lm_tiny: 190.7 GiB of cache; this model 23.8 GiB)
    assert e.value.code == (
        "attnzoo-generate: error: a prompt of 7 tokens + --max_new_tokens 100000000 needs a KV "
        "cache of 23.8 GiB (2 x 1 layers x 1 rows x 100000007 slots x 4 heads x 8 dims x 4 "
        "bytes), more than the 16.0 GiB physical memory of this host: lower --max_new_tokens"
    )


def test_translate_memory_estimate_refuses_a_huge_max_len(_inp_mt_workdir, tmp_path, monkeypatch):
    _inp_host_of(monkeypatch, 16)
    path = tmp_path / "in.txt"
    path.write_text("In the beginning\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        decoding_cli.translate_main(
            ["--workdir", str(_inp_mt_workdir), "--input", str(path), "--max_len", "100000000"]
        )
    assert e.value.code == (
        "attnzoo-translate: error: --max_len 100000000 x --batch_size 16 x --beam_size 4 needs "
        "a KV cache of 1525.9 GiB (2 x 1 layers x 64 rows x 100000000 slots x 4 heads x 8 dims "
        "x 4 bytes), more than the 16.0 GiB physical memory of this host: lower --max_len, "
        "--batch_size or --beam_size"
    )


# -- attnzoo-translate's input and options ---------------------------------------------------


@pytest.mark.parametrize("command", ["translate_main", "eval_main"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_len_zero_or_negative_is_an_error(tmp_path, capsys, command, value):
    # was silently "the default" (0) or passed on to beam search (negative)
    with pytest.raises(SystemExit) as e:
        getattr(decoding_cli, command)(["--workdir", str(tmp_path / "missing"), "--max_len", value])
    assert e.value.code == 2  # argparse's usage error, before any checkpoint is read
    err = capsys.readouterr().err
    assert (
        f"error: argument --max_len: must be >= 1, got {value} (leave it out for the default)"
        in err
    )


_INP_BAD = "In the beginning\nGod created the \xff heaven\n".encode("latin-1")


def test_translate_invalid_utf8_file_names_file_and_line(_inp_mt_workdir, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(_INP_BAD)  # was a UnicodeDecodeError traceback
    with pytest.raises(SystemExit) as e:
        decoding_cli.translate_main(["--workdir", str(_inp_mt_workdir), "--input", str(path)])
    assert e.value.code == (
        f"attnzoo-translate: error: {path}: line 2 is not valid UTF-8 (byte 0xff at character "
        "17); fix the input or pass --on_invalid_utf8=replace"
    )


def test_translate_invalid_utf8_stdin_names_line(_inp_mt_workdir, monkeypatch):
    # stdin as Python opens it under a C locale: surrogateescape, which used to hand lone
    # surrogates to sentencepiece (a pybind RuntimeError); the UTF-8 locale gave a
    # UnicodeDecodeError
    stdin = io.TextIOWrapper(io.BytesIO(_INP_BAD), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    with pytest.raises(SystemExit) as e:
        decoding_cli.translate_main(["--workdir", str(_inp_mt_workdir)])
    assert e.value.code == (
        "attnzoo-translate: error: <stdin>: line 2 is not valid UTF-8 (byte 0xff at character "
        "17); fix the input or pass --on_invalid_utf8=replace"
    )


def test_translate_invalid_utf8_replaced_on_request(_inp_mt_workdir, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_bytes(_INP_BAD + b"\xc3(\n")
    decoding_cli.translate_main(
        ["--workdir", str(_inp_mt_workdir), "--input", str(path), "--on_invalid_utf8=replace",
         "--max_len", "2", "--beam_size", "1", "--batch_size", "4"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3  # one translation per input line
    assert (
        f"attnzoo-translate: warning: {path}: replaced invalid UTF-8 with U+FFFD in 2 line(s) "
        "(first: line 2)"
    ) in err


def test_generate_invalid_utf8_prompt_is_one_line(_inp_lm_run):
    prompt = b"KING \xff".decode("utf-8", errors="surrogateescape")  # as sys.argv holds it
    with pytest.raises(SystemExit) as e:
        decoding_cli.generate_main(["--workdir", str(_inp_lm_run[0]), "--prompt", prompt])
    assert e.value.code == "attnzoo-generate: error: --prompt number 1 is not valid UTF-8"


def test_decoding_cli_errors_name_the_program(tmp_path):
    with pytest.raises(SystemExit) as e:
        decoding_cli.eval_main(["--workdir", str(tmp_path / "missing")])
    assert str(e.value.code).startswith("attnzoo-eval: error: no checkpoint in ")


# -- the NaN message ---------------------------------------------------------------------------


def test_nan_message_does_not_advise_the_clipping_already_on(_inp_lm_run):
    _, message = _inp_lm_run
    assert "non-finite loss or gradients at step 2" in message
    assert "set config.clip_norm" not in message  # it was 1.0 (the default) all along
    assert "Lower config.learning_rate (now 1e+30)" in message
    assert "more config.warmup_steps (now 0)" in message
    assert "already clipped to global norm 1.0 (config.clip_norm)" in message
    assert "check the data" in message


# ================================================================================================
# Item 7: safe loading of Hugging Face checkpoints
# ================================================================================================

_LOAD_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_llama_config(n_layers: int = 2, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def _load_llama(n_layers: int = 2, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_load_llama_config(n_layers, **kw)).eval()


def _load_saved(tmp_path: pathlib.Path, n_layers: int = 2) -> pathlib.Path:
    """A tiny LLaMA saved as ``config.json`` + ``model.safetensors``, float32."""
    _load_llama(n_layers).save_pretrained(tmp_path)
    return tmp_path


def _load_rewrite(directory: pathlib.Path, edit) -> None:
    """Rewrites ``model.safetensors`` in place with ``edit(tensors)`` applied."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


_LOAD_Q = "model.layers.1.self_attn.q_proj.weight"


# ---- dtypes ------------------------------------------------------------------------------


def test_load_refuses_int8_tensors_unless_asked(tmp_path):
    d = _load_saved(tmp_path)
    quantized = {}

    def to_int8(t):
        quantized[_LOAD_Q] = np.clip(np.round(t[_LOAD_Q] * 100), -127, 127).astype(np.int8)
        t[_LOAD_Q] = quantized[_LOAD_Q]

    _load_rewrite(d, to_int8)
    with pytest.raises(ValueError) as err:
        convert.from_safetensors(d)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"llama checkpoint tensor {_LOAD_Q!r} is int8, not a float type" in msg
    assert "allow_dtype_cast=True" in msg
    # asked for: the stored values, cast as they are
    _, _, params = convert.from_safetensors(d, allow_dtype_cast=True)
    got = np.asarray(nnx.to_pure_dict(params)["blocks"][1]["self_attn"]["q"]["kernel"][...])
    want = quantized[_LOAD_Q].astype(np.float32).T.reshape(32, 4, 8)
    np.testing.assert_array_equal(got, want)


def test_load_refuses_integer_torch_tensors_from_state_dict():
    model = _load_llama()
    sd = dict(model.state_dict())
    sd["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'model.norm.weight' is int32, not a float type"):
        convert.from_state_dict("llama", model.config, sd)


def test_load_float_precisions_still_load():
    """float16 / bfloat16 / float64 are floats: upcast (or rounded) to float32, no error."""
    model = _load_llama()
    sd = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float64)
    cfg, _, _ = convert.from_state_dict("llama", model.config, sd)
    assert cfg.n_layers == 2


# ---- NaN / Inf ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_load_refuses_nan_and_inf_naming_the_tensor(tmp_path, bad):
    d = _load_saved(tmp_path)

    def poison(t):
        t[_LOAD_Q] = t[_LOAD_Q].copy()
        t[_LOAD_Q][0, :3] = float(bad)

    _load_rewrite(d, poison)
    with pytest.raises(ValueError) as err:
        convert.from_safetensors(d)
    msg = str(err.value)
    assert "\n" not in msg
    counts = "3 NaN and 0 Inf" if bad == "nan" else "0 NaN and 3 Inf"
    assert f"llama checkpoint tensor {_LOAD_Q!r} has {counts} values" in msg


# ---- tensors the config does not use -------------------------------------------------------


def test_load_refuses_layers_the_config_does_not_have(tmp_path):
    d = _load_saved(tmp_path, n_layers=3)
    want = "model.layers.2.*: 9 tensors the config (num_hidden_layers=2) does not use"
    # an explicit config with too few layers
    with pytest.raises(ValueError) as err:
        convert.from_safetensors(d, _load_llama_config(2))
    assert want in str(err.value) and "\n" not in str(err.value)
    # config.json edited to too few layers
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(want)):
        convert.from_safetensors(d)


def test_load_unused_keys_from_state_dict_and_transformers_same_error():
    big = _load_llama(n_layers=4)
    with pytest.raises(ValueError) as err:
        convert.from_state_dict("llama", _load_llama_config(2), big.state_dict())
    assert "model.layers.2-3.*: 18 tensors the config (num_hidden_layers=2) does not use" in str(
        err.value
    )
    # a head the converter does not know (a classifier on a tied LLaMA) is named, not dropped
    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(
        _load_llama_config(2, tie_word_embeddings=True, num_labels=3, pad_token_id=0)
    )
    with pytest.raises(ValueError, match=r"'score\.weight': 1 tensor no llama parameter uses"):
        convert.from_transformers(classifier)


def test_load_known_buffers_are_not_unused_keys():
    """Buffers older saves carry (transformers ignores them too) still load."""
    llama = _load_llama()
    sd = dict(llama.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    convert.from_state_dict("llama", llama.config, sd)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    )
    sd = dict(gpt2.state_dict())
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16, dtype=torch.bool))
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    convert.from_state_dict("gpt2", gpt2.config, sd)


# ---- shard paths -------------------------------------------------------------------------


def _load_sharded(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "ckpt"
    _load_llama().save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_load_refuses_weight_map_paths_outside_the_directory(tmp_path, where):
    d = _load_sharded(tmp_path)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, shard = next(iter(index["weight_map"].items()))
    # the shard really exists out there, so a reader that follows the path loads it
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(d / shard, outside / shard)
    name = f"../elsewhere/{shard}" if where == "parent" else str(outside / shard)
    index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        convert.from_safetensors(d)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"weight_map puts {key!r} in {name!r}, outside {d}" in msg


def test_load_sharded_checkpoint_inside_the_directory_loads(tmp_path):
    d = _load_sharded(tmp_path)
    cfg, _, _ = convert.from_safetensors(d)
    assert cfg.n_layers == 2


# ---- remote code ---------------------------------------------------------------------------


def test_load_runs_no_code_from_the_checkpoint(tmp_path, monkeypatch):
    # A checkpoint may ship Python (``auto_map`` + a module file) that transformers runs under
    # trust_remote_code=True. Loading reads config.json as JSON: neither that module nor any
    # transformers config loader runs.
    d = _load_saved(tmp_path)
    ran = tmp_path / "remote_code_ran"
    (d / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(cfg))

    def refuse(*args, **kwargs):
        raise AssertionError("loading went through transformers.AutoConfig")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PretrainedConfig, "from_pretrained", refuse)
    src_cfg, _, params = convert.from_pretrained(d)
    assert not ran.exists()
    assert src_cfg.n_layers == 2 and params  # it did load


def test_load_every_transformers_from_pretrained_in_the_package_passes_trust_remote_code_false():
    # attnzoo's own loader (convert.from_pretrained) needs no transformers; any transformers
    # from_pretrained call added to the package must refuse remote code explicitly.
    calls = []
    for path in sorted((_LOAD_ROOT / "attnzoo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "convert")
            ):
                value = {k.arg: k.value for k in node.keywords}.get("trust_remote_code")
                ok = isinstance(value, ast.Constant) and value.value is False
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]
    loaders = [
        p.name
        for p in (_LOAD_ROOT / "attnzoo").rglob("*.py")
        if "convert.from_pretrained(" in p.read_text()
    ]
    assert loaders, "expected attnzoo to load checkpoints through convert.from_pretrained"
