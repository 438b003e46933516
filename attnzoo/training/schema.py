"""The config schema: defaults every experiment starts from, and the experiments attnzoo ships.

Stable top-level keys (docs, notebooks and external tools rely on them): ``steps, batch_size,
seq_len, seed, learning_rate, eval_every, checkpoint_every, mesh.{data,fsdp,tensor}, model,
model_overrides, task, dataset, tokenizer, vocab_size``. ``attnzoo-train`` rejects any key that
is not here, so a typo in ``--config.lerning_rate`` fails instead of being ignored.

Experiment files (``get_config()`` modules that start from ``get_config()`` here and override
what they change) live in ``configs/`` of a checkout; an installed wheel carries the same files
in ``<prefix>/share/attnzoo/configs``. ``attnzoo:NAME`` names one wherever it lives::

    attnzoo-train --config attnzoo:lm_tiny --workdir runs/lm    # or --config configs/lm_tiny.py
    config = schema.load_experiment("lm_tiny")                  # the same ConfigDict in Python

``validate(config)`` rejects values no run can use (intervals, sizes, learning rate, task);
``check_memory(config, model_cfg)`` a training step that cannot fit this machine's memory
(``estimate_train_memory``). ``attnzoo-train`` runs both before anything is compiled.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import math
import os
import pathlib
import sysconfig
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from attnzoo.models import attention, decoder_lm, encoder_decoder
from attnzoo.training import overrides

# An experiment config: the ml_collections.ConfigDict of get_config(), with an experiment's values.
# Annotations say ``schema.Config`` for it; it is ``Any`` to type checkers because ConfigDict's
# fields are dynamic (``config.steps`` would otherwise be ``str | float | ... | None``).
Config = Any

# The values of ``config.task`` (``attnzoo.training.tasks.TASKS`` maps each to its model module).
TASKS = ("lm", "mt")
# Each task's model Config (``tasks.model_module(task).Config``); model_overrides has their fields.
MODEL_CONFIGS: dict[str, type] = {"lm": decoder_lm.Config, "mt": encoder_decoder.Config}
PREFIX = "attnzoo:"  # --config attnzoo:NAME names a shipped experiment file
_SHARE = ("share", "attnzoo", "configs")  # where the wheel installs them, under the prefix


def get_config() -> ml_collections.ConfigDict:
    """The defaults: every key an experiment may set, with its default value."""
    c = ml_collections.ConfigDict()
    c.task = "lm"  # "lm" (attnzoo.models.decoder_lm) or "mt" (attnzoo.models.encoder_decoder)
    c.dataset = "shakespeare"
    c.tokenizer = "byte"  # "byte" or "sentencepiece"
    # fields of a tfds:/jsonl: dataset to read: one for an LM, (source, target) for MT; () = default
    c.text_keys = ml_collections.FieldReference(None, field_type=tuple)
    c.vocab_size = ml_collections.FieldReference(None, field_type=int)  # sentencepiece only
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.packing = True

    c.model = "tiny"  # a preset name of the task's model module (Config.preset)
    c.model_overrides = model_overrides()
    # step-0 params from a run's workdir, a Hugging Face directory or a .safetensors file
    # (attnzoo.training.init_from); the optimizer starts fresh; ignored when resuming
    c.init_from = ml_collections.FieldReference(None, field_type=str)

    c.steps = 1000
    c.batch_size = 32  # global, across all processes and devices
    c.seq_len = 128
    c.seed = 0

    c.optimizer = "adamw"  # "adamw" or "adafactor"
    c.learning_rate = 1e-3  # peak; for schedule="rsqrt" a multiplier of the paper's formula
    c.schedule = "warmup_cosine"  # "warmup_cosine", "rsqrt" (the paper's), "constant"
    c.warmup_steps = 100
    c.final_lr_fraction = 0.1  # cosine decays to this fraction of the peak
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-9
    c.weight_decay = 0.0  # decoupled (AdamW); never applied to biases, norms
    c.clip_norm = 1.0  # global-norm clipping; 0 disables
    c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
    c.label_smoothing = 0.0
    c.z_loss = 0.0
    # head + loss in one chunked pass, never holding [B, T, V] logits (losses.fused_cross_entropy)
    c.fused_loss = True

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: remaining devices
    c.sharding = "dp"  # a table of attnzoo.training.rules.RULES

    c.eval_every = 200
    c.eval_batches = 8
    c.bleu_sentences = 0  # MT: sentences of the eval split translated for BLEU (0: skip)
    # MT beam search: source tokens kept (None: seq_len) and the paper's output limit, source
    # length + N (None: seq_len tokens); attnzoo-eval/-translate read them as their defaults
    c.eval_source_len = ml_collections.FieldReference(None, field_type=int)
    c.eval_max_len_offset = ml_collections.FieldReference(None, field_type=int)
    # at the end of training, evaluate the mean params of the last N checkpoints (0: off);
    # keep_checkpoints is raised to N (attnzoo.training.averaging)
    c.average_last = 0
    c.checkpoint_every = 200
    c.keep_checkpoints = 3  # latest N are kept, plus the best by eval loss
    # also keep every checkpoint whose step is a multiple of N (0: none), e.g. to evaluate a
    # BLEU-vs-time curve after training; a multiple of checkpoint_every
    c.keep_every = 0
    c.async_checkpoints = True
    c.log_every = 10
    return c


def text_keys(config: Config) -> tuple[str, ...] | None:
    """``config.text_keys`` as a tuple, or None when unset (as in configs saved before it)."""
    keys = config.get("text_keys") if hasattr(config, "get") else None
    return tuple(keys) if keys else None


def model_overrides() -> ml_collections.ConfigDict:
    """``config.model_overrides``: every field of every task's model Config (nested
    dataclasses such as ``position`` as nested ConfigDicts), each a typed ``None`` (the preset's
    value), so ``--config.model_overrides.<field>=<value>`` works for any of them
    (``attnzoo.training.overrides``). Which fields a task accepts is checked when its model
    Config is built (``tasks.model_config``)."""
    return overrides.template(MODEL_CONFIGS.values())


def experiments_dir() -> pathlib.Path | None:
    """The directory of the shipped experiment files, or ``None`` if they are not installed.

    In a checkout (the package next to ``pyproject.toml``) that is ``configs/``; in an installed
    wheel, the copy the wheel put in ``<prefix>/share/attnzoo/configs``.
    """
    root = pathlib.Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root / "configs"
    try:
        files = importlib.metadata.distribution("attnzoo").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:  # the wheel's RECORD lists them relative to site-packages
        if f.parent.parts[-3:] == _SHARE:
            return pathlib.Path(str(f.locate())).resolve().parent
    fallback = pathlib.Path(sysconfig.get_path("data")).joinpath(*_SHARE)
    return fallback if fallback.is_dir() else None


def experiment_names() -> list[str]:
    """Names of the shipped experiments (``attnzoo:NAME``), sorted."""
    directory = experiments_dir()
    if directory is None:
        return []
    return sorted(p.stem for p in directory.glob("*.py") if not p.name.startswith("_"))


def experiment_file(name: str) -> pathlib.Path:
    """The file of the shipped experiment ``name`` (``"lm_tiny"`` or ``"attnzoo:lm_tiny"``).

    Raises:
      ValueError: no such experiment; the message lists the ones there are.
    """
    stem = name.removeprefix(PREFIX)
    directory = experiments_dir()
    if directory is None:
        raise ValueError(
            f"cannot resolve {PREFIX}{stem}: attnzoo's experiment files are not installed "
            f"(neither a checkout's configs/ nor <prefix>/{'/'.join(_SHARE)}); pass a file path"
        )
    names = experiment_names()
    if stem not in names:
        shipped = ", ".join(PREFIX + n for n in names)
        raise ValueError(
            f"unknown experiment {PREFIX}{stem}; attnzoo ships {shipped} (in {directory}), "
            "or pass a config file path"
        )
    return directory / f"{stem}.py"


def resolve(config_arg: str) -> str:
    """A ``--config`` value as a file path: ``attnzoo:NAME`` resolved, anything else unchanged."""
    return str(experiment_file(config_arg)) if config_arg.startswith(PREFIX) else config_arg


def load_experiment(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of an experiment: a shipped name (``"lm_tiny"``, ``"attnzoo:lm_tiny"``)
    or the path of a ``.py`` experiment file.

    Raises:
      ValueError: an unknown name (the message lists the shipped ones).
    """
    path = pathlib.Path(name) if name.endswith(".py") else experiment_file(name)
    spec = importlib.util.spec_from_file_location(f"attnzoo_experiment_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load experiment file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# Keys that must be integers >= 1, and what they count (for the error message).
_POSITIVE = {
    "steps": "training steps",
    "batch_size": "sequences per step, over all processes",
    "seq_len": "tokens per sequence",
    "eval_every": "steps between evaluations",
    "eval_batches": "batches per evaluation",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "latest checkpoints kept",
    "log_every": "steps between log lines",
}

# ``ATTNZOO_SKIP_MEMORY_CHECK=1`` skips ``check_memory`` (for when its estimate is wrong).
SKIP_MEMORY_CHECK_ENV = "ATTNZOO_SKIP_MEMORY_CHECK"
_GiB = 1 << 30


def validate(config: Config) -> None:
    """Rejects values no run can use, before anything is built, compiled or written.

    Intervals, counts and sizes (``_POSITIVE``) must be integers >= 1, ``learning_rate`` a
    finite number > 0 (a negative one would train by gradient ascent), and ``task`` one of
    ``TASKS``. Each message names the key and the fix.

    Raises:
      ValueError: the first bad value.
    """
    defaults = get_config()
    for key, what in _POSITIVE.items():
        value = config.get(key, defaults[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"config.{key} must be an integer >= 1 ({what}), got {value!r}: set "
                f"--config.{key}=N (default {defaults[key]})"
            )
    lr = config.get("learning_rate", defaults.learning_rate)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        ascent = " (a negative rate trains by gradient ascent)" if lr < 0 else ""
        raise ValueError(
            f"config.learning_rate must be a number > 0, got {lr!r}{ascent}: set "
            f"--config.learning_rate, e.g. {defaults.learning_rate} (the default)"
        )
    task = config.get("task", defaults.task)
    if task not in TASKS:
        raise ValueError(
            f"unknown config.task {task!r}: set --config.task to one of {', '.join(TASKS)}"
        )
    average = config.get("average_last", 0)
    if isinstance(average, bool) or not isinstance(average, int) or average < 0:
        raise ValueError(
            f"config.average_last must be an integer >= 0 (checkpoints averaged at the end; 0: "
            f"off), got {average!r}: set --config.average_last=N"
        )
    every = config.get("keep_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(
            f"config.keep_every must be an integer >= 0 (steps between checkpoints kept for "
            f"good; 0: none), got {every!r}: set --config.keep_every=N"
        )
    if every and every % config.checkpoint_every:
        raise ValueError(
            f"config.keep_every={every} is not a multiple of config.checkpoint_every="
            f"{config.checkpoint_every}, so some of the checkpoints it should keep are never "
            f"written: set --config.keep_every to a multiple of {config.checkpoint_every}"
        )


def gib(n: float) -> str:
    """``n`` bytes as ``"12.3 GiB"``."""
    return f"{n / _GiB:.1f} GiB"


def memory_limit(devices: Sequence[Any] | None = None) -> tuple[int, str] | None:
    """(bytes, what they are) available to a program on ``devices``, or ``None`` if unknown.

    CPU devices share the host's physical memory (``os.sysconf``), counted once per process;
    accelerators add up ``memory_stats()["bytes_limit"]`` of this process's devices, times the
    number of processes (each host has the same devices). Default: every local device.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    n_proc = jax.process_count()
    hosts = f" x {n_proc} hosts" if n_proc > 1 else ""
    if not devices:
        return None
    if all(d.platform == "cpu" for d in devices):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return total * n_proc, f"physical memory of this host{hosts}"
    total = 0
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001  (backends without memory stats raise various errors)
            return None
        if not stats or "bytes_limit" not in stats:
            return None
        total += int(stats["bytes_limit"])
    return total * n_proc, f"memory of {len(devices)} {devices[0].platform} device(s){hosts}"


def _itemsize(dtype: str) -> int:
    return jax.numpy.dtype(dtype).itemsize


def _param_estimate(model_cfg: Any) -> int:
    """Parameters of the attention and MLP weights and the embedding (biases and norms left
    out, so this is slightly low)."""
    d, f, h = model_cfg.d_model, model_cfg.d_ff, model_cfg.head_size
    attn = d * h * 2 * (model_cfg.n_heads + model_cfg.kv_heads)  # q, o + k, v
    mlp = d * f * (3 if model_cfg.gated_mlp else 2)
    total = model_cfg.vocab_size * d * (1 if model_cfg.tie_embeddings else 2)
    for stack, depth_field in model_cfg.STACKS.items():
        depth = getattr(model_cfg, depth_field)
        # a decoder block of an encoder-decoder also has cross-attention
        cross = attn if stack == "decoder_blocks" else 0
        total += depth * (attn + cross + mlp)
    return total


def _materialises_scores(model_cfg: Any, length: int) -> bool:
    """Whether attention over ``length`` keys builds [B, N, T, S] scores (einsum or XLA's
    ``jax.nn.dot_product_attention``) rather than blocks (blockwise, splash, cuDNN flash)."""
    impl = model_cfg.attention_impl or attention.default_implementation(length)
    if impl in ("blockwise", "splash"):
        return False
    # the cuDNN default falls back to XLA's path for float32
    half = model_cfg.dtype in ("bfloat16", "float16")
    return not (impl == "cudnn" and half)


def estimate_train_memory(config: Config, model_cfg: Any) -> dict[str, int]:
    """A rough estimate, by part, of the bytes one training step needs (over all devices).

    * ``state``: parameters and gradients in ``param_dtype``, plus AdamW's two moments; the
      parameter count leaves out biases and norms.
    * ``activations``: what the backward pass keeps of each block, per token: the inputs of
      its matmuls and norms, q, k, v, the attention output and the MLP hidden before and
      after the nonlinearity, ``7 d_model + 2 kv_heads head_size + 2 d_ff`` (``3 d_ff``
      gated; ``2 d_model + 2 kv_heads head_size`` more for cross-attention), in the compute
      ``dtype``, for ``batch_size / grad_accum_steps`` sequences of ``seq_len`` tokens. With
      remat (any ``remat_policy`` but ``"none"``), each block's input and one block's working
      set.
    * ``attention``: one layer's float32 attention probabilities [B, N, T, T] when the
      attention path builds them (einsum / XLA; not blockwise or flash attention).
    * ``logits``: the float32 [B, T, V] logits unless ``fused_loss``.

    Temporaries, the optimizer update and the eval step are left out, so the estimate is
    low: XLA:CPU's buffers for lm_tiny at seq_len=100000 take 52 GiB where this says 26 GiB.
    That keeps ``check_memory`` from refusing a config that fits.
    """
    accum = config.get("grad_accum_steps", 1)
    batch = config.batch_size // accum if isinstance(accum, int) and accum >= 1 else 1
    tokens = max(batch, 1) * config.seq_len
    act, param = _itemsize(model_cfg.dtype), _itemsize(model_cfg.param_dtype)
    copies = 4 if config.get("optimizer", "adamw") == "adamw" else 2
    d, kv = model_cfg.d_model, model_cfg.kv_heads * model_cfg.head_size
    block = 7 * d + 2 * kv + (3 if model_cfg.gated_mlp else 2) * model_cfg.d_ff
    per_block = []
    for stack, depth_field in model_cfg.STACKS.items():
        cross = 2 * d + 2 * kv if stack == "decoder_blocks" else 0
        per_block += [block + cross] * getattr(model_cfg, depth_field)
    if model_cfg.effective_remat_policy != "none":
        saved = len(per_block) * d + max(per_block)
    else:
        saved = sum(per_block)
    parts = {
        "state": _param_estimate(model_cfg) * param * copies,
        "activations": tokens * saved * act,
        "attention": 0,
        "logits": 0,
    }
    if _materialises_scores(model_cfg, config.seq_len):
        parts["attention"] = tokens * model_cfg.n_heads * config.seq_len * 4
    if not config.get("fused_loss", True):
        parts["logits"] = tokens * model_cfg.vocab_size * 4
    return parts


def check_memory(config: Config, model_cfg: Any) -> None:
    """Fails when a training step of ``config`` (its model: ``model_cfg``, e.g.
    ``tasks.model_config``) cannot fit the memory of this machine's devices
    (``memory_limit``), by ``estimate_train_memory``: checked before anything is allocated.
    Skipped when the limit is unknown or ``$ATTNZOO_SKIP_MEMORY_CHECK`` is set.

    Raises:
      ValueError: the estimate exceeds the limit; the message gives both and what to lower.
    """
    if os.environ.get(SKIP_MEMORY_CHECK_ENV, "") not in ("", "0"):
        return
    limit = memory_limit()
    if limit is None:
        return
    parts = estimate_train_memory(config, model_cfg)
    total = sum(parts.values())
    if total <= limit[0]:
        return
    shown = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
    raise ValueError(
        f"config.batch_size={config.batch_size} x config.seq_len={config.seq_len} needs at "
        f"least {gib(total)} for one training step ({shown}), more than the {gib(limit[0])} "
        f"{limit[1]}: lower config.batch_size or config.seq_len, or raise "
        f"config.grad_accum_steps (set {SKIP_MEMORY_CHECK_ENV}=1 to skip this estimate)"
    )


def describe_error(e: BaseException) -> str:
    """The one line that ``attnzoo-train``, ``-generate``, ``-translate`` and ``-eval`` print
    (after ``PROG: error:``) for an error, instead of a traceback.

    An ``OSError`` with a file name becomes ``"<reason>: <path>"``, plus which directories
    must be writable when that was the problem; ``KeyError`` and ``ZeroDivisionError`` (which
    a validated config should never reach) keep their type name; anything else is its message.
    """
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += (
                "; the workdir and the data directory (config.data_dir, else "
                "$ATTNZOO_DATA_DIR, else ~/attnzoo_data) must be writable"
            )
    elif isinstance(e, (KeyError, ZeroDivisionError)):
        text = f"{type(e).__name__}: {e}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())
