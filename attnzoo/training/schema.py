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
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import sysconfig
from typing import Any

import ml_collections

# An experiment config: the ml_collections.ConfigDict of get_config(), with an experiment's values.
# Annotations say ``schema.Config`` for it; it is ``Any`` to type checkers because ConfigDict's
# fields are dynamic (``config.steps`` would otherwise be ``str | float | ... | None``).
Config = Any

PREFIX = "attnzoo:"  # --config attnzoo:NAME names a shipped experiment file
_SHARE = ("share", "attnzoo", "configs")  # where the wheel installs them, under the prefix


def get_config() -> ml_collections.ConfigDict:
    """The defaults: every key an experiment may set, with its default value."""
    c = ml_collections.ConfigDict()
    c.task = "lm"  # "lm" (attnzoo.models.decoder_lm) or "mt" (attnzoo.models.encoder_decoder)
    c.dataset = "shakespeare"
    c.tokenizer = "byte"  # "byte" or "sentencepiece"
    c.vocab_size = ml_collections.FieldReference(None, field_type=int)  # sentencepiece only
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.packing = True

    c.model = "tiny"  # a preset name of the task's model module (Config.preset)
    c.model_overrides = model_overrides()

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
    c.checkpoint_every = 200
    c.keep_checkpoints = 3  # latest N are kept, plus the best by eval loss
    c.async_checkpoints = True
    c.log_every = 10
    return c


# Model Config fields that can be overridden from the command line even when the experiment file
# does not set them (``--config.model_overrides.dtype=bfloat16``): ml_collections only accepts
# overrides of existing keys. ``None`` means "the preset's value". Experiment files may add any
# other field of the model's Config.
_OVERRIDABLE = {
    int: (
        "d_model",
        "n_layers",
        "n_encoder_layers",
        "n_decoder_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_ff",
    ),
    float: ("dropout", "attention_dropout", "activation_dropout"),
    str: ("dtype", "activation", "norm"),
    bool: ("remat", "embed_scale", "use_bias", "tie_embeddings"),
}


def model_overrides() -> ml_collections.ConfigDict:
    """``config.model_overrides``: common model Config fields, ``None`` (the preset's value)."""
    return ml_collections.ConfigDict(
        {
            name: ml_collections.FieldReference(None, field_type=kind)
            for kind, names in _OVERRIDABLE.items()
            for name in names
        }
    )


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
