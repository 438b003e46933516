"""The paper's base Transformer on WMT14 En->De (section 5): for TPU/GPU, tfds data.

Section 5.1-5.4: shared 37k BPE vocabulary (here sentencepiece), ~25k source + 25k target tokens
per batch, Adam(0.9, 0.98, 1e-9), lrate = d_model^-0.5 min(step^-0.5, step warmup^-1.5) with
warmup 4000, dropout 0.1, label smoothing 0.1, 100k steps.
"""

from attnzoo.training import schema


def get_config():
    c = schema.get_config()
    c.task = "mt"
    c.dataset = "wmt14_translate/de-en"
    c.tokenizer = "sentencepiece"
    c.vocab_size = 37000
    c.model = "transformer_base"
    c.steps = 100_000
    c.batch_size = 512  # x seq_len 64 ~ 25k target tokens with packing
    c.seq_len = 64
    c.optimizer = "adamw"
    c.weight_decay = 0.0
    c.schedule = "rsqrt"
    c.learning_rate = 1.0
    c.warmup_steps = 4000
    c.b1, c.b2, c.eps = 0.9, 0.98, 1e-9
    c.clip_norm = 0.0
    c.label_smoothing = 0.1
    c.eval_every = 5000
    c.eval_batches = 50
    c.bleu_sentences = 500
    c.checkpoint_every = 5000
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.sharding = "dp"
    return c
