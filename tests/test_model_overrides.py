"""config.model_overrides: every model Config field, typed from the dataclasses, settable from
the command line; unknown names get a did-you-mean, mistyped values a clear error."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.models.positional import PositionConfig
from attnzoo.training import checkpoint, overrides, schema, tasks

TRAIN = str(pathlib.Path(sys.executable).parent / "attnzoo-train")
TINY = [
    "--config.model_overrides.d_model=32",
    "--config.model_overrides.d_ff=64",
    "--config.model_overrides.n_layers=1",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.eval_batches=1",
]


def _train(workdir, *flags, timeout=300):
    return subprocess.run(
        [TRAIN, "--config", "attnzoo:lm_tiny", "--workdir", str(workdir), *flags],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_model_field_has_a_typed_placeholder():
    assert set(schema.MODEL_CONFIGS) == set(tasks.TASKS)
    for task, cls in schema.MODEL_CONFIGS.items():
        assert tasks.model_module(task).Config is cls
    tmpl = schema.get_config().model_overrides
    for cls in (decoder_lm.Config, encoder_decoder.Config):
        for f in dataclasses.fields(cls):
            if f.name != "vocab_size":  # the tokenizer's
                assert f.name in tmpl, f.name
    assert set(tmpl.position) == {f.name for f in dataclasses.fields(PositionConfig)}
    assert "vocab_size" not in tmpl
    types = {
        "scan_layers": bool,
        "remat_policy": str,
        "sliding_window": int,  # int | None
        "attention_scale": float,  # float | None
        "dropout": float,
        "n_encoder_layers": int,
    }
    for name, kind in types.items():
        assert tmpl.get_ref(name).get_type() is kind, name
        assert tmpl[name] is None  # the preset's value
    assert tmpl.position.get_ref("kind").get_type() is str
    assert tmpl.position.get_ref("yarn_truncate").get_type() is bool
    with pytest.raises(TypeError):
        tmpl.scan_layers = "yes"


def test_field_types_come_from_the_type_hints():
    from typing import Literal

    @dataclasses.dataclass(frozen=True)
    class Inner:
        mode: Literal["a", "b"] = "a"

    @dataclasses.dataclass(frozen=True)
    class Outer:
        sizes: tuple[int, ...] = (1,)
        inner: Inner | None = None
        width: int | None = None

    known = overrides.fields([Outer])
    assert known["sizes"].kind is tuple
    assert known["inner"].group is Inner and known["inner"].optional
    assert known["inner.mode"].choices == ("a", "b") and known["inner.mode"].kind is str
    assert known["width"].kind is int and known["width"].optional
    # a preset's None group becomes the group's defaults with the fields set
    assert overrides.changes(Outer(), {"inner": {"mode": "b"}, "sizes": [2, 3]}) == {
        "inner": Inner(mode="b"),
        "sizes": (2, 3),
    }
    with pytest.raises(ValueError, match=r"inner.mode: mode must be one of 'a', 'b'"):
        overrides.changes(Outer(), {"inner": {"mode": "c"}})


def test_overrides_build_the_model_config():
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.position.kind = "rope"
    c.model_overrides.position.rope_base = 500.0
    c.model_overrides.scan_layers = True
    c.model_overrides.sliding_window = 16
    c.model_overrides.remat_policy = "full"
    cfg = tasks.model_config(c, 256)
    preset = decoder_lm.Config.preset(c.model)
    assert cfg.position == preset.position.replace(kind="rope", rope_base=500.0)
    assert (cfg.scan_layers, cfg.sliding_window, cfg.remat_policy) == (True, 16, "full")
    assert (cfg.d_model, cfg.vocab_size) == (128, 256)  # lm_tiny's file; the tokenizer's

    c = schema.load_experiment("mt_tiny")
    c.model_overrides.position.kind = "t5"
    c.model_overrides.share_embeddings = False
    cfg = tasks.model_config(c, 300)
    assert isinstance(cfg, encoder_decoder.Config)
    assert cfg.position.kind == "t5" and not cfg.share_embeddings


def test_unknown_or_mistyped_fields_in_a_config_are_clear_errors():
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.d_modle = 3
    with pytest.raises(ValueError, match=r'"d_modle".*Did you mean "d_model"\?.*scan_layers'):
        tasks.model_config(c, 256)
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.n_encoder_layers = 2  # an encoder-decoder field, on an LM
    with pytest.raises(ValueError, match=r'"n_encoder_layers".*Valid fields: .*n_layers'):
        tasks.model_config(c, 256)
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.position.knd = "rope"
    with pytest.raises(ValueError, match=r'"knd".*Did you mean "kind"'):
        tasks.model_config(c, 256)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model_overrides.d_modle=3", r'Did you mean "d_model"\? Valid fields: '),
        ("--config.model_overrides.position.knd=rope", r'Did you mean "position.kind"'),
        ("--config.model_overrides.scan_layer=true", r'Did you mean "scan_layers"'),
        (
            "--config.model_overrides.scan_layers=maybe",
            r"scan_layers must be true or false, got 'maybe'",
        ),
        ("--config.model_overrides.n_layers=2.5", r"n_layers must be an integer, got '2.5'"),
        ("--config.model_overrides.dropout=high", r"dropout must be a number, got 'high'"),
        ("--config.model_overrides.position=rope", r"names a group of fields \(PositionConfig\)"),
        ("--config.model_overrides.vocab_size=9", r"set --config.vocab_size"),
    ],
)
def test_check_flags(flag, message):
    with pytest.raises(ValueError, match=message):
        overrides.check_flags([flag], schema.MODEL_CONFIGS.values())


def test_check_flags_accepts_every_field():
    ok = [
        "--config.model_overrides.position.kind=rope",
        "--config.model_overrides.position.rope_scaling=yarn",
        "--config.model_overrides.scan_layers=true",
        "--config.model_overrides.remat",
        "--noconfig.model_overrides.tie_embeddings",
        "--config.model_overrides.remat_policy=full",
        "--config.model_overrides.sliding_window",
        "64",
        "--config.model_overrides.attention_scale=0.5",
        "--config.steps=3",
    ]
    overrides.check_flags(ok, schema.MODEL_CONFIGS.values())


def test_cli_rejects_typos_and_bad_values_in_one_line(tmp_path):
    for flag, message in [
        ("--config.model_overrides.positon.kind=rope", 'Did you mean "position.kind"'),
        ("--config.model_overrides.scan_layers=maybe", "scan_layers must be true or false"),
    ]:
        result = _train(tmp_path / "w", flag, timeout=120)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "attnzoo-train: error: " in result.stderr
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_trains_a_rope_model_and_its_checkpoint_keeps_the_overrides(tmp_path):
    result = _train(
        tmp_path / "w",
        *TINY,
        "--config.steps=2",
        "--config.model_overrides.position.kind=rope",
        "--config.model_overrides.scan_layers=true",
        "--config.model_overrides.remat_policy=full",
        "--config.model_overrides.sliding_window=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["step"] == 2
    r = checkpoint.load_for_inference(str(tmp_path / "w"))
    cfg = r.model_cfg
    assert cfg.position.kind == "rope" and cfg.scan_layers and cfg.sliding_window == 8
    assert cfg.remat_policy == "full" and cfg.d_model == 32
    # the saved config round-trips: it rebuilds the same model and is no change on resume
    saved = r.config.to_dict()
    assert tasks.model_config(ml_collections.ConfigDict(saved), r.tokenizer.vocab_size) == cfg
    assert checkpoint.config_changes(saved, ml_collections.ConfigDict(saved)) == ([], [])
    changed = ml_collections.ConfigDict(saved)
    changed.model_overrides.position.kind = "alibi"
    fixed, _ = checkpoint.config_changes(saved, changed)
    assert fixed == ["model_overrides.position.kind='rope', config says 'alibi'"]
