"""Tokenizers: exact round trips, the byte id layout, sentencepiece training and caching."""

import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import data
from attnzoo.data import tokenizers

BYTE = data.get_tokenizer("byte")


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_byte_round_trip_on_arbitrary_unicode(text):
    ids = BYTE.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]  # the documented layout, from UTF-8
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id, *ids, BYTE.eos_id, BYTE.pad_id, BYTE.pad_id]) == text


def test_byte_special_ids_and_bad_ids():
    assert (BYTE.vocab_size, BYTE.pad_id, BYTE.bos_id, BYTE.eos_id) == (259, 0, 1, 2)
    assert BYTE.decode(np.array([[3 + ord("h"), 3 + ord("i")]])) == "hi"
    with pytest.raises(ValueError, match=r"ids must be in \[0, 259\)"):
        BYTE.decode([300])


def test_get_tokenizer_bad_options():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        data.get_tokenizer("bpe")
    with pytest.raises(ValueError, match="fixed vocabulary of 259.*vocab_size=None"):
        data.get_tokenizer("byte", vocab_size=256)
    with pytest.raises(ValueError, match="needs dataset="):
        data.get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.get_tokenizer("sentencepiece", dataset="wikipedia")


@pytest.fixture(scope="module")
def data_dir():
    # The suite's shared data dir (conftest): mt_tiny's tokenizer, trained once per test run.
    return data.default_data_dir()


@pytest.fixture(scope="module")
def bible_sp(data_dir):
    return data.get_tokenizer(
        "sentencepiece", dataset="bible_en_es", vocab_size=2000, data_dir=data_dir
    )


def test_sentencepiece_round_trips_corpus_lines_in_both_languages(bible_sp, data_dir):
    pairs = data.text_pairs("bible_en_es", "test", data_dir=data_dir)
    assert (bible_sp.vocab_size, bible_sp.pad_id, bible_sp.bos_id, bible_sp.eos_id) == (
        2000,
        0,
        1,
        2,
    )
    n_tokens = n_chars = 0
    for en, es in pairs:
        for text in (en, es):
            ids = bible_sp.encode(text)
            assert bible_sp.decode(ids) == text
            assert bible_sp.decode([bible_sp.bos_id, *ids, bible_sp.eos_id, 0]) == text
            n_tokens, n_chars = n_tokens + len(ids), n_chars + len(text)
    # A shared vocabulary learned real subwords for both languages, not bytes.
    assert n_chars / n_tokens > 2.5
    assert len(bible_sp.encode("y dijo Dios")) <= 4 and len(bible_sp.encode("and God said")) <= 4


@given(st.text(max_size=50))
@settings(max_examples=100, deadline=None)
def test_sentencepiece_round_trips_arbitrary_unicode(bible_sp, text):
    # Byte fallback and identity normalization: even emoji, tabs and newlines survive.
    assert bible_sp.decode(bible_sp.encode(text)) == text


def test_sentencepiece_is_cached_and_deterministic(bible_sp, data_dir, tmp_path):
    path = pathlib.Path(bible_sp.path)
    assert path == pathlib.Path(data_dir) / "tokenizers" / "bible_en_es.unigram2000.seed0.model"
    mtime = path.stat().st_mtime_ns
    again = data.get_tokenizer(
        "sentencepiece", dataset="bible_en_es", vocab_size=2000, data_dir=data_dir
    )
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert again.encode("In the beginning") == bible_sp.encode("In the beginning")
    # Same input sentences -> byte-identical model (one trainer thread, no internal sampling).
    lines = [en for en, _ in data.text_pairs("bible_en_es", "test", data_dir=data_dir)]
    first = tokenizers.train_sentencepiece(lines, vocab_size=600)
    assert tokenizers.train_sentencepiece(lines, vocab_size=600) == first


def test_corrupt_sentencepiece_model_says_delete(bible_sp, tmp_path):
    bad = tmp_path / "tokenizers" / "bible_en_es.unigram2000.seed0.model"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt.*delete it"):
        data.get_tokenizer(
            "sentencepiece", dataset="bible_en_es", vocab_size=2000, data_dir=str(tmp_path)
        )


def test_sentencepiece_vocab_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller vocab_size"):
        tokenizers.train_sentencepiece(["a tiny corpus", "of two lines"], vocab_size=5000)
