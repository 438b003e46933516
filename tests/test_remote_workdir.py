"""Remote workdirs (``gs://bucket/run``): the URL reaches orbax unchanged, nothing local is named
after it, and the local-only features (workdir lock, free-space check, TensorBoard) step aside.

The bucket is an ``etils.epath.testing.mock_epath`` file system over a temporary directory;
orbax's ``CheckpointManager`` is replaced by a recorder (its TensorStore writes would go to the
network, which the tests do not have).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from attnzoo.training import checkpoint, loop, schema

URL = "gs://bucket/run"


class _RecordingManager:
    """Stands in for ``ocp.CheckpointManager``: records the directory and the saved steps."""

    created: list[str] = []
    saved: list[int] = []

    def __init__(self, directory, options=None, item_handlers=None):
        del options, item_handlers
        type(self).created.append(str(directory))

    def all_steps(self):
        return list(type(self).saved)

    def save(self, step, args=None, metrics=None, force=False):
        del args, metrics, force
        type(self).saved.append(step)
        return True

    def is_saving_in_progress(self):
        return False

    def wait_until_finished(self):
        pass

    def reload(self):
        pass

    def close(self):
        pass


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """``gs://bucket/...`` backed by ``tmp_path/bucket``; the test runs in an empty cwd."""
    root = tmp_path / "bucket"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(p):
        text = os.fspath(p)
        return str(root / text.removeprefix("gs://bucket/")) if text.startswith("gs://") else p

    def remapped(fn, path, *args, **kw):
        args = tuple(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args)
        return fn(local(path), *args, **kw)

    fns = (
        "copy exists glob isdir listdir makedirs mkdir open remove rename replace rmtree stat walk"
    )
    monkeypatch.setattr(_RecordingManager, "created", [])
    monkeypatch.setattr(_RecordingManager, "saved", [])
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", _RecordingManager)
    with epath_testing.mock_epath(**dict.fromkeys(fns.split(), remapped)):
        yield root, cwd


def test_workdir_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(checkpoint.workdir_path(URL)) == URL
    assert str(checkpoint.workdir_path("runs/lm")) == str(tmp_path / "runs" / "lm")
    assert checkpoint.is_local("runs/lm") and not checkpoint.is_local(URL)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_checkpoints_hand_orbax_the_url(bucket):
    _, cwd = bucket
    ckpt = checkpoint.Checkpoints(URL)
    assert _RecordingManager.created == [f"{URL}/checkpoints"]
    assert isinstance(ckpt.directory, epath.Path)
    ckpt.close()
    assert list(cwd.iterdir()) == []  # no ./gs:/bucket/run


def test_remote_workdir_is_not_locked_and_says_so(bucket, caplog):
    _, cwd = bucket
    with caplog.at_level(logging.INFO):
        assert loop.lock_workdir(URL) is None
    assert "cannot be locked" in caplog.text
    assert list(cwd.iterdir()) == []


def test_training_in_a_remote_workdir(bucket):
    """The reported crash: a run in gs://... trained, then failed at its first checkpoint,
    having written everything under ./gs:/bucket/run."""
    root, cwd = bucket
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.update(n_layers=1, d_model=32, n_heads=2, d_ff=64)
    c.mesh.data = 1
    c.update(
        steps=2,
        batch_size=4,
        seq_len=16,
        eval_every=2,
        checkpoint_every=1,
        eval_batches=1,
        log_every=1,
        bleu_sentences=0,
    )
    summary = loop.train(c, URL)
    assert summary["status"] == "completed" and summary["step"] == 2
    assert _RecordingManager.created == [f"{URL}/checkpoints"]
    assert _RecordingManager.saved == [1, 2]
    run = root / "run"
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 2]  # train 1, train 2, eval 2
    assert not (run / "tensorboard").exists()  # local workdirs only
    assert list(cwd.iterdir()) == []
    assert not any(p.name.startswith("gs:") for p in pathlib.Path(root).parent.rglob("*"))
