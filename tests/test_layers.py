"""Building blocks against independent float64 references."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch

from attnzoo.models import layers


def test_exact_gelu_matches_erf_formula_and_torch():
    x = np.linspace(-8.0, 8.0, 2001)
    want = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    dwant = np.array(
        [
            0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
            + v * math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
            for v in x
        ]
    )
    got = layers.ACTIVATIONS["gelu"](jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    grad = jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(grad, dwant, atol=2e-6)
    ref = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


# (eqn, x shape, w shape, dots the weight-stationary form runs): the model's projections
# (q/k/v, stacked q/k/v, output, FFN, untied and tied heads); weights of 0.75-8 MB (stacked
# q/k/v and FFN at d=256) run as two half-matmuls
EQNS = [
    ("btd,dnh->btnh", (2, 3, 8), (8, 2, 4), 1),
    ("btd,dpnh->btpnh", (2, 3, 8), (8, 3, 2, 4), 1),
    ("btnh,nhd->btd", (2, 3, 2, 4), (2, 4, 8), 1),
    ("btd,df->btf", (2, 1, 8), (8, 16), 1),
    ("btd,vd->btv", (2, 1, 8), (32, 8), 1),
    ("bnd,ndh->bnh", (2, 3, 8), (3, 8, 4), 1),  # per-head weights: n is a batch dim of the dot
    ("btd,dpnh->btpnh", (8, 1, 256), (256, 3, 4, 64), 2),
    ("btf,fd->btd", (8, 1, 1024), (1024, 256), 2),
]


def test_few_row_matmuls_compute_the_same_einsum_as_weight_stationary_dots():
    rng = np.random.default_rng(0)
    for eqn, xs, ws, dots in EQNS:
        x, w = rng.standard_normal(xs), rng.standard_normal(ws) / math.sqrt(max(ws))
        want = np.einsum(eqn, x, w)  # float64

        def f(x, w, eqn=eqn):
            with layers.few_row_matmuls():
                return layers.linear(eqn, x, w)

        args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(jax.jit(f)(*args), want, atol=1e-5, rtol=1e-5, err_msg=eqn)
        np.testing.assert_allclose(layers.linear(eqn, *args), want, atol=1e-5, rtol=1e-5)
        hlo = jax.jit(f).lower(*args).as_text()
        # the weight-stationary form really runs on CPU (barriers pin the transposed layouts)
        assert ("optimization_barrier" in hlo) == (jax.default_backend() == "cpu"), eqn
        if jax.default_backend() == "cpu":
            assert hlo.count("dot_general") == dots, eqn
        plain = jax.jit(partial(layers.linear, eqn)).lower(*args).as_text()
        assert "optimization_barrier" not in plain

    # not rows times a weight (t is summed away): falls back to the plain einsum
    x, w = rng.standard_normal((2, 3, 8)), rng.standard_normal((8, 4))
    with layers.few_row_matmuls():
        got = layers.linear("btd,df->bf", jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, np.einsum("btd,df->bf", x, w), atol=1e-5, rtol=1e-5)

    def off(x, w):
        with layers.few_row_matmuls(enabled=False):
            return layers.linear("btd,vd->btv", x, w)

    head = (jnp.zeros((2, 1, 8)), jnp.zeros((32, 8)))
    assert "optimization_barrier" not in jax.jit(off).lower(*head).as_text()
