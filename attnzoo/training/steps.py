"""Pure train and eval steps over a ``TrainState`` pytree.

Neither function jits or shards anything: the caller wraps them in ``jax.jit`` with the in/out
shardings of its mesh (``attnzoo.training.loop``), or calls them eagerly in a test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from attnzoo.training import losses, tasks

Batch = Mapping[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes: a pytree, so it jits, shards, checkpoints."""

    step: jax.Array  # [] int32, optimizer updates applied so far
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32 raw key data; step s uses fold_in(rng, s)

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)


def create_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: ``params``, a fresh ``tx`` state for them and the dropout key of ``seed``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def step_rng(state: TrainState) -> jax.Array:
    """The dropout key of the next step: a function of (seed, step) only, so resume is exact."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _loss_sums(
    params, graphdef, batch, rng, *, task, label_smoothing, z_loss, deterministic, fused_loss
):
    out = tasks.forward(
        task,
        graphdef,
        params,
        batch,
        deterministic=deterministic,
        dropout_rng=rng,
        return_hidden=fused_loss,
    )
    targets, weights = tasks.targets(task, batch)
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    if fused_loss:
        head = tasks.output_head(task, graphdef, params)
        sums = losses.fused_cross_entropy(head, out, targets, weights, **kw)
    else:
        sums = losses.cross_entropy(out, targets, weights, **kw)
    return sums["loss"], sums


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array | None,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    task: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    grad_accum_steps: int = 1,
    deterministic: bool = False,
    fused_loss: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on ``batch`` (dict of [B, T] arrays).

    The loss is the token-weighted mean over the whole batch. With ``grad_accum_steps = k`` the
    batch is split into k micro-batches of B/k rows whose gradient *sums* are accumulated in a
    ``lax.scan`` and divided by the total token weight once, so the update equals the one of the
    full batch exactly, also when micro-batches hold different numbers of real tokens (averaging
    per-micro-batch means, as ``optax.MultiSteps`` does, would not). Only one micro-batch's
    activations are alive at a time.

    ``fused_loss`` computes the output projection and the loss together in chunks
    (``losses.fused_cross_entropy``): the same loss and gradients, without the [B, T, V]
    logits and their gradient in memory.

    Returns the new state and metrics: ``loss`` (mean optimised loss), ``nll``, ``accuracy``,
    ``tokens``, ``grad_norm``, ``finite`` (False if the loss or a gradient is NaN/Inf; the
    update is then skipped, the state returned unchanged).
    """
    grad_fn = jax.grad(_loss_sums, has_aux=True)
    kw = dict(
        task=task,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        deterministic=deterministic or rng is None,
        fused_loss=fused_loss,
    )
    if grad_accum_steps == 1:
        grads, sums = grad_fn(state.params, graphdef, batch, rng, **kw)
    else:
        rows = next(iter(batch.values())).shape[0]
        if rows % grad_accum_steps:
            raise ValueError(
                f"batch of {rows} rows does not split into {grad_accum_steps} "
                "micro-batches; make batch_size divisible by grad_accum_steps"
            )
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, rows // grad_accum_steps, *x.shape[1:]), batch
        )  # (k, B/k, T)
        rngs = jax.random.split(rng, grad_accum_steps) if rng is not None else None

        def body(acc, xs):
            mb, mb_rng = xs
            g, s = grad_fn(state.params, graphdef, mb, mb_rng, **kw)
            return jax.tree.map(jnp.add, acc, (g, s)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        zero_sums = {
            k: jnp.zeros((), jnp.float32) for k in ("loss", "nll", "z_loss", "weight", "correct")
        }
        (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro, rngs))

    denom = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    loss = sums["loss"] / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step must not poison the state: keep the old one; the loop stops the run.
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = dict(
        loss=loss,
        nll=sums["nll"] / denom,
        accuracy=sums["correct"] / denom,
        tokens=sums["weight"],
        grad_norm=grad_norm,
        finite=finite,
    )
    return new, metrics


def eval_step(
    params: nnx.State, batch: Batch, *, graphdef: nnx.GraphDef, task: str
) -> dict[str, jax.Array]:
    """Summed ``nll``, ``correct`` and ``weight`` over the batch (sum over batches, then divide)."""
    logits = tasks.forward(task, graphdef, params, batch, deterministic=True)
    targets, weights = tasks.targets(task, batch)
    sums = losses.cross_entropy(logits, targets, weights)
    return {k: sums[k] for k in ("nll", "correct", "weight")}
