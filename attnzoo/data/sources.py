"""Dataset registry and random-access sources: every dataset is a tfds ArrayRecord data source.

The bundled corpora and the full-size tfds datasets (WMT, LM1B) go through the same calls: tfds
prepares ArrayRecord files in the data dir on first use (bundled: offline from package data;
others: downloaded, for users with internet) and ``builder.as_data_source`` (what
``tfds.data_source`` does, with our error messages around each step) gives random access, which
grain needs for global shuffling and exact resume.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import tensorflow_datasets as tfds

from attnzoo.data import local
from attnzoo.data.locking import file_lock

DATA_DIR_ENV = "ATTNZOO_DATA_DIR"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How an attnzoo dataset name maps onto a tfds dataset.

    Attributes:
      tfds_name: tfds name, with config (``"wmt14_translate/de-en"``).
      task: ``"lm"`` (documents) or ``"mt"`` (source/target pairs).
      splits: attnzoo split name -> tfds split spec (may be a slice such as ``"test[:50%]"``).
      module: module whose import registers the tfds builder (tfds only auto-registers its own
        builders when TensorFlow is installed).
      text_key: the document feature (``task="lm"``).
      language_pair: (source feature, target feature) (``task="mt"``).
      vocab_size: default sentencepiece vocabulary size for this corpus.
      prepare_needs_tensorflow: the tfds builder uses TensorFlow file APIs while preparing
        (LM1B's file globbing, the download extractor for WMT's archives), so preparing checks
        for TensorFlow before anything is downloaded. Reading prepared files never needs it.
    """

    tfds_name: str
    task: Literal["lm", "mt"]
    splits: Mapping[str, str]
    module: str
    text_key: str | None = None
    language_pair: tuple[str, str] | None = None
    vocab_size: int = 32000
    prepare_needs_tensorflow: bool = False

    def __post_init__(self):
        if self.task == "lm" and self.text_key is None:
            raise ValueError(f"{self.tfds_name}: a task='lm' DatasetSpec needs text_key")
        if self.task == "mt" and self.language_pair is None:
            raise ValueError(f"{self.tfds_name}: a task='mt' DatasetSpec needs language_pair")

    @property
    def text_features(self) -> tuple[str, ...]:
        """The text features: ``(text_key,)`` for ``"lm"``, ``language_pair`` for ``"mt"``."""
        if self.task == "mt" and self.language_pair is not None:
            return self.language_pair
        if self.task == "lm" and self.text_key is not None:
            return (self.text_key,)
        raise ValueError(f"{self.tfds_name}: no text feature for task={self.task!r}")


_SAME_SPLITS = {s: s for s in SPLITS}
DATASETS: dict[str, DatasetSpec] = {
    "shakespeare": DatasetSpec(
        tfds_name="attnzoo_shakespeare",
        task="lm",
        splits=_SAME_SPLITS,
        module="attnzoo.data.shakespeare",
        text_key="text",
        vocab_size=4000,
    ),
    "bible_en_es": DatasetSpec(
        tfds_name="attnzoo_bible_en_es",
        task="mt",
        splits=_SAME_SPLITS,
        module="attnzoo.data.bible_en_es",
        language_pair=("en", "es"),
        vocab_size=8000,
    ),
    # LM1B ships only train and test; halves of test serve as validation and test.
    "lm1b": DatasetSpec(
        tfds_name="lm1b",
        task="lm",
        splits={"train": "train", "validation": "test[:50%]", "test": "test[50%:]"},
        module="tensorflow_datasets.datasets.lm1b.lm1b_dataset_builder",
        text_key="text",
        prepare_needs_tensorflow=True,
    ),
    # One tfds config per language pair; the name picks the direction (en-de is the paper's).
    **{
        f"wmt{year}_translate/{src}-{tgt}": DatasetSpec(
            tfds_name=f"wmt{year}_translate/de-en",
            task="mt",
            splits=_SAME_SPLITS,
            module=f"tensorflow_datasets.translate.wmt{year}",
            language_pair=(src, tgt),
            prepare_needs_tensorflow=True,
        )
        for year in (14, 17)
        for src, tgt in (("de", "en"), ("en", "de"))
    },
}
"""The attnzoo dataset names (the ``dataset`` argument everywhere) and their tfds datasets.

Add a ``DatasetSpec`` here to use another tfds text dataset.
"""


def default_data_dir() -> str:
    """``$ATTNZOO_DATA_DIR``, else ``~/attnzoo_data``."""
    return os.environ.get(DATA_DIR_ENV) or str(pathlib.Path("~/attnzoo_data").expanduser())


def spec(
    dataset: str, *, task: str | None = None, text_keys: Sequence[str] | None = None
) -> DatasetSpec:
    """The registry entry for ``dataset``; ValueError naming the valid names otherwise.

    Besides the names in ``DATASETS``: ``text:<glob>``, ``tsv:<glob>``, ``jsonl:<glob>`` and
    ``tfds:<name>`` with ``text_keys`` (see ``attnzoo.data.local``).
    """
    if local.is_custom(dataset):
        s = local.spec(dataset, text_keys)
    elif dataset not in DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}, or your own data: "
            "'text:<glob>', 'tsv:<file>', 'jsonl:<file>', 'tfds:<name>' with text_keys "
            "(see attnzoo.data.local)"
        )
    else:
        s = DATASETS[dataset]
    if task is not None and s.task != task:
        wanted = {"lm": "a language-modelling", "mt": "a translation"}[task]
        valid = [n for n, d in DATASETS.items() if d.task == task]
        hint = {"lm": "'text:<glob>'", "mt": "'tsv:<file>' or 'jsonl:<file>'"}[task]
        raise ValueError(
            f"dataset {dataset!r} is not {wanted} dataset (text_keys={s.text_features}); use one "
            f"of {valid}, or your own data: {hint}"
        )
    return s


def data_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_keys: Sequence[str] | None = None,
) -> Sequence[Any]:
    """Random-access examples (dicts of features) of ``dataset``/``split``, prepared if needed.

    ``text_keys`` names the text features of a custom dataset (``tfds:<name>``, ``jsonl:``).
    """
    s = spec(dataset, text_keys=text_keys)
    if split not in s.splits:
        raise ValueError(
            f"unknown split {split!r} for dataset {dataset!r}; valid splits: {', '.join(s.splits)}"
        )
    if local.is_custom(dataset) and not dataset.startswith("tfds:"):
        return local.data_source(dataset, split, text_keys=text_keys, data_dir=data_dir)
    if s.module:
        importlib.import_module(s.module)  # registers the builder with tfds
    data_dir = data_dir or default_data_dir()
    builder = _builder(s, data_dir)
    if local.is_custom(dataset):  # tfds:<name>: features are known before any download
        _check_text_keys(builder, s)
    if not builder.is_prepared():
        # Only one process prepares; the others wait, then read what it wrote.
        with file_lock(_dataset_dir(s, data_dir).with_suffix(".lock")):
            builder = _builder(s, data_dir)
            if not builder.is_prepared():
                _prepare(builder, s, data_dir)
    split_spec = s.splits[split]
    if local.is_custom(dataset):
        split_spec = _generic_split(builder, s, dataset, split)
    try:
        # tfds wraps as_data_source in a wrapt decorator that hides its signature from type
        # checkers; with one split name it returns one random-access Sequence.
        as_data_source = cast(Callable[..., Sequence[Any]], builder.as_data_source)
        source = as_data_source(split=split_spec)
        # Cheap probe: a truncated ArrayRecord file fails here rather than mid-epoch.
        if len(source):
            _ = source[0], source[len(source) - 1]
    except Exception as err:
        raise _corrupt_error(s, data_dir, err) from err
    if len(source) == 0:
        raise ValueError(
            f"split {split!r} of dataset {dataset!r} in {data_dir} is empty; delete "
            f"{_dataset_dir(s, data_dir)} so it is prepared again"
        )
    return source


def _check_text_keys(builder: Any, s: DatasetSpec) -> None:
    """``tfds:<name>``: every ``text_keys`` entry is a feature of the dataset."""
    features = builder.info.features
    names = list(features.keys()) if hasattr(features, "keys") else []
    missing = [k for k in s.text_features if names and k not in names]
    if missing:
        what = "language pair" if s.task == "mt" else "text feature"
        raise ValueError(
            f"tfds dataset {s.tfds_name!r} has no feature {', '.join(map(repr, missing))} (the "
            f"{what} text_keys={s.text_features} asks for); its features: {', '.join(names)}"
        )


def _generic_split(builder: Any, s: DatasetSpec, dataset: str, split: str) -> str:
    """The tfds split spec of ``split`` for ``tfds:<name>`` (halves of test if no validation)."""
    have = set(builder.info.splits.keys()) if builder.info.splits else set(SPLITS)
    if split in have:
        return split
    if "train" not in have:
        raise ValueError(f"tfds dataset {s.tfds_name!r} has no train split; it has {sorted(have)}")
    # No such split: LM1B's convention (halves of test), else 5% + 5% of train.
    if "test" in have and "validation" not in have:
        return {"validation": "test[:50%]", "test": "test[50%:]"}[split]
    if "validation" in have:  # no test: halves of validation
        return {"validation": "validation[:50%]", "test": "validation[50%:]"}[split]
    raise ValueError(
        f"tfds dataset {s.tfds_name!r} ({dataset!r}) has only a train split; hold out part of it "
        "with its own split spec, or use the train split"
    )


def _builder(s: DatasetSpec, data_dir: str) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(s.tfds_name, data_dir=data_dir, file_format="array_record")
    except Exception as err:  # unreadable dataset_info.json and the like
        raise _corrupt_error(s, data_dir, err) from err


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("tensorflow") is not None


def _prepare(builder: tfds.core.DatasetBuilder, s: DatasetSpec, data_dir: str) -> None:
    if s.prepare_needs_tensorflow and not tensorflow_available():
        # Before download_and_prepare: otherwise the download runs (GBs for WMT and LM1B)
        # and only then does the builder fail on its first TensorFlow call.
        raise ValueError(
            f"preparing {s.tfds_name!r} needs TensorFlow, which is not installed: its tfds "
            'builder uses TensorFlow file APIs. Run `pip install "attnzoo[tf]"` (or add the `tf` '
            "extra to the command attnzoo was installed with) once, then run again. Nothing was "
            "downloaded; reading the prepared ArrayRecord files needs no TensorFlow"
        )
    try:
        builder.download_and_prepare()
    except ValueError:
        raise  # already names the problem (e.g. a damaged bundled corpus)
    except ImportError as err:
        raise ValueError(
            f"preparing {s.tfds_name!r} needs the missing module {err.name!r} ({err}); its tfds "
            'builder uses TensorFlow file APIs: `pip install "attnzoo[tf]"` once to prepare it '
            "(reading the prepared ArrayRecord files needs no TensorFlow)"
        ) from err
    except Exception as err:
        raise ValueError(
            f"preparing {s.tfds_name!r} into {data_dir} failed ({type(err).__name__}: {err}); "
            "full-size datasets are downloaded, so check the network connection and disk space, "
            f"then delete {_dataset_dir(s, data_dir)} and run again"
        ) from err


def _dataset_dir(s: DatasetSpec, data_dir: str) -> pathlib.Path:
    return pathlib.Path(data_dir) / s.tfds_name.split("/")[0]


def _corrupt_error(s: DatasetSpec, data_dir: str, err: Exception) -> ValueError:
    return ValueError(
        f"could not read prepared dataset {s.tfds_name!r} from {data_dir} "
        f"({type(err).__name__}: {err}); the files are missing or corrupt: delete "
        f"{_dataset_dir(s, data_dir)} and run again to re-prepare it"
    )


def as_text(value: Any) -> str:
    """A tfds Text feature (bytes from ArrayRecord sources, str from mocks) as ``str``."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def texts(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    *,
    text_keys: Sequence[str] | None = None,
) -> list[str]:
    """Every document of an LM dataset split, in stored order (for evaluation)."""
    (key,) = spec(dataset, task="lm", text_keys=text_keys).text_features
    source = data_source(dataset, split, data_dir=data_dir, text_keys=text_keys)
    return [as_text(ex[key]) for ex in source]


def text_pairs(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    *,
    text_keys: Sequence[str] | None = None,
) -> list[tuple[str, str]]:
    """Every (source, reference) pair of a translation dataset split, in stored order."""
    src_key, tgt_key = spec(dataset, task="mt", text_keys=text_keys).text_features
    source = data_source(dataset, split, data_dir=data_dir, text_keys=text_keys)
    return [(as_text(ex[src_key]), as_text(ex[tgt_key])) for ex in source]
