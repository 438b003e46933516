"""losses.fused_cross_entropy equals cross_entropy(head(x)) in value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.models.layers import LinearHead
from attnzoo.training import losses

B, T, D, V = 3, 7, 16, 37


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    kernel = jnp.asarray(r.normal(size=(D, V)) * 0.3, jnp.float32)
    bias = jnp.asarray(r.normal(size=(V,)), jnp.float32)
    targets = jnp.asarray(r.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray(r.random((B, T)) > 0.2, jnp.float32)  # some padding
    return x, kernel, bias, targets, weights


@pytest.mark.parametrize(
    "tied, use_bias, scale, eps, z, chunk_rows",
    [
        (False, True, 1.0, 0.0, 0.0, 6),  # T=7 is padded to whole chunks of 2 steps
        (False, False, 1.0, 0.1, 1e-2, 256),  # one chunk
        (True, False, 0.25, 0.1, 0.0, 3),  # tied [V, D] table, scaled (T5)
        (True, True, 1.0, 0.0, 1e-3, 1),  # chunks of one time step
    ],
)
def test_fused_matches_plain_loss_and_gradients(tied, use_bias, scale, eps, z, chunk_rows):
    x, kernel, bias, targets, weights = _inputs()
    if tied:
        kernel = kernel.T
    kw = dict(label_smoothing=eps, z_loss=z)

    def head_of(k, b):
        return LinearHead(kernel=k, bias=b if use_bias else None, scale=scale, tied=tied)

    def plain(k, b, x):
        return losses.cross_entropy(head_of(k, b)(x), targets, weights, **kw)

    def fused(k, b, x):
        return losses.fused_cross_entropy(
            head_of(k, b), x, targets, weights, chunk_rows=chunk_rows, **kw
        )

    want, got = plain(kernel, bias, x), jax.jit(fused)(kernel, bias, x)
    for key in ("loss", "nll", "z_loss", "weight", "correct"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=1e-5, err_msg=key)

    g_want = jax.grad(lambda *a: plain(*a)["loss"], argnums=(0, 1, 2))(kernel, bias, x)
    g_got = jax.jit(jax.grad(lambda *a: fused(*a)["loss"] * 3.0, argnums=(0, 1, 2)))(
        kernel, bias, x
    )
    for name, w_, g_ in zip(("kernel", "bias", "x"), g_want, g_got, strict=True):
        np.testing.assert_allclose(g_, 3.0 * w_, rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(jnp.abs(g_got[2]).max()) > 1e-3  # the gradients are not trivially zero


def test_metrics_are_constants_to_grad():
    x, kernel, bias, targets, weights = _inputs(1)
    head = lambda k: LinearHead(kernel=k, bias=bias)
    g = jax.grad(lambda k: losses.fused_cross_entropy(head(k), x, targets, weights)["nll"])
    assert float(jnp.abs(g(kernel)).max()) == 0.0


def test_shape_mismatch_is_a_clear_error():
    x, kernel, bias, targets, weights = _inputs()
    with pytest.raises(ValueError, match="must agree on"):
        losses.fused_cross_entropy(LinearHead(kernel=kernel), x[:, :5], targets, weights)


@pytest.mark.parametrize("tie", [True, False])
def test_decoder_lm_output_head_of_hidden_is_the_logits(tie):
    cfg = decoder_lm.Config.tiny(vocab_size=40).replace(tie_embeddings=tie, n_layers=1)
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 40)
    logits = decoder_lm.apply(graphdef, params, tokens)
    hidden = decoder_lm.apply(graphdef, params, tokens, return_hidden=True)
    assert hidden.shape == (2, 6, cfg.d_model)
    head = decoder_lm.output_head(graphdef, params)
    assert head.tied is tie
    np.testing.assert_allclose(head(hidden), logits, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(tie_embeddings=True, scale_tied_logits=True, final_logits_bias=True),  # T5 / Marian
        dict(tie_embeddings=False),
    ],
)
def test_encoder_decoder_output_head_of_hidden_is_the_logits(kw):
    cfg = encoder_decoder.Config.tiny().replace(
        vocab_size=40, n_encoder_layers=1, n_decoder_layers=1, **kw
    )
    graphdef, params = encoder_decoder.init(cfg, jax.random.key(0))
    if cfg.final_logits_bias:  # zero-initialised: make it matter
        params["logits_bias"][...] = jnp.arange(40, dtype=jnp.float32) / 40
    src = jax.random.randint(jax.random.key(1), (2, 5), 1, 40)
    tgt = jax.random.randint(jax.random.key(2), (2, 4), 1, 40)
    logits = encoder_decoder.apply(graphdef, params, src, tgt)
    hidden = encoder_decoder.apply(graphdef, params, src, tgt, return_hidden=True)
    head = encoder_decoder.output_head(graphdef, params)
    np.testing.assert_allclose(head(hidden), logits, atol=1e-5)
    # and the fused loss of the hidden states is the loss of those logits
    t = jax.random.randint(jax.random.key(3), (2, 4), 0, 40)
    w = jnp.ones((2, 4))
    np.testing.assert_allclose(
        losses.fused_cross_entropy(head, hidden, t, w)["loss"],
        losses.cross_entropy(logits, t, w)["loss"],
        rtol=1e-6,
    )
