"""A byte-level LM on the bundled Shakespeare aiming at <= 1.55 nats/byte validation loss
(Hamlet) within 30 minutes on 2 CPU cores.

For scale: nanoGPT's character-level Shakespeare (6 layers, d_model 384, context 256, on a GPU)
reaches ~1.47 on its own validation split. Here: 4 layers, d_model 256, context 256, RoPE,
the last 5 checkpoints averaged at the end (``avg_eval_loss``).

    attnzoo-train --config attnzoo:lm_shakespeare --workdir runs/lm_shakespeare
    attnzoo-eval --workdir runs/lm_shakespeare --average_last 5      # nll_per_token = nats/byte

Recorded (2026-12-05, 2 CPU cores, float32): 24.4 minutes of training, **1.474 nats/byte** on
the whole validation split (Hamlet, 173,703 bytes) with the last 5 checkpoints averaged; the
curve is in ``benchmarks/RESULTS.md`` ("Recipes", ``python -m benchmarks.recipes``).
"""

from attnzoo.training import schema


def get_config():
    c = schema.get_config()
    c.task = "lm"
    c.dataset = "shakespeare"
    c.tokenizer = "byte"
    c.model = "tiny"
    c.model_overrides.d_model = 256
    c.model_overrides.n_layers = 4
    c.model_overrides.n_heads = 4
    c.model_overrides.d_ff = 1024
    c.model_overrides.dropout = 0.0
    c.model_overrides.embed_scale = True
    c.model_overrides.position.kind = "rope"
    c.steps = 2000  # ~0.8 s per step on 2 CPU cores: ~27 minutes
    c.batch_size = 16
    c.seq_len = 256
    c.learning_rate = 2e-3
    c.warmup_steps = 100
    c.final_lr_fraction = 0.05
    c.weight_decay = 0.01
    c.eval_every = 500
    c.eval_batches = 16
    c.checkpoint_every = 100
    c.average_last = 5
    c.keep_every = 500  # the curve: `python -m benchmarks.recipes` evaluates these afterwards
    return c
