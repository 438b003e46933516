"""Weight conversion between Hugging Face transformers checkpoints and attnzoo params.

Families: GPT-2 (``GPT2LMHeadModel``), LLaMA (``LlamaForCausalLM``), Marian (``MarianMTModel``:
the paper's post-LN, sqrt(d_model)-scaled, sinusoidal encoder-decoder) and T5 v1.0/v1.1
(``T5ForConditionalGeneration``)::

    cfg, graphdef, params = convert.from_transformers(hf_torch_model)
    cfg, graphdef, params = convert.from_safetensors("path/to/checkpoint_dir")  # no torch needed
    cfg, graphdef, params = convert.from_pretrained("gpt2")  # a Hub name or a directory
    state_dict = convert.to_transformers(cfg, params)    # numpy arrays keyed like hf state_dict
    convert.save_pretrained(cfg, params, "out_dir")      # config.json + model.safetensors

The per-family config mapping and weight rules live in ``_hf_families``.

Loading refuses what would silently give a different model than the checkpoint holds:
non-float tensors (a quantized checkpoint; ``allow_dtype_cast=True`` casts them anyway), NaN
or Inf values, tensors the config does not use (a config with too few layers), and shard
paths in ``model.safetensors.index.json`` outside the checkpoint directory. Configs are read
with ``trust_remote_code=False``: no code from a checkpoint is ever run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from attnzoo.models import encoder_decoder, hf_files
from attnzoo.models._hf_configs import hf_config_dict, read_hf_config
from attnzoo.models._hf_families import (
    FAMILIES,
    FAMILY,
    IGNORED,
    LAYER_PREFIXES,
    Path,
    marian_sinusoids,
)

__all__ = [
    "FAMILIES",
    "family_of",
    "from_safetensors",
    "from_state_dict",
    "from_pretrained",
    "from_transformers",
    "hf_config",
    "marian_sinusoids",
    "read_hf_config",
    "save_pretrained",
    "to_transformers",
]


def _family(name: str) -> tuple:
    if name not in FAMILY:
        raise ValueError(f"unsupported model family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILY[name]


def from_state_dict(
    family: str,
    hf_config: Any,
    state_dict: Mapping[str, Any],
    *,
    scan_layers: bool = False,
    allow_dtype_cast: bool = False,
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """Hugging Face tensors (numpy or torch, keyed as the HF model's ``state_dict``) -> our model.

    Float tensors of any precision are cast to float32. Raises ``ValueError`` for a tensor
    that is not a float type (unless ``allow_dtype_cast``), holds NaN or Inf, or that the
    config does not use (e.g. ``model.layers.2.*`` when the config has 2 layers).

    Returns:
      (cfg, graphdef, params), params float32 (cast with ``jax.tree.map`` if you want bf16).
    """
    make_cfg, rules, module = _family(family)
    cfg = make_cfg(hf_config)
    rule_list = list(rules(cfg))
    if family == "gpt2" and "wte.weight" in state_dict:  # saved from the bare GPT2Model
        state_dict = {f"transformer.{k}": v for k, v in state_dict.items()}
    used = {rule.hf_key for rule in rule_list}
    if not allow_dtype_cast:
        _check_float(family, {k: v for k, v in state_dict.items() if k in used})
    sd = {k: _numpy(v) for k, v in state_dict.items() if k in used}
    _check_finite(family, sd)
    if family == "marian":
        for side in ("encoder", "decoder"):
            sd.setdefault(
                f"model.{side}.embed_positions.weight",
                marian_sinusoids(cfg.position.max_len, cfg.d_model),
            )
        sd.setdefault("final_logits_bias", np.zeros((1, cfg.vocab_size), np.float32))
    graphdef, abstract = jax.eval_shape(lambda: module.init(cfg, jax.random.key(0)))
    pure = nnx.to_pure_dict(abstract)
    filled: set[Path] = set()
    for rule in rule_list:
        if rule.hf_key not in sd:
            if all(p in filled for p in rule.paths):  # an optional tied copy
                continue
            raise ValueError(
                f"{family} checkpoint has no {rule.hf_key!r}; is it a {family} "
                "model with the given config?"
            )
        for path, value in zip(rule.paths, rule.to_ours(sd[rule.hf_key]), strict=True):
            if path in filled:
                continue  # tied copy: the first occurrence wins
            _set(pure, path, value)
            filled.add(path)
    # after the missing-key check: a checkpoint under other names is reported as missing keys
    _check_unused(family, hf_config, (k for k in state_dict if k not in used))
    nnx.replace_by_pure_dict(abstract, pure)
    params = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), abstract)
    if scan_layers:
        return module.relayout(cfg, params, scan_layers=True)
    return cfg, graphdef, params


def _set(pure: dict, path: Path, value: np.ndarray) -> None:
    node = pure
    for p in path[:-1]:
        node = node[p]
    want = node[path[-1]].shape
    if tuple(value.shape) != tuple(want):
        raise ValueError(
            f"param {'/'.join(map(str, path))} needs shape {want}, the checkpoint "
            f"gives {value.shape}"
        )
    node[path[-1]] = value


def _check_unused(family: str, hf_config: Any, keys: Iterable[str]) -> None:
    """Tensors no rule reads (other than known buffers) -> one error naming them, by layer."""
    ignored = IGNORED[family]
    unused = sorted(k for k in keys if not ignored.fullmatch(k))
    if not unused:
        return
    layers: dict[tuple[str, str], dict[int, int]] = {}  # (prefix, field) -> {index: count}
    others = []
    for key in unused:
        for prefix, field in LAYER_PREFIXES[family]:
            m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", key)
            if m:
                counts = layers.setdefault((prefix, field), {})
                counts[int(m[1])] = counts.get(int(m[1]), 0) + 1
                break
        else:
            others.append(key)
    parts = []
    for (prefix, field), counts in layers.items():
        n = sum(counts.values())
        parts.append(
            f"{prefix}.{_ranges(sorted(counts))}.*: {n} tensor{'s' * (n != 1)} the config "
            f"({field}={getattr(hf_config, field, '?')}) does not use"
        )
    if others:
        shown = ", ".join(repr(k) for k in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        parts.append(
            f"{shown}{more}: {len(others)} tensor{'s' * (len(others) != 1)} no {family} "
            "parameter uses"
        )
    raise ValueError(
        f"{family} checkpoint has tensors this config would drop: {'; '.join(parts)}; load "
        "it with its own config (config.json), or drop those tensors yourself"
    )


def _ranges(indices: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4,7'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _is_float(x: Any) -> tuple[bool, str]:
    """(is x a floating-point tensor, its dtype's name) for torch, jax and numpy tensors."""
    dtype: Any = getattr(x, "dtype", None)
    if dtype is None:
        dtype = np.asarray(x).dtype
    if hasattr(dtype, "is_floating_point"):  # torch.dtype
        return bool(dtype.is_floating_point), str(dtype).removeprefix("torch.")
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating)), np.dtype(dtype).name


def _check_float(family: str, tensors: Mapping[str, Any]) -> None:
    bad = {}
    for key, x in tensors.items():
        is_float, name = _is_float(x)
        if not is_float:
            bad[key] = name
    if bad:
        key = sorted(bad)[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"{family} checkpoint tensor {key!r} is {bad[key]}, not a float type{more}: a "
            "quantized checkpoint must be dequantized first (pass allow_dtype_cast=True to "
            "cast the stored values to float32 as they are)"
        )


def _check_finite(family: str, tensors: Mapping[str, np.ndarray]) -> None:
    bad = {}
    for key, x in tensors.items():
        if not np.isfinite(x).all():
            bad[key] = (int(np.isnan(x).sum()), int(np.isinf(x).sum()), x.size)
    if bad:
        key = sorted(bad)[0]
        nan, inf, size = bad[key]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(
            f"{family} checkpoint tensor {key!r} has {nan} NaN and {inf} Inf values of "
            f"{size} (as float32){more}: the checkpoint is corrupt or was saved from a "
            "diverged run"
        )


def _numpy(x: Any) -> np.ndarray:
    """A torch, jax or numpy tensor as float32 numpy (bfloat16/float16 checkpoints upcast)."""
    if hasattr(x, "detach"):  # torch.Tensor
        return x.detach().cpu().float().numpy()
    return np.asarray(jax.numpy.asarray(x, jax.numpy.float32))


def family_of(hf_config: Any) -> str:
    """The attnzoo family key of a Hugging Face config (its ``model_type``), or a clear error."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; valid: {FAMILIES}")
    return model_type


def from_transformers(
    hf_model: Any, *, scan_layers: bool = False, allow_dtype_cast: bool = False
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """A transformers PyTorch model (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``MarianMTModel``, ``T5ForConditionalGeneration``) -> (cfg, graphdef, params) computing the
    same logits. Checks its tensors as ``from_state_dict`` does."""
    family = family_of(hf_model.config)
    return from_state_dict(
        family,
        hf_model.config,
        hf_model.state_dict(),
        scan_layers=scan_layers,
        allow_dtype_cast=allow_dtype_cast,
    )


def from_safetensors(
    path: str | pathlib.Path,
    hf_config: Any = None,
    *,
    family: str | None = None,
    scan_layers: bool = False,
    allow_dtype_cast: bool = False,
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """A checkpoint on disk: a ``.safetensors`` file (give ``hf_config``) or a directory with
    ``config.json`` and ``model.safetensors`` or sharded ``model.safetensors.index.json``.

    ``hf_config`` is a transformers config or anything with its attributes; by default the
    directory's ``config.json``, read as plain JSON (``_hf_configs.read_hf_config``: neither
    torch nor transformers is imported, no code from the checkpoint is run). Raises
    ``ValueError`` for a shard path outside the directory and for the tensors
    ``from_state_dict`` refuses."""
    path = pathlib.Path(path)
    if path.is_dir():
        if hf_config is None:
            hf_config = read_hf_config(hf_files.load_config(path))
    elif hf_config is None:
        raise ValueError(
            f"{path} is a single file: pass hf_config (e.g. "
            "transformers.AutoConfig.from_pretrained(<dir>))"
        )
    return from_state_dict(
        family or family_of(hf_config),
        hf_config,
        hf_files.load_tensors(path),
        scan_layers=scan_layers,
        allow_dtype_cast=allow_dtype_cast,
    )


def from_pretrained(
    path_or_name: str | pathlib.Path,
    *,
    revision: str | None = None,
    scan_layers: bool = False,
    allow_dtype_cast: bool = False,
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """A Hugging Face checkpoint -> (cfg, graphdef, params), without torch or transformers.

    ``path_or_name``: a directory (``config.json`` + ``model.safetensors`` or shards) or a Hub
    name such as ``"gpt2"``, downloaded once into the Hugging Face cache (needs
    ``huggingface_hub``; offline, ``HF_HUB_OFFLINE=1``, only the cache is used). See
    ``hf_files.resolve`` for the errors, ``from_safetensors`` for the checks."""
    directory = hf_files.resolve(path_or_name, revision=revision)
    return from_safetensors(directory, scan_layers=scan_layers, allow_dtype_cast=allow_dtype_cast)


def save_pretrained(
    cfg: Any,
    params: nnx.State,
    directory: str | os.PathLike[str],
    *,
    family: str | None = None,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    decoder_start_token_id: int | None = None,
) -> pathlib.Path:
    """Writes ``config.json`` and ``model.safetensors`` that transformers loads
    (``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM.from_pretrained(directory)``) as a
    model computing the same logits; torch is not needed to write them.

    The family is the one that expresses ``cfg`` exactly (``family`` to insist on one). The
    token ids default to attnzoo's tokenizers' (pad 0, bos 1, eos 2); an encoder-decoder's
    ``decoder_start_token_id`` defaults to ``bos_token_id`` (attnzoo's decoders start with
    bos).

    Returns:
      the directory (created if needed; existing files of those names are replaced).

    Raises:
      ValueError: ``cfg`` has no Hugging Face equivalent (the message names each setting),
        or its params hold what the checkpoint cannot (a trained Marian position table).
    """
    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if isinstance(cfg, encoder_decoder.Config):
        start = bos_token_id if decoder_start_token_id is None else decoder_start_token_id
        ids.update(decoder_start_token_id=start, forced_eos_token_id=eos_token_id)
    family, config = hf_config_dict(cfg, family=family, token_ids=ids)
    state = to_transformers(cfg, params, family=family)
    if family == "marian":  # Marian recomputes its sinusoids: a trained table has no place
        for side in ("encoder", "decoder"):
            table = state[f"model.{side}.embed_positions.weight"]
            gap = float(np.abs(table - marian_sinusoids(*table.shape)).max())
            if gap > 1e-5:
                raise ValueError(
                    f"{side}_position holds a learned table (up to {gap:.3g} from Marian's "
                    "fixed sinusoids, which transformers recomputes): no marian checkpoint "
                    "can hold it"
                )
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_files.save_tensors(state, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def to_transformers(
    cfg: Any, params: nnx.State, *, family: str | None = None
) -> dict[str, np.ndarray]:
    """Our params -> a Hugging Face ``state_dict`` of numpy arrays (``torch.from_numpy`` each
    and ``load_state_dict``). ``family`` is by default the one that expresses ``cfg`` exactly
    (``hf_config``)."""
    family = family or hf_config_dict(cfg)[0]
    _, rules, module = _family(family)
    if cfg.scan_layers:
        cfg, _, params = module.relayout(cfg, params, scan_layers=False)
    pure = nnx.to_pure_dict(params)

    def get(path: Path) -> np.ndarray:
        node = pure
        for p in path:
            node = node[p]
        return np.asarray(node)

    rule_list = list(rules(cfg))
    covered = {p for r in rule_list for p in r.paths}
    dropped = [p for p in traverse_util.flatten_dict(pure) if p not in covered]
    if dropped:
        raise ValueError(
            f"param {'/'.join(map(str, dropped[0]))} has no place in a {family} checkpoint"
            f"{f' (and {len(dropped) - 1} more)' if len(dropped) > 1 else ''}: this config is "
            f"not a {family} model"
        )
    return {r.hf_key: np.array(r.to_hf(*(get(p) for p in r.paths))) for r in rule_list}


def hf_config(cfg: Any, *, family: str | None = None) -> tuple[str, dict[str, Any]]:
    """(family, ``config.json`` dict) of an attnzoo config (``_hf_configs.hf_config_dict``).

    Raises:
      ValueError: no Hugging Face family computes what ``cfg`` does; the message names each
        setting without an equivalent (e.g. ``position.kind='sinusoidal'``)."""
    return hf_config_dict(cfg, family=family)
