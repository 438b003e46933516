"""The paper's base block as a decoder-only LM on LM1B (tfds; needs internet once), for TPU/GPU.

    attnzoo-train --config configs/lm1b_base.py --workdir gs://bucket/lm1b \\
        --config.mesh.data=-1 --config.mesh.fsdp=4 --config.sharding=fsdp
"""

from attnzoo.training import schema


def get_config():
    c = schema.get_config()
    c.task = "lm"
    c.dataset = "lm1b"
    c.tokenizer = "sentencepiece"
    c.vocab_size = 32000
    c.model = "vaswani_lm"
    c.steps = 100_000
    c.batch_size = 256
    c.seq_len = 256
    c.optimizer = "adamw"
    c.schedule = "rsqrt"
    c.learning_rate = 1.0  # multiplier of d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    c.warmup_steps = 4000
    c.b1, c.b2, c.eps = 0.9, 0.98, 1e-9
    c.clip_norm = 0.0
    c.label_smoothing = 0.1
    c.eval_every = 2000
    c.eval_batches = 50
    c.checkpoint_every = 2000
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.sharding = "dp"
    return c
