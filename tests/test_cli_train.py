"""attnzoo-train as users run it: fail-fast messages, and a real short run end to end."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from attnzoo.training import loop, schema

TRAIN = str(pathlib.Path(sys.executable).parent / "attnzoo-train")
TINY = [
    "--config.model_overrides.d_model=32",
    "--config.model_overrides.d_ff=64",
    "--config.model_overrides.n_layers=1",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.eval_batches=1",
]


def _run(tmp_path, *flags, timeout=240, config=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    config = config or str(schema.experiment_file("lm_tiny"))
    return subprocess.run(
        [TRAIN, "--config", config, "--workdir", str(tmp_path / "w"), *flags],
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


def test_shipped_experiments_by_name(tmp_path):
    # --config attnzoo:NAME is the installed route to the experiment files; overrides and
    # --nocpu_tuning apply as with a path (the bad sharding fails after the file loaded).
    result = _run(tmp_path, "--config.sharding=zero3", "--nocpu_tuning", config="attnzoo:lm_tiny")
    assert result.returncode != 0
    assert "set config.sharding to one of" in result.stderr, result.stderr[-2000:]
    result = _run(tmp_path, config="attnzoo:lm_tinny")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown experiment attnzoo:lm_tinny; attnzoo ships " in result.stderr
    shipped = result.stderr.split("attnzoo ships ", 1)[1].split(" (in ", 1)[0].split(", ")
    assert shipped == [f"attnzoo:{n}" for n in schema.experiment_names()], result.stderr[-2000:]
    assert {"attnzoo:lm_tiny", "attnzoo:mt_tiny"} <= set(shipped)


def test_every_shipped_experiment_loads_and_validates():
    root = pathlib.Path(__file__).resolve().parents[1]
    assert schema.experiments_dir() == root / "configs"
    names = schema.experiment_names()
    assert names == sorted(p.stem for p in (root / "configs").glob("*.py"))
    assert {"lm_tiny", "mt_tiny", "wmt14_ende_base", "wmt14_ende_big"} <= set(names)
    for name in names:
        c = schema.load_experiment(f"attnzoo:{name}")
        loop.validate_config(c)
        assert c.to_dict() == schema.load_experiment(str(root / "configs" / f"{name}.py")).to_dict()
    assert schema.load_experiment("wmt14_ende_big").model == "transformer_big"
    assert schema.resolve("configs/lm_tiny.py") == "configs/lm_tiny.py"
    assert schema.resolve("attnzoo:lm_tiny") == str(root / "configs" / "lm_tiny.py")
    with pytest.raises(ValueError, match="unknown experiment attnzoo:no; attnzoo ships .*lm_tiny"):
        schema.experiment_file("no")


def test_unknown_key_in_a_config_file_is_rejected():
    c = schema.load_experiment("lm_tiny")
    c.lerning_rate = 1.0
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'"):
        loop.validate_config(c)
    c = schema.load_experiment("lm_tiny")
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
    assert json.loads(result.stdout) == summary  # stdout is the JSON summary and nothing else
    assert summary["status"] == "completed" and summary["step"] == 12
    # stderr is not a terminal here: no progress bar (no carriage returns), but one plain line
    # every log_every steps with step, loss, learning rate, tokens/s and the ETA; eval results
    # go there too.
    assert "\r" not in result.stderr
    logged = [
        re.fullmatch(
            r"step (\d+)/12: loss \d+\.\d+, lr \d\.\d\de[+-]\d+, \d+ tokens/s, "
            r"ETA \d+:\d\d:\d\d",
            line,
        )
        for line in result.stderr.splitlines()
        if line.startswith("step ") and "tokens/s" in line
    ]
    assert all(logged), result.stderr[-3000:]
    assert [int(m.group(1)) for m in logged if m] == [3, 6, 9, 12]
    assert "step 6: eval_loss " in result.stderr and "step 12: eval_loss " in result.stderr
    assert sorted(
        p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["12", "6"]
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12]


def test_help_lists_every_flag_with_its_help_and_default():
    # absl's --help shows the main module's key flags: the console script's, not cli.py's
    out = subprocess.run([TRAIN, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1) and "USAGE" in out.stdout, out.stderr[-2000:]  # absl: 1
    blocks = re.split(r"\n(?=  --)", out.stdout)
    flags = {}
    for block in blocks[1:]:
        name, _, text = block.strip().partition(": ")
        flags[name.removeprefix("--").removeprefix("[no]")] = text
    assert {"config", "workdir", "cpu_tuning", "distributed", "num_processes"} <= set(flags)
    for name, text in flags.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name  # --snake_case
        assert len(text.split()) >= 3, f"--{name} has no help: {text!r}"
        assert "default" in text or "required" in text, f"--{name} shows no default: {text!r}"
    assert "--config.model_overrides.position.kind=rope" in flags["config"].replace("\n    ", "")
