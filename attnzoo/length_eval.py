"""Perplexity of a decoder LM at evaluation lengths other than its training length.

``attnzoo-eval --lengths 256,512,1024,2048`` and ``benchmarks/positions.py`` use this: the
validation split becomes one token stream (each document ``[bos] + tokens + [eos]``, in stored
order), cut into consecutive, non-overlapping windows of the evaluation length L. Every window
starts a fresh context at position 0, so each length scores the same tokens, each predicted
from the tokens before it in its window: longer windows give more context on average and
positions the model may never have trained on. The batch holds ``tokens_per_batch // L`` rows
(at least one), so memory stays about the same at every length.

A learned position table (``position.kind == "learned"``) has no row past ``max_len``: such
lengths are reported as not applicable (``not_applicable``), not evaluated.

RoPE scalings apply at inference without retraining (``parse_rope_scaling``,
``with_rope_scaling``): ``linear:factor=4`` (position interpolation), ``dynamic:factor=4``
(NTK-aware base, grown from each call's length ``max(positions) + 1`` = the window length),
``yarn:factor=4`` (NTK-by-parts plus attention temperature), ``llama3:factor=8``; each maps
onto ``PositionConfig.rope_scaling`` / ``rope_factor`` with ``rope_original_max_len`` = the
training length unless the spec gives ``original_max_len=``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import evaluation
from attnzoo.models.positional import rope
from attnzoo.training import tasks
from attnzoo.training.losses import cross_entropy

__all__ = [
    "length_perplexity",
    "not_applicable",
    "parse_lengths",
    "parse_rope_scaling",
    "rows_for",
    "token_stream",
    "window_batches",
    "with_rope_scaling",
]

# short spec keys -> PositionConfig fields (any PositionConfig field name is accepted as well)
_ALIASES = {
    "factor": "rope_factor",
    "original_max_len": "rope_original_max_len",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "attention_factor": "yarn_attention_factor",
    "low_freq_factor": "llama3_low_freq_factor",
    "high_freq_factor": "llama3_high_freq_factor",
}
_FLOAT_FIELDS = (
    "rope_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_attention_factor",
    "llama3_low_freq_factor",
    "llama3_high_freq_factor",
)
SCALINGS = tuple(s for s in rope.SCALINGS if s is not None)  # linear, dynamic, yarn, llama3


def parse_lengths(text: str) -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]`` (order kept, duplicates dropped).

    Raises:
      ValueError: an empty list or an entry that is not an integer >= 1 (named).
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"--lengths takes comma-separated integers such as 256,512,1024; {part!r} is not "
                "one"
            ) from None
        if value < 1:
            raise ValueError(f"--lengths entries must be >= 1, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("--lengths is empty: give e.g. --lengths 256,512,1024,2048")
    return out


def parse_rope_scaling(text: str) -> dict[str, Any]:
    """``"yarn:factor=4"`` -> ``{"rope_scaling": "yarn", "rope_factor": 4.0}``.

    The form is ``KIND[:KEY=VALUE,...]`` with KIND one of ``SCALINGS``; keys are
    ``PositionConfig`` fields or their short names (``factor``, ``original_max_len``,
    ``beta_fast``, ``beta_slow``, ``attention_factor``, ``low_freq_factor``,
    ``high_freq_factor``). ``factor`` is required (a scaling of 1 changes nothing).

    Raises:
      ValueError: an unknown kind or key, a value that is not a number, or no factor >= 1.
    """
    kind, _, rest = text.strip().partition(":")
    if kind not in SCALINGS:
        raise ValueError(
            f"unknown --rope_scaling kind {kind!r}: use one of {', '.join(SCALINGS)}, e.g. "
            "--rope_scaling yarn:factor=4"
        )
    fields = {f.name for f in dataclasses.fields(rope.PositionConfig)}
    out: dict[str, Any] = {"rope_scaling": kind}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        name = _ALIASES.get(key.strip(), key.strip())
        if not eq or name not in fields or not (name.startswith(("rope_", "yarn_", "llama3_"))):
            raise ValueError(
                f"--rope_scaling option {item!r} is not KEY=VALUE with a known key: use "
                f"{', '.join(_ALIASES)} (e.g. {kind}:factor=4,original_max_len=256)"
            )
        try:
            if name == "rope_original_max_len":
                out[name] = int(value)
            elif name == "yarn_truncate":
                out[name] = value.strip().lower() in ("1", "true", "yes")
            else:
                out[name] = float(value)
        except ValueError:
            raise ValueError(f"--rope_scaling {key}={value!r} is not a number") from None
    factor = out.get("rope_factor")
    if factor is None or not math.isfinite(factor) or factor < 1:
        raise ValueError(
            f"--rope_scaling {text!r} needs factor=F with F >= 1 (the context extension, e.g. "
            f"{kind}:factor=4 for 4x the training length)"
        )
    return out


def with_rope_scaling(model_cfg: Any, scaling: dict[str, Any], *, original_max_len: int) -> Any:
    """``model_cfg`` with ``scaling`` (``parse_rope_scaling``) on its RoPE ``position`` config.

    ``rope_original_max_len`` becomes ``original_max_len`` (the training length) unless
    ``scaling`` sets it.

    Raises:
      ValueError: the model's position kind is not ``rope``.
    """
    position = model_cfg.position
    if position.kind != "rope":
        raise ValueError(
            f"--rope_scaling applies to RoPE models, but this run's position kind is "
            f"{position.kind!r}: leave --rope_scaling out (or train with "
            "--config.model_overrides.position.kind=rope)"
        )
    changes = {"rope_original_max_len": original_max_len, **scaling}
    return model_cfg.replace(position=position.replace(**changes))


def not_applicable(model_cfg: Any, length: int) -> str | None:
    """Why ``model_cfg`` cannot be evaluated at ``length`` tokens, or ``None`` if it can.

    Only a learned position table limits the length (positions ``0 .. length - 1`` must be
    rows of its ``max_len``-row table); every other kind computes positions on the fly.
    """
    position = model_cfg.position
    if position.kind == "learned" and length > position.max_len:
        return (
            f"learned positions: the table has {position.max_len} rows (position.max_len), "
            f"fewer than the {length} positions of this length"
        )
    return None


def token_stream(tokenizer: Any, documents: Iterable[str]) -> np.ndarray:
    """The documents as one int32 stream, each ``[bos] + tokens + [eos]``, as training sees them."""
    parts = [
        np.asarray([tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id], np.int32)
        for doc in documents
    ]
    if not parts:
        raise ValueError("no documents to evaluate")
    return np.concatenate(parts)


def rows_for(length: int, tokens_per_batch: int) -> int:
    """Rows per batch at ``length``: ``tokens_per_batch // length``, at least 1."""
    return max(1, tokens_per_batch // length)


def window_batches(
    ids: np.ndarray,
    *,
    length: int,
    rows: int,
    pad_id: int,
    max_tokens: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of consecutive ``length``-token windows of the stream ``ids`` [N].

    Window ``w`` predicts ``ids[w L + 1 : (w + 1) L + 1]`` from ``ids[w L : (w + 1) L]``,
    positions ``0 .. L - 1`` (one segment per window). The last window and batch are padded
    with zero-weight tokens, so all batches have one shape.

    Args:
      ids: [N] int token stream (``token_stream``).
      length: L, tokens per window.
      rows: windows per batch.
      pad_id: the padding token.
      max_tokens: predict only the first this many tokens of the stream (default all N - 1).
    Yields:
      Dicts of [rows, L] arrays: ``inputs``, ``targets``, ``segment_ids``, ``positions``
      (int32) and ``weights`` (float32, 1 on real targets).
    """
    if length < 1 or rows < 1:
        raise ValueError(f"length and rows must be >= 1, got {length}, {rows}")
    n = len(ids) - 1 if max_tokens is None else min(len(ids) - 1, max_tokens)
    if n < 1:
        raise ValueError("the token stream has nothing to predict")
    windows = -(-n // length)
    windows += -windows % rows  # whole batches: one compiled shape
    inputs = np.full((windows * length,), pad_id, np.int32)
    targets = inputs.copy()
    inputs[:n], targets[:n] = ids[:n], ids[1 : n + 1]
    real = (np.arange(windows * length) < n).reshape(windows, length)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (windows, length))
    batch = {
        "inputs": inputs.reshape(windows, length),
        "targets": targets.reshape(windows, length),
        "segment_ids": real.astype(np.int32),
        "positions": np.where(real, positions, 0).astype(np.int32),
        "weights": real.astype(np.float32),
    }
    for start in range(0, windows, rows):
        yield {k: v[start : start + rows] for k, v in batch.items()}


def _graphdef(model_cfg: Any) -> nnx.GraphDef:
    """The graphdef of a decoder LM built from ``model_cfg`` (shapes only, nothing allocated)."""
    from attnzoo.training import checkpoint  # noqa: PLC0415  (orbax: only when needed)

    graphdef, _ = checkpoint.abstract_params("lm", model_cfg)
    return graphdef


def length_perplexity(
    model_cfg: Any,
    params: nnx.State,
    ids: np.ndarray,
    lengths: Sequence[int],
    *,
    pad_id: int,
    tokens_per_batch: int,
    max_tokens: int | None = None,
    graphdef: nnx.GraphDef | None = None,
) -> dict[str, dict[str, Any]]:
    """Perplexity of a decoder LM over the stream ``ids`` at each length of ``lengths``.

    Args:
      model_cfg: the ``decoder_lm.Config`` to evaluate (e.g. after ``with_rope_scaling``).
      params: its params.
      ids: [N] int token stream (``token_stream``).
      lengths: evaluation lengths L.
      pad_id: the padding token.
      tokens_per_batch: rows per batch are ``rows_for(L, tokens_per_batch)``.
      max_tokens: predict only the first this many tokens (the same ones at every length).
      graphdef: the model's graphdef; default: built from ``model_cfg``.
    Returns:
      ``{str(L): result}``: ``{"perplexity", "nll_per_token", "tokens", "rows"}`` for a length
      that runs, ``{"perplexity": None, "reason": ...}`` for one that is not applicable
      (``not_applicable``).
    """
    if graphdef is None:
        graphdef = _graphdef(model_cfg)

    @jax.jit
    def sums(params, batch):
        logits = tasks.forward("lm", graphdef, params, batch)
        out = cross_entropy(logits, batch["targets"], batch["weights"])
        return out["nll"], out["weight"]

    results: dict[str, dict[str, Any]] = {}
    for length in lengths:
        reason = not_applicable(model_cfg, length)
        if reason is not None:
            results[str(length)] = {"perplexity": None, "reason": reason}
            continue
        rows = rows_for(length, tokens_per_batch)
        batches = window_batches(
            ids, length=length, rows=rows, pad_id=pad_id, max_tokens=max_tokens
        )
        ppl = evaluation.perplexity(
            lambda b: sums(params, {k: jnp.asarray(v) for k, v in b.items()}), batches
        )
        results[str(length)] = {**ppl, "rows": rows}
    return results
