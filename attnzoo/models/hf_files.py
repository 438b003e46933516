"""Hugging Face checkpoint files, read and written without torch or transformers.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), maybe ``tokenizer.json``. ``resolve`` finds it: a local
directory as it is, a Hub name (``"gpt2"``, ``"org/name"``) downloaded once into the
Hugging Face cache by ``huggingface_hub`` (``pip install 'attnzoo[hf]'``)::

    directory = hf_files.resolve("gpt2")          # or a local directory
    config = hf_files.load_config(directory)      # the config.json dict
    tensors = hf_files.load_tensors(directory)    # {hf key: jax/numpy array}
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["HUB_FILES", "load_config", "load_tensors", "resolve", "save_tensors", "shard_files"]

# What a download fetches: the config, the safetensors weights and the tokenizer files.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``directory/config.json`` as a dict (plain JSON: no code in it is ever run)."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{directory} has no config.json: is it a Hugging Face checkpoint directory?"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def load_tensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, or of a checkpoint directory's
    ``model.safetensors`` or shards. bfloat16 tensors stay bfloat16 (jax arrays; numpy has no
    bfloat16); nothing is cast here.

    Raises:
      ValueError: no safetensors weights (a ``pytorch_model.bin``-only checkpoint needs torch),
        or a shard outside the directory (``shard_files``).
    """
    from safetensors.flax import load_file  # noqa: PLC0415  (optional dependency)

    path = pathlib.Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        files = shard_files(path, index) if index.exists() else [path / "model.safetensors"]
        if not index.exists() and not files[0].exists():
            others = sorted(p.name for p in path.glob("*.bin")) + sorted(
                p.name for p in path.glob("*.pt*")
            )
            hint = (
                f" (it has {', '.join(others)}: load that with torch and "
                "convert.from_transformers, or re-save it with safe_serialization=True)"
                if others
                else ""
            )
            raise ValueError(f"{path} has no model.safetensors{hint}")
    else:
        files = [path]
    state: dict[str, Any] = {}
    for f in files:
        if not f.exists():
            raise ValueError(f"checkpoint file {f} does not exist")
        state.update(load_file(str(f)))
    return state


def save_tensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Writes numpy ``tensors`` to the ``.safetensors`` file ``path`` (metadata
    ``format=pt``, which transformers requires); each is made contiguous first."""
    from safetensors.numpy import save_file  # noqa: PLC0415  (optional dependency)

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(path), metadata={"format": "pt"})


def shard_files(directory: pathlib.Path, index: pathlib.Path) -> list[pathlib.Path]:
    """The shard files an index names, each a relative path inside ``directory``.

    Checked on the names, not on resolved paths: the Hugging Face cache links a snapshot's
    files to blobs elsewhere, which is fine; a name that climbs out ("../", absolute) is not.
    """
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map object")
    files = set()
    for key, name in weight_map.items():
        rel = pathlib.PurePosixPath(name) if isinstance(name, str) else None
        if (
            rel is None
            or not name
            or rel.is_absolute()
            or ".." in rel.parts
            or "\\" in name
            or pathlib.PureWindowsPath(name).drive
        ):
            raise ValueError(
                f"{index}: weight_map puts {key!r} in {name!r}, outside {directory}; shard "
                "files must be relative paths inside the checkpoint directory"
            )
        files.add(directory / rel)
    return sorted(files)


def resolve(path_or_name: str | os.PathLike[str], *, revision: str | None = None) -> pathlib.Path:
    """A checkpoint directory: ``path_or_name`` itself when it exists locally, else a Hub
    repository name downloaded (``HUB_FILES`` only) into the Hugging Face cache, or taken
    from the cache when offline (``HF_HUB_OFFLINE=1``).

    Raises:
      ValueError: neither a local path nor a valid Hub name; ``huggingface_hub`` missing; the
        repository does not exist; offline (or no network) and not in the cache: the message
        says how to get the files.
    """
    path = pathlib.Path(path_or_name)
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{path} is a file: give its directory (config.json next to the weights)"
            )
        return path
    name = str(path_or_name)
    if not _REPO_ID.fullmatch(name) or name.startswith((".", "/", "~")):
        raise ValueError(
            f"{name} is neither an existing directory nor a Hugging Face Hub name "
            "('name' or 'org/name')"
        )
    try:
        import huggingface_hub  # noqa: PLC0415  (optional dependency)
        from huggingface_hub import errors  # noqa: PLC0415
    except ImportError:
        raise ValueError(
            f"{name} is not a local directory, and downloading it from the Hugging Face Hub "
            "needs huggingface_hub: pip install 'attnzoo[hf]' (or pass a local directory)"
        ) from None
    try:
        return pathlib.Path(
            huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=HUB_FILES)
        )
    except errors.RepositoryNotFoundError:
        raise ValueError(
            f"{name} is not a local directory, and the Hugging Face Hub has no (public) "
            "repository of that name; check the spelling, or log in for a private one"
        ) from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{name} has no revision {revision!r} on the Hugging Face Hub") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise ValueError(
            f"cannot download {name}: {why}, and it is not in the local Hugging Face cache "
            f"({type(e).__name__}); download it where there is a network (huggingface-cli "
            f"download {name}) and pass that directory, or copy the cache (HF_HOME) here"
        ) from None
