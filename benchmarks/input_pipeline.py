"""input_pipeline: the bundled-corpus grain pipelines alone, plus corpus statistics.

LM: Shakespeare, sentencepiece (4000), T=256 B=8 packed (the lm_train shapes). MT: Bible en-es,
shared sentencepiece (8000), S=T=128 B=16 packed (the mt_train shapes). Throughput counts rows
(``examples/s``: the fixed-shape sequences a train step consumes) and real tokens (``tokens/s``:
non-padding targets); one process, 0 grain workers, as training runs here. ``batch_ms`` is the
number to hold against a train step's time: the pipeline runs synchronously before each step.

Usage: python -m benchmarks.input_pipeline [--data_dir DIR] [--batches N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from attnzoo import data
from benchmarks.protocol import LM, MT, emit

PEER = "attnzoo"


def corpus_stats(dataset: str, tokenizer_name: str, data_dir: str) -> None:
    """One record per split: tokens after tokenization (no bos/eos), examples, vocabulary."""
    tok = data.get_tokenizer(tokenizer_name, dataset=dataset, data_dir=data_dir)
    for split in ("train", "validation", "test"):
        if data.DATASETS[dataset].task == "lm":
            docs = data.texts(dataset, split, data_dir=data_dir)
            n_tokens = sum(len(tok.encode(d)) for d in docs)
            info = {"examples": len(docs), "chars": sum(map(len, docs))}
        else:
            pairs = data.text_pairs(dataset, split, data_dir=data_dir)
            src = sum(len(tok.encode(s)) for s, _ in pairs)
            tgt = sum(len(tok.encode(t)) for _, t in pairs)
            n_tokens = src + tgt
            info = {"examples": len(pairs), "src_tokens": src, "tgt_tokens": tgt}
        info |= {"dataset": dataset, "tokenizer": tokenizer_name, "vocab_size": tok.vocab_size}
        emit(PEER, "input_pipeline", f"corpus_tokens_{split}", n_tokens, "tokens", extra=info)


def throughput(task: str, it: Iterator, n_batches: int, prefix: str, **info) -> None:
    """Times ``n_batches`` after a warm-up batch; emits examples/s and tokens/s."""
    weights, segment_ids = f"{prefix}weights", f"{prefix}segment_ids"
    next(it)  # the first batch pays for opening files, not steady state
    rows = tokens = segments = 0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
        rows += b[weights].shape[0]
        tokens += int(b[weights].sum())
        segments += int(b[segment_ids].max(axis=1).sum())  # documents or pairs
    dt = time.perf_counter() - t0
    info |= {
        "batches": n_batches,
        "batch_ms": round(1e3 * dt / n_batches, 3),
        "fill": round(tokens / (rows * b[weights].shape[1]), 4),  # non-padding fraction
        "segments_per_s": round(segments / dt, 1),
    }
    emit(PEER, task, "examples_per_s", rows / dt, "examples/s", extra=info)
    emit(PEER, task, "tokens_per_s", tokens / dt, "tokens/s", extra=info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", help="default: $ATTNZOO_DATA_DIR or ~/attnzoo_data")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    d = args.data_dir or data.default_data_dir()

    for dataset in ("shakespeare", "bible_en_es"):
        for tokenizer in ("byte", "sentencepiece"):
            corpus_stats(dataset, tokenizer, d)

    tok = data.get_tokenizer("sentencepiece", dataset="shakespeare", data_dir=d)
    T, B = LM["seq"], LM["batch"]
    lm = data.lm_batches("shakespeare", "train", tokenizer=tok, seq_len=T, batch_size=B, data_dir=d)
    info = {"dataset": "shakespeare", "seq_len": T, "batch_size": B}
    throughput("input_pipeline_lm", lm, args.batches, "", **info)

    tok = data.get_tokenizer("sentencepiece", dataset="bible_en_es", data_dir=d)
    T, B = MT["tgt"], MT["batch"]
    mt = data.mt_batches("bible_en_es", "train", tokenizer=tok, seq_len=T, batch_size=B, data_dir=d)
    info = {"dataset": "bible_en_es", "seq_len": T, "batch_size": B}
    throughput("input_pipeline_mt", mt, args.batches, "tgt_", **info)


if __name__ == "__main__":
    main()
