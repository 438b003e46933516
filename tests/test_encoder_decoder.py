"""encoder_decoder: the paper's equations in NumPy float64, incremental decoding, scan, packing.

Parity with Hugging Face Marian lives in test_convert.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.models import encoder_decoder as ed
from attnzoo.models import positional
from attnzoo.models.positional import PositionConfig

V, S, T = 64, 9, 7


@pytest.fixture(scope="session", params=[False, True], ids=["post_ln", "pre_ln"])
def model(request):
    cfg = ed.Config.tiny(vocab_size=V).replace(
        d_model=32, d_ff=64, n_heads=4, pre_norm=request.param
    )
    graphdef, params = ed.init(cfg, jax.random.key(0))
    # random norm scales/biases so the reference sees their placement, not ones and zeros
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return cfg, graphdef, jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="session")
def batch():
    src = jax.random.randint(jax.random.key(1), (2, S), 1, V)
    tgt = jax.random.randint(jax.random.key(2), (2, T), 1, V)
    src_seg = jnp.array([[1] * S, [1] * 6 + [0] * 3])  # row 1 has 3 padding tokens
    return src, tgt, src_seg


def _close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


# ---- NumPy float64 transcription of Vaswani et al. (2017) ----------------------------------


def _sinusoids(n: int, d: int) -> np.ndarray:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pe = np.zeros((n, d))
    for pos in range(n):
        for i in range(d // 2):
            pe[pos, 2 * i] = np.sin(pos / 10000 ** (2 * i / d))
            pe[pos, 2 * i + 1] = np.cos(pos / 10000 ** (2 * i / d))
    return pe


def _reference_logits(cfg, params, src, tgt, src_valid):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
    D, N = cfg.d_model, cfg.n_heads
    H = D // N

    def ln(x, w):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * w["scale"] + w["bias"]

    def attention(w, xq, xkv, mask):  # eq. (1) per head, heads concatenated, W^O
        def proj(x, name):
            return x @ w[name]["kernel"].reshape(D, N * H) + w[name]["bias"].reshape(N * H)

        q, k, v = proj(xq, "q"), proj(xkv, "k"), proj(xkv, "v")
        heads = []
        for n in range(N):
            sl = slice(n * H, (n + 1) * H)
            logits = q[:, sl] @ k[:, sl].T / np.sqrt(H)
            logits = np.where(mask, logits, -np.inf)
            a = np.exp(logits - logits.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, sl])
        return np.concatenate(heads, -1) @ w["o"]["kernel"].reshape(N * H, D) + w["o"]["bias"]

    def ffn(w, x):  # eq. (2): max(0, x W1 + b1) W2 + b2
        h = np.maximum(0, x @ w["wi"]["kernel"] + w["wi"]["bias"])
        return h @ w["wo"]["kernel"] + w["wo"]["bias"]

    def residual(x, norm, f):  # section 5.4 post-LN, or the pre-LN option
        return x + f(ln(x, norm)) if cfg.pre_norm else ln(x + f(x), norm)

    E = p["embed"]["embedding"]
    out = []
    for b in range(src.shape[0]):
        x = E[src[b]] * np.sqrt(D) + _sinusoids(S, D)  # section 3.4 scaling, then 3.5
        key_ok = np.broadcast_to(src_valid[b][None, :], (S, S))
        for w in p["encoder_blocks"].values():
            x = residual(
                x, w["self_attn_norm"], lambda h, w=w: attention(w["self_attn"], h, h, key_ok)
            )
            x = residual(x, w["mlp_norm"], lambda h, w=w: ffn(w["mlp"], h))
        enc = ln(x, p["encoder_norm"]) if cfg.pre_norm else x
        y = E[tgt[b]] * np.sqrt(D) + _sinusoids(T, D)
        causal = np.tril(np.ones((T, T), bool))
        cross_ok = np.broadcast_to(src_valid[b][None, :], (T, S))
        for w in p["decoder_blocks"].values():
            y = residual(
                y, w["self_attn_norm"], lambda h, w=w: attention(w["self_attn"], h, h, causal)
            )
            y = residual(
                y, w["cross_attn_norm"], lambda h, w=w: attention(w["cross_attn"], h, enc, cross_ok)
            )
            y = residual(y, w["mlp_norm"], lambda h, w=w: ffn(w["mlp"], h))
        if cfg.pre_norm:
            y = ln(y, p["decoder_norm"])
        out.append(y @ E.T)  # shared pre-softmax projection (section 3.4)
    return np.stack(out)


def test_matches_numpy_float64_reference_of_the_paper(model, batch):
    cfg, g, p = model
    src, tgt, src_seg = batch
    ref = _reference_logits(cfg, p, np.asarray(src), np.asarray(tgt), np.asarray(src_seg) != 0)
    ours = ed.apply(g, p, src, tgt, src_seg)
    assert ours.shape == (2, T, V)
    _close(ours, ref, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_incremental_decoding_matches_teacher_forcing(model, batch, scan):
    cfg, g, p = model
    src, tgt, src_seg = batch
    full = ed.apply(g, p, src, tgt, src_seg)
    if scan:
        cfg, g, p = ed.relayout(cfg, p, scan_layers=True)
        _close(ed.apply(g, p, src, tgt, src_seg), full)  # float32 rounding only
    encoded = ed.encode(g, p, src, src_seg)
    cache = ed.fill_cross_cache(g, p, ed.init_cache(cfg, 2, 8), encoded)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tgt.shape)
    # encoded is zeros inside the step: the cached cross-attention K/V must be what is used
    zeros = jnp.zeros_like(encoded)
    step = jax.jit(lambda c, x, ps: ed.decode_cached(g, p, zeros, src_seg, x, ps, c))
    outs = []
    for t in range(T):
        logits, cache = step(cache, tgt[:, t : t + 1], pos[:, t : t + 1])
        outs.append(logits)
    _close(jnp.concatenate(outs, 1), full)
    # beam-search style reordering of every cache, self- and cross-attention alike
    rows = jnp.array([1, 0, 1])
    full_rows = ed.apply(g, p, src[rows], tgt[rows], src_seg[rows])
    cache = ed.fill_cross_cache(g, p, ed.init_cache(cfg, 2, 8), encoded)
    _, cache = step(cache, tgt[:, :4], pos[:, :4])
    taken = cache.take(rows)
    logits, _ = ed.decode_cached(
        g, p, zeros[rows], src_seg[rows], tgt[rows, 4:5], pos[rows, 4:5], taken
    )
    _close(logits, full_rows[:, 4:5])


def test_first_decode_call_fills_the_cross_cache(model, batch):
    cfg, g, p = model
    src, tgt, src_seg = batch
    encoded = ed.encode(g, p, src, src_seg)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tgt.shape)
    cache = ed.init_cache(cfg, 2, 8)
    assert cache.cross is None
    logits, cache = ed.decode_cached(g, p, encoded, src_seg, tgt, pos, cache)
    assert len(cache.cross) == cfg.n_decoder_layers
    assert cache.cross[0].k.shape == (2, cfg.n_heads, S, cfg.d_model // cfg.n_heads)  # heads-major
    _close(logits, ed.apply(g, p, src, tgt, src_seg))


def test_source_padding_is_invisible(model, batch):
    cfg, g, p = model
    src, tgt, src_seg = batch
    other = src.at[1, 6:].set(3)  # change only row 1's padded tokens
    _close(ed.apply(g, p, src, tgt, src_seg), ed.apply(g, p, other, tgt, src_seg), 0)


def test_packed_examples_equal_separate_ones(model):
    cfg, g, p = model
    k = jax.random.split(jax.random.key(5), 4)
    s1, s2 = jax.random.randint(k[0], (4,), 1, V), jax.random.randint(k[1], (5,), 1, V)
    t1, t2 = jax.random.randint(k[2], (3,), 1, V), jax.random.randint(k[3], (4,), 1, V)
    packed = ed.apply(
        g,
        p,
        jnp.concatenate([s1, s2])[None],
        jnp.concatenate([t1, t2])[None],
        jnp.array([[1] * 4 + [2] * 5]),
        jnp.array([[1] * 3 + [2] * 4]),
    )
    _close(packed[0, :3], ed.apply(g, p, s1[None], t1[None])[0])
    _close(packed[0, 3:], ed.apply(g, p, s2[None], t2[None])[0])


def test_dropout_only_when_not_deterministic(model, batch):
    cfg, g, p = model
    src, tgt, src_seg = batch
    assert cfg.dropout == 0.1
    a = ed.apply(g, p, src, tgt, src_seg)
    kw = dict(deterministic=False, dropout_rng=jax.random.key(1))
    d1, d2 = ed.apply(g, p, src, tgt, src_seg, **kw), ed.apply(g, p, src, tgt, src_seg, **kw)
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(d1 - a).max() > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        ed.apply(g, p, src, tgt, deterministic=False)


def test_jit_grad_vmap(model, batch):
    cfg, g, p = model
    src, tgt, src_seg = batch
    eager = ed.apply(g, p, src, tgt, src_seg)
    _close(jax.jit(ed.apply, static_argnums=0)(g, p, src, tgt, src_seg), eager)
    # vmap and grad under jit: traced the same way, without compiling every op of them eagerly
    rows = jax.vmap(lambda s, t, m: ed.apply(g, p, s[None], t[None], m[None])[0])
    _close(jax.jit(rows)(src, tgt, src_seg), eager)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(ed.apply(g, p, src, tgt, src_seg) ** 2)))(p)
    for path, leaf in nnx.to_flat_state(grads):
        assert np.all(np.isfinite(leaf[...])) and np.any(leaf[...] != 0), path


def test_unshared_untied_options_and_scanned_param_axes():
    cfg = ed.Config.tiny(vocab_size=V).replace(
        d_model=32,
        d_ff=64,
        n_heads=4,
        share_embeddings=False,
        tie_embeddings=False,
        final_logits_bias=True,
        scan_layers=True,
    )
    g, p = ed.init(cfg, jax.random.key(0))
    assert p["src_embed"]["embedding"].shape == (V, 32) and p["head"]["kernel"].shape == (32, V)
    names = p["decoder_blocks"]["cross_attn"]["q"]["kernel"].get_metadata()["out_sharding"]
    assert names == ("layers", "embed", "heads", "head_dim")
    assert ed.apply(g, p, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 2), jnp.int32)).shape == (
        1,
        2,
        V,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30), "divisible by n_heads"),
        (dict(n_decoder_layers=0), "n_decoder_layers"),
        (dict(activation="tanh"), "unknown activation"),
    ],
)
def test_bad_configs_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        ed.Config.tiny().replace(**overrides)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="transformer_base.*transformer_big"):
        ed.Config.preset("transformer_huge")
    assert ed.Config.preset("transformer_big", dropout=0.0).d_model == 1024


def test_bad_inputs_have_clear_errors(model, batch):
    cfg, g, p = model
    src, tgt, src_seg = batch
    with pytest.raises(ValueError, match="segment_ids"):
        ed.apply(g, p, src, tgt, src_seg[:, :3])
    with pytest.raises(ValueError, match="encode"):
        ed.decode(g, p, jnp.zeros((3, S, 32)), None, tgt)
    with pytest.raises(ValueError, match="tgt_positions"):
        ed.decode_cached(g, p, jnp.zeros((2, S, 32)), None, tgt, None, ed.init_cache(cfg, 2, 8))


def test_t5_style_incremental_decoding_with_relative_bias(batch):
    """T5's decoder bias is recomputed per step from cache slot positions."""
    src, tgt, src_seg = batch
    cfg = ed.Config.t5_small(vocab_size=V).replace(
        d_model=32, d_ff=64, n_heads=4, n_encoder_layers=1, n_decoder_layers=2, scan_layers=True
    )
    g, p = ed.init(cfg, jax.random.key(0))
    full = ed.apply(g, p, src, tgt, src_seg)
    encoded = ed.encode(g, p, src, src_seg)
    cache = ed.init_cache(cfg, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tgt.shape)
    logits, cache = ed.decode_cached(g, p, encoded, src_seg, tgt[:, :3], pos[:, :3], cache)
    outs = [logits]
    for t in range(3, T):
        logits, cache = ed.decode_cached(
            g, p, encoded, src_seg, tgt[:, t : t + 1], pos[:, t : t + 1], cache
        )
        outs.append(logits)
    _close(jnp.concatenate(outs, 1), full)


@pytest.mark.parametrize("kind", positional.kinds())
def test_every_positional_kind_scans_and_decodes_incrementally(kind, batch):
    src, tgt, src_seg = batch
    cfg = ed.Config.tiny(vocab_size=V).replace(
        d_model=32, d_ff=64, n_heads=4, n_encoder_layers=1, position=PositionConfig(kind=kind)
    )
    g, p = ed.init(cfg, jax.random.key(0))
    full = ed.apply(g, p, src, tgt, src_seg)
    scfg, sg, sp = ed.relayout(cfg, p, scan_layers=True)
    _close(ed.apply(sg, sp, src, tgt, src_seg), full)
    encoded = ed.encode(sg, sp, src, src_seg)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tgt.shape)
    cache = ed.init_cache(scfg, 2, 8)
    logits, cache = ed.decode_cached(sg, sp, encoded, src_seg, tgt[:, :4], pos[:, :4], cache)
    step, _ = ed.decode_cached(sg, sp, encoded, src_seg, tgt[:, 4:5], pos[:, 4:5], cache)
    _close(jnp.concatenate([logits, step], 1), full[:, :5])
