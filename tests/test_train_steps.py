"""Losses, schedules, optimizer masks and the train step against independent references."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnzoo.models import decoder_lm
from attnzoo.training import losses, optim, schema, steps


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("eps, z", [(0.0, 0.0), (0.1, 0.0), (0.1, 1e-4)])
def test_cross_entropy_matches_the_formulas_in_float64(eps, z):
    rng = np.random.default_rng(0)
    V = 11
    logits = rng.normal(size=(2, 5, V)) * 3
    targets = rng.integers(0, V, (2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float64)
    out = losses.cross_entropy(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(targets),
        jnp.asarray(weights, jnp.float32),
        label_smoothing=eps,
        z_loss=z,
    )
    logp = _np_log_softmax(logits)
    q = np.full((2, 5, V), eps / V)  # the paper's smoothing: (1 - eps) one-hot + eps uniform
    q[np.arange(2)[:, None], np.arange(5), targets] += 1 - eps
    ce = -(q * logp).sum(-1)
    log_z = np.log(np.exp(logits).sum(-1))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["loss"], ((ce + z * log_z**2) * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(out["nll"], (nll * weights).sum(), rtol=1e-5)
    assert float(out["weight"]) == weights.sum()
    np.testing.assert_allclose(out["correct"], ((logits.argmax(-1) == targets) * weights).sum())
    # d loss / d logits = w (softmax - q) + w 2 z log Z softmax
    grad = jax.grad(
        lambda lg: losses.cross_entropy(
            lg,
            jnp.asarray(targets),
            jnp.asarray(weights, jnp.float32),
            label_smoothing=eps,
            z_loss=z,
        )["loss"]
    )(jnp.asarray(logits, jnp.float32))
    p = np.exp(logp)
    want = weights[..., None] * (p - q + 2 * z * log_z[..., None] * p)
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must agree"):
        losses.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), int), jnp.zeros((2, 4)))


def test_rsqrt_schedule_is_the_papers_formula():
    d, warmup = 512, 4000
    sched = optim.rsqrt_schedule(d, warmup)
    for count in (0, 1, 99, 3999, 4000, 10_000, 99_999):
        step = count + 1.0
        want = d**-0.5 * min(step**-0.5, step * warmup**-1.5)
        np.testing.assert_allclose(float(sched(count)), want, rtol=1e-6)
    # Peak at the end of warmup: d^-0.5 * warmup^-0.5.
    np.testing.assert_allclose(float(sched(warmup - 1)), (d * warmup) ** -0.5, rtol=1e-6)


def test_warmup_cosine_and_constant_schedules():
    c = schema.get_config()
    c.update(learning_rate=1.0, warmup_steps=10, steps=110, final_lr_fraction=0.1)
    cos = optim.make_schedule(c, d_model=8)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half way down
    assert float(cos(110)) == pytest.approx(0.1)
    c.schedule = "constant"
    const = optim.make_schedule(c, d_model=8)
    assert float(const(5)) == pytest.approx(0.5) and float(const(50)) == pytest.approx(1.0)
    c.schedule = "cosine!"
    with pytest.raises(ValueError, match="config.schedule"):
        optim.make_schedule(c, d_model=8)


def _tiny(**kw):
    return decoder_lm.Config.tiny(vocab_size=32).replace(
        d_model=16, n_heads=2, d_ff=32, n_layers=1, embed_scale=True, **kw
    )


@pytest.fixture(scope="module")
def model():
    # No projection biases: the key bias has an exactly-zero true gradient whose rounding noise
    # Adam would blow up to full-size updates, making "equal params" comparisons meaningless.
    cfg = _tiny(use_bias=False)
    return cfg, *decoder_lm.init(cfg, jax.random.key(0))


def test_weight_decay_skips_biases_and_norms():
    _, params = decoder_lm.init(_tiny(), jax.random.key(0))
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['embed']['embedding'].value"]
    assert flat["['blocks'][0]['mlp']['wi']['kernel'].value"]
    assert not flat["['blocks'][0]['mlp']['wi']['bias'].value"]
    assert not flat["['blocks'][0]['mlp_norm']['scale'].value"]
    assert not flat["['final_norm']['bias'].value"]
    # With zero gradients, AdamW moves only the decayed leaves: p <- p - lr * wd * p.
    c = schema.get_config()
    c.update(
        schedule="constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.5, clip_norm=0.0
    )
    tx, _ = optim.make_optimizer(c, d_model=16)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for m, u, p in zip(
        jax.tree.leaves(mask), jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_allclose(u, -0.05 * p if m else 0 * p, atol=1e-7)


def test_adafactor_and_unknown_optimizer(model):
    _, _, params = model
    c = schema.get_config()
    c.optimizer = "adafactor"
    tx, _ = optim.make_optimizer(c, d_model=16)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
    c.optimizer = "sgd!"
    with pytest.raises(ValueError, match="config.optimizer"):
        optim.make_optimizer(c, d_model=16)


def _batch(B=8, T=12, V=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, (B, T + 1)).astype(np.int32)
    weights = np.ones((B, T), np.float32)
    # padding concentrated in the first of 4 micro-batches, which are strided: rows 0, 4, ...
    weights[::4, T // 2 :] = 0.0
    segment_ids = weights.astype(np.int32)
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=segment_ids,
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        weights=weights,
    )


def _step(model, accum, **kw):
    _, graphdef, params = model
    c = schema.get_config()
    c.update(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    tx, _ = optim.make_optimizer(c, d_model=16)
    step = jax.jit(
        functools.partial(
            steps.train_step, graphdef=graphdef, tx=tx, task="lm", grad_accum_steps=accum, **kw
        )
    )
    return steps.create_state(params, tx, 0), step


def test_gradient_accumulation_equals_the_full_batch(model):
    batch = _batch()
    state, full = _step(model, 1)
    new_full, m_full = full(state, batch, None)
    state, acc = _step(model, 4)
    new_acc, m_acc = acc(state, batch, None)
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    assert float(m_acc["tokens"]) == batch["weights"].sum()
    for a, b in zip(jax.tree.leaves(new_acc.params), jax.tree.leaves(new_full.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_micro_batches_are_strided_rows():
    batch = {"x": jnp.arange(8)[:, None] * jnp.ones((1, 3), int)}
    micro = steps.micro_batches(batch, 4)["x"]
    assert micro.shape == (4, 2, 3)
    # micro-batch i = rows i, i + 4: under data parallelism each device keeps its own rows
    np.testing.assert_array_equal(micro[:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="divisible by grad_accum_steps"):
        steps.micro_batches(batch, 3)


def test_padding_does_not_contribute(model):
    batch = _batch()
    state, step = _step(model, 1)
    _, m = step(state, batch, None)
    # Changing a padded target changes nothing; changing a real one does.
    padded = {**batch, "targets": batch["targets"].copy()}
    padded["targets"][0, -1] = (padded["targets"][0, -1] + 1) % 32
    _, m_pad = step(state, padded, None)
    assert float(m_pad["loss"]) == float(m["loss"])
    real = {**batch, "targets": batch["targets"].copy()}
    real["targets"][-1, -1] = (real["targets"][-1, -1] + 1) % 32
    _, m_real = step(state, real, None)
    assert float(m_real["loss"]) != float(m["loss"])


def test_non_finite_step_is_flagged_and_not_applied(model):
    state, step = _step(model, 1)
    bad = state.replace(
        params=jax.tree.map(lambda p: p.at[...].set(jnp.nan) if p.ndim == 2 else p, state.params)
    )
    new, m = step(bad, _batch(), None)
    assert not bool(m["finite"])
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(bad), strict=True):
        np.testing.assert_array_equal(a, b)


def test_dropout_rng_changes_the_step_and_is_reproducible(model):
    cfg, _, _ = model
    cfg = cfg.replace(dropout=0.5)
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    state, step = _step((cfg, graphdef, params), 1)
    rng = steps.step_rng(state)
    _, a = step(state, _batch(), rng)
    _, b = step(state, _batch(), rng)
    _, c = step(state, _batch(), jax.random.fold_in(rng, 1))
    assert float(a["loss"]) == float(b["loss"]) != float(c["loss"])


def test_config_has_the_stable_keys():
    c = schema.get_config()
    for key in (
        "steps",
        "batch_size",
        "seq_len",
        "seed",
        "learning_rate",
        "eval_every",
        "checkpoint_every",
        "model",
        "task",
        "dataset",
        "tokenizer",
        "vocab_size",
    ):
        assert key in c
    assert set(c.mesh) == {"data", "fsdp", "tensor"}
    assert isinstance(c.model_overrides, ml_collections.ConfigDict)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss(model):
    cfg, _, params = model
    bf16 = cfg.replace(dtype="bfloat16")
    graphdef, _ = decoder_lm.init(bf16, jax.random.key(0))
    state, step = _step((bf16, graphdef, params), 1)
    new, m = step(state, _batch(), None)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    logits = decoder_lm.apply(graphdef, params, jnp.asarray(_batch()["inputs"]))
    assert logits.dtype == jnp.bfloat16
    state32, step32 = _step(model, 1)
    _, m32 = step32(state32, _batch(), None)
    np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=2e-2)


def test_fused_loss_step_equals_the_plain_loss_step(model):
    batch = _batch(seed=3)
    state, fused = _step(model, 1, fused_loss=True, label_smoothing=0.1, z_loss=1e-3)
    new_f, m_f = fused(state, batch, None)
    state, plain = _step(model, 1, fused_loss=False, label_smoothing=0.1, z_loss=1e-3)
    new_p, m_p = plain(state, batch, None)
    for k in ("loss", "nll", "accuracy", "tokens", "grad_norm"):
        np.testing.assert_allclose(m_f[k], m_p[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(new_f.params), jax.tree.leaves(new_p.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
