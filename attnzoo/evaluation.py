"""Scores of trained models: corpus BLEU of translations, perplexity from summed token NLLs.

Layering: ``models`` <- ``decoding`` <- ``evaluation`` <- ``training`` <- the CLIs. The training
loop (BLEU at eval steps) and ``attnzoo-eval`` both score through here, so the two report the
same numbers for the same checkpoint and sentences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from sacrebleu.metrics.bleu import BLEU, BLEUScore

from attnzoo.decoding.translate import translate
from attnzoo.models import encoder_decoder as ed

__all__ = ["bleu_signature", "corpus_bleu", "perplexity", "translation_bleu"]


def _bleu() -> BLEU:
    """The sacreBLEU metric every score here uses: its defaults (13a tokenisation, mixed case,
    exponential smoothing), as WMT reports."""
    return BLEU()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BLEUScore:
    """sacreBLEU (13a tokenisation, as WMT reports) of detokenised strings, one reference each.

    ``.score`` is the BLEU in [0, 100]; ``str()`` of the result is sacreBLEU's score line
    (``BLEU = 21.3 55.1/27.0/...``); ``bleu_signature()`` gives the settings it was computed with.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return _bleu().corpus_score(list(hypotheses), [list(references)])


def bleu_signature() -> str:
    """sacreBLEU's signature of ``corpus_bleu``'s settings, to report next to a score:
    ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.x.y``."""
    metric = _bleu()
    metric.corpus_score([""], [[""]])  # sacreBLEU signs a metric once it knows the references
    return str(metric.get_signature())


def translation_bleu(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: ed.Config,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len: int = 128,
    max_src_len: int = 128,
    batch_size: int = 16,
    max_len_offset: int | None = None,
) -> tuple[list[str], BLEUScore]:
    """Translates the sources of ``(source, reference)`` pairs with beam search and scores them.

    The keyword arguments go to ``attnzoo.decoding.translate`` (the paper's beam 4, alpha 0.6).

    Returns:
      The translations (one string per pair, in order) and their corpus BLEU against the
      references.
    """
    hypotheses = translate(
        graphdef,
        params,
        cfg,
        tokenizer,
        [src for src, _ in pairs],
        beam_size=beam_size,
        alpha=alpha,
        max_len=max_len,
        max_src_len=max_src_len,
        batch_size=batch_size,
        max_len_offset=max_len_offset,
    )
    return hypotheses, corpus_bleu(hypotheses, [ref for _, ref in pairs])


def perplexity(
    batch_sums: Callable[[Mapping[str, np.ndarray]], tuple[jax.Array, jax.Array]],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Token-level perplexity ``exp(sum NLL / sum tokens)`` over ``batches``.

    Args:
      batch_sums: one batch (dict of [B, T] arrays) -> (summed NLL [], token weight []); e.g. a
        jitted model forward plus ``attnzoo.training.losses.cross_entropy``.
      batches: the evaluation batches; at most ``max_batches`` of them are read.
    Returns:
      ``nll_per_token``, ``perplexity`` and ``tokens`` (the summed weight).
    Raises:
      ValueError: the batches held no tokens.
    """
    nll = tokens = 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        n, w = batch_sums(batch)
        nll, tokens = nll + float(n), tokens + float(w)
    if tokens == 0:
        raise ValueError("no tokens to evaluate")
    return {"nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens}
