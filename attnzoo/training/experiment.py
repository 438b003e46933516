"""Everything a config determines before the first step: mesh, model, optimizer, shardings, jit.

``build(config)`` is shared by the training loop, the tests and notebooks, so that what is
tested (e.g. "DP=8 and FSDP=8 give the same params") is exactly what ``attnzoo-train`` runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from attnzoo.backends import memory
from attnzoo.training import checkpoint, optim, schema, sharding, steps, tasks
from attnzoo.training import rules as sharding_rules
from attnzoo.training.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What ``build`` makes of a config: the mesh, the model, the optimizer and jitted steps.

    ``train_step`` and ``eval_step`` take batches as dicts of ``[batch_size, seq_len]`` arrays
    placed with ``batch_sharding`` (``sharding.put_batch``).
    """

    mesh: Mesh
    rules: sharding_rules.Rules
    model_cfg: Any
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: steps.TrainState  # ShapeDtypeStructs carrying their target shardings
    state_sharding: steps.TrainState  # NamedSharding per leaf
    batch_sharding: NamedSharding
    init_state: Callable[[], steps.TrainState]  # jitted; builds the state already sharded
    train_step: Callable  # jitted (state, batch, rng) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch) -> summed metrics


def check_batch(config: schema.Config, mesh: Mesh, rules: sharding_rules.Rules) -> None:
    """Fails fast when the global batch cannot be split over processes, micro-batches, mesh."""
    split = sharding.batch_split(mesh, rules)
    n_proc = jax.process_count()
    accum = config.grad_accum_steps
    if (
        accum < 1
        or config.batch_size % n_proc
        or config.batch_size % accum
        or (config.batch_size // accum) % split
    ):
        raise ValueError(
            f"batch_size {config.batch_size} must split over {n_proc} process(es) and into "
            f"{accum} micro-batch(es), each divisible by the {split}-way batch sharding of mesh "
            f"{dict(mesh.shape)}; change config.batch_size, config.grad_accum_steps or "
            "config.mesh"
        )


def build(config: schema.Config, *, vocab_size: int, mesh: Mesh | None = None) -> Experiment:
    """The experiment of ``config`` on ``mesh`` (default: ``config.mesh`` over all devices)."""
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding_rules.get(config.sharding)
    check_batch(config, mesh, rules)
    model_cfg = tasks.model_config(config, vocab_size)
    remat_policy = memory.training_remat_policy(model_cfg.effective_remat_policy)
    if remat_policy != model_cfg.effective_remat_policy:  # "offload" with no host memory
        model_cfg = model_cfg.replace(remat_policy=remat_policy)
    sharding.check_model_axes(model_cfg, mesh, rules)
    module = tasks.model_module(config.task)
    tx, schedule = optim.make_optimizer(config, d_model=model_cfg.d_model)
    graphdef, _ = checkpoint.abstract_params(config.task, model_cfg)

    def init_state():
        _, params = module.init(model_cfg, jax.random.key(config.seed))
        return steps.create_state(params, tx, config.seed)

    # Shapes first, then the state is created directly in its sharded layout: no full copy of
    # the parameters ever sits on one device.
    shapes = jax.eval_shape(init_state)
    state_sharding = sharding.tree_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_step = functools.partial(
        steps.train_step,
        graphdef=graphdef,
        tx=tx,
        task=config.task,
        label_smoothing=config.label_smoothing,
        z_loss=config.z_loss,
        fused_loss=config.get("fused_loss", True),
        grad_accum_steps=config.grad_accum_steps,
        mesh=mesh,  # activations follow the rules too (steps.activation_sharding)
        rules=rules,
    )
    eval_step = functools.partial(
        steps.eval_step, graphdef=graphdef, task=config.task, mesh=mesh, rules=rules
    )
    return Experiment(
        mesh=mesh,
        rules=rules,
        model_cfg=model_cfg,
        graphdef=graphdef,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        init_state=jax.jit(init_state, out_shardings=state_sharding),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_sharding, batch_sharding, None),
            out_shardings=(state_sharding, None),
            donate_argnums=0,
            # XLA:CPU's memory-optimising scheduler when remat is on (else it saves nothing)
            compiler_options=memory.remat_compiler_options(remat_policy),
        ),
        eval_step=jax.jit(eval_step, in_shardings=(state_sharding.params, batch_sharding)),
    )
