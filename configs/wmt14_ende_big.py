"""The paper's big Transformer on WMT14 English -> German: d_model 1024, 16 heads, dropout 0.3,
300k steps, the mean of the last 20 checkpoints (table 2: 28.4 BLEU on newstest2014).

Checkpoints every 600 steps (the paper's 10-minute interval at its ~1 s per step); the last 20
are kept for the average (each holds params and Adam moments: ~2.5 GB, ~50 GB in all).
FSDP by default: the optimizer state of 213M parameters is worth sharding on accelerators with
16 GB.

    pip install 'attnzoo[tpu,tf]'
    attnzoo-train --config attnzoo:wmt14_ende_big --workdir gs://BUCKET/wmt14_big
    attnzoo-eval --workdir gs://BUCKET/wmt14_big --split test --max_sentences 3003 \\
        --average_last 20
"""

from attnzoo.training import schema


def get_config():
    c = schema.load_experiment("wmt14_ende_base")  # the shipped base experiment
    c.model = "transformer_big"
    c.steps = 300_000
    c.checkpoint_every = 600
    c.average_last = 20
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.sharding = "fsdp"
    return c
