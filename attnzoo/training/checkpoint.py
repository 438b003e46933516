"""Checkpoints with orbax: async saves, keep-last-N plus best, exact resume, inference restore.

Each checkpoint step directory holds the items

- ``params``, ``opt_state``, ``meta`` (step, rng): jax arrays, written cooperatively by every
  process for the shards it owns, restorable onto any mesh (pass the target shardings);
- ``data``: the input pipeline position, one JSON file per process (grain's handler);
- ``config``: the experiment config as trained (JSON), so a checkpoint is self-describing.

A latest checkpoint that cannot be read (killed mid-write on a file system without atomic
renames, disk corruption) is reported and skipped in favour of the previous one; nothing is
deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from attnzoo.data import Tokenizer
from attnzoo.training import input_pipeline, schema, tasks
from attnzoo.training.steps import TrainState

BEST_METRIC = "eval_loss"


class _IteratorState(grain.DatasetIterator):
    """A frozen snapshot of a data iterator's state for grain's orbax handler.

    Saves are asynchronous: snapshotting here means the saved position is the one at the save
    call, not wherever the live iterator has moved on to by the time the write happens.
    """

    def __init__(self, state: dict | None = None):
        super().__init__()
        self.state = state

    def __next__(self):
        raise TypeError("a state snapshot is not iterable")

    def get_state(self) -> dict | None:
        return self.state

    def set_state(self, state: dict) -> None:
        self.state = state


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


class Checkpoints:
    """An ``ocp.CheckpointManager`` under ``workdir/checkpoints`` with this project's items."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # orbax warns when it has to change it
        )
        # orbax warns "Given directory is read only" on every read-only open, which is what
        # restoring for inference is; keep it out of the CLIs' output
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_drop_read_only_notice)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                # grain's handler implements orbax's protocol without subclassing it
                item_handlers={  # pyright: ignore[reportArgumentType]
                    "params": ocp.StandardCheckpointHandler(),
                    "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                },
            )
        finally:
            absl_logger.removeFilter(_drop_read_only_notice)

    def steps(self) -> list[int]:
        """The steps that have a checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        state: TrainState,
        *,
        data_state: dict,
        config: schema.Config,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an (async) save of ``state`` at ``state.step``; returns whether it saved."""
        step = int(jax.device_get(state.step))
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
                data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            metrics=metrics,
            force=force,
        )

    def _restore_first_good(self, step: int | None, restore_one) -> tuple[int, Any]:
        """``restore_one(step)`` on ``step`` (or the latest), falling back to older steps."""
        candidates = [s for s in reversed(self.steps()) if step is None or s == step]
        if not candidates:
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' at step {step}'} in {self.directory}"
                f"; available steps: {self.steps() or 'none'}"
            )
        for s in candidates:
            try:
                return s, restore_one(s)
            except Exception as e:  # orbax raises many types for unreadable data
                if step is not None:
                    raise ValueError(
                        f"checkpoint {self.directory / str(s)} is unreadable: "
                        f"{type(e).__name__}: {e}"
                    ) from e
                logging.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to the previous one. "
                    "It is left on disk for inspection; delete it to silence this message.",
                    self.directory / str(s),
                    type(e).__name__,
                    str(e)[:300],
                )
        raise ValueError(
            f"no readable checkpoint in {self.directory} (tried steps "
            f"{candidates}); delete the directory to start from scratch"
        )

    def restore(
        self, abstract_state: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict]:
        """(state, data iterator state) of the latest readable checkpoint.

        ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves whose ``sharding`` says where
        the arrays go: that is how a run saved under one mesh resumes under another.
        """

        def restore_one(s):
            r: Any = self.manager.restore(
                s,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    meta=ocp.args.StandardRestore(
                        {"step": abstract_state.step, "rng": abstract_state.rng}
                    ),
                    data=grain.checkpoint.CheckpointRestore(_IteratorState()),
                ),
            )
            state = TrainState(
                step=r.meta["step"], params=r.params, opt_state=r.opt_state, rng=r.meta["rng"]
            )
            return state, r.data.state

        _, out = self._restore_first_good(step, restore_one)
        return out

    def restore_params(
        self, abstract_params: Any, step: int | None = None
    ) -> tuple[int, Any, dict]:
        """(step, params, config dict) without touching the optimizer state.

        ``abstract_params`` is the params pytree as ``jax.ShapeDtypeStruct`` leaves (shapes,
        dtypes, target shardings), e.g. from ``abstract_params``.
        """

        def restore_one(s):
            r: Any = self.manager.restore(
                s,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    config=ocp.args.JsonRestore(),
                ),
            )
            return r.params, r.config

        s, (params, config) = self._restore_first_good(step, restore_one)
        return s, params, config

    def restore_config(self, step: int | None = None) -> tuple[int, dict]:
        """(step, experiment config as a dict) of ``step`` (default: the latest readable)."""
        return self._restore_first_good(
            step,
            lambda s: self.manager.restore(
                s, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )["config"],
        )

    def wait(self) -> None:
        """Blocks until every pending (async) save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the checkpoint manager."""
        self.manager.close()


@dataclasses.dataclass
class Restored:
    """A trained model ready for inference (see ``load_for_inference``)."""

    config: schema.Config  # the experiment config it was trained with (a ConfigDict)
    task: str  # "lm" or "mt"
    model_cfg: Any  # decoder_lm.Config or encoder_decoder.Config
    graphdef: nnx.GraphDef
    params: nnx.State  # on the default device
    tokenizer: Tokenizer
    step: int


def abstract_params(task: str, model_cfg: Any, sharding: Any = None) -> tuple[Any, Any]:
    """(graphdef, params as ShapeDtypeStructs): shapes only, nothing is allocated.

    ``sharding``, a pytree of ``Sharding`` matching the params, is attached to the leaves.
    """
    graphdef = None

    def init():
        nonlocal graphdef
        graphdef, params = tasks.model_module(task).init(model_cfg, jax.random.key(0))
        return params

    shapes = jax.eval_shape(init)
    if sharding is not None:
        shapes = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding
        )
    return graphdef, shapes


def load_for_inference(workdir: str, step: int | None = None) -> Restored:
    """The model trained in ``workdir`` at ``step`` (default: the latest readable checkpoint).

    Params land on the default device, whatever mesh they were trained on.
    """
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step, config_dict = ckpt.restore_config(step)
        config: schema.Config = ml_collections.ConfigDict(config_dict)
        tokenizer = input_pipeline.get_tokenizer(config)
        model_cfg = tasks.model_config(config, tokenizer.vocab_size)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        graphdef, shapes = abstract_params(config.task, model_cfg)
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes
        )
        step, params, _ = ckpt.restore_params(shapes, step)
    finally:
        ckpt.close()
    return Restored(
        config=config,
        task=config.task,
        model_cfg=model_cfg,
        graphdef=graphdef,
        params=params,
        tokenizer=tokenizer,
        step=step,
    )
