"""The paper's base Transformer on WMT14 English -> German (section 5): for TPU/GPU, tfds data.

Section 5.1-5.4: shared 37k BPE vocabulary (here sentencepiece), ~25k source + 25k target tokens
per batch, Adam(0.9, 0.98, 1e-9), lrate = d_model^-0.5 min(step^-0.5, step warmup^-1.5) with
warmup 4000, dropout 0.1, label smoothing 0.1, 100k steps. Section 6.1: beam 4, length penalty
alpha 0.6, maximum output length input length + 50, and the mean of the last 5 checkpoints
(written at 10-minute intervals: ~1,400 of the paper's steps), which reached 27.3 BLEU on
newstest2014 (table 2).

``dataset = "wmt14_translate/en-de"``: the source is the English side, the target German
(tfds's ``wmt14_translate/de-en`` holds both; ``attnzoo.data.sources.DATASETS`` maps the name's
order onto its ``en`` and ``de`` features).

    pip install 'attnzoo[tpu,tf]'
    attnzoo-train --config attnzoo:wmt14_ende_base --workdir gs://BUCKET/wmt14_base
    attnzoo-eval --workdir gs://BUCKET/wmt14_base --split test --max_sentences 3003 \\
        --average_last 5
"""

from attnzoo.training import schema


def get_config():
    c = schema.get_config()
    c.task = "mt"
    c.dataset = "wmt14_translate/en-de"  # English source, German target
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
    # evaluation is not cut to the training length: sources up to 512 tokens, outputs up to
    # the source length + 50 (beam 4, alpha 0.6 are attnzoo-eval's defaults)
    c.eval_source_len = 512
    c.eval_max_len_offset = 50
    # the paper's checkpoint averaging: the last 5, ~10 minutes apart; the averaged model's
    # avg_eval_* metrics are reported at the end (keep_checkpoints is raised to 5)
    c.checkpoint_every = 1400
    c.average_last = 5
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.sharding = "dp"
    return c
