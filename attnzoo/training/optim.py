"""Optimizers and learning-rate schedules from the experiment config (optax)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnzoo.training import schema


def rsqrt_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """The paper's schedule (section 5.3), with optimizer steps counted from 1:

    lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)
    """
    if warmup_steps < 1:
        raise ValueError("the rsqrt schedule needs warmup_steps >= 1")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0  # optax counts updates from 0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def make_schedule(config: schema.Config, *, d_model: int) -> optax.Schedule:
    """The learning rate per optimizer step from ``config.schedule``, ``learning_rate``,
    ``warmup_steps`` (and ``steps``, ``final_lr_fraction`` for the cosine decay)."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "rsqrt":
        return rsqrt_schedule(d_model, warmup, lr)
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(config.steps, warmup + 1),
            end_value=lr * config.final_lr_fraction,
        )
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ValueError(
        f"unknown schedule {config.schedule!r}; set config.schedule to 'rsqrt', "
        "'warmup_cosine' or 'constant'"
    )


def decay_mask(params: nnx.State) -> Any:
    """True for weight matrices, False for biases and norm parameters (not weight-decayed).

    Decided from the logical axis names (any ``"norm"`` axis) and the rank (biases are vectors),
    so new layers need no list of parameter paths.
    """
    specs = nnx.get_partition_spec(params)
    return jax.tree.map(lambda x, spec: x.ndim >= 2 and "norm" not in tuple(spec), params, specs)


def make_optimizer(
    config: schema.Config, *, d_model: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) from ``config.optimizer`` and friends; clipping comes first.

    The config keys read are those of ``attnzoo.training.schema.get_config()``: ``optimizer``
    (``"adamw"`` or ``"adafactor"``), ``b1``, ``b2``, ``eps``, ``weight_decay`` (never applied
    to biases and norms: ``decay_mask``), ``clip_norm`` (global norm; 0 disables) and the
    schedule's keys (``make_schedule``). ``d_model`` scales the ``"rsqrt"`` schedule.
    """
    schedule = make_schedule(config, d_model=d_model)
    if config.optimizer == "adamw":
        opt = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    elif config.optimizer == "adafactor":
        # Adafactor's own relative step size is off: the schedule above drives it.
        opt = optax.adafactor(
            learning_rate=schedule,
            multiply_by_parameter_scale=False,
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=decay_mask,
        )
    else:
        raise ValueError(
            f"unknown optimizer {config.optimizer!r}; set config.optimizer to 'adamw' or "
            "'adafactor'"
        )
    clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    return optax.chain(*clip, opt), schedule
