"""Full-size datasets (WMT14/17, LM1B) through the real code path, with tfds mocked (no network).

``tfds.testing.mock_data`` replaces only what tfds reads from disk: our registry, module
registration, ``tfds.data_source`` call, tokenizer training and grain pipelines all run for real.
"""

import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnzoo import data
from attnzoo.data import sources

BYTE = data.get_tokenizer("byte")
REAL_TENSORFLOW_AVAILABLE = sources.tensorflow_available


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path)


@pytest.fixture(autouse=True)
def _tensorflow_installed(monkeypatch):
    """These builders need TensorFlow to prepare, which the library checks before preparing; the
    mocked preparation needs none, so the tests run where TensorFlow is absent."""
    monkeypatch.setattr(sources, "tensorflow_available", lambda: True)


@pytest.mark.parametrize("dataset", ["lm1b", "wmt14_translate/en-de", "wmt17_translate/de-en"])
def test_missing_tensorflow_is_reported_before_any_download(monkeypatch, dataset, data_dir):
    monkeypatch.setattr(sources, "tensorflow_available", REAL_TENSORFLOW_AVAILABLE)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # absent, whether installed or not
    download = mock.Mock(side_effect=AssertionError("download started"))
    with tfds.testing.mock_data(num_examples=4):  # also keeps tfds off the network (GCS)
        with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", download):
            with pytest.raises(ValueError, match=r'needs TensorFlow.*pip install "attnzoo\[tf\]"'):
                data.data_source(dataset, "train", data_dir=data_dir)
    download.assert_not_called()


@pytest.mark.parametrize(
    "dataset", ["wmt14_translate/de-en", "wmt14_translate/en-de", "wmt17_translate/de-en"]
)
def test_wmt_translation_path(dataset, data_dir):
    with tfds.testing.mock_data(num_examples=24):
        pairs = data.text_pairs(dataset, "validation", data_dir=data_dir)
        it = data.mt_batches(
            dataset,
            "train",
            tokenizer=BYTE,
            seq_len=64,
            batch_size=4,
            data_dir=data_dir,
            num_epochs=1,
        )
        batches = list(it)
    assert len(pairs) == 24 and all(isinstance(s, str) and s for s, _ in pairs)
    got = []
    for b in batches:
        for r in range(4):
            seg = b["src_segment_ids"][r]
            for s in range(1, seg.max() + 1):
                src = BYTE.decode(b["src"][r][seg == s])
                tgt = BYTE.decode(b["tgt_targets"][r][b["tgt_segment_ids"][r] == s])
                got.append((src, tgt))
    # Mocked splits are identical, so the packed training pairs are the validation pairs.
    assert sorted(got) == sorted(p for p in pairs if all(0 < len(x.encode()) < 64 for x in p))
    assert got


def test_wmt_sentencepiece_trains_on_both_sides(data_dir):
    with tfds.testing.mock_data(num_examples=40):
        tok = data.get_tokenizer(
            "sentencepiece", dataset="wmt14_translate/de-en", vocab_size=300, data_dir=data_dir
        )
        pairs = data.text_pairs("wmt14_translate/de-en", "test", data_dir=data_dir)
        b = next(
            data.mt_batches(
                "wmt14_translate/de-en",
                "train",
                tokenizer=tok,
                seq_len=64,
                batch_size=2,
                data_dir=data_dir,
            )
        )
    assert tok.vocab_size == 300
    assert "wmt14_translate_de-en.unigram300" in tok.path
    for de, en in pairs:
        assert tok.decode(tok.encode(de)) == de and tok.decode(tok.encode(en)) == en
    assert b["tgt_weights"].sum() > 0 and b["src"].max() < 300


def test_lm1b_language_model_path(data_dir):
    with tfds.testing.mock_data(num_examples=30):
        docs = data.texts("lm1b", "validation", data_dir=data_dir)  # a slice of tfds "test"
        batches = list(
            data.lm_batches(
                "lm1b",
                "train",
                tokenizer=BYTE,
                seq_len=32,
                batch_size=4,
                data_dir=data_dir,
                num_epochs=1,
            )
        )
    assert len(docs) == 30
    targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    assert (targets == BYTE.eos_id).sum() == 30  # every sentence delimited by EOS
    sentences = np.split(targets, np.flatnonzero(targets == BYTE.eos_id) + 1)[:-1]
    # Mocked splits are identical, so the training sentences are the validation sentences.
    assert sorted(BYTE.decode(s) for s in sentences) == sorted(docs)
    with pytest.raises(ValueError, match="unknown split 'dev' for dataset 'lm1b'"):
        data.texts("lm1b", "dev", data_dir=data_dir)


def test_mt_length_policy_drops_empty_and_overlong_pairs(data_dir):
    examples = [
        {"de": "", "en": "empty source"},
        {"de": "leeres Ziel", "en": ""},
        {"de": "x" * 40, "en": "too long a source"},
        {"de": "kurz", "en": "y" * 40},
        {"de": "Guten Tag", "en": "Good day"},
        {"de": "Danke", "en": "Thanks"},
    ]

    def as_data_source(self, split, **kwargs):
        return examples

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        batches = list(
            data.mt_batches(
                "wmt14_translate/de-en",
                "train",
                tokenizer=BYTE,
                seq_len=24,
                batch_size=2,
                data_dir=data_dir,
                num_epochs=1,
            )
        )
    src = [
        BYTE.decode(b["src"][r][b["src_segment_ids"][r] == s])
        for b in batches
        for r in range(2)
        for s in range(1, 3)
    ]
    assert sorted(s for s in src if s) == ["Danke", "Guten Tag"]
