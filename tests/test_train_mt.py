"""The translation task trains the encoder-decoder through the same loop and restores."""

import json

import jax
import numpy as np
import pytest

from attnzoo.models import encoder_decoder
from attnzoo.training import checkpoint, input_pipeline, loop, schema, tasks


def _config():
    c = schema.load_experiment("mt_tiny")
    c.tokenizer = "byte"  # no sentencepiece training in a unit test
    c.vocab_size = None
    c.model_overrides.update(d_model=64, d_ff=128, n_encoder_layers=1, n_decoder_layers=1)
    c.mesh.data = 2
    c.update(
        steps=40,
        batch_size=16,
        seq_len=96,
        warmup_steps=10,
        eval_every=40,
        checkpoint_every=40,
        eval_batches=2,
        log_every=10,
        bleu_sentences=4,
    )
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mt")
    config = _config()
    return config, workdir, loop.train(config, str(workdir))


def test_mt_run_learns(trained):
    _, workdir, summary = trained
    # Uniform over 259 bytes is ln(259) = 5.56 nats; 40 steps must learn well below that.
    assert summary["eval_loss"] < np.log(259) - 1.5
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(train) == 4 and train[-1] < train[0] - 0.5
    assert summary["step"] == 40
    # BLEU of beam-search translations is part of the eval (tiny: any valid score).
    assert 0.0 <= summary["eval_bleu"] <= 100.0
    assert any("eval_bleu" in r for r in rows)


def test_mt_checkpoint_restores_an_encoder_decoder(trained):
    config, workdir, _ = trained
    restored = checkpoint.load_for_inference(str(workdir))
    assert restored.task == "mt"
    assert isinstance(restored.model_cfg, encoder_decoder.Config)
    assert restored.model_cfg.n_encoder_layers == 1 and restored.model_cfg.d_model == 64
    batch = next(
        input_pipeline.batches(
            config, "validation", tokenizer=restored.tokenizer, batch_size=2, num_epochs=1
        )
    )
    logits = tasks.forward(
        "mt", restored.graphdef, restored.params, jax.tree.map(np.asarray, batch)
    )
    assert logits.shape == (2, 96, restored.tokenizer.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()
