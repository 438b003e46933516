"""grain pipelines: packing against an independent reconstruction, model-level segment isolation,
exact resume, per-epoch shuffling, multi-process sharding, and length/argument errors.

References are built from the raw texts (``data.texts`` / ``data.text_pairs``) and UTF-8 bytes,
never from the pipeline's own output.
"""

import collections
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import data
from attnzoo.models import decoder_lm

BYTE = data.get_tokenizer("byte")
BOS, EOS = BYTE.bos_id, BYTE.eos_id
LM_KEYS = {"inputs", "targets", "segment_ids", "positions", "weights"}
MT_KEYS = {
    "src",
    "src_segment_ids",
    "src_positions",
    "tgt_inputs",
    "tgt_targets",
    "tgt_segment_ids",
    "tgt_positions",
    "tgt_weights",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("attnzoo_data"))


@pytest.fixture(scope="module")
def lm(data_dir):
    """lm_batches over Shakespeare, byte tokens: ``lm(split, seq_len=..., batch_size=..., ...)``."""
    return functools.partial(data.lm_batches, "shakespeare", tokenizer=BYTE, data_dir=data_dir)


@pytest.fixture(scope="module")
def mt(data_dir):
    """mt_batches over the Bible, byte tokens: ``mt(split, seq_len=..., batch_size=..., ...)``."""
    return functools.partial(data.mt_batches, "bible_en_es", tokenizer=BYTE, data_dir=data_dir)


def _segments(segment_ids):
    """[(segment id, start, stop)] of one row, from run boundaries (independent of positions)."""
    out, start = [], 0
    for t in range(1, len(segment_ids) + 1):
        if t == len(segment_ids) or segment_ids[t] != segment_ids[t - 1]:
            if segment_ids[start]:
                out.append((int(segment_ids[start]), start, t))
            start = t
    return out


def _check_row_layout(segment_ids, positions, weights):
    """Segments 1, 2, ... in order, padding only at the end, positions 0.. per segment."""
    segs = _segments(segment_ids)
    assert [s for s, _, _ in segs] == list(range(1, len(segs) + 1))
    assert not segment_ids[segs[-1][2] if segs else 0 :].any()
    for _, a, b in segs:
        np.testing.assert_array_equal(positions[a:b], np.arange(b - a))
    np.testing.assert_array_equal(weights, (segment_ids != 0).astype(np.float32))
    return segs


def _documents(target_stream):
    """Texts from a concatenated target stream: UTF-8 bytes + 3, each document ended by EOS."""
    pieces = np.split(np.asarray(target_stream), np.flatnonzero(np.equal(target_stream, EOS)) + 1)
    return [bytes((p[:-1] - 3).astype(np.uint8)).decode() for p in pieces if len(p)]


@pytest.mark.parametrize("packing", [True, False])
def test_lm_rows_reassemble_into_exactly_the_documents(lm, data_dir, packing):
    seq_len, batch = 48, 8
    batches = list(lm("test", seq_len=seq_len, batch_size=batch, num_epochs=1, packing=packing))
    assert set(batches[0]) == LM_KEYS
    input_stream, target_stream, n_segments = [], [], []
    for b in batches:
        assert all(v.shape == (batch, seq_len) for v in b.values())
        assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
        for r in range(batch):
            segs = _check_row_layout(b["segment_ids"][r], b["positions"][r], b["weights"][r])
            n_segments.append(len(segs))
            for _, a, c in segs:
                inp, tgt = b["inputs"][r, a:c], b["targets"][r, a:c]
                np.testing.assert_array_equal(inp[1:], tgt[:-1])  # targets are inputs shifted
                input_stream.extend(inp.tolist())
                target_stream.extend(tgt.tolist())
    docs = data.texts("shakespeare", "test", data_dir=data_dir)
    assert collections.Counter(_documents(target_stream)) == collections.Counter(docs)
    # Each document is [bos] + bytes as inputs and bytes + [eos] as targets: EOS between docs.
    assert input_stream.count(BOS) == len(docs) and EOS not in input_stream
    if packing:
        assert max(n_segments) >= 2  # documents share rows
        assert sum(b["weights"].sum() for b in batches[:-1]) == (len(batches) - 1) * batch * seq_len
    else:
        assert max(n_segments) == 1


def test_lm_packed_segments_are_isolated_in_the_model(lm):
    """Each packed segment's logits equal running that segment alone through decoder_lm."""
    seq_len = 32
    it = lm("validation", seq_len=seq_len, batch_size=4, seed=3)
    b = next(b for b in it if (b["segment_ids"].max(axis=1) >= 2).any())  # a document boundary
    cfg = decoder_lm.Config.tiny(vocab_size=BYTE.vocab_size).replace(
        d_model=32, d_ff=64, n_heads=4, n_layers=2
    )
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    apply = jax.jit(decoder_lm.apply, static_argnums=0)
    packed = apply(graphdef, params, b["inputs"], b["positions"], b["segment_ids"])
    segs = [(r, a, c) for r in range(4) for _, a, c in _segments(b["segment_ids"][r])]
    # Segment alone at the start of its own row; the filler after it cannot affect it (causal).
    alone = np.full((len(segs), seq_len), 7, np.int32)
    for i, (r, a, c) in enumerate(segs):
        alone[i, : c - a] = b["inputs"][r, a:c]
    alone_logits = apply(graphdef, params, jnp.asarray(alone))
    for i, (r, a, c) in enumerate(segs):
        np.testing.assert_allclose(packed[r, a:c], alone_logits[i, : c - a], atol=1e-5, rtol=1e-5)
    # The check can fail: without segment ids, later segments do see earlier ones.
    unmasked = apply(graphdef, params, b["inputs"], b["positions"])
    r, a, c = next(s for s in segs if s[1] > 0)
    assert np.abs(unmasked[r, a:c] - packed[r, a:c]).max() > 1e-3


@pytest.mark.parametrize("packing", [True, False])
def test_mt_rows_hold_exactly_the_pairs_that_fit(mt, data_dir, packing):
    seq_len, batch = 160, 4
    batches = list(
        mt("validation", seq_len=seq_len, batch_size=batch, num_epochs=1, packing=packing)
    )
    assert set(batches[0]) == MT_KEYS
    got, per_row = [], []
    for b in batches:
        for r in range(batch):
            src_ids = b["src_segment_ids"][r]
            src = _check_row_layout(src_ids, b["src_positions"][r], (src_ids != 0) * 1.0)
            tgt = _check_row_layout(
                b["tgt_segment_ids"][r], b["tgt_positions"][r], b["tgt_weights"][r]
            )
            assert [s for s, _, _ in src] == [s for s, _, _ in tgt]  # pair k is segment k on both
            per_row.append(len(src))
            for (_, a, c), (_, d, e) in zip(src, tgt, strict=True):
                s_ids = b["src"][r, a:c]
                t_in, t_out = b["tgt_inputs"][r, d:e], b["tgt_targets"][r, d:e]
                assert s_ids[-1] == EOS and t_out[-1] == EOS and t_in[0] == BOS
                np.testing.assert_array_equal(t_in[1:], t_out[:-1])
                got.append((BYTE.decode(s_ids), BYTE.decode(t_out)))
    pairs = data.text_pairs("bible_en_es", "validation", data_dir=data_dir)
    fits = [(s, t) for s, t in pairs if max(len(s.encode()), len(t.encode())) + 1 <= seq_len]
    assert 0 < len(fits) < len(pairs)  # some pairs really are dropped
    assert collections.Counter(got) == collections.Counter(fits)
    assert (max(per_row) >= 2) == packing


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
    "pipeline, split, kwargs",
    [
        ("lm", "test", dict(seq_len=256, batch_size=8, seed=5)),
        ("lm", "test", dict(seq_len=512, batch_size=8, packing=False)),
        ("mt", "validation", dict(seq_len=256, batch_size=4, seed=1)),
        ("mt", "validation", dict(seq_len=256, batch_size=4, packing=False)),
    ],
    ids=["lm_packed", "lm_unpacked", "mt_packed", "mt_unpacked"],
)
def test_resume_yields_the_same_next_batches(request, pipeline, split, kwargs):
    make = functools.partial(request.getfixturevalue(pipeline), split, **kwargs)
    it = make()
    _take(it, 57)  # past the first epoch boundary of each split
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 4)
    resumed = make()
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 4), strict=True):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _sources_in_order(mt, **kwargs):
    """Source sentences in the order the (unpacked, batch 1) pipeline yields them."""
    it = mt("validation", seq_len=512, batch_size=1, packing=False, **kwargs)
    return [BYTE.decode(b["src"][0]) for b in it]


def test_shuffle_is_seeded_and_changes_every_epoch(mt):
    order = _sources_in_order(mt, seed=0, num_epochs=2)
    first, second = order[:85], order[85:]
    assert sorted(first) == sorted(second) and first != second
    assert _sources_in_order(mt, seed=0, num_epochs=1) == first
    assert _sources_in_order(mt, seed=1, num_epochs=1) != first


def test_shards_are_disjoint_and_cover_the_split(lm, mt, data_dir):
    # What processes 0..2 of 3 would read (shard_index=jax.process_index()).
    shards = [_sources_in_order(mt, num_epochs=1, shard_index=i, shard_count=3) for i in range(3)]
    everything = [s for s, _ in data.text_pairs("bible_en_es", "validation", data_dir=data_dir)]
    assert collections.Counter(sum(shards, [])) == collections.Counter(everything)
    assert all(not set(shards[i]) & set(shards[j]) for i, j in [(0, 1), (0, 2), (1, 2)])
    assert min(map(len, shards)) == 85 // 3
    lm_shards = []
    for i in range(2):
        it = lm("test", seq_len=64, batch_size=2, shard_index=i, shard_count=2, num_epochs=1)
        lm_shards.append(_documents(np.concatenate([b["targets"][b["weights"] > 0] for b in it])))
    docs = data.texts("shakespeare", "test", data_dir=data_dir)
    assert collections.Counter(lm_shards[0] + lm_shards[1]) == collections.Counter(docs)
    assert not set(lm_shards[0]) & set(lm_shards[1])


def test_text_longer_than_seq_len_is_a_clear_error(mt):
    with pytest.raises(ValueError, match="none of the first 85 pairs .* fit seq_len=8.*raise"):
        mt("validation", seq_len=8, batch_size=2)


def test_long_lm_documents_continue_in_the_next_row(lm):
    b = next(lm("test", seq_len=16, batch_size=4, packing=False))
    # One ~1,000-byte document split into 16-token rows: nothing dropped, positions restart.
    assert b["weights"].all() and b["inputs"][0, 0] == BOS and (b["inputs"][1:] > EOS).all()
    np.testing.assert_array_equal(b["inputs"][1:, 0], b["targets"][:-1, -1])
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(16), (4, 16)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index < shard_count.*process_index"),
        ({"num_epochs": 0}, "num_epochs must be None"),
        ({"shard_count": 200}, "fewer than shard_count=200"),
        ({"split": "dev"}, "unknown split 'dev'"),
    ],
)
def test_bad_arguments(lm, kwargs, match):
    args = {"split": "test", "seq_len": 16, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        lm(args.pop("split"), **args)


def test_wrong_task_is_a_clear_error():
    with pytest.raises(ValueError, match="not a translation dataset.*bible_en_es"):
        data.mt_batches("shakespeare", "test", tokenizer=BYTE, seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="not a language-modelling dataset"):
        data.lm_batches("bible_en_es", "test", tokenizer=BYTE, seq_len=16, batch_size=2)
