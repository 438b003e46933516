"""End-to-end: a short lm_tiny run learns the corpus and restores for inference."""

import json
import math
from collections import Counter

import jax
import numpy as np
import pytest

from attnzoo.training import checkpoint, input_pipeline, loop, schema, tasks


def _config(**kw):
    c = schema.load_experiment("lm_tiny")
    c.model_overrides.n_layers = 1
    c.mesh.data = 1  # one device: this test is about learning, test_sharding about meshes
    c.update(
        dict(
            steps=100,
            batch_size=32,
            seq_len=64,
            eval_every=100,
            checkpoint_every=50,
            eval_batches=4,
            log_every=20,
            warmup_steps=20,
            learning_rate=5e-3,
        ),
        **kw,
    )
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm")
    config = _config()
    summary = loop.train(config, str(workdir))
    return config, workdir, summary


def _unigram_entropy_nats(config) -> float:
    """Entropy of the validation split's token frequencies: the best a context-free model does."""
    tokenizer = input_pipeline.get_tokenizer(config)
    it = input_pipeline.batches(
        config, "validation", tokenizer=tokenizer, batch_size=64, num_epochs=1
    )
    counts = Counter()
    for _, batch in zip(range(20), it, strict=False):
        counts.update(batch["targets"][batch["weights"] > 0].tolist())
    p = np.array(list(counts.values()), np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def test_eval_loss_falls_well_below_unigram_entropy(trained):
    config, _, summary = trained
    entropy = _unigram_entropy_nats(config)
    assert 2.5 < entropy < 4.0  # sanity: English bytes carry ~3 nats of unigram entropy
    assert summary["eval_loss"] < entropy - 0.4, (summary["eval_loss"], entropy)
    assert math.isclose(summary["eval_perplexity"], math.exp(summary["eval_loss"]), rel_tol=1e-6)


def test_metrics_jsonl_and_tensorboard_are_written(trained):
    _, workdir, _ = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [20, 40, 60, 80, 100]
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert all(r["train_tokens_per_s"] > 0 and r["train_learning_rate"] > 0 for r in train_rows)
    elapsed = [r["train_elapsed_s"] for r in train_rows]  # wall clock, for loss-vs-time curves
    assert elapsed[0] > 0 and all(b > a for a, b in zip(elapsed, elapsed[1:], strict=False))
    assert elapsed[-1] <= json.loads((workdir / "summary.json").read_text())["seconds"]
    assert any("eval_loss" in r for r in rows)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_load_for_inference_restores_the_trained_params(trained):
    config, workdir, summary = trained
    restored = checkpoint.load_for_inference(str(workdir))
    assert restored.step == 100 and restored.task == "lm"
    assert restored.config.to_dict() == config.to_dict()
    assert restored.model_cfg == tasks.model_config(config, restored.tokenizer.vocab_size)
    # The restored model reproduces the logged eval loss on the same batches.
    from attnzoo.training import rules, sharding, steps

    mesh = jax.make_mesh(
        (1, 1, 1),
        ("data", "fsdp", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=jax.devices()[:1],
    )
    eval_fn = jax.jit(lambda p, b: steps.eval_step(p, b, graphdef=restored.graphdef, task="lm"))
    metrics = loop.evaluate(
        config,
        restored.params,
        eval_fn=eval_fn,
        tokenizer=restored.tokenizer,
        batch_sharding=sharding.batch_sharding(mesh, rules.DP),
    )
    assert metrics["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)


def test_load_for_inference_at_an_earlier_step(trained):
    _, workdir, _ = trained
    early = checkpoint.load_for_inference(str(workdir), step=50)
    late = checkpoint.load_for_inference(str(workdir))
    assert early.step == 50
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), early.params, late.params)
    assert max(jax.tree.leaves(diff)) > 0
