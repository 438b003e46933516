"""Task adapters: which model module a task trains and how a batch feeds it.

The train and eval steps are model-agnostic; they only call ``forward`` and ``targets``.
``"lm"`` trains ``attnzoo.models.decoder_lm``, ``"mt"`` ``attnzoo.models.encoder_decoder``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import jax
from flax import nnx

from attnzoo.models.layers import LinearHead
from attnzoo.models.positional import PositionConfig
from attnzoo.training import schema

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

    ``vocab_size`` comes from the tokenizer; ``position`` may be given as a dict of
    ``PositionConfig`` fields; ``None`` values keep the preset's.
    """
    module = model_module(config.task)
    overrides = config.model_overrides
    overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: keep the preset's
    if isinstance(overrides.get("position"), Mapping):
        overrides["position"] = PositionConfig(**overrides["position"])
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"config.model_overrides has unknown fields {unknown} for {module.__name__}.Config; "
            f"valid: {sorted(fields)}"
        )
    return module.Config.preset(config.model, **{**overrides, "vocab_size": vocab_size})


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
