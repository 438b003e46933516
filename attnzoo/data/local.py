"""Your own data: plain text files, TSV / JSON Lines parallel files, and any tfds dataset by name.

Dataset names (the ``dataset`` argument everywhere, ``config.dataset`` in training)::

    text:<glob>     LM; every file UTF-8, split into documents at blank lines (paragraphs,
                    joined up to ``MAX_CHARS`` characters, as the bundled Shakespeare is)
    tsv:<glob>      MT; one pair per line, ``source<TAB>target``
    jsonl:<glob>    MT; one JSON object per line, keys ``text_keys`` (default ``("src", "tgt")``)
    tfds:<name>     any tfds dataset (``tfds:ag_news_subset``, ``tfds:wmt14_translate/de-en``);
                    ``text_keys`` names its features: one key -> LM, two (source, target) -> MT

Options follow the path, separated by ``;``::

    text:data/train/*.txt;validation=data/val/*.txt;test=data/test/*.txt
    jsonl:pairs.jsonl;keys=en,fr;holdout=0.1;split_seed=3
    tfds:ag_news_subset;keys=description

``validation=`` / ``test=`` read those splits from their own files. A split without files is a
fixed fraction (``holdout``, default 0.05 each) of the train files, chosen by a seeded hash of
the example's text (``split_seed``, default 0, independent of the training seed): deterministic,
disjoint, and an exact duplicate never sits on both sides. ``keys=`` is the same as passing
``text_keys`` (the training config's ``text_keys``). Local files are read into memory (a list of
feature dicts, what a tfds data source returns), so tokenizer training, packing and the
resumable grain iterator are the bundled datasets' own.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

from attnzoo.data import corpora

PREFIXES = ("text:", "tsv:", "jsonl:", "tfds:")
MAX_CHARS = 2000  # document size for text files (the bundled Shakespeare uses the same idea)
DEFAULT_HOLDOUT = 0.05
DEFAULT_MT_KEYS = ("src", "tgt")
SPLITS = ("train", "validation", "test")


def is_custom(dataset: str) -> bool:
    """Whether ``dataset`` names user data (``text:``, ``tsv:``, ``jsonl:``, ``tfds:``)."""
    return dataset.startswith(PREFIXES)


@dataclasses.dataclass(frozen=True)
class Custom:
    """A parsed custom dataset name (see the module docstring)."""

    kind: str  # "text" | "tsv" | "jsonl" | "tfds"
    path: str  # train glob, or the tfds name
    files: dict[str, str]  # split -> glob, for validation / test read from files
    keys: tuple[str, ...]
    holdout: float
    split_seed: int

    @property
    def task(self) -> str:
        if self.kind == "text":
            return "lm"
        if self.kind == "tfds":
            return "lm" if len(self.keys) == 1 else "mt"
        return "mt"


def parse(dataset: str, text_keys: Sequence[str] | None = None) -> Custom:
    """Parses ``dataset`` (``kind:path;opt=value;...``); ValueError on a bad spelling."""
    kind, _, rest = dataset.partition(":")
    if f"{kind}:" not in PREFIXES:
        raise ValueError(f"{dataset!r} is not a custom dataset; prefixes: {', '.join(PREFIXES)}")
    path, *opts = rest.split(";")
    if not path:
        raise ValueError(f"dataset {dataset!r} names no path after {kind + ':'!r}")
    files: dict[str, str] = {}
    keys = tuple(text_keys) if text_keys else ()
    holdout, split_seed = DEFAULT_HOLDOUT, 0
    for opt in opts:
        name, eq, value = opt.partition("=")
        name = name.strip()
        if not eq or not value:
            raise ValueError(f"dataset {dataset!r}: option {opt!r} is not name=value")
        if name in ("validation", "test"):
            if kind == "tfds":
                raise ValueError(f"dataset {dataset!r}: tfds datasets take their own splits")
            files[name] = value
        elif name == "keys":
            from_name = tuple(k.strip() for k in value.split(","))
            if keys and keys != from_name:
                raise ValueError(f"dataset {dataset!r}: keys={value} but text_keys={keys}")
            keys = from_name
        elif name == "holdout":
            holdout = float(value)
            if not 0 < holdout < 0.5:
                raise ValueError(f"dataset {dataset!r}: holdout must be in (0, 0.5), got {value}")
        elif name == "split_seed":
            split_seed = int(value)
        else:
            raise ValueError(
                f"dataset {dataset!r}: unknown option {name!r}; valid: validation, test, keys, "
                "holdout, split_seed"
            )
    if kind == "text":
        if keys and len(keys) != 1:
            raise ValueError(f"dataset {dataset!r}: text files take one text key, got {keys}")
        keys = keys or ("text",)
    elif kind in ("tsv", "jsonl"):
        keys = keys or DEFAULT_MT_KEYS
        if len(keys) != 2:
            raise ValueError(
                f"dataset {dataset!r}: translation data needs two text_keys (source, target), "
                f"got {keys}"
            )
    elif not keys or len(keys) > 2:
        raise ValueError(
            f"dataset {dataset!r}: a tfds dataset needs text_keys naming its text features: one "
            "for language modelling (e.g. text_keys=('description',)), two (source, target) for "
            f"translation (e.g. text_keys=('de', 'en')); got {keys or 'none'}"
        )
    return Custom(kind, path, files, keys, holdout, split_seed)


def spec(dataset: str, text_keys: Sequence[str] | None = None) -> Any:
    """The ``sources.DatasetSpec`` of a custom dataset."""
    from attnzoo.data import sources

    c = parse(dataset, text_keys)
    return sources.DatasetSpec(
        tfds_name=c.path if c.kind == "tfds" else dataset,
        task="lm" if c.task == "lm" else "mt",
        splits={s: s for s in SPLITS},
        module=_tfds_module(c.path) if c.kind == "tfds" else "",
        text_key=c.keys[0] if c.task == "lm" else None,
        language_pair=(c.keys[0], c.keys[1]) if c.task == "mt" else None,
        vocab_size=8000,
    )


def _tfds_module(tfds_name: str) -> str:
    """The module whose import registers ``tfds_name``'s builder ("" if none is found).

    tfds registers its own builders only when TensorFlow is installed, so the module is imported
    explicitly: attnzoo's registry's, else tfds's ``datasets/<name>/<name>_dataset_builder``.
    """
    from attnzoo.data import sources

    for s in sources.DATASETS.values():
        if s.tfds_name.split("/")[0] == tfds_name.split("/")[0]:
            return s.module
    name = tfds_name.split("/")[0].split(":")[0]
    module = f"tensorflow_datasets.datasets.{name}.{name}_dataset_builder"
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    return module if found else ""


def cache_name(dataset: str, text_keys: Sequence[str] | None = None) -> str:
    """A file-name-safe tokenizer cache key: kind plus a hash of the name and the train data."""
    c = parse(dataset, text_keys)
    h = hashlib.sha1(f"{dataset}|{c.keys}".encode())
    if c.kind != "tfds":
        for path in _glob(c.path):
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"{c.kind}-{h.hexdigest()[:16]}"
    return f"tfds-{c.path.replace('/', '_')}-{h.hexdigest()[:8]}"


def data_source(
    dataset: str, split: str, *, text_keys: Sequence[str] | None = None, data_dir: str | None
) -> Sequence[dict[str, str]]:
    """The examples of ``split`` of a local-file dataset (``text:``, ``tsv:``, ``jsonl:``)."""
    c = parse(dataset, text_keys)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {dataset!r}; valid: {', '.join(SPLITS)}")
    if split in c.files:
        examples = _read_glob(c, c.files[split], split)
    else:
        held = [s for s in ("validation", "test") if s not in c.files]
        examples = [ex for ex in _read_glob(c, c.path, "train") if _split_of(ex, c, held) == split]
    if not examples:
        raise ValueError(
            f"split {split!r} of dataset {dataset!r} has no examples"
            + ("" if split in c.files else f" (holdout={c.holdout} of the train files)")
            + "; add data, raise holdout=, or give the split its own files (;"
            f"{split}=<glob>)"
        )
    return examples


def _split_of(ex: dict[str, str], c: Custom, held: list[str]) -> str:
    text = "\x1f".join(ex[k] for k in c.keys)
    digest = hashlib.sha256(f"{c.split_seed}\x1e{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    for i, s in enumerate(held):
        if c.holdout * i <= u < c.holdout * (i + 1):
            return s
    return "train"


def _glob(pattern: str) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"no files match {pattern!r} (relative paths are from {os.getcwd()})")
    return paths


def _read_glob(c: Custom, pattern: str, split: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in _glob(pattern):
        st = os.stat(path)
        out.extend(_read_file(path, c.kind, c.keys, st.st_size, st.st_mtime_ns))
    return out


@functools.lru_cache(maxsize=64)
def _read_file(
    path: str, kind: str, keys: tuple[str, ...], size: int, mtime_ns: int
) -> tuple[dict[str, str], ...]:
    """One file's examples (cached per file version: size and mtime are in the key)."""
    del size, mtime_ns
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: invalid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "convert the file to UTF-8"
        ) from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; remove it or narrow the glob")
    if kind == "text":
        return tuple({keys[0]: d} for d in corpora.paragraph_chunks(text, max_chars=MAX_CHARS))
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if kind == "tsv":
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(
                    f"{path}:{lineno}: expected 2 non-empty tab-separated columns (source, "
                    f"target), found {len([f for f in fields if f.strip()])}: {line[:80]!r}"
                )
            out.append(dict(zip(keys, fields, strict=True)))
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {line[:80]!r}")
            for k in keys:
                if k not in record:
                    raise ValueError(
                        f"{path}:{lineno}: record has no key {k!r} (its keys: "
                        f"{', '.join(map(repr, record)) or 'none'}); name the source and target "
                        "keys with text_keys or ;keys=src_key,tgt_key"
                    )
                if not isinstance(record[k], str):
                    raise ValueError(f"{path}:{lineno}: {k!r} is not a string: {record[k]!r}")
            out.append({k: record[k] for k in keys})
    if not out:
        raise ValueError(f"{path}: the file has no records")
    return tuple(out)
