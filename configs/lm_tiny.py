"""A byte-level LM on the bundled Shakespeare corpus: trains on 2 CPU cores in about 3 minutes.

attnzoo-train --config attnzoo:lm_tiny --workdir runs/lm [--config.steps=2000]
"""

from attnzoo.training import schema


def get_config():
    c = schema.get_config()
    c.task = "lm"
    c.dataset = "shakespeare"
    c.tokenizer = "byte"
    c.model = "tiny"
    c.model_overrides.d_model = 128
    c.model_overrides.n_layers = 2
    c.model_overrides.n_heads = 4
    c.model_overrides.d_ff = 512
    c.model_overrides.dropout = 0.0
    # The paper's sqrt(d_model) embedding scale: without it the 0.02-std token embeddings are
    # drowned by the unit-amplitude sinusoids and the model is stuck at unigram loss for
    # hundreds of steps.
    c.model_overrides.embed_scale = True
    c.steps = 600
    # 256 bytes of context: generation (attnzoo-generate) stays inside trained positions.
    c.batch_size = 16
    c.seq_len = 256
    c.learning_rate = 3e-3
    c.warmup_steps = 50
    c.weight_decay = 0.01
    c.eval_every = 200
    c.checkpoint_every = 200
    return c
