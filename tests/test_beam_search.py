"""Beam search: Hugging Face parity on a converted random Marian model, greedy, scores, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from attnzoo.decoding.beam_search import beam_search, length_penalty
from attnzoo.models import convert, positional
from attnzoo.models import encoder_decoder as ed
from attnzoo.models.positional import PositionConfig
from attnzoo.training import rules
from attnzoo.training.mesh import make_mesh
from attnzoo.training.sharding import tree_shardings

V, EOS, BOS, PAD, MAX_LEN = 48, 1, 0, 0, 12


@pytest.fixture(scope="module")
def marian():
    """A random HF Marian model whose EOS is likely enough that beams finish at varied lengths."""
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        scale_embedding=True,
        init_std=0.1,  # source-dependent outputs (at 0.02 the decoder ignores the source)
    )
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = 1.0
    cfg, graphdef, params = convert.from_transformers(model)
    return model, cfg, graphdef, params


def _src() -> np.ndarray:
    rng = np.random.default_rng(0)
    src = rng.integers(2, V, size=(6, 9))
    for row, n_pad in enumerate([0, 3, 5, 1, 0, 7]):
        src[row, 9 - n_pad :] = PAD
    return src


def _hf_beam(model, src, *, num_beams, alpha, max_len) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(src),
            attention_mask=torch.from_numpy((src != PAD).astype(np.int64)),
            num_beams=num_beams,
            length_penalty=alpha,
            early_stopping=True,
            max_length=max_len + 1,  # HF counts the decoder start token
            do_sample=False,
            forced_eos_token_id=None,  # Marian's default forces EOS at max_length
        ).numpy()[:, 1:]
    out = np.pad(out, ((0, 0), (0, max_len - out.shape[1])), constant_values=PAD)
    # HF fills after EOS with `pad_token_id or eos_token_id`, i.e. EOS when pad is 0
    after_eos = np.cumsum(out == EOS, axis=1) - (out == EOS) > 0
    return np.where(after_eos, PAD, out)


@pytest.mark.parametrize("alpha", [0.6, 1.0, -0.5])
def test_matches_hf_generate_num_beams_4(marian, alpha):
    model, cfg, graphdef, params = marian
    src = _src()
    want = _hf_beam(model, src, num_beams=4, alpha=alpha, max_len=MAX_LEN)
    ours = beam_search(
        graphdef, params, cfg, src, beam_size=4, alpha=alpha, max_len=MAX_LEN, eos_id=EOS,
        bos_id=BOS, length_penalty="power",
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ours), want)
    ends = [(row == EOS).argmax() if (row == EOS).any() else MAX_LEN for row in want]
    assert len(set(ends)) > 2, f"the test needs varied output lengths, got {ends}"


def test_scanned_layers_give_the_same_beams(marian):
    _, cfg, graphdef, params = marian
    kw = dict(beam_size=4, max_len=MAX_LEN, eos_id=EOS, bos_id=BOS)
    scfg, sgraphdef, sparams = ed.relayout(cfg, params, scan_layers=True)
    want = beam_search(graphdef, params, cfg, _src(), **kw)
    got = beam_search(sgraphdef, sparams, scfg, _src(), **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_staged_loop_over_a_growing_cache_matches_hf(marian):
    model, cfg, graphdef, params = marian
    want = _hf_beam(model, _src(), num_beams=4, alpha=0.6, max_len=MAX_LEN)
    kw = dict(beam_size=4, alpha=0.6, max_len=MAX_LEN, eos_id=EOS, bos_id=BOS,
              length_penalty="power", return_scores=True)  # fmt: skip
    tokens, scores = beam_search(graphdef, params, cfg, _src(), stages=3, **kw)
    np.testing.assert_array_equal(np.asarray(tokens), want)
    _, one_loop = beam_search(graphdef, params, cfg, _src(), stages=1, **kw)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(one_loop), rtol=1e-6)


def _naive_greedy(graphdef, params, src, max_len):
    """Greedy with no cache, one sentence at a time without source padding."""
    return np.concatenate(
        [_greedy_full_forward(graphdef, params, s[s != PAD][None], max_len) for s in src]
    )


def test_beam_one_is_greedy(marian):
    _, cfg, graphdef, params = marian
    # Doubled weight matrices: greedy on the fixture itself emits one token throughout, which
    # any decoder stuck on a single token would also pass.
    params = jax.tree.map(lambda x: 2 * x if x.ndim >= 2 else x, params)
    src = _src()
    want = _naive_greedy(graphdef, params, src, MAX_LEN)
    assert len({tuple(r) for r in want}) > 2 and len(set(want[0])) > 1
    ours = beam_search(
        graphdef, params, cfg, src, beam_size=1, max_len=MAX_LEN, eos_id=EOS, bos_id=BOS
    )
    np.testing.assert_array_equal(np.asarray(ours), want)


def _greedy_full_forward(graphdef, params, src, max_len):
    """Greedy with no cache: the full teacher-forced model on a growing target, jitted once.

    The target buffer has a fixed length; causal attention keeps the unfilled tail (padding
    that is overwritten later) from influencing position t.
    """
    apply = jax.jit(lambda p, s, seg, t: ed.apply(graphdef, p, s, t, seg))
    seg = (src != PAD).astype(np.int32)
    tgt = np.full((len(src), max_len), PAD, np.int32)
    tgt[:, 0] = BOS
    out = np.full((len(src), max_len), PAD, np.int32)
    done = np.zeros(len(src), bool)
    for t in range(max_len):
        tok = np.asarray(jnp.argmax(apply(params, src, seg, tgt)[:, t], -1))
        out[:, t] = np.where(done, PAD, tok)
        done |= tok == EOS
        if t + 1 < max_len:
            tgt[:, t + 1] = tok
    return out


@pytest.mark.parametrize("kind", positional.kinds())
def test_beam_one_is_greedy_for_every_positional_kind(kind):
    cfg = ed.Config.tiny(vocab_size=V).replace(
        d_model=32, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, dropout=0.0,
        tie_embeddings=False, position=PositionConfig(kind=kind, max_len=32),
    )  # fmt: skip
    graphdef, params = ed.init(cfg, jax.random.key(5))
    src = _src()
    want = _greedy_full_forward(graphdef, params, src, 10)
    got = beam_search(graphdef, params, cfg, src, beam_size=1, max_len=10, eos_id=EOS, bos_id=BOS)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len({tuple(r) for r in want}) > 1


def test_scores_are_gnmt_penalised_logprobs_of_the_tokens(marian):
    _, cfg, graphdef, params = marian
    src = _src()
    tokens, scores = beam_search(
        graphdef, params, cfg, src, beam_size=4, alpha=0.6, max_len=MAX_LEN, eos_id=EOS,
        bos_id=BOS, return_scores=True,
    )  # fmt: skip
    tokens = np.asarray(tokens)
    for s, toks, score in zip(src, tokens, np.asarray(scores), strict=True):
        n = int((toks == EOS).argmax()) + 1 if (toks == EOS).any() else MAX_LEN
        tgt = np.concatenate([[BOS], toks[: n - 1]])
        s = s[s != PAD][None]
        logp = jax.nn.log_softmax(ed.apply(graphdef, params, jnp.asarray(s), tgt[None])[0])
        total = float(np.sum(np.asarray(logp)[np.arange(n), toks[:n]], dtype=np.float64))
        want = total / ((5 + n) / 6) ** 0.6  # GNMT, Wu et al. 2016 eq. 14
        np.testing.assert_allclose(score, want, rtol=1e-5)


def test_length_penalty_formulas():
    np.testing.assert_allclose(length_penalty(7, 0.6), (12 / 6) ** 0.6, rtol=1e-6)
    np.testing.assert_allclose(length_penalty(7, 0.6, kind="power"), 7**0.6, rtol=1e-6)


def test_sharded_params_and_batch_give_the_same_tokens(marian):
    _, cfg, graphdef, params = marian
    src = np.concatenate([_src(), _src()[:2]])  # 8 rows: one per device
    want = beam_search(graphdef, params, cfg, src, max_len=MAX_LEN, eos_id=EOS, bos_id=BOS)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = jax.device_put(params, tree_shardings(params, mesh, rules.FSDP))
    src_sharded = jax.device_put(
        src, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    )
    got = beam_search(graphdef, sharded, cfg, src_sharded, max_len=MAX_LEN, eos_id=EOS, bos_id=BOS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_inputs(marian):
    _, cfg, graphdef, params = marian
    kw = dict(max_len=MAX_LEN, eos_id=EOS, bos_id=BOS)
    with pytest.raises(ValueError, match="empty source sentence"):
        beam_search(graphdef, params, cfg, np.array([[5, 6], [PAD, PAD]]), **kw)
    with pytest.raises(ValueError, match="unknown length_penalty 'hf'"):
        beam_search(graphdef, params, cfg, _src(), length_penalty="hf", **kw)
    with pytest.raises(ValueError, match="for decoder-only LMs use"):
        beam_search(graphdef, params, object(), _src(), **kw)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        beam_search(graphdef, params, cfg, _src(), stages=0, **kw)
