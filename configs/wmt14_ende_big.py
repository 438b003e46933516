"""The paper's big Transformer on WMT14 En->De: d_model 1024, 16 heads, dropout 0.3, 300k steps.

FSDP by default: the optimizer state of 213M parameters is worth sharding on accelerators with
16 GB.
"""

from attnzoo.training import schema


def get_config():
    c = schema.load_experiment("wmt14_ende_base")  # the shipped base experiment
    c.model = "transformer_big"
    c.steps = 300_000
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.sharding = "fsdp"
    return c
