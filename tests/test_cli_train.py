"""attnzoo-train as users run it: fail-fast messages, and a real short run end to end."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from attnzoo.configs import lm_tiny
from attnzoo.training import loop

TRAIN = str(pathlib.Path(sys.executable).parent / "attnzoo-train")
TINY = [
    "--config.model_overrides.d_model=32",
    "--config.model_overrides.d_ff=64",
    "--config.model_overrides.n_layers=1",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.eval_batches=1",
]


def _run(tmp_path, *flags, timeout=240):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [TRAIN, "--config", lm_tiny.__file__, "--workdir", str(tmp_path / "w"), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.lerning_rate=1", 'Did you mean "learning_rate"'),
        ("--config.model_overrides.d_modle=3", 'Did you mean "d_model"'),
        ("--config.mesh.data=16", "needs 16 devices but 8 exist"),
        ("--config.batch_size=12", "batch_size 12 must split"),
        ("--config.dataset=nonexistent", "unknown dataset 'nonexistent'"),
        ("--config.sharding=zero3", "set config.sharding to one of"),
    ],
)
def test_bad_configs_fail_fast_with_what_to_change(tmp_path, flag, message):
    result = _run(tmp_path, flag, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_key_in_a_config_file_is_rejected():
    c = lm_tiny.get_config()
    c.lerning_rate = 1.0
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'"):
        loop.validate_config(c)
    c = lm_tiny.get_config()
    c.mesh.pipeline = 2
    with pytest.raises(ValueError, match="unknown config key 'mesh.pipeline'"):
        loop.validate_config(c)


@pytest.mark.slow
def test_cli_trains_writes_logs_and_a_checkpoint(tmp_path):
    result = _run(
        tmp_path,
        *TINY,
        "--config.steps=12",
        "--config.eval_every=6",
        "--config.checkpoint_every=6",
        "--config.log_every=3",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=-1",
        "--config.sharding=fsdp",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert json.loads(result.stdout[result.stdout.index("{") :]) == summary
    assert summary["status"] == "completed" and summary["step"] == 12
    # The progress bar shows step, loss, learning rate, tokens/s and the ETA.
    bar = result.stderr.replace("\r", "\n")
    assert "12/12" in bar and "loss=" in bar and "lr=" in bar and "tok_s=" in bar and "<" in bar
    assert sorted(
        p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["12", "6"]
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12]
