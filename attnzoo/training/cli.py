"""``attnzoo-train``: train an experiment config.

    attnzoo-train --config configs/lm_tiny.py --workdir runs/lm --config.steps=2000

Several hosts: start the same command on each with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (on TPU pods and SLURM, ``--distributed`` alone lets
``jax.distributed.initialize()`` discover them).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from attnzoo import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (get_config)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process: HOST:PORT of process 0's coordinator"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with auto-detection"
)
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_host_allocator",
    True,
    "on CPU, keep freed memory in-process so XLA's per-step buffers are not re-faulted "
    "(attnzoo.runtime.tune_host_allocator)",
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
    import jax  # noqa: PLC0415  (configure before the backend starts)

    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        # CPU processes talk over gloo; without it cross-process collectives are unavailable.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    if _TUNE_MALLOC.value:
        runtime.tune_host_allocator()  # before the backend starts its threads
    _init_distributed()
    from attnzoo.training import loop  # noqa: PLC0415  (after distributed init)

    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        summary = loop.train(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, loop.TrainingError) as e:
        print(f"attnzoo-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    import jax  # noqa: PLC0415

    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an unknown or mistyped --config.key=value this way.
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"attnzoo-train: error: bad --config override: {message}")


def train_main() -> None:
    """Console-script entry point (``attnzoo-train``)."""
    flags.mark_flag_as_required("config")
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    train_main()
