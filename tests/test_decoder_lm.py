"""decoder_lm: scan vs unrolled, KV cache, remat, dropout, packing, transforms, config errors.

Parity against Hugging Face GPT-2 / LLaMA lives in test_convert.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo.models import decoder_lm, positional
from attnzoo.models.positional import PositionConfig

V, T = 64, 12
AXES = {
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "norm",
    "layers",
    "relpos",
    "position",
}


@pytest.fixture(scope="session")
def models():
    """Unrolled and scanned copies of one tiny GQA model with the same weights."""
    cfg = decoder_lm.Config.tiny(vocab_size=V).replace(
        d_model=32,
        d_ff=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=3,
        dropout=0.1,
        position=PositionConfig(kind="learned", max_len=32),
    )
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    scanned = decoder_lm.relayout(cfg, params, scan_layers=True)
    return {"unrolled": (cfg, graphdef, params), "scanned": scanned}


@pytest.fixture(scope="session")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, T), 0, V)


def _close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_scanned_and_unrolled_give_identical_logits(models, tokens):
    (_, g, p), (scfg, sg, sp) = models["unrolled"], models["scanned"]
    assert scfg.scan_layers and sp["blocks"]["mlp"]["wi"]["kernel"].shape == (3, 32, 64)
    _close(decoder_lm.apply(g, p, tokens), decoder_lm.apply(sg, sp, tokens), atol=1e-6)


def test_relayout_round_trip_is_exact(models):
    cfg, _, params = models["unrolled"]
    scfg, _, sp = models["scanned"]
    _, _, back = decoder_lm.relayout(scfg, sp, scan_layers=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    # layer i of the stack is exactly block i
    np.testing.assert_array_equal(
        sp["blocks"]["self_attn"]["q"]["kernel"][2], params["blocks"][2]["self_attn"]["q"]["kernel"]
    )


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_every_param_has_logical_axis_names(models, layout):
    _, _, params = models[layout]
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim, path
        assert set(names) <= AXES, (path, names)
        assert (names[0] == "layers") == (layout == "scanned" and path[0] == "blocks"), path


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_dropout_masks_agree_between_layouts(models, tokens, layout):
    """One key per layer, split identically, so training is reproducible across layouts."""
    kw = dict(deterministic=False, dropout_rng=jax.random.key(7))
    (_, g, p), (_, sg, sp) = models["unrolled"], models["scanned"]
    _close(decoder_lm.apply(g, p, tokens, **kw), decoder_lm.apply(sg, sp, tokens, **kw), 1e-6)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_incremental_decoding_matches_full_forward(models, tokens, layout):
    cfg, g, p = models[layout]
    full = decoder_lm.apply(g, p, tokens)
    cache = decoder_lm.init_cache(cfg, 2, 16)
    if layout == "scanned":  # layer caches stacked: [L, B, K, S_max, H]
        assert cache.layers.k.shape == (3, 2, 2, 16, 8)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
    step = jax.jit(lambda c, x, ps: decoder_lm.apply_cached(g, p, x, ps, c))
    logits, cache = step(cache, tokens[:, :5], pos[:, :5])  # prefill
    outs = [logits]
    for t in range(5, T):
        logits, cache = step(cache, tokens[:, t : t + 1], pos[:, t : t + 1])
        outs.append(logits)
    _close(jnp.concatenate(outs, axis=1), full)
    np.testing.assert_array_equal(cache.index, [T, T])


def test_remat_changes_neither_values_nor_gradients(models, tokens):
    for layout in ("unrolled", "scanned"):
        cfg, _, params = models[layout]
        rg, _ = decoder_lm.init(cfg.replace(remat=True), jax.random.key(0))
        _, g, _ = models[layout]

        def loss(p, graphdef):
            return jnp.mean(decoder_lm.apply(graphdef, p, tokens) ** 2)

        l1, g1 = jax.value_and_grad(loss)(params, g)
        l2, g2 = jax.value_and_grad(loss)(params, rg)
        _close(l1, l2, 1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            _close(a, b, 1e-6)


def test_jit_grad_vmap(models, tokens):
    _, g, p = models["scanned"]
    eager = decoder_lm.apply(g, p, tokens)
    _close(jax.jit(decoder_lm.apply, static_argnums=0)(g, p, tokens), eager)
    per_row = jax.vmap(lambda row: decoder_lm.apply(g, p, row[None])[0])(tokens)
    _close(per_row, eager)
    grads = jax.grad(lambda p: jnp.mean(decoder_lm.apply(g, p, tokens) ** 2))(p)
    for path, leaf in nnx.to_flat_state(grads):
        assert np.all(np.isfinite(leaf[...])), path
        assert np.any(leaf[...] != 0), f"no gradient reaches {path}"


def test_dropout_only_when_not_deterministic(models, tokens):
    _, g, p = models["unrolled"]
    a = decoder_lm.apply(g, p, tokens)
    np.testing.assert_array_equal(a, decoder_lm.apply(g, p, tokens))
    # deterministic=True ignores a given rng
    np.testing.assert_array_equal(
        a, decoder_lm.apply(g, p, tokens, deterministic=True, dropout_rng=jax.random.key(3))
    )
    d1 = decoder_lm.apply(g, p, tokens, deterministic=False, dropout_rng=jax.random.key(3))
    d2 = decoder_lm.apply(g, p, tokens, deterministic=False, dropout_rng=jax.random.key(3))
    d3 = decoder_lm.apply(g, p, tokens, deterministic=False, dropout_rng=jax.random.key(4))
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(d1 - a).max() > 1e-3 and np.abs(d1 - d3).max() > 1e-3
    with pytest.raises(ValueError, match="dropout_rng"):
        decoder_lm.apply(g, p, tokens, deterministic=False)


def test_causal_future_tokens_do_not_leak(models, tokens):
    _, g, p = models["unrolled"]
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % V)
    a, b = decoder_lm.apply(g, p, tokens), decoder_lm.apply(g, p, changed)
    _close(a[:, :8], b[:, :8], 0)
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-4


def test_packed_segments_equal_separate_sequences(models, tokens):
    """Two documents packed into one row (positions restart) = each run on its own."""
    _, g, p = models["scanned"]
    a, b = tokens[0, :5], tokens[1, :7]
    packed = jnp.concatenate([a, b])[None]  # (1, 12)
    seg = jnp.array([[1] * 5 + [2] * 7])
    out = decoder_lm.apply(g, p, packed, segment_ids=seg)
    _close(out[0, :5], decoder_lm.apply(g, p, a[None])[0])
    _close(out[0, 5:], decoder_lm.apply(g, p, b[None])[0])


def test_embeddings_scaled_by_sqrt_d_model(tokens):
    """embed_scale multiplies the token embeddings by sqrt(d_model) (the paper, section 3.4):
    the same as an unscaled model whose table is sqrt(d_model) times larger."""
    cfg = decoder_lm.Config.vaswani_lm(vocab_size=V).replace(
        d_model=32, d_ff=64, n_heads=4, n_layers=1, tie_embeddings=False
    )
    g, p = decoder_lm.init(cfg, jax.random.key(0))
    g0, p0 = decoder_lm.init(cfg.replace(embed_scale=False), jax.random.key(0))
    p0["embed"]["embedding"][...] = p["embed"]["embedding"][...] * np.sqrt(32.0)
    _close(decoder_lm.apply(g, p, tokens), decoder_lm.apply(g0, p0, tokens))


def test_issue_api_dataclasses_replace_position_kind():
    cfg = decoder_lm.Config.gpt2_small()
    cfg = dataclasses.replace(
        cfg,
        n_layers=1,
        d_model=32,
        n_heads=4,
        d_ff=64,
        vocab_size=V,
        position=dataclasses.replace(cfg.position, kind="none"),
    )
    g, p = decoder_lm.init(cfg, jax.random.key(0))
    assert decoder_lm.apply(g, p, jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, V)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(n_kv_heads=3), "must divide n_heads"),
        (dict(activation="swishy"), "unknown activation"),
        (dict(norm="batchnorm"), "unknown norm"),
        (dict(n_layers=0), "n_layers"),
        (dict(dropout=1.0), "dropout"),
        (dict(remat_policy="all"), "remat_policy"),
        (dict(dtype="float33"), "dtype"),
        (dict(position=PositionConfig(kind="fourier")), "unknown position kind"),
    ],
)
def test_bad_configs_rejected_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        decoder_lm.Config.tiny().replace(**overrides)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2_small.*llama"):
        decoder_lm.Config.preset("gpt3")
    assert decoder_lm.Config.preset("tiny", vocab_size=99).vocab_size == 99


def test_bad_inputs_have_clear_errors(models):
    cfg, g, p = models["unrolled"]
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        decoder_lm.apply(g, p, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="explicit positions"):
        decoder_lm.apply_cached(
            g, p, jnp.zeros((1, 2), jnp.int32), None, decoder_lm.init_cache(cfg, 1, 4)
        )


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_cache_take_reorders_rows_like_beam_search(models, tokens, layout):
    cfg, g, p = models[layout]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
    _, cache = decoder_lm.apply_cached(
        g, p, tokens[:, :6], pos[:, :6], decoder_lm.init_cache(cfg, 2, T)
    )
    rows = jnp.array([1, 1, 0])  # expand to 3 rows: row 1 twice, then row 0
    taken = cache.take(rows)
    logits, _ = decoder_lm.apply_cached(g, p, tokens[rows, 6:7], pos[rows, 6:7], taken)
    _close(logits, decoder_lm.apply(g, p, tokens[:, :7])[rows, 6:7])


def test_bfloat16_activations_track_float32(models, tokens):
    cfg, _, params = models["unrolled"]
    g16, _ = decoder_lm.init(cfg.replace(dtype="bfloat16"), jax.random.key(0))
    _, g, _ = models["unrolled"]
    out16 = decoder_lm.apply(g16, params, tokens)
    assert out16.dtype == jnp.bfloat16 and params["embed"]["embedding"].dtype == jnp.float32
    _close(out16.astype(jnp.float32), decoder_lm.apply(g, params, tokens), atol=0.1)


@pytest.mark.parametrize("kind", positional.kinds())
def test_every_positional_kind_scans_and_decodes_incrementally(kind, tokens):
    """Any kind on any preset: scanned = unrolled, and cached decoding = the full forward."""
    cfg = decoder_lm.Config.llama_small(vocab_size=V).replace(
        d_model=32,
        d_ff=48,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        position=PositionConfig(kind=kind, max_len=32),
    )
    g, p = decoder_lm.init(cfg, jax.random.key(0))
    full = decoder_lm.apply(g, p, tokens)
    scfg, sg, sp = decoder_lm.relayout(cfg, p, scan_layers=True)
    _close(decoder_lm.apply(sg, sp, tokens), full)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
    logits, cache = decoder_lm.apply_cached(
        sg, sp, tokens[:, :7], pos[:, :7], decoder_lm.init_cache(scfg, 2, T)
    )
    step, _ = decoder_lm.apply_cached(sg, sp, tokens[:, 7:8], pos[:, 7:8], cache)
    _close(jnp.concatenate([logits, step], 1), full[:, :8])


def test_logical_axes_shard_params_on_a_mesh(models):
    """The logical names map to a (data, model) mesh and the sharded model computes the same."""
    _, g, p = models["scanned"]
    # Auto axes, as in training: activations are not annotated, XLA propagates from params
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}

    def sharding(var):
        names = var.get_metadata()["out_sharding"]
        spec = jax.sharding.PartitionSpec(*(rules.get(n) for n in names))
        return jax.sharding.NamedSharding(mesh, spec)

    shardings = jax.tree.map(sharding, p, is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharded = jax.device_put(p, shardings)
    wi = sharded["blocks"]["mlp"]["wi"]["kernel"][...]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    x = jax.random.randint(jax.random.key(2), (4, T), 0, V)
    x_sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    out = jax.jit(decoder_lm.apply, static_argnums=0)(g, sharded, x_sharded)
    _close(out, decoder_lm.apply(g, p, x))


def test_scanned_program_size_does_not_grow_with_depth(tokens):
    """Why scan compiles in constant time: the lowered program is the same for any depth."""

    def program_lines(n_layers: int, scan: bool) -> int:
        cfg = decoder_lm.Config.tiny(vocab_size=V).replace(
            d_model=32, d_ff=64, n_layers=n_layers, scan_layers=scan
        )
        g, p = decoder_lm.init(cfg, jax.random.key(0))
        loss = lambda p: jnp.mean(decoder_lm.apply(g, p, tokens))  # noqa: E731
        return len(jax.jit(jax.grad(loss)).lower(p).as_text().splitlines())

    assert program_lines(2, scan=True) == program_lines(8, scan=True)
    assert program_lines(8, scan=False) > 2 * program_lines(2, scan=False)
