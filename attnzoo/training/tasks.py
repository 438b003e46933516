"""Task adapters: which model module a task trains and how a batch feeds it.

The train and eval steps are model-agnostic; they only call ``forward`` and ``targets``.
``"lm"`` trains ``attnzoo.models.decoder_lm``, ``"mt"`` ``attnzoo.models.encoder_decoder``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import jax
from flax import nnx

from attnzoo.models.layers import LinearHead
from attnzoo.training import overrides, schema

TASKS = {"lm": "attnzoo.models.decoder_lm", "mt": "attnzoo.models.encoder_decoder"}


def model_module(task: str) -> ModuleType:
    """The model module ``task`` trains (``TASKS``): ``init``, ``apply``, ``Config``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; set config.task to one of {sorted(TASKS)}")
    try:
        return importlib.import_module(TASKS[task])
    except ModuleNotFoundError as e:
        raise ValueError(f"task {task!r} needs {TASKS[task]}, which is not installed") from e


def model_config(config: schema.Config, vocab_size: int) -> Any:
    """The model ``Config`` of ``config.model`` (a preset) with ``config.model_overrides``.

    ``vocab_size`` comes from the tokenizer. ``None`` values keep the preset's; a nested
    dataclass field (``position``) changes only the sub-fields set, e.g.
    ``model_overrides.position.kind = "rope"`` keeps the preset's other ``PositionConfig``
    fields (``attnzoo.training.overrides.changes``).

    Raises:
      ValueError: an unknown field for this task's Config (did-you-mean, valid fields), a
        mistyped value, or a combination the model Config rejects.
    """
    module = model_module(config.task)
    preset = module.Config.preset(config.model)
    changes = overrides.changes(preset, config.get("model_overrides"))
    return preset.replace(**{**changes, "vocab_size": vocab_size})


def forward(
    task: str,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Mapping[str, jax.Array],
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Logits ``[B, T, V]`` for the batch's targets (final hidden states [B, T, D] with
    ``return_hidden``; ``output_head`` projects them)."""
    kw = dict(deterministic=deterministic, dropout_rng=dropout_rng, return_hidden=return_hidden)
    if task == "lm":
        return model_module(task).apply(
            graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"], **kw
        )
    return model_module(task).apply(
        graphdef,
        params,
        batch["src"],
        batch["tgt_inputs"],
        batch["src_segment_ids"],
        batch["tgt_segment_ids"],
        src_positions=batch["src_positions"],
        tgt_positions=batch["tgt_positions"],
        **kw,
    )


def output_head(task: str, graphdef: nnx.GraphDef, params: nnx.State) -> LinearHead:
    """The model's output projection (``LinearHead``), for losses that apply it themselves."""
    return model_module(task).output_head(graphdef, params)


def targets(task: str, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T] int, weights [B, T] float; 0 on padding)."""
    if task == "lm":
        return batch["targets"], batch["weights"]
    return batch["tgt_targets"], batch["tgt_weights"]
