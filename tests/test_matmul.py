"""``matmul.linear``: the einsum it stands for, its derivatives, and the dot layouts on CPU."""

import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.models import matmul

ON_CPU = jax.default_backend() == "cpu"

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
            with matmul.few_row_matmuls():
                return matmul.linear(eqn, x, w)

        args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(jax.jit(f)(*args), want, atol=1e-5, rtol=1e-5, err_msg=eqn)
        np.testing.assert_allclose(matmul.linear(eqn, *args), want, atol=1e-5, rtol=1e-5)
        hlo = jax.jit(f).lower(*args).as_text()
        # the weight-stationary form really runs on CPU (barriers pin the transposed layouts)
        assert ("optimization_barrier" in hlo) == ON_CPU, eqn
        if ON_CPU:
            assert hlo.count("dot_general") == dots, eqn
        plain = jax.jit(partial(matmul.linear, eqn)).lower(*args).as_text()
        assert "optimization_barrier" not in plain

    # not rows times a weight (t is summed away): falls back to the plain einsum
    x, w = rng.standard_normal((2, 3, 8)), rng.standard_normal((8, 4))
    with matmul.few_row_matmuls():
        got = matmul.linear("btd,df->bf", jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, np.einsum("btd,df->bf", x, w), atol=1e-5, rtol=1e-5)

    def off(x, w):
        with matmul.few_row_matmuls(enabled=False):
            return matmul.linear("btd,vd->btv", x, w)

    head = (jnp.zeros((2, 1, 8)), jnp.zeros((32, 8)))
    assert "optimization_barrier" not in jax.jit(off).lower(*head).as_text()


# Weights narrower and wider than x (the two forms of the weight gradient), stacked q/k/v,
# the attention output projection, and the tied head.
GRAD_EQNS = [
    ("btd,df->btf", (3, 5, 8), (8, 24)),
    ("btf,fd->btd", (3, 5, 24), (24, 8)),
    ("btd,dpnh->btpnh", (3, 5, 8), (8, 3, 2, 4)),
    ("btnh,nhd->btd", (3, 5, 2, 4), (2, 4, 8)),
    ("btd,vd->btv", (3, 5, 8), (32, 8)),
]


def _grads64(eqn, x, w, dy):
    """d/dx and d/dw of sum(dy * einsum(eqn, x, w)) in float64, from the einsum's labels."""
    (xs, ws), out = eqn.split("->")[0].split(","), eqn.split("->")[1]
    return np.einsum(f"{out},{ws}->{xs}", dy, w), np.einsum(f"{xs},{out}->{ws}", x, dy)


def test_linear_derivatives_match_the_einsums_in_both_modes():
    rng = np.random.default_rng(1)
    for eqn, xs, ws in GRAD_EQNS:
        x, w = rng.standard_normal(xs), rng.standard_normal(ws)
        dy = rng.standard_normal(np.einsum(eqn, x, w).shape)
        tx, tw = rng.standard_normal(xs), rng.standard_normal(ws)
        f32 = partial(jnp.asarray, dtype=jnp.float32)

        def loss(x, w, eqn=eqn, dy=dy):
            return jnp.sum(f32(dy) * matmul.linear(eqn, x, w))

        want_dx, want_dw = _grads64(eqn, x, w, dy)
        dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(f32(x), f32(w))
        np.testing.assert_allclose(dx, want_dx, atol=1e-4, rtol=1e-5, err_msg=eqn)
        np.testing.assert_allclose(dw, want_dw, atol=1e-4, rtol=1e-5, err_msg=eqn)
        # forward mode (jvp, hessians) works too: the derivative is a custom_jvp, not a vjp
        _, tangent = jax.jvp(
            lambda x, w: matmul.linear(eqn, x, w), (f32(x), f32(w)), (f32(tx), f32(tw))
        )
        want = np.einsum(eqn, tx, w) + np.einsum(eqn, x, tw)
        np.testing.assert_allclose(tangent, want, atol=1e-4, rtol=1e-5, err_msg=eqn)
        # only one argument differentiated (frozen weights, or inputs)
        dw_only = jax.grad(loss, argnums=1)(f32(x), f32(w))
        np.testing.assert_allclose(dw_only, want_dw, atol=1e-4, rtol=1e-5, err_msg=eqn)
    # second order: the Hessian of a quadratic in w is x^T x on each output column
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2))
    hess = jax.hessian(lambda w: 0.5 * jnp.sum(matmul.linear("btd,df->btf", f32(x), w) ** 2))(
        f32(w)
    )
    xx = np.einsum("btd,bte->de", x, x)
    np.testing.assert_allclose(hess, np.einsum("de,fg->dfeg", xx, np.eye(2)), atol=1e-4)


def test_weight_gradients_are_canonical_dots_on_cpu():
    """XLA:CPU runs a dot contracting the lhs's leading dimension on a slower (Eigen) path.

    Plain autodiff of ``x @ w`` gives ``dW = x^T dy`` in exactly that form; ``linear``'s
    derivative materialises the narrower transpose instead. Every dot of the compiled
    gradient contracts the lhs's last dimension.
    """
    for eqn, xs, ws in GRAD_EQNS:
        x, w = jnp.ones(xs), jnp.ones(ws)
        grad = jax.grad(lambda x, w, eqn=eqn: jnp.sum(jnp.sin(matmul.linear(eqn, x, w))), (0, 1))
        hlo = jax.jit(grad).lower(x, w).compile().as_text()
        lhs_dims = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
        assert len(lhs_dims) == 3, (eqn, lhs_dims)
        if ON_CPU:
            assert set(lhs_dims) == {"1"}, (eqn, lhs_dims)
        if eqn in ("btd,df->btf", "btf,fd->btd"):  # the FFN: plain autodiff has the slow form
            plain = jax.grad(lambda x, w, eqn=eqn: jnp.sum(jnp.sin(jnp.einsum(eqn, x, w))), (0, 1))
            plain_dims = re.findall(
                r" dot\(.*?lhs_contracting_dims=\{(\d+)\}",
                jax.jit(plain).lower(x, w).compile().as_text(),
            )
            assert "0" in plain_dims, (eqn, plain_dims)
