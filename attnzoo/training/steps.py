"""Pure train and eval steps over a ``TrainState`` pytree.

Neither function jits anything: the caller wraps them in ``jax.jit`` with the in/out shardings
of its mesh (``attnzoo.training.experiment``), or calls them eagerly in a test. Given the
``mesh`` and the rules table, they constrain the model's activations while it is traced
(``activation_sharding``); without them the model runs unconstrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from attnzoo.models import activation_sharding as act
from attnzoo.training import losses, sharding, tasks
from attnzoo.training.rules import Rules

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


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules | None) -> Iterator[None]:
    """While tracing inside it, the models' activations follow ``rules`` on ``mesh``
    (``attnzoo.models.activation_sharding``); with either ``None``, nothing is constrained."""
    to_spec = (
        None
        if mesh is None or rules is None
        else functools.partial(sharding.logical_to_mesh, mesh=mesh, rules=rules)
    )
    with act.activation_sharding(mesh, to_spec):
        yield


def _constrain_batch(batch: Batch) -> Batch:
    """Every [B, T] input laid out as ("batch", "length") (no-op outside a sharding scope)."""
    names = lambda v: ("batch", "length", *(None,) * (v.ndim - 2))[: v.ndim]
    return {k: act.constrain(v, names(v)) for k, v in batch.items()}


def micro_batches(batch: Batch, k: int) -> Batch:
    """``batch`` [B, ...] -> [k, B/k, ...]: micro-batch i holds rows i, i + k, i + 2k, ...

    Strided, not contiguous: the batch is split over n devices in contiguous blocks of B/n
    rows, so with n | B/k every device holds B/(n k) rows of every strided micro-batch and each
    accumulation step computes on local rows only. A contiguous micro-batch (rows i B/k to
    (i+1) B/k - 1) lives on n/k of the devices: XLA all-gathers it and each device computes
    k times its share (data=8, k=4: 5 all-gathers, ~4x the FLOPs). Rows are independent
    examples (packing stays within a row), so only the summation order changes: the loss is
    the full batch's up to float rounding, and resume stays exact (the order depends on the
    batch alone).
    """
    rows = next(iter(batch.values())).shape[0]
    if rows % k:
        raise ValueError(
            f"batch of {rows} rows does not split into {k} micro-batches; make "
            "batch_size divisible by grad_accum_steps"
        )
    return jax.tree.map(lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _loss_sums(
    params, graphdef, batch, rng, *, task, label_smoothing, z_loss, deterministic, fused_loss
):
    batch = _constrain_batch(batch)
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


def _grads(params, graphdef, batch, rng, grad_fn, k, kw):
    """Gradient and loss sums of the whole batch, over ``k`` micro-batches when ``k > 1``."""
    if k == 1:
        return grad_fn(params, graphdef, batch, rng, **kw)
    micro = micro_batches(batch, k)  # (k, B/k, T)
    rngs = jax.random.split(rng, k) if rng is not None else None

    def body(acc, xs):
        mb, mb_rng = xs
        g, s = grad_fn(params, graphdef, mb, mb_rng, **kw)
        return jax.tree.map(jnp.add, acc, (g, s)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_sums = {
        name: jnp.zeros((), jnp.float32) for name in ("loss", "nll", "z_loss", "weight", "correct")
    }
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro, rngs))
    return grads, sums


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
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on ``batch`` (dict of [B, T] arrays).

    The loss is the token-weighted mean over the whole batch. With ``grad_accum_steps = k`` the
    batch is split into k strided micro-batches of B/k rows (``micro_batches``: each device
    keeps computing on its own rows) whose gradient *sums* are accumulated in a
    ``lax.scan`` and divided by the total token weight once, so the update equals the one of the
    full batch exactly, also when micro-batches hold different numbers of real tokens (averaging
    per-micro-batch means, as ``optax.MultiSteps`` does, would not). Only one micro-batch's
    activations are alive at a time.

    ``fused_loss`` computes the output projection and the loss together in chunks
    (``losses.fused_cross_entropy``): the same loss and gradients, without the [B, T, V]
    logits and their gradient in memory.

    ``mesh`` and ``rules`` (the strategy's table) constrain the activations while tracing
    (``activation_sharding``); leave them ``None`` to run unsharded or let XLA choose.

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
    with activation_sharding(mesh, rules):
        grads, sums = _grads(state.params, graphdef, batch, rng, grad_fn, grad_accum_steps, kw)

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
    params: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    task: str,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> dict[str, jax.Array]:
    """Summed ``nll``, ``correct`` and ``weight`` over the batch (sum over batches, then divide).

    ``mesh`` and ``rules`` constrain the activations as in ``train_step``.
    """
    with activation_sharding(mesh, rules):
        logits = tasks.forward(task, graphdef, params, _constrain_batch(batch), deterministic=True)
    targets, weights = tasks.targets(task, batch)
    sums = losses.cross_entropy(logits, targets, weights)
    return {k: sums[k] for k in ("nll", "correct", "weight")}
