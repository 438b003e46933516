"""Weight conversion between Hugging Face transformers checkpoints and attnzoo params.

Families: GPT-2 (``GPT2LMHeadModel``), LLaMA (``LlamaForCausalLM``), Marian (``MarianMTModel``:
the paper's post-LN, sqrt(d_model)-scaled, sinusoidal encoder-decoder) and T5 v1.0/v1.1
(``T5ForConditionalGeneration``)::

    cfg, graphdef, params = convert.from_transformers(hf_torch_model)
    cfg, graphdef, params = convert.from_safetensors("path/to/checkpoint_dir")  # no torch needed
    state_dict = convert.to_transformers(cfg, params)    # numpy arrays keyed like hf state_dict

The per-family config mapping and weight rules live in ``_hf_families``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from attnzoo.models import encoder_decoder
from attnzoo.models._hf_families import FAMILIES, FAMILY, Path, marian_sinusoids

__all__ = [
    "FAMILIES",
    "family_of",
    "from_safetensors",
    "from_state_dict",
    "from_transformers",
    "marian_sinusoids",
    "to_transformers",
]


def _family(name: str) -> tuple:
    if name not in FAMILY:
        raise ValueError(f"unsupported model family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILY[name]


def from_state_dict(
    family: str, hf_config: Any, state_dict: Mapping[str, Any], *, scan_layers: bool = False
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """Hugging Face tensors (numpy or torch, keyed as the HF model's ``state_dict``) -> our model.

    Returns:
      (cfg, graphdef, params), params float32 (cast with ``jax.tree.map`` if you want bf16).
    """
    make_cfg, rules, module = _family(family)
    cfg = make_cfg(hf_config)
    sd = {k: _numpy(v) for k, v in state_dict.items()}
    if family == "marian":
        for side in ("encoder", "decoder"):
            sd.setdefault(
                f"model.{side}.embed_positions.weight",
                marian_sinusoids(cfg.position.max_len, cfg.d_model),
            )
        sd.setdefault("final_logits_bias", np.zeros((1, cfg.vocab_size), np.float32))
    if family == "gpt2" and "wte.weight" in sd:  # checkpoints saved from the bare GPT2Model
        sd = {f"transformer.{k}": v for k, v in sd.items()}
    graphdef, abstract = jax.eval_shape(lambda: module.init(cfg, jax.random.key(0)))
    pure = nnx.to_pure_dict(abstract)
    filled: set[Path] = set()
    for rule in rules(cfg):
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


def _numpy(x: Any) -> np.ndarray:
    """A torch, jax or numpy tensor as float32 numpy (bfloat16/float16 checkpoints upcast)."""
    if hasattr(x, "detach"):  # torch.Tensor
        return x.detach().cpu().float().numpy()
    return np.asarray(jax.numpy.asarray(x, jax.numpy.float32))


def family_of(hf_config: Any) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; valid: {FAMILIES}")
    return model_type


def from_transformers(
    hf_model: Any, *, scan_layers: bool = False
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """A transformers PyTorch model (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``MarianMTModel``, ``T5ForConditionalGeneration``) -> (cfg, graphdef, params) computing the
    same logits."""
    family = family_of(hf_model.config)
    return from_state_dict(family, hf_model.config, hf_model.state_dict(), scan_layers=scan_layers)


def from_safetensors(
    path: str | pathlib.Path,
    hf_config: Any = None,
    *,
    family: str | None = None,
    scan_layers: bool = False,
) -> tuple[Any, nnx.GraphDef, nnx.State]:
    """A checkpoint on disk: a ``.safetensors`` file (give ``hf_config``) or a directory with
    ``config.json`` and ``model.safetensors`` or sharded ``model.safetensors.index.json``."""
    # the flax reader keeps bfloat16 checkpoints loadable (numpy has no bfloat16)
    from safetensors.flax import load_file  # noqa: PLC0415  (optional dependency)

    path = pathlib.Path(path)
    if path.is_dir():
        if hf_config is None:
            import transformers  # noqa: PLC0415

            hf_config = transformers.AutoConfig.from_pretrained(path)
        index = path / "model.safetensors.index.json"
        files = (
            sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.exists()
            else [path / "model.safetensors"]
        )
    else:
        if hf_config is None:
            raise ValueError(
                f"{path} is a single file: pass hf_config (e.g. "
                "transformers.AutoConfig.from_pretrained(<dir>))"
            )
        files = [path]
    state = {}
    for f in files:
        if not f.exists():
            raise ValueError(f"checkpoint file {f} does not exist")
        state.update(load_file(str(f)))
    return from_state_dict(
        family or family_of(hf_config), hf_config, state, scan_layers=scan_layers
    )


def to_transformers(
    cfg: Any, params: nnx.State, *, family: str | None = None
) -> dict[str, np.ndarray]:
    """Our params -> a Hugging Face ``state_dict`` of numpy arrays (``torch.from_numpy`` each
    and ``load_state_dict``). ``family`` is inferred from ``cfg`` when not given."""
    family = family or _infer_family(cfg)
    _, rules, module = _family(family)
    if cfg.scan_layers:
        cfg, _, params = module.relayout(cfg, params, scan_layers=False)
    pure = nnx.to_pure_dict(params)

    def get(path: Path) -> np.ndarray:
        node = pure
        for p in path:
            node = node[p]
        return np.asarray(node)

    return {r.hf_key: np.array(r.to_hf(*(get(p) for p in r.paths))) for r in rules(cfg)}


def _infer_family(cfg: Any) -> str:
    kind, norm = cfg.position.kind, cfg.norm
    if isinstance(cfg, encoder_decoder.Config):
        family = {"learned": "marian", "t5": "t5"}.get(kind)
    elif kind == "learned" and norm == "layernorm" and cfg.tie_embeddings:
        family = "gpt2"
    elif kind == "rope" and norm == "rmsnorm" and cfg.gated_mlp:
        family = "llama"
    else:
        family = None
    if family is None:
        raise ValueError(
            f"cannot tell the Hugging Face family of this config; pass family= one of {FAMILIES}"
        )
    return family
