"""Text in, text out: batched beam-search translation (BLEU of it: ``attnzoo.evaluation``).

Sentences are encoded as in training (``tokens + [eos]`` on the source side, ``bos`` starts the
target), grouped into fixed-size batches padded to a few bucket lengths so that a whole file
compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from attnzoo.decoding.beam_search import beam_search
from attnzoo.models import encoder_decoder as ed


def _bucket(n: int, limit: int) -> int:
    """The next power of two >= n (at least 8), capped at ``limit``."""
    return min(max(8, 1 << (n - 1).bit_length()), limit)


def translate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: ed.Config,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len: int = 128,
    max_src_len: int = 128,
    batch_size: int = 16,
    max_len_offset: int | None = None,
) -> list[str]:
    """Translates ``sentences`` with beam search (the paper's beam 4, alpha 0.6) -> strings.

    Sources longer than ``max_src_len`` tokens are cut (their end-of-sentence kept); raise it
    to evaluate longer sentences than the model trained on.

    Args:
      max_len: target tokens at most (EOS included).
      max_len_offset: the paper's output limit, "input length + 50" (section 6.1): each batch
        generates at most its padded source width + ``max_len_offset`` tokens (the width, a
        power of two >= every source in the batch, keeps the compiled shapes few), and never
        more than ``max_len``. ``None``: ``max_len`` for every batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_len_offset is not None and max_len_offset < 0:
        raise ValueError(f"max_len_offset must be >= 0, got {max_len_offset}")
    encoded = []
    for s in sentences:
        ids = tokenizer.encode(s)[: max_src_len - 1] + [tokenizer.eos_id]
        encoded.append(ids)
    # longest first: batches of similar lengths waste less padding
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = _bucket(max(len(encoded[i]) for i in rows), max_src_len)
        src = np.full((batch_size, width), tokenizer.pad_id, np.int32)
        src[:, 0] = tokenizer.eos_id  # filler rows: a lone end-of-sentence, never read back
        for r, i in enumerate(rows):
            src[r, : len(encoded[i])] = encoded[i]
        tokens = np.asarray(
            beam_search(
                graphdef,
                params,
                cfg,
                src,
                beam_size=beam_size,
                alpha=alpha,
                max_len=max_len if max_len_offset is None else min(max_len, width + max_len_offset),
                eos_id=tokenizer.eos_id,
                bos_id=tokenizer.bos_id,
                pad_id=tokenizer.pad_id,
            )
        )
        for r, i in enumerate(rows):
            out[i] = tokenizer.decode(strip(tokens[r], eos_id=tokenizer.eos_id))
    return out


def strip(tokens: np.ndarray | Sequence[int], *, eos_id: int) -> list[int]:
    """Tokens up to (not including) the first ``eos_id``."""
    tokens = list(np.asarray(tokens).tolist())
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
