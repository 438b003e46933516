"""``attnzoo-train``: train an experiment config.

    attnzoo-train --config attnzoo:lm_tiny --workdir runs/lm --config.steps=2000
    attnzoo-train --config configs/lm_tiny.py --workdir runs/lm     # the same, from a checkout

``--config attnzoo:NAME`` is an experiment attnzoo ships (``attnzoo.training.schema``); any
other value is the path of a ``get_config()`` file.

Several hosts: start the same command on each with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (on TPU pods and SLURM, ``--distributed`` alone lets
``jax.distributed.initialize()`` discover them).
"""

from __future__ import annotations

import json
import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from attnzoo import backends
from attnzoo.training import loop, overrides, schema, tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "required: the experiment, attnzoo:NAME (a shipped one, e.g. attnzoo:lm_tiny) or the path "
    "of a get_config() file. Override any key with --config.KEY=VALUE (e.g. --config.steps=2000) "
    "and any model Config field with --config.model_overrides.FIELD=VALUE (e.g. "
    "--config.model_overrides.position.kind=rope)",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "required: where checkpoints, metrics.jsonl and summary.json go"
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "multi-process: HOST:PORT of process 0's coordinator (default: unset, one process)",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "multi-process: process count (default: unset, one process)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "multi-process: this process's index (default: unset, one process)"
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with auto-detection"
)
_CPU_TUNING = flags.DEFINE_bool(
    "cpu_tuning",
    True,
    "on CPU, use attnzoo.backends.cpu: matmul layouts and host allocator; no effect on "
    "accelerators",
)


def _init_distributed() -> None:
    explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
    if not _DISTRIBUTED.value and all(v is None for v in explicit):
        return
    if not _DISTRIBUTED.value and any(v is None for v in explicit):
        raise app.UsageError(
            "multi-process runs need all of --coordinator_address, "
            "--num_processes and --process_id (or --distributed)"
        )
    platforms = getattr(jax.config, "jax_platforms", None)
    if platforms in (None, "", "cpu") or "cpu" in str(platforms):
        # CPU processes talk over gloo; without it cross-process collectives are unavailable.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def _check_memory(config: schema.Config) -> None:
    """``schema.check_memory``: whether a training step can fit, before anything is
    allocated or compiled (after ``loop.validate_config``, which ``loop.train`` repeats)."""
    loop.validate_config(config)
    # the tokenizer's vocabulary is not known yet: config.vocab_size, else the byte tokenizer's
    model_cfg = tasks.model_config(config, config.vocab_size or 256)
    schema.check_memory(config, model_cfg)


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if _CPU_TUNING.value:
        backends.tune_for_platform()  # before the backend starts its threads
    _init_distributed()
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        _check_memory(_CONFIG.value)
        summary = loop.train(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError, KeyError, ZeroDivisionError, loop.TrainingError) as e:
        print(f"attnzoo-train: error: {schema.describe_error(e)}", file=sys.stderr)
        sys.exit(1)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # what schema.check_memory's lower-bound estimate let through
        first = str(e).strip().splitlines()[0]
        print(
            f"attnzoo-train: error: out of memory ({first}); lower config.batch_size or "
            "config.seq_len, or raise config.grad_accum_steps",
            file=sys.stderr,
        )
        sys.exit(1)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


def _resolve_config(argv: list[str]) -> list[str]:
    """``argv`` with an ``attnzoo:NAME`` value of ``--config`` replaced by that file's path."""
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in ("--config=", "-config="):
            if arg.startswith(flag + schema.PREFIX):
                out[i] = flag + schema.resolve(arg.removeprefix(flag))
        if arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = schema.resolve(out[i + 1])
    return out


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse of ``argv``, after resolving ``--config attnzoo:NAME`` and checking every
    ``--config.model_overrides.<field>=<value>`` against the model Configs
    (``overrides.check_flags``); a bad flag exits with one ``attnzoo-train: error:`` line."""
    try:
        argv = _resolve_config(argv)
        overrides.check_flags(argv, schema.MODEL_CONFIGS.values())
    except ValueError as e:
        sys.exit(f"attnzoo-train: error: {e}")
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an unknown or mistyped --config.key=value this way.
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"attnzoo-train: error: bad --config override: {message}")


def _adopt_key_flags() -> None:
    """Makes this module's flags key flags of the main module, which is what ``--help``
    lists: run as the ``attnzoo-train`` script, the main module is that script, not this one."""
    fv = flags.FLAGS
    for flag in fv.get_key_flags_for_module(sys.modules[__name__]):
        fv.register_key_flag_for_module(sys.argv[0], flag)


def train_main() -> None:
    """Console-script entry point (``attnzoo-train``)."""
    flags.mark_flag_as_required("config")
    _adopt_key_flags()
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    train_main()
