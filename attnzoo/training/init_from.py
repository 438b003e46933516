"""``config.init_from``: a new run's step-0 params from weights trained elsewhere.

``--config.init_from=`` takes

* a training workdir (it has ``checkpoints/``): its latest readable checkpoint's params;
* a Hugging Face directory (it has ``config.json``; ``attnzoo.models.convert.from_pretrained``);
* a ``.safetensors`` file of Hugging Face tensors for the family that expresses the config's
  model (``convert.hf_config``), e.g. a ``model.safetensors`` on its own.

The params must have exactly the shapes the config's model has (the error names the first
param that differs); other settings that differ from the source model (an activation, say)
are logged as a warning. The optimizer state starts fresh, at step 0. ``loop.train`` uses
this only for a new run: a resume restores the run's own checkpoint and ignores
``init_from`` (which may change on resume).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
from flax import nnx, traverse_util

from attnzoo.models import convert
from attnzoo.training import checkpoint, schema, steps, tasks
from attnzoo.training.experiment import Experiment

# Settings that do not change what the weights compute: not worth a warning when they differ.
_NOT_ARCHITECTURE = frozenset(
    {"dropout", "attention_dropout", "activation_dropout", "embed_init_std", "dtype",
     "param_dtype", "remat", "remat_policy", "scan_layers", "attention_impl"}
)  # fmt: skip


def load_params(source: str, *, task: str, model_cfg: Any) -> tuple[nnx.State, Any]:
    """(params, the source's model config) of ``source`` for a ``task`` model like
    ``model_cfg`` (in its ``scan_layers`` layout). Shapes are not checked here
    (``check_shapes``).

    Raises:
      ValueError: ``source`` is none of the three kinds, holds a model of the other task, or
        cannot be read (the message says why).
    """
    path = pathlib.Path(source)
    what = f"config.init_from={source}"
    if (path / "checkpoints").is_dir():
        restored = checkpoint.load_for_inference(source)
        if restored.task != task:
            raise ValueError(
                f"{what} holds a {restored.task!r} run; this config trains a {task!r} model"
            )
        src_cfg, params = restored.model_cfg, restored.params
        if src_cfg.scan_layers != model_cfg.scan_layers:
            src_cfg, _, params = tasks.model_module(task).relayout(
                src_cfg, params, scan_layers=model_cfg.scan_layers
            )
        return params, src_cfg
    if (path / "config.json").is_file():
        src_cfg, _, params = convert.from_pretrained(path, scan_layers=model_cfg.scan_layers)
    elif path.is_file() and path.suffix == ".safetensors":
        family, fields = convert.hf_config(model_cfg)
        hf = convert.read_hf_config(fields)
        src_cfg, _, params = convert.from_safetensors(
            path, hf, family=family, scan_layers=model_cfg.scan_layers
        )
    else:
        raise ValueError(
            f"{what}: {'no such file or directory' if not path.exists() else 'unknown kind'}; "
            "give a training workdir (with checkpoints/), a Hugging Face directory (with "
            "config.json) or a .safetensors file"
        )
    want = tasks.model_module(task).Config
    if not isinstance(src_cfg, want):
        raise ValueError(
            f"{what} holds a {type(src_cfg).__module__.rsplit('.', 1)[-1]} model; this config "
            f"trains a {task!r} model ({want.__module__.rsplit('.', 1)[-1]})"
        )
    return params, src_cfg


def check_shapes(params: Any, abstract: Any, source: str) -> None:
    """Fails unless ``params`` and ``abstract`` (the config's params, e.g. ShapeDtypeStructs)
    have the same param paths with the same shapes.

    Raises:
      ValueError: names the first param that differs (or is missing / extra) and both shapes.
    """
    got, want = _flat(params), _flat(abstract)
    what = f"config.init_from={source}"
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(
            f"{what} has no param {missing[0]} (of {len(missing)} the config's model has and "
            "it lacks): set --config.model / model_overrides to the source model's architecture"
        )
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(
            f"{what} has param {extra[0]} (of {len(extra)} the config's model lacks): set "
            "--config.model / model_overrides to the source model's architecture"
        )
    for key in want:
        a, b = tuple(got[key].shape), tuple(want[key].shape)
        if a != b:
            hint = (
                "the tokenizer's vocab_size must be the source model's"
                if key.startswith("embed/") or key.endswith("logits_bias")
                else "set --config.model_overrides (d_model, n_heads, d_ff, n_layers, ...) to "
                "the source model's"
            )
            raise ValueError(
                f"{what}: param {key} has shape {a} there, but the config's model needs {b}; {hint}"
            )


def _flat(params: Any) -> dict[str, Any]:
    """``{"blocks/0/mlp/wi/kernel": leaf, ...}`` of an ``nnx.State``."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    return {"/".join(map(str, k)): v for k, v in flat.items()}


def _warn_differences(src_cfg: Any, model_cfg: Any, source: str) -> None:
    ours, theirs = dataclasses.asdict(model_cfg), dataclasses.asdict(src_cfg)
    diffs = [
        f"{k}={ours[k]!r} (source: {theirs[k]!r})"
        for k in ours
        if k not in _NOT_ARCHITECTURE | {"vocab_size"} and ours[k] != theirs.get(k)
    ]
    if diffs:
        logging.warning(
            "config.init_from=%s: the config's model differs from the source model in %s; "
            "its weights are loaded anyway (the shapes match)",
            source,
            ", ".join(diffs),
        )


def initial_state(config: schema.Config, exp: Experiment) -> steps.TrainState:
    """The step-0 state of a new run: ``exp.init_state()``, or with ``config.init_from`` set,
    that source's params (cast to the config's ``param_dtype``, laid out as
    ``exp.state_sharding``) and a fresh optimizer state."""
    source = config.get("init_from")
    if not source:
        return exp.init_state()
    params, src_cfg = load_params(source, task=config.task, model_cfg=exp.model_cfg)
    check_shapes(params, exp.abstract_state.params, source)
    _warn_differences(src_cfg, exp.model_cfg, source)
    # the source's values in the config's own params tree (its variable metadata, its dtypes)
    target = jax.tree.map(lambda a: a, exp.abstract_state.params)
    values = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    dtypes: dict[Any, Any] = traverse_util.flatten_dict(nnx.to_pure_dict(target))
    cast = {k: jax.numpy.asarray(v, dtypes[k].dtype) for k, v in values.items()}
    nnx.replace_by_pure_dict(target, traverse_util.unflatten_dict(cast))
    make = jax.jit(
        lambda p: steps.create_state(p, exp.tx, config.seed), out_shardings=exp.state_sharding
    )
    state = make(jax.device_put(target, exp.state_sharding.params))
    logging.info("initialised the params from %s (%s)", source, type(src_cfg).__module__)
    return state
