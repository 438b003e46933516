"""Checkpoints with orbax: async saves, keep-last-N plus best, exact resume, inference restore.

Each checkpoint step directory holds the items

- ``params``, ``opt_state``, ``meta`` (step, rng): jax arrays, written cooperatively by every
  process for the shards it owns, restorable onto any mesh (pass the target shardings);
- ``data``: the input pipeline position, one JSON file per process (grain's handler);
- ``config``: the experiment config as trained (JSON), so a checkpoint is self-describing.

A latest checkpoint that cannot be read (killed mid-write on a file system without atomic
renames, disk corruption) is reported in one line (step, file, reason) and skipped in favour of
the previous one. Nothing is deleted: a training resume moves the unreadable step aside to
``checkpoints/<step>.corrupt-<UTC time>`` (a name orbax does not list as a step), so that the
step can be saved again; the read-only opens of the inference CLIs leave it in place.

On resume the saved experiment config is compared with the new one first (``config_changes``):
a change to what shapes the parameters, the optimizer state or the data order is refused in one
line that names it (``ConfigMismatch``), instead of surfacing as unreadable checkpoints.

A failed (async) save is raised as ``SaveError`` (one line: step, directory, cause, last good
step) by ``poll``, cheap enough to call every step, or at the latest by the next ``save`` or
``wait``.

Workdirs are ``etils.epath`` paths (``workdir_path``): ``gs://bucket/run`` and other remote
URLs reach orbax unchanged. The free-space check needs a local file system and is skipped for
remote ones; moving an unreadable step aside is an ``epath`` rename, which works on both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from attnzoo.data import Tokenizer
from attnzoo.training import input_pipeline, schema, tasks
from attnzoo.training.steps import TrainState

BEST_METRIC = "eval_loss"
CORRUPT_MARK = ".corrupt-"  # checkpoints/60.corrupt-20260101T000000Z: moved aside, not a step

# Config keys whose value on resume must be the checkpoint's: they shape the parameters or the
# optimizer state, or decide the order of the data. ``model_overrides.*`` are compared too, as
# the model Config they make (a preset's value spelled out is no change). Every other key (steps,
# the eval, log and checkpoint cadence, the learning-rate schedule, mesh and sharding: a restore
# reshards) may change on resume; such changes are logged.
RESUME_FIXED = (
    "task",
    "dataset",
    "text_keys",
    "tokenizer",
    "vocab_size",
    "packing",
    "model",
    "seq_len",
    "batch_size",
    "seed",
    "optimizer",
)
# Keys that change the optimizer state's structure only when switched on or off.
_RESUME_FIXED_ON_OFF = ("clip_norm",)


class ConfigMismatch(ValueError):
    """The config changes something the checkpoint fixes (``RESUME_FIXED``); one line."""


class SaveError(RuntimeError):
    """A checkpoint save failed; the message (one line) names the step, the directory, the
    cause and the last good step, which is kept."""

    def __init__(self, message: str, *, step: int, disk_full: bool):
        super().__init__(message)
        self.step = step
        self.disk_full = disk_full


class _Unreadable(Exception):
    """One checkpoint step failed to restore: which file (or item folder), and why."""

    def __init__(self, step: int, where: str, reason: str):
        super().__init__(f"checkpoint {step} is unreadable ({where}: {reason})")
        self.step = step


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes / contexts, outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _one_line(e: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, shortened: how a cause is named in one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_disk_full(e: BaseException) -> bool:
    return any(
        (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left on device" in str(x)
        for x in _chain(e)
    )


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(config: Any) -> dict:
    """A config (ConfigDict or dict) as the JSON the checkpoint holds: lists, not tuples."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else json.dumps(v, default=str)


def _model_fields(config: dict) -> dict[str, Any] | None:
    """The model Config's fields that ``config`` makes (JSON-plain; nested dataclasses as
    dotted paths, ``position.kind``, as ``model_overrides`` names them), or None if it can't."""
    try:
        cfg = tasks.model_config(ml_collections.ConfigDict(config), 1)
        return _flat(_plain(dataclasses.asdict(cfg)))
    except Exception:  # an old or foreign config: compare model_overrides key by key instead
        return None


def config_changes(saved: Mapping, config: Any) -> tuple[list[str], list[str]]:
    """(changes that rule out resuming, changes that are fine): each ``key=old, config says new``.

    ``saved`` is the checkpoint's experiment config (a dict), ``config`` the new one. Keys only
    one of them has (a newer or older schema) are not compared.
    """
    old, new = _plain(saved), _plain(config)
    old_flat, new_flat = _flat(old), _flat(new)
    fixed, fine = [], []

    def change(key, a, b):
        return f"{key}={_show(a)}, config says {_show(b)}"

    models_compared = False
    if old.get("model") == new.get("model") and old.get("task") == new.get("task"):
        old_model, new_model = _model_fields(old), _model_fields(new)
        if old_model is not None and new_model is not None:
            models_compared = True
            for field in sorted(set(old_model) & set(new_model) - {"vocab_size"}):
                if old_model[field] != new_model[field]:
                    fixed.append(
                        change(f"model_overrides.{field}", old_model[field], new_model[field])
                    )
    for key in sorted(set(old_flat) & set(new_flat)):
        a, b = old_flat[key], new_flat[key]
        if a == b or (key.startswith("model_overrides.") and models_compared):
            continue
        switched = bool(a) != bool(b)  # e.g. clipping on/off: the optimizer state's structure
        if (
            key in RESUME_FIXED
            or key.startswith("model_overrides.")
            or (key in _RESUME_FIXED_ON_OFF and switched)
            or (key == "weight_decay" and new.get("optimizer") == "adafactor" and switched)
        ):
            fixed.append(change(key, a, b))
        else:
            fine.append(f"{key} {_show(a)} -> {_show(b)}")
    return fixed, fine


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


# What orbax logs, with a full traceback, when a background save fails: the failure is raised
# by ``Checkpoints.poll``/``save``/``wait`` as a one-line ``SaveError`` instead.
_SAVE_FAILURE_LOGS = (
    "Failed to run",
    "Save Finalize thread",
    "Checkpointer failed",
    "_SignalingThread.run() raised an exception",
)


def _drop_save_failure_logs(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(m in message for m in _SAVE_FAILURE_LOGS)


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """Silences orbax's abandoned reads after a failed restore.

    orbax reads the arrays of an item concurrently; when one read fails, the others' coroutines
    are dropped with their own errors, and Python prints each one ("Exception ignored in:
    <coroutine ...>", a TensorStore spec of 60 lines) whenever it is collected. The restore's
    error is reported in one line instead: collect them (``gc.collect()``) inside this block.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = _abandoned_io_hook(previous)
    try:
        yield
    finally:
        sys.unraisablehook = previous


_silenced = False


def _silence_abandoned_io() -> None:
    """After a failed save or restore, for the rest of the process: silences what orbax and
    asyncio log about that save's writes or that restore's reads still in flight (each failing
    on its own, with a traceback, whenever it is collected), so that the one-line report stands
    alone. (What TensorStore prints itself, "RuntimeError: Event loop is closed", is not
    caught: ``_check_space`` avoids starting a save that cannot fit, when most of it happens.)
    """
    global _silenced
    if _silenced:
        return
    _silenced = True
    logging.getLogger("absl").addFilter(_drop_save_failure_logs)
    logging.getLogger("asyncio").addFilter(lambda r: "orbax" not in r.getMessage())
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    sys.unraisablehook = _abandoned_io_hook(sys.unraisablehook)


def _abandoned_io_hook(previous: Callable[[Any], Any]) -> Callable[[Any], None]:
    """``sys.unraisablehook`` without orbax's abandoned coroutines (see ``_silence_abandoned_io``):
    their errors, and their callbacks into orbax's closed event loops."""

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    return hook


def workdir_path(workdir: str | os.PathLike[str]) -> epath.Path:
    """``workdir`` as an ``epath.Path``: a URL (``gs://bucket/run``, ``s3://...``) unchanged, a
    local path made absolute. Never creates anything."""
    text = os.fspath(workdir)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(pathlib.Path(text).absolute())


def is_local(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is on a local file system (no ``scheme://`` prefix)."""
    return "://" not in os.fspath(path)


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class Checkpoints:
    """An ``ocp.CheckpointManager`` under ``workdir/checkpoints`` with this project's items.

    One writer per workdir: ``attnzoo.training.train`` holds ``workdir/.lock`` while it has one
    of these open for writing, so leftover temporary folders of a killed save are removed when
    it opens.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = workdir_path(workdir) / "checkpoints"
        self.read_only = read_only
        self._pending: int | None = None  # the step of the last save not yet known to be done
        self._last_step = -1  # the step of the last save started
        self._closed = False
        kept: list[Any] = [
            policies.LatestN(n=keep),
            policies.BestN(
                get_metric_fn=lambda m: m[BEST_METRIC],
                reverse=True,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
        if keep_every:  # e.g. a BLEU-vs-time curve evaluated after training
            kept.append(policies.EveryNSteps(interval_steps=keep_every))
        policy = policies.AnyPreservationPolicy(kept)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # orbax warns when it has to change it
            # partial writes of a save that never finished (the run was killed, the disk was
            # full): safe to remove, as the workdir lock keeps out any other writer
            cleanup_tmp_directories=not read_only,
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
        # this instance's own filter object: closing one writer leaves another's in place
        self._log_filter = None if read_only else lambda r: _drop_save_failure_logs(r)
        if self._log_filter is not None:
            absl_logger.addFilter(self._log_filter)

    def steps(self) -> list[int]:
        """The steps that have a checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    # -- saving ----------------------------------------------------------------------------

    def _save_error(self, step: int, e: BaseException) -> SaveError:
        _silence_abandoned_io()
        disk_full = _is_disk_full(e)
        try:
            on_disk = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
        except OSError:
            on_disk = []
        good = max((s for s in on_disk if s != step), default=None)
        fix = "free space" if disk_full else "fix that"
        if good is None:
            after = f"there is no earlier checkpoint: {fix}, then rerun the same command"
        else:
            after = (
                f"the last good checkpoint (step {good}) is kept: {fix}, then rerun the same "
                "command to resume from it"
            )
        what = "the disk is full" if disk_full else "the save failed"
        return SaveError(
            f"saving the checkpoint of step {step} in {self.directory.parent} failed: {what} "
            f"({_one_line(e)}); {after}",
            step=step,
            disk_full=disk_full,
        )

    def _check_space(self, step: int) -> None:
        """Refuses to start a save that cannot fit next to the checkpoints kept.

        A save that fails half-way leaves orbax's and TensorStore's writes of it running, each
        failing with a traceback; one refused up front fails in one line. The estimate is the
        size of the latest checkpoint (local file systems, one process; skipped otherwise).
        """
        steps = self.steps()
        if not steps or jax.process_count() > 1 or not is_local(self.directory):
            return
        try:
            latest = pathlib.Path(self.directory / str(steps[-1]))  # local, checked above
            need = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
            free = shutil.disk_usage(self.directory).free
        except (OSError, NotImplementedError):
            return
        if free < need + (1 << 20):
            raise self._save_error(
                step,
                OSError(
                    errno.ENOSPC,
                    f"{os.strerror(errno.ENOSPC)}: {free} bytes free, checkpoint {steps[-1]} "
                    f"took {need}",
                ),
            )

    def _settle(self) -> None:
        """Waits for the pending save; raises its failure as a ``SaveError``."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step if step is not None else -1, e) from e

    def poll(self) -> None:
        """Raises ``SaveError`` if the last async save has failed; cheap (no waiting, no I/O).

        Call it every step so that a failed save (a full disk) ends the run at the next step.
        In a multi-process run every process must reach the same verdict at the same step, so
        there failures surface at the next ``save`` or ``wait`` instead (orbax's barriers).
        """
        in_progress = getattr(self.manager, "is_saving_in_progress", None)  # orbax >= 0.11.?
        if self._pending is None or in_progress is None or jax.process_count() > 1:
            return
        if not in_progress():
            self._settle()

    def save(
        self,
        state: TrainState,
        *,
        data_state: dict,
        config: schema.Config,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an (async) save of ``state`` at ``state.step``; returns whether it saved.

        Raises ``SaveError`` if this save cannot start or the previous one failed.
        """
        step = int(jax.device_get(state.step))
        if self._pending is not None:
            self._settle()
        self._last_step = step
        self._check_space(step)
        try:
            saved = self.manager.save(
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
        except Exception as e:
            raise self._save_error(step, e) from e
        if saved:
            self._pending = step
        return saved

    # -- restoring -------------------------------------------------------------------------

    def _bad_file(self, step: int, item: str, e: BaseException) -> str:
        """The file a failed restore of ``item`` at ``step`` points at, or the item's folder."""
        step_dir = self.directory / str(step)
        text = "\n".join(str(x) for x in _chain(e))
        m = re.search(re.escape(str(step_dir)) + r"/[^\s'\",;)\]]+", text)
        if m:
            return m.group(0).rstrip(".:")
        item_dir = step_dir / item
        if not item_dir.exists():
            return f"{item_dir} (missing)"
        if (item_dir / "manifest.ocdbt").exists() and not (item_dir / "_METADATA").exists():
            return f"{item_dir / '_METADATA'} (missing)"  # an array item's tree structure
        if not is_local(item_dir):  # a recursive listing of a bucket: too many requests
            return str(item_dir)
        files = [
            f
            for f in pathlib.Path(item_dir).rglob("*")
            if f.is_file() and f.name != "commit_success.txt"
        ]
        return str(files[0] if len(files) == 1 else item_dir)

    def _restore_items(self, step: int, **args: Any) -> dict[str, Any]:
        """The items ``args`` names at ``step``, one by one, so that a failure names its item."""
        out = {}
        for name, arg in args.items():
            with _quiet_abandoned_reads():
                try:
                    restored: Any = self.manager.restore(
                        step, args=ocp.args.Composite(**{name: arg})
                    )
                    out[name] = restored[name]
                    continue
                except Exception as e:  # orbax raises many types for unreadable data
                    where = self._bad_file(step, name, e)
                    # the root cause says what is wrong with a file that is there ("Requested
                    # byte range ... is not valid"); for a missing one, orbax's own words
                    cause = e if where.endswith("(missing)") else _chain(e)[-1]
                    error = _Unreadable(step, where, _one_line(cause))
                    _silence_abandoned_io()
                    del cause  # (its frames hold the abandoned reads)
                gc.collect()  # the failed read's leftovers, while they are silenced
            raise error
        return out

    def _move_aside(self, steps: list[int]) -> list[str]:
        """Renames unreadable ``steps`` to ``<step>.corrupt-<UTC time>`` (process 0; all
        processes then re-list the steps); returns what became of each, for the warning."""
        moved = []
        if jax.process_index() == 0:
            stamp = _utc_stamp()
            for s in steps:
                src = self.directory / str(s)
                dst = src.with_name(f"{s}{CORRUPT_MARK}{stamp}")
                try:
                    src.rename(dst)  # epath: local or remote
                    moved.append(f"moved aside to {dst}")
                except OSError as e:
                    moved.append(f"could not move it aside ({_one_line(e)})")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("attnzoo checkpoints moved aside")
        if jax.process_index() != 0:
            moved = ["moved aside by process 0"] * len(steps)
        self.manager.reload()
        return moved

    def _restore_first_good(
        self, step: int | None, restore_one: Callable[[int], Any], *, move_aside: bool = False
    ) -> tuple[int, Any]:
        """``restore_one(step)`` on ``step`` (or the latest), falling back to older steps.

        Each step skipped is reported in one warning line (step, file, reason). With
        ``move_aside`` (a training resume), the skipped steps are renamed
        ``<step>.corrupt-<time>`` once an older one has been restored, so that training can
        save those steps again; nothing is ever deleted. ``ConfigMismatch`` is not a fallback
        case: it is raised at once.
        """
        candidates = [s for s in reversed(self.steps()) if step is None or s == step]
        if not candidates:
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' at step {step}'} in {self.directory}"
                f"; available steps: {self.steps() or 'none'}"
            )
        failed: list[_Unreadable] = []
        for s in candidates:
            try:
                out = restore_one(s)
            except _Unreadable as e:
                if step is not None:
                    raise ValueError(str(e)) from e
                failed.append(e)
                continue
            if failed:
                unreadable = [f.step for f in failed]
                if move_aside and not self.read_only:
                    after = self._move_aside(unreadable)
                else:
                    after = ["left in place"] * len(failed)
                for f, note in zip(failed, after, strict=True):
                    logging.warning("%s; falling back to step %d; %s", f, s, note)
            return s, out
        raise ValueError(
            f"no readable checkpoint in {self.directory}: {'; '.join(map(str, failed))}; "
            "nothing was moved or deleted"
        )

    def _config_at(self, step: int) -> dict:
        return self._restore_items(step, config=ocp.args.JsonRestore())["config"]

    def _refuse(self, step: int, fixed: list[str]) -> None:
        if fixed:
            raise ConfigMismatch(
                f"checkpoint {step} in {self.directory.parent} was trained with "
                f"{'; '.join(fixed)}: use a new workdir or the original config"
            )

    def check_config(self, config: schema.Config, step: int | None = None) -> None:
        """Refuses to resume under ``config`` if it changes what the checkpoint fixes.

        Compares with the config saved at ``step`` (default: the newest one readable).
        Raises ``ConfigMismatch`` (one line, naming each change); logs allowed changes.
        """
        for s in reversed(self.steps()) if step is None else [step]:
            try:
                saved = self._config_at(s)
            except _Unreadable:
                continue  # the restore reports it and falls back
            fixed, fine = config_changes(saved, config)
            self._refuse(s, fixed)
            if fine:
                logging.warning(
                    "resuming from checkpoint %d with config changes: %s", s, ", ".join(fine)
                )
            return

    def restore(
        self,
        abstract_state: TrainState,
        step: int | None = None,
        *,
        config: schema.Config | None = None,
        move_aside: bool = False,
    ) -> tuple[TrainState, dict]:
        """(state, data iterator state) of the latest readable checkpoint.

        ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves whose ``sharding`` says where
        the arrays go: that is how a run saved under one mesh resumes under another. With
        ``config``, each step's saved config is checked against it first (``ConfigMismatch``);
        ``move_aside``: see ``_restore_first_good``.
        """

        def restore_one(s):
            if config is not None:
                self._refuse(s, config_changes(self._config_at(s), config)[0])
            r = self._restore_items(
                s,
                data=grain.checkpoint.CheckpointRestore(_IteratorState()),
                meta=ocp.args.StandardRestore(
                    {"step": abstract_state.step, "rng": abstract_state.rng}
                ),
                params=ocp.args.StandardRestore(abstract_state.params),
                opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            )
            state = TrainState(
                step=r["meta"]["step"],
                params=r["params"],
                opt_state=r["opt_state"],
                rng=r["meta"]["rng"],
            )
            return state, r["data"].state

        _, out = self._restore_first_good(step, restore_one, move_aside=move_aside)
        return out

    def restore_params(
        self, abstract_params: Any, step: int | None = None
    ) -> tuple[int, Any, dict]:
        """(step, params, config dict) without touching the optimizer state.

        ``abstract_params`` is the params pytree as ``jax.ShapeDtypeStruct`` leaves (shapes,
        dtypes, target shardings), e.g. from ``abstract_params``.
        """

        def restore_one(s):
            r = self._restore_items(
                s, config=ocp.args.JsonRestore(), params=ocp.args.StandardRestore(abstract_params)
            )
            return r["params"], r["config"]

        s, (params, config) = self._restore_first_good(step, restore_one)
        return s, params, config

    def restore_config(self, step: int | None = None) -> tuple[int, dict]:
        """(step, experiment config as a dict) of ``step`` (default: the latest readable)."""
        return self._restore_first_good(step, self._config_at)

    def wait(self) -> None:
        """Blocks until every pending (async) save is on disk; raises ``SaveError`` if one
        failed."""
        if self._pending is not None:
            self._settle()
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the checkpoint manager (once; a later call does
        nothing). A save failure still pending, or one orbax reports on closing, is raised as
        ``SaveError``."""
        if self._closed:
            return
        self._closed = True
        errors: list[SaveError] = []
        if self._pending is not None:
            try:
                self._settle()
            except SaveError as e:
                errors.append(e)
        try:
            self.manager.close()
        except Exception as e:  # e.g. a write of the failed save that was still going
            errors.append(self._save_error(self._last_step, e))
        finally:
            if self._log_filter is not None:
                logging.getLogger("absl").removeFilter(self._log_filter)
        if errors:
            raise errors[0]


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


def load_for_inference(workdir: str | os.PathLike[str], step: int | None = None) -> Restored:
    """The model trained in ``workdir`` at ``step`` (default: the latest readable checkpoint).

    Without ``step``, an unreadable latest checkpoint is reported (one warning line, as a
    training resume reports it) and the newest readable one is used; it is left in place (the
    open is read-only). Params land on the default device, whatever mesh they were trained on.
    """
    ckpt = Checkpoints(workdir, read_only=True)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore_one(s: int) -> Restored:
        config: schema.Config = ml_collections.ConfigDict(ckpt._config_at(s))
        tokenizer = input_pipeline.get_tokenizer(config)
        model_cfg = tasks.model_config(config, tokenizer.vocab_size)
        graphdef, shapes = abstract_params(config.task, model_cfg)
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes
        )
        params = ckpt._restore_items(s, params=ocp.args.StandardRestore(shapes))["params"]
        return Restored(
            config=config,
            task=config.task,
            model_cfg=model_cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            step=s,
        )

    try:
        _, restored = ckpt._restore_first_good(step, restore_one)
    finally:
        ckpt.close()
    return restored
