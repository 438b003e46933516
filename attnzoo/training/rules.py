"""Sharding rules: one table per strategy, mapping logical axis names to mesh axes.

Parameters carry logical names (``attnzoo.models.layers.param``); the mesh has the axes
``("data", "fsdp", "tensor")``. A table says, for each logical name, which mesh axis (or tuple
of axes) shards that dimension; ``None`` replicates it. ``"batch"`` is the batch dimension of
inputs and activations, ``"length"`` their sequence dimension; activations otherwise reuse the
parameter names (``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``;
``attnzoo.models.activation_sharding``). A mesh axis shards one dimension of an array, so under
FSDP an activation's ``embed`` stays whole: ``batch`` already holds ``fsdp``. Changing strategy
is choosing another table (``config.sharding``) and a mesh shape (``config.mesh``), nothing
else: ``get(config.sharding)`` is the table training uses.

A dimension whose size a mesh axis does not divide (e.g. a 259-entry byte vocabulary on 8
devices) is replicated instead; ``attnzoo.training.sharding`` reports it.
"""

from __future__ import annotations

from collections.abc import Mapping

Rules = Mapping[str, str | tuple[str, ...] | None]

# The batch is split over every axis that holds a different slice of data: in FSDP each device
# sees its own examples too, it only gathers the parameters it needs for the current layer.
_BATCH = ("data", "fsdp")

DP: Rules = {
    "batch": _BATCH,
    "length": None,
    "vocab": None,
    "embed": None,
    "mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "norm": None,
    "layers": None,
    "relpos": None,
    "position": None,
}

# ZeRO-3 style: every weight matrix split along its model dimension; norms/biases are tiny and
# stay replicated.
FSDP: Rules = {**DP, "embed": "fsdp"}

# Megatron-style tensor parallelism on top of FSDP: attention heads and the MLP hidden layer are
# split over "tensor" (column- then row-parallel), so each block needs one all-reduce per sublayer.
FSDP_TP: Rules = {
    **FSDP,
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
}

# Tensor parallelism alone (Megatron): weights whole along the model width, heads, MLP hidden
# units and the vocabulary split over "tensor"; a "data" axis, if the mesh has one, adds DP.
TP: Rules = {
    **DP,
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
}

RULES: dict[str, Rules] = {"dp": DP, "fsdp": FSDP, "fsdp_tp": FSDP_TP, "tp": TP}


def get(name: str) -> Rules:
    """The rules table for strategy ``name`` (``"dp"``, ``"fsdp"``, ``"fsdp_tp"`` or ``"tp"``)."""
    if name not in RULES:
        raise ValueError(
            f"unknown sharding strategy {name!r}; set config.sharding to one of {sorted(RULES)}"
        )
    return RULES[name]
