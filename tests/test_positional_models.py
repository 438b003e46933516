"""Every positional kind through a tiny ``decoder_lm``: jit, grad, vmap, float32 and bfloat16,
the causal property, relative kinds ignoring a position offset, and KV-cached decoding equal to
the full forward pass (how the cache meets each kind: keys rotated/scaled at write time, biases
and relative terms from the cached slot positions).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.models.positional import PositionConfig, kinds

V, B, T, PREFILL = 64, 2, 12, 5

# options that make each kind act within 12 tokens (clipping, log buckets, decay, partial rotary)
KINDS = {
    "none": PositionConfig(kind="none"),
    "sinusoidal": PositionConfig(kind="sinusoidal"),
    "learned": PositionConfig(kind="learned", max_len=32),
    "rope": PositionConfig(
        kind="rope", rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8
    ),
    "rope_interleaved_partial": PositionConfig(
        kind="rope", rope_layout="interleaved", rope_fraction=0.5
    ),
    "alibi": PositionConfig(kind="alibi"),
    "t5": PositionConfig(kind="t5", num_buckets=8, max_distance=10),
    "shaw": PositionConfig(kind="shaw", shaw_max_distance=3),
    "xpos": PositionConfig(kind="xpos", xpos_scale_base=16.0),
}
RELATIVE = ("none", "rope", "rope_interleaved_partial", "alibi", "t5", "shaw", "xpos")


def test_every_registered_kind_is_covered():
    assert {c.kind for c in KINDS.values()} == set(kinds())


def _cfg(position: PositionConfig, dtype: str = "float32") -> decoder_lm.Config:
    return decoder_lm.Config.tiny(vocab_size=V).replace(
        d_model=32, d_ff=64, n_heads=4, n_kv_heads=2, n_layers=2, position=position, dtype=dtype
    )


@pytest.fixture(scope="session")
def models():
    out = {}
    for name, position in KINDS.items():
        cfg = _cfg(position)
        graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
        out[name] = (cfg, graphdef, params)
    return out


@pytest.fixture(scope="session")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, V)


_apply = jax.jit(decoder_lm.apply, static_argnums=0)


def _positions(offset=0):
    return jnp.broadcast_to(jnp.arange(offset, offset + T, dtype=jnp.int32), (B, T))


@pytest.mark.parametrize("name", KINDS)
def test_cached_decoding_equals_full_forward(models, tokens, name):
    cfg, g, p = models[name]
    full = _apply(g, p, tokens, _positions())
    # rows start at different positions, as prompts of different lengths would
    pos = _positions() + jnp.array([[0], [3]])
    full_shifted = _apply(g, p, tokens, pos)
    step = jax.jit(lambda c, x, ps: decoder_lm.apply_cached(g, p, x, ps, c))
    cache = decoder_lm.init_cache(cfg, B, 16)
    logits, cache = step(cache, tokens[:, :PREFILL], pos[:, :PREFILL])
    outs = [logits]
    for t in range(PREFILL, T):
        logits, cache = step(cache, tokens[:, t : t + 1], pos[:, t : t + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full_shifted, atol=1e-5, rtol=0)
    if name in RELATIVE:  # an offset shared by every token changes nothing
        np.testing.assert_allclose(full_shifted[0], full[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(full_shifted[1], full[1], atol=2e-5, rtol=0)
    else:  # absolute kinds see the offset
        assert np.abs(full_shifted[1] - full[1]).max() > 1e-3


@pytest.mark.parametrize("name", KINDS)
def test_future_tokens_never_change_past_logits(models, tokens, name):
    _, g, p = models[name]
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % V)
    a, b = _apply(g, p, tokens, _positions()), _apply(g, p, changed, _positions())
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-4


@pytest.mark.parametrize("name", KINDS)
def test_grad_vmap_and_bfloat16(models, tokens, name):
    cfg, g, p = models[name]
    grads = jax.jit(jax.grad(lambda p: jnp.mean(decoder_lm.apply(g, p, tokens) ** 2)))(p)
    for path, leaf in nnx.to_flat_state(grads):
        assert np.all(np.isfinite(leaf[...])), path
        assert np.any(leaf[...] != 0), f"no gradient reaches {path}"
    full = _apply(g, p, tokens, _positions())
    per_row = jax.jit(jax.vmap(lambda row: decoder_lm.apply(g, p, row[None])[0]))(tokens)
    np.testing.assert_allclose(per_row, full, atol=1e-5, rtol=0)

    g16, _ = decoder_lm.init(_cfg(KINDS[name], dtype="bfloat16"), jax.random.key(0))
    low = _apply(g16, p, tokens, _positions())
    assert low.dtype == jnp.bfloat16
    low = np.asarray(low, np.float32)
    assert np.isfinite(low).all()
    # bf16 keeps ~3 significant digits: close to float32, not equal
    np.testing.assert_allclose(low, full, atol=0.1 * np.abs(full).max(), rtol=0)


def test_position_params_have_logical_axes(models):
    expect = {
        "learned": {("position", "embed")},
        "t5": {("relpos", "heads")},
        "shaw": {("relpos", "head_dim")},
    }
    for name, axes in expect.items():
        _, _, params = models[name]
        found = {
            tuple(v.get_metadata()["out_sharding"])
            for path, v in nnx.to_flat_state(params)
            if any(str(k) in ("position", "rel_k", "rel_v", "table") for k in path)
        }
        assert found == axes, name
    # T5 shares one table across layers; Shaw has a pair per layer
    count = lambda name, key: sum(
        key in map(str, path)  # noqa: E731
        for path, _ in nnx.to_flat_state(models[name][2])
    )
    assert count("t5", "table") == 1
    assert count("shaw", "rel_k") == count("shaw", "rel_v") == 2


def test_bad_inputs_have_clear_errors(models):
    with pytest.raises(ValueError, match=r"unknown position kind 'rotary'; valid kinds: alibi"):
        _cfg(PositionConfig(kind="rotary"))
    with pytest.raises(ValueError, match="must be even"):
        _cfg(PositionConfig(kind="rope")).replace(head_dim=7)
    with pytest.raises(ValueError, match="must be even"):
        _cfg(PositionConfig(kind="xpos", rope_fraction=0.2))
    _, g, p = models["learned"]
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="beyond the learned position table"):
        decoder_lm.apply(g, p, tokens, jnp.array([[30, 31, 32, 33]]))
    with pytest.raises(ValueError, match="exceeds the learned position table"):
        decoder_lm.apply(g, p, jnp.zeros((1, 40), jnp.int32))


@pytest.fixture(scope="session")
def seq2seq():
    out = {}
    for name, position in KINDS.items():
        cfg = encoder_decoder.Config.tiny(V).replace(
            d_model=32,
            d_ff=64,
            n_encoder_layers=1,
            n_decoder_layers=1,
            dropout=0.0,
            position=position,
        )
        out[name] = (cfg, *encoder_decoder.init(cfg, jax.random.key(0)))
    return out


@pytest.mark.parametrize("name", KINDS)
def test_encoder_decoder_bidirectional_encoder_and_cached_decoder(seq2seq, tokens, name):
    """The encoder stack gets the bidirectional form (T5 buckets for both signs, |i - j| ALiBi),
    the decoder the causal one; incremental decoding equals the teacher-forced pass."""
    cfg, g, p = seq2seq[name]
    src, tgt = tokens[:, :10], tokens[:, 2:]
    encode = jax.jit(lambda s: encoder_decoder.encode(g, p, s))
    a, b = encode(src), encode(src.at[:, 7:].set((src[:, 7:] + 1) % V))
    assert np.abs(a[:, :7] - b[:, :7]).max() > 1e-4  # earlier tokens see later ones
    full = jax.jit(lambda t: encoder_decoder.apply(g, p, src, t))(tgt)
    step = jax.jit(lambda c, t, ps: encoder_decoder.decode_cached(g, p, a, None, t, ps, c))
    cache = encoder_decoder.init_cache(cfg, B, 12)
    pos = jnp.broadcast_to(jnp.arange(tgt.shape[1], dtype=jnp.int32), tgt.shape)
    outs = []
    for t in range(tgt.shape[1]):
        logits, cache = step(cache, tgt[:, t : t + 1], pos[:, t : t + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", KINDS)
def test_packed_segments_equal_separate_sequences(models, tokens, name):
    """Two documents packed in one row (positions restart per segment) = each run alone."""
    _, g, p = models[name]
    a, b = tokens[0, :5], tokens[1, :7]
    packed = jnp.concatenate([a, b])
    alone_a = jnp.concatenate([a, jnp.zeros(7, a.dtype)])  # padding is segment 0
    alone_b = jnp.concatenate([b, jnp.zeros(5, b.dtype)])
    packed_seg = jnp.array([1] * 5 + [2] * 7)
    seg_a, seg_b = jnp.array([1] * 5 + [0] * 7), jnp.array([1] * 7 + [0] * 5)
    # one compiled shape for all calls: [packed row, lone row]
    run = jax.jit(lambda x, s: decoder_lm.apply(g, p, x, segment_ids=s))
    out_a = run(jnp.stack([packed, alone_a]), jnp.stack([packed_seg, seg_a]))
    out_b = run(jnp.stack([packed, alone_b]), jnp.stack([packed_seg, seg_b]))
    np.testing.assert_allclose(out_a[0, :5], out_a[1, :5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_b[0, 5:], out_b[1, :7], atol=1e-5, rtol=0)
