"""Your own data: ``text:``, ``tsv:``, ``jsonl:`` files and ``tfds:<name>`` with text_keys."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnzoo import data
from attnzoo.data import corpora, local, sources

BYTE = data.get_tokenizer("byte")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _paragraphs(n, tag):
    rng = np.random.default_rng(len(tag))
    return [f"{tag} {i}: " + " ".join(rng.choice(WORDS, 8)) for i in range(n)]


def _decoded_segments(batches, tok, inputs="inputs", seg="segment_ids"):
    out = []
    for b in batches:
        for r in range(b[inputs].shape[0]):
            for s in range(1, int(b[seg][r].max()) + 1):
                out.append(tok.decode(b[inputs][r][b[seg][r] == s]))
    return out


def test_text_glob_trains_sentencepiece_and_packs_file_text(tmp_path):
    for k in range(3):
        (tmp_path / f"doc{k}.txt").write_text("\n\n".join(_paragraphs(60, f"file{k}")) + "\n")
    ds = f"text:{tmp_path}/*.txt"
    docs = data.texts(ds, "train")
    assert all(d.startswith("file") for d in docs)
    tok = data.get_tokenizer("sentencepiece", dataset=ds, vocab_size=300, data_dir=str(tmp_path))
    assert tok.vocab_size == 300
    it = data.lm_batches(ds, "train", tokenizer=tok, seq_len=32, batch_size=4, num_epochs=1)
    batch = next(it)
    assert batch["inputs"].shape == (4, 32) and batch["weights"].all()  # packed: no padding
    state = it.get_state()
    nxt = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["inputs"], nxt["inputs"])  # resumable
    text = " ".join(_decoded_segments([batch, nxt], tok))
    assert "file" in text and any(w in text for w in WORDS)
    corpus = "\n".join(docs)
    for piece in text.split():
        assert piece.strip(":") in corpus


def test_text_fraction_split_is_deterministic_and_disjoint(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(_paragraphs(400, "p")))
    # 400 short paragraphs join into ~10 documents of <= MAX_CHARS; a large holdout keeps the
    # text-file test small, the 1000-pair jsonl below checks the default 5% + 5%.
    ds = f"text:{tmp_path}/a.txt;holdout=0.3;split_seed=7"
    splits = {s: data.texts(ds, s) for s in ("train", "validation", "test")}
    assert all(splits.values())
    assert splits == {s: data.texts(ds, s) for s in splits}  # deterministic
    assert not set(splits["train"]) & (set(splits["validation"]) | set(splits["test"]))
    whole = corpora.paragraph_chunks((tmp_path / "a.txt").read_text(), max_chars=local.MAX_CHARS)
    assert sorted(sum(splits.values(), [])) == sorted(whole)  # a partition of the documents
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"src": f"s{i}", "tgt": f"t{i}"}) for i in range(1000))
    )
    pj = f"jsonl:{tmp_path}/p.jsonl"
    got = {s: data.text_pairs(pj, s) for s in ("train", "validation", "test")}
    sets = {s: set(v) for s, v in got.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    assert sum(map(len, got.values())) == 1000
    assert 20 < len(got["validation"]) < 90 and 20 < len(got["test"]) < 90  # ~5% each
    assert got == {s: data.text_pairs(pj, s) for s in got}
    other = data.text_pairs(pj + ";split_seed=1", "validation")
    assert set(other) != sets["validation"]  # the seed picks the hold-out


def test_validation_and_test_from_files(tmp_path):
    (tmp_path / "train.txt").write_text("training text one\n\ntraining text two\n")
    (tmp_path / "val.txt").write_text("validation text\n")
    (tmp_path / "test.txt").write_text("test text\n")
    ds = f"text:{tmp_path}/train.txt;validation={tmp_path}/val.txt;test={tmp_path}/test.txt"
    assert data.texts(ds, "validation") == ["validation text"]
    assert data.texts(ds, "test") == ["test text"]
    assert "training text one" in data.texts(ds, "train")[0]


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_parallel_files_give_mt_batches(tmp_path, kind):
    pairs = [(f"source number {i}", f"target number {i}") for i in range(40)]
    path = tmp_path / f"pairs.{kind}"
    if kind == "tsv":
        path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
        ds, keys = f"tsv:{path};validation={path}", None
    else:
        path.write_text("".join(json.dumps({"en": s, "fr": t}) + "\n" for s, t in pairs))
        ds, keys = f"jsonl:{path};validation={path}", ("en", "fr")
    assert data.text_pairs(ds, "validation", text_keys=keys) == pairs
    it = data.mt_batches(
        ds, "validation", tokenizer=BYTE, seq_len=48, batch_size=4, num_epochs=1, text_keys=keys
    )
    got = []
    for b in it:
        for r in range(4):
            seg = b["src_segment_ids"][r]
            for s in range(1, seg.max() + 1):
                src = BYTE.decode(b["src"][r][seg == s])
                tgt = BYTE.decode(b["tgt_targets"][r][b["tgt_segment_ids"][r] == s])
                got.append((src, tgt))
    assert sorted(got) == sorted(pairs)
    tok = data.get_tokenizer(
        "sentencepiece", dataset=ds, vocab_size=285, data_dir=str(tmp_path), text_keys=keys
    )
    assert tok.decode(tok.encode("target number 3")) == "target number 3"


def test_keys_in_the_name_equal_text_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"a": "x y", "b": "z w"}) + "\n")
    ds = f"jsonl:{path};validation={path}"
    assert data.text_pairs(ds + ";keys=a,b", "validation") == [("x y", "z w")]
    assert data.text_pairs(ds, "validation", text_keys=("b", "a")) == [("z w", "x y")]


def _bad(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("kind", "name", "content", "message"),
    [
        ("text", "empty.txt", b"  \n\n", r"empty\.txt: the file is empty"),
        ("text", "bad.txt", b"ok line\nsecond \xff line\n", r"bad\.txt:2: invalid UTF-8"),
        ("tsv", "one.tsv", b"a\tb\nonly one field\n", r"one\.tsv:2: expected 2 non-empty tab"),
        ("tsv", "bad.tsv", b"a\tb\n\nc\t\xc3(\n", r"bad\.tsv:3: invalid UTF-8"),
        (
            "jsonl",
            "key.jsonl",
            b'{"src": "a", "tgt": "b"}\n{"src": "c"}\n',
            r"key\.jsonl:2: .*no key 'tgt'",
        ),
        (
            "jsonl",
            "json.jsonl",
            b'{"src": "a", "tgt": "b"}\n{oops\n',
            r"json\.jsonl:2: not valid JSON",
        ),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, kind, name, content, message):
    path = _bad(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        data.data_source(f"{kind}:{path}", "train")


def test_no_matching_files_and_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"no files match"):
        data.data_source(f"text:{tmp_path}/*.nothing", "train")
    with pytest.raises(ValueError, match=r"unknown option 'valid'"):
        local.parse(f"text:{tmp_path}/a.txt;valid=x")
    with pytest.raises(ValueError, match=r"needs text_keys"):
        sources.spec("tfds:ag_news_subset")
    with pytest.raises(ValueError, match=r"not a translation dataset"):
        sources.spec("text:x.txt", task="mt")


def test_tfds_by_name_with_text_keys(tmp_path):
    ds = "tfds:wmt14_translate/de-en"
    with tfds.testing.mock_data(num_examples=6):
        pairs = data.text_pairs(ds, "test", data_dir=str(tmp_path), text_keys=("en", "de"))
        assert len(pairs) == 6 and all(s and t for s, t in pairs)
        assert sources.spec(ds, text_keys=("de",)).task == "lm"
        with pytest.raises(ValueError, match=r"has no feature 'fr' \(the language pair"):
            data.data_source(ds, "train", data_dir=str(tmp_path), text_keys=("de", "fr"))
