"""Tokenizers: byte-level (fixed, for quick tests) and sentencepiece (trained per corpus).

Both reserve the same special ids: 0 pad, 1 bos, 2 eos. ``encode`` never adds bos/eos (the
pipelines do, so documents and sentence pairs are delimited in one place) and ``decode`` drops
the special ids. Both round-trip arbitrary text exactly: bytes trivially; sentencepiece because it
is trained with identity normalization, kept whitespace and byte fallback.
"""

from __future__ import annotations

import io
import itertools
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

from attnzoo.data import local, sources
from attnzoo.data.locking import file_lock

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Sentences sampled from the train split for sentencepiece training: enough for a stable
# 2k-32k vocabulary, small enough that training takes seconds on a laptop core.
MAX_TRAIN_SENTENCES = 200_000


class Tokenizer(Protocol):
    """What the pipelines, training and decoding need of a tokenizer.

    ``ByteTokenizer`` and ``SentencePieceTokenizer`` implement it; any object with these
    attributes and methods works (``encode`` adds no bos/eos: the pipelines add them).

    Attributes:
      vocab_size: number of ids, special ids included.
      pad_id: padding id (0).
      bos_id: beginning-of-sequence id (1).
      eos_id: end-of-sequence id (2).
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special ids are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes offset by 3 past the special ids: vocabulary 259."""

    offset = 3
    vocab_size = 256 + offset
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``, each offset past the special ids."""
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        return (data.astype(np.int32) + self.offset).tolist()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``: special ids dropped, invalid UTF-8 shown as U+FFFD.

        Raises:
          ValueError: an id outside ``[0, vocab_size)``.
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"byte tokenizer ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
        # A model can emit invalid UTF-8; show it as U+FFFD rather than fail mid-generation.
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A trained sentencepiece model (pad 0, bos 1, eos 2, unk 3), picklable for grain workers."""

    def __init__(self, model_proto: bytes, *, path: str | None = None):
        self.path = path
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = (
            self._sp.pad_id(),
            self._sp.bos_id(),
            self._sp.eos_id(),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Reads a model written by ``get_tokenizer`` (or any sentencepiece ``.model`` file).

        Raises:
          ValueError: the file is not a sentencepiece model.
        """
        proto = pathlib.Path(path).read_bytes()
        try:
            return cls(proto, path=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"sentencepiece model {path} is corrupt ({err}); delete it and it will be "
                "retrained from the train split"
            ) from err

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; pad, bos and eos are dropped.

        Raises:
          ValueError: an id outside ``[0, vocab_size)``.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"sentencepiece ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self._sp.decode(ids)

    def __getstate__(self):
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], path=state["path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def train_sentencepiece(
    sentences: Iterable[str], *, vocab_size: int, model_type: str = "unigram"
) -> bytes:
    """Trains a sentencepiece model on ``sentences`` (one per item) and returns its proto.

    Deterministic for a given input: one thread (the EM result depends on the thread count) and
    no internal sampling (callers pass at most ``MAX_TRAIN_SENTENCES``).
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            byte_fallback=True,  # no unknowns: any text round-trips
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=1.0,
            input_sentence_size=MAX_TRAIN_SENTENCES,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size is too high"
        raise ValueError(
            f"sentencepiece training failed for vocab_size={vocab_size}: {err}; choose a "
            "smaller vocab_size for this corpus"
        ) from err
    return model.getvalue()


def _training_sentences(
    dataset: str, *, data_dir: str, seed: int, text_keys: Sequence[str] | None = None
) -> Iterator[str]:
    """Lines of the train split (both languages for translation, for a shared vocabulary).

    Reads a seeded random subset of examples when the split is large (WMT, LM1B): the source
    is random access, so the sample costs no pass over the data.
    """
    s = sources.spec(dataset, text_keys=text_keys)
    source = sources.data_source(dataset, "train", data_dir=data_dir, text_keys=text_keys)
    keys = s.text_features
    n = min(len(source), MAX_TRAIN_SENTENCES // len(keys))
    # Sorted for read locality; `choice` without replacement samples n of N without an N-array.
    indices = np.sort(np.random.default_rng(seed).choice(len(source), size=n, replace=False))
    examples = (source[int(i)] for i in indices)
    lines = (
        line
        for example in examples
        for key in keys
        for line in sources.as_text(example[key]).split("\n")
        if line.strip()
    )
    return itertools.islice(lines, MAX_TRAIN_SENTENCES)


def get_tokenizer(
    name: str,
    *,
    dataset: str | None = None,
    vocab_size: int | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    model_type: str = "unigram",
    text_keys: Sequence[str] | None = None,
) -> Tokenizer:
    """``"byte"`` or ``"sentencepiece"`` (trained on ``dataset``'s train split at first use).

    The sentencepiece model is cached as
    ``{data_dir}/tokenizers/{dataset}.{model_type}{vocab_size}.seed{seed}.model``; delete it to
    retrain (your own data, ``text:`` etc., is cached under a hash of the name and files, so
    edited files train a new one). ``vocab_size`` defaults to the dataset's (4000 Shakespeare,
    8000 Bible and your own data, 32000 WMT and LM1B). ``text_keys``: see ``attnzoo.data.local``.
    """
    if name == "byte":
        if vocab_size not in (None, ByteTokenizer.vocab_size):
            raise ValueError(
                f"the byte tokenizer has a fixed vocabulary of {ByteTokenizer.vocab_size}, got "
                f"vocab_size={vocab_size}; pass vocab_size=None or {ByteTokenizer.vocab_size}"
            )
        return ByteTokenizer()
    if name != "sentencepiece":
        raise ValueError(f"unknown tokenizer {name!r}; valid: 'byte', 'sentencepiece'")
    if dataset is None:
        raise ValueError(
            "get_tokenizer('sentencepiece') needs dataset= (the corpus whose train split it is "
            "trained on), e.g. dataset='shakespeare'"
        )
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"unknown sentencepiece model_type {model_type!r}; use 'unigram' or 'bpe'")
    vocab_size = vocab_size or sources.spec(dataset, text_keys=text_keys).vocab_size
    data_dir = data_dir or sources.default_data_dir()
    name = local.cache_name(dataset, text_keys) if local.is_custom(dataset) else dataset
    filename = f"{name.replace('/', '_')}.{model_type}{vocab_size}.seed{seed}.model"
    path = pathlib.Path(data_dir) / "tokenizers" / filename
    if not path.exists():
        # One process trains; the others wait for the file (training is deterministic anyway).
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                proto = train_sentencepiece(
                    _training_sentences(dataset, data_dir=data_dir, seed=seed, text_keys=text_keys),
                    vocab_size=vocab_size,
                    model_type=model_type,
                )
                # Write-then-rename: a reader never sees half a file.
                with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                    f.write(proto)
                os.replace(f.name, path)
    return SentencePieceTokenizer.load(path)
