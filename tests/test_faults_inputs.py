"""Every bad input a one-line error (issue 23, items 6 and 7): config values validated before
anything compiles, a memory estimate before anything is allocated, unwritable directories,
invalid UTF-8 and ``--max_len 0`` named, and a NaN message that says something true. Each test
failed on the code before.

The CLIs are called in-process with an argv list (``attnzoo-train`` through its absl flag
parser). Two tiny workdirs are trained in-process once per module: an LM (byte tokenizer;
its learning rate makes step 2 NaN, so it also yields the NaN message) and an MT model (byte
tokenizer, 128 bytes a side, 1 step). Private helpers are ``_inp_*`` so that this file merges into
``tests/test_faults.py`` without clashes.
"""

import io
import os
import pathlib
import re
import sys
from unittest import mock

import pytest
from absl import flags

from attnzoo.decoding import cli as decoding_cli
from attnzoo.training import cli as train_cli
from attnzoo.training import loop, schema, tasks

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
