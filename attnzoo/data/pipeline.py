"""grain input pipelines: LM and translation batches with packing and exact resume.

Both pipelines are one grain graph over a tfds ArrayRecord data source (``sources.data_source``)::

    source -> shard (process) -> shuffle (seed, reshuffled per epoch) -> repeat -> tokenize
           -> [filter by length (mt)] -> pack -> rename / weights -> batch (padded to batch_size)

so ``get_state()`` / ``set_state()`` of the returned grain iterator restore the exact position
(epoch, index, partial packing buffers); the state is a small JSON-serialisable dict to save next
to model checkpoints. For multi-host training each process passes ``shard_index=
jax.process_index(), shard_count=jax.process_count()`` and gets a disjoint shard; with a finite
``num_epochs`` shards may yield different numbers of batches, so evaluate on fixed step counts.

Length policy: LM never drops text (documents longer than ``seq_len`` continue in the next
row(s) as a new segment whose positions restart at 0). Translation drops pairs with either side
empty or longer than ``seq_len`` (a truncated target would teach the model to stop mid-sentence);
if none of the first examples fit, ``mt_batches`` raises instead of silently producing nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from attnzoo.data import sources
from attnzoo.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]
# Examples tokenized up front by mt_batches to fail fast when nothing fits seq_len.
_LENGTH_PROBE = 1000
# Synchronous reads: local ArrayRecord lookups take microseconds, and grain's default read-ahead
# (16 threads, 500 elements) costs more in bookkeeping and GIL contention than it hides here.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def lm_batches(
    dataset: str,
    split: str,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    data_dir: str | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    packing: bool = True,
    text_keys: Sequence[str] | None = None,
) -> grain.DatasetIterator:
    """Language-model batches: each ``next()`` is a dict of ``[batch_size, seq_len]`` arrays.

    Every document becomes ``[bos] + tokens + [eos]``; ``inputs`` is that sequence without its
    last token and ``targets`` without its first, so each segment starts from BOS and learns to
    end with EOS. With ``packing`` the documents are concatenated and cut into full rows
    (grain's ``ConcatThenSplitIterDataset``: no padding except the final row); without, each row
    holds one document piece of at most ``seq_len`` tokens.

    Returns a grain iterator of dicts: ``inputs``, ``targets``, ``segment_ids`` (1, 2, ... per
    document in the row, 0 = padding), ``positions`` (restart at 0 per segment), all int32, and
    ``weights`` float32 (1 where the target is a real token). ``num_epochs=None`` repeats forever;
    a finite run ends with a final batch padded with zero-weight rows. ``dataset`` may also be
    your own data, ``text:<glob>`` or ``tfds:<name>`` with ``text_keys`` (``attnzoo.data.local``).
    """
    (key,) = sources.spec(dataset, task="lm", text_keys=text_keys).text_features
    _check_args(seq_len, batch_size, shard_index, shard_count, num_epochs, min_seq_len=1)
    ds = _examples(dataset, split, data_dir, seed, shard_index, shard_count, text_keys).repeat(
        num_epochs
    )

    def tokenize(example: dict[str, Any]) -> dict[str, np.ndarray]:
        ids = np.asarray(tokenizer.encode(sources.as_text(example[key])), np.int32)
        ids = np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}

    it = ds.map(tokenize).to_iter_dataset(_READ)
    lengths = {"inputs": seq_len, "targets": seq_len}
    if packing:
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths)
    else:
        it = grain.experimental.FlatMapIterDataset(it, _SplitAndPad(lengths))

    def finalize(row: dict[str, np.ndarray]) -> Batch:
        segment_ids = row["inputs_segment_ids"]
        return {
            "inputs": row["inputs"],
            "targets": row["targets"],
            "segment_ids": segment_ids,
            "positions": row["inputs_positions"],
            "weights": (segment_ids != 0).astype(np.float32),
        }

    return iter(it.map(finalize).batch(batch_size, batch_fn=_padded_stack(batch_size)))


def mt_batches(
    dataset: str,
    split: str,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    data_dir: str | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    packing: bool = True,
    text_keys: Sequence[str] | None = None,
) -> grain.DatasetIterator:
    """Translation batches: each ``next()`` is a dict of ``[batch_size, seq_len]`` arrays.

    A pair becomes ``src = tokens + [eos]``, ``tgt_inputs = [bos] + tokens``, ``tgt_targets =
    tokens + [eos]`` (one shared vocabulary). Pairs with a side empty or longer than ``seq_len``
    are dropped. With ``packing``, pairs are packed first-fit into ``batch_size`` rows (grain's
    ``FirstFitPackIterDataset``); pair k of a row has segment id k on both sides, so the
    cross-attention mask is ``src_segment_ids == tgt_segment_ids``. Without, one pair per row.

    Returns a grain iterator of dicts: ``src``, ``src_segment_ids``, ``src_positions``,
    ``tgt_inputs``, ``tgt_targets``, ``tgt_segment_ids``, ``tgt_positions`` (int32) and
    ``tgt_weights`` (float32, 1 where the target is a real token). ``dataset`` may also be your
    own data, ``tsv:<glob>``, ``jsonl:<glob>`` or ``tfds:<name>`` with two ``text_keys``.
    """
    src_key, tgt_key = sources.spec(dataset, task="mt", text_keys=text_keys).text_features
    _check_args(seq_len, batch_size, shard_index, shard_count, num_epochs, min_seq_len=2)
    ds = _examples(dataset, split, data_dir, seed, shard_index, shard_count, text_keys)

    def tokenize(example: dict[str, Any]) -> dict[str, np.ndarray]:
        src = tokenizer.encode(sources.as_text(example[src_key]))
        tgt = tokenizer.encode(sources.as_text(example[tgt_key]))
        return {
            "src": np.asarray(src + [tokenizer.eos_id], np.int32),
            "tgt_inputs": np.asarray([tokenizer.bos_id] + tgt, np.int32),
            "tgt_targets": np.asarray(tgt + [tokenizer.eos_id], np.int32),
        }

    def fits(pair: dict[str, np.ndarray]) -> bool:
        # Length 1 is bos/eos alone: an empty side (common in WMT) teaches nothing but stopping.
        return 1 < len(pair["src"]) <= seq_len and 1 < len(pair["tgt_inputs"]) <= seq_len

    ds = ds.map(tokenize)
    _require_some_fit(ds, fits, dataset=dataset, split=split, seq_len=seq_len)
    it = ds.repeat(num_epochs).filter(fits).to_iter_dataset(_READ)
    lengths = {"src": seq_len, "tgt_inputs": seq_len, "tgt_targets": seq_len}
    if packing:
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=lengths, num_packing_bins=batch_size, seed=seed
        )
    else:
        it = grain.experimental.FlatMapIterDataset(it, _SplitAndPad(lengths))

    def finalize(row: dict[str, np.ndarray]) -> Batch:
        segment_ids = row["tgt_inputs_segment_ids"]
        return {
            "src": row["src"],
            "src_segment_ids": row["src_segment_ids"],
            "src_positions": row["src_positions"],
            "tgt_inputs": row["tgt_inputs"],
            "tgt_targets": row["tgt_targets"],
            "tgt_segment_ids": segment_ids,
            "tgt_positions": row["tgt_inputs_positions"],
            "tgt_weights": (segment_ids != 0).astype(np.float32),
        }

    return iter(it.map(finalize).batch(batch_size, batch_fn=_padded_stack(batch_size)))


def _check_args(
    seq_len: int,
    batch_size: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    *,
    min_seq_len: int,
) -> None:
    if seq_len < min_seq_len:
        raise ValueError(f"seq_len must be >= {min_seq_len}, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
            f"shard_count={shard_count} (pass jax.process_index(), jax.process_count())"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")


def _examples(
    dataset: str,
    split: str,
    data_dir: str | None,
    seed: int,
    shard_index: int,
    shard_count: int,
    text_keys: Sequence[str] | None = None,
) -> grain.MapDataset:
    """One epoch of this process's shard of the split, shuffled.

    Callers ``repeat`` it after: shuffle before repeat makes grain reseed the shuffle every
    epoch without mixing epochs.
    """
    source = sources.data_source(dataset, split, data_dir=data_dir, text_keys=text_keys)
    if len(source) < shard_count:
        raise ValueError(
            f"split {split!r} of {dataset!r} has {len(source)} examples, fewer than "
            f"shard_count={shard_count}: some processes would get no data; use fewer processes"
        )
    # Strided slice: shards are disjoint and cover the split (grain's multi-host idiom).
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    return ds.shuffle(seed=seed)


def _require_some_fit(
    ds: grain.MapDataset,
    fits: Callable[[dict[str, np.ndarray]], bool],
    *,
    dataset: str,
    split: str,
    seq_len: int,
) -> None:
    """Fails fast where filtering would silently drop everything (an endless or empty epoch)."""
    # MapDataset indexing gives None for an element filtered out (none are, before `fits`).
    probe = [p for i in range(min(len(ds), _LENGTH_PROBE)) if (p := ds[i]) is not None]
    kept = sum(map(fits, probe))
    if kept < len(probe):
        logging.info(
            f"mt_batches({dataset!r}, {split!r}): {len(probe) - kept} of the first {len(probe)} "
            f"pairs are dropped (a side empty or longer than seq_len={seq_len})"
        )
    if not kept:
        needed = min(max(len(p["src"]), len(p["tgt_inputs"])) for p in probe)
        raise ValueError(
            f"none of the first {len(probe)} pairs of {dataset!r}/{split!r} fit seq_len={seq_len} "
            f"(the shortest needs {needed} tokens with bos/eos): pairs longer than seq_len are "
            f"dropped, so raise seq_len to well above {needed}"
        )


class _SplitAndPad(grain.experimental.FlatMapTransform):
    """Unpacked rows: one example per row, cut into ``seq_len`` pieces, padded with zeros.

    Adds the ``{feature}_segment_ids`` / ``{feature}_positions`` that the packers produce, so
    both modes share ``finalize``. Pieces of one example are aligned across features.
    """

    max_fan_out = 1 << 20  # only bounds MapDataset flat maps; this one runs on an IterDataset

    def __init__(self, lengths: dict[str, int]):
        self.lengths = lengths

    def flat_map(self, example: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n_pieces = max(-(-len(example[k]) // n) for k, n in self.lengths.items())
        rows = []
        for p in range(max(n_pieces, 1)):
            row = {}
            for k, n in self.lengths.items():
                piece = example[k][p * n : (p + 1) * n]
                values = np.zeros(n, np.int32)
                values[: len(piece)] = piece
                segment_ids = (np.arange(n) < len(piece)).astype(np.int32)
                row[k] = values
                row[f"{k}_segment_ids"] = segment_ids
                row[f"{k}_positions"] = np.arange(n, dtype=np.int32) * segment_ids
            rows.append(row)
        return rows


def _padded_stack(batch_size: int) -> Callable[[Sequence[Batch]], Batch]:
    """Stacks rows to ``[batch_size, ...]``, padding a final short batch with all-zero rows.

    Fixed shapes mean one compiled step, and evaluation keeps its last examples (zero rows
    have zero weight) instead of dropping them.
    """

    def stack(rows: Sequence[Batch]) -> Batch:
        out = {}
        for k in rows[0]:
            x = np.stack([r[k] for r in rows])
            if len(rows) < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - len(rows), *x.shape[1:]), x.dtype)])
            out[k] = x
        return out

    return stack
