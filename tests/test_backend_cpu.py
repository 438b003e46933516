"""``attnzoo.backends.cpu``: the einsums its products stand for, their derivatives, the dot
layouts they pin, and the switch that installs them (``attnzoo.ops``)."""

import math
import re
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo import backends, ops
from attnzoo.backends import cpu
from attnzoo.models import decoder_lm

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


def test_few_rows_compute_the_same_einsum_as_weight_stationary_dots():
    rng = np.random.default_rng(0)
    for eqn, xs, ws, dots in EQNS:
        x, w = rng.standard_normal(xs), rng.standard_normal(ws) / math.sqrt(max(ws))
        want = np.einsum(eqn, x, w)  # float64

        def f(x, w, eqn=eqn):
            with cpu.few_rows():
                return cpu.linear(eqn, x, w)

        args = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(jax.jit(f)(*args), want, atol=1e-5, rtol=1e-5, err_msg=eqn)
        np.testing.assert_allclose(cpu.linear(eqn, *args), want, atol=1e-5, rtol=1e-5)
        hlo = jax.jit(f).lower(*args).as_text()
        # the weight-stationary form really runs (barriers pin the transposed layouts)
        assert "optimization_barrier" in hlo, eqn
        assert hlo.count("dot_general") == dots, eqn
        plain = jax.jit(partial(cpu.linear, eqn)).lower(*args).as_text()
        assert "optimization_barrier" not in plain

    # not rows times a weight (t is summed away): falls back to the plain einsum
    x, w = rng.standard_normal((2, 3, 8)), rng.standard_normal((8, 4))
    with cpu.few_rows():
        got = cpu.linear("btd,df->bf", jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, np.einsum("btd,df->bf", x, w), atol=1e-5, rtol=1e-5)

    def off(x, w):
        with cpu.few_rows(enabled=False):
            return cpu.linear("btd,vd->btv", x, w)

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
            return jnp.sum(f32(dy) * cpu.linear(eqn, x, w))

        want_dx, want_dw = _grads64(eqn, x, w, dy)
        dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(f32(x), f32(w))
        np.testing.assert_allclose(dx, want_dx, atol=1e-4, rtol=1e-5, err_msg=eqn)
        np.testing.assert_allclose(dw, want_dw, atol=1e-4, rtol=1e-5, err_msg=eqn)
        # forward mode (jvp, hessians) works too: the derivative is a custom_jvp, not a vjp
        _, tangent = jax.jvp(
            lambda x, w: cpu.linear(eqn, x, w), (f32(x), f32(w)), (f32(tx), f32(tw))
        )
        want = np.einsum(eqn, tx, w) + np.einsum(eqn, x, tw)
        np.testing.assert_allclose(tangent, want, atol=1e-4, rtol=1e-5, err_msg=eqn)
        # only one argument differentiated (frozen weights, or inputs)
        dw_only = jax.grad(loss, argnums=1)(f32(x), f32(w))
        np.testing.assert_allclose(dw_only, want_dw, atol=1e-4, rtol=1e-5, err_msg=eqn)
    # second order: the Hessian of a quadratic in w is x^T x on each output column
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2))
    hess = jax.hessian(lambda w: 0.5 * jnp.sum(cpu.linear("btd,df->btf", f32(x), w) ** 2))(f32(w))
    xx = np.einsum("btd,bte->de", x, x)
    np.testing.assert_allclose(hess, np.einsum("de,fg->dfeg", xx, np.eye(2)), atol=1e-4)


def test_weight_gradients_are_canonical_dots():
    """XLA:CPU runs a dot contracting the lhs's leading dimension on a slower (Eigen) path.

    Plain autodiff of ``x @ w`` gives ``dW = x^T dy`` in exactly that form; ``linear``'s
    derivative materialises the narrower transpose instead. Every dot of the compiled
    gradient contracts the lhs's last dimension.
    """
    for eqn, xs, ws in GRAD_EQNS:
        x, w = jnp.ones(xs), jnp.ones(ws)
        grad = jax.grad(lambda x, w, eqn=eqn: jnp.sum(jnp.sin(cpu.linear(eqn, x, w))), (0, 1))
        hlo = jax.jit(grad).lower(x, w).compile().as_text()
        lhs_dims = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
        assert len(lhs_dims) == 3, (eqn, lhs_dims)
        assert set(lhs_dims) == {"1"}, (eqn, lhs_dims)
        if eqn in ("btd,df->btf", "btf,fd->btd"):  # the FFN: plain autodiff has the slow form
            plain = jax.grad(lambda x, w, eqn=eqn: jnp.sum(jnp.sin(jnp.einsum(eqn, x, w))), (0, 1))
            plain_dims = re.findall(
                r" dot\(.*?lhs_contracting_dims=\{(\d+)\}",
                jax.jit(plain).lower(x, w).compile().as_text(),
            )
            assert "0" in plain_dims, (eqn, plain_dims)


@pytest.mark.parametrize(
    "eqn, xs, ws, n",
    [
        ("btd,dnh->btnh", (2, 3, 8), (8, 2, 4), 3),  # q, k, v (MHA)
        ("btd,dnh->btnh", (2, 3, 8), (8, 1, 4), 2),  # k, v (MQA)
        ("btd,df->btf", (2, 3, 8), (8, 16), 2),  # two FFN-shaped weights
    ],
)
def test_linear_many_equals_separate_einsums(eqn, xs, ws, n):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(xs), [rng.standard_normal(ws) for _ in range(n)]
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    got = jax.jit(lambda x, w: cpu.linear_many(eqn, x, w))(f32(x), [f32(a) for a in w])
    assert len(got) == n
    for g, a in zip(got, w, strict=True):
        np.testing.assert_allclose(g, np.einsum(eqn, x, a), atol=1e-5, rtol=1e-5)
    # one product of the stacked weights, not n
    hlo = jax.jit(lambda x, w: cpu.linear_many(eqn, x, w)).lower(f32(x), [f32(a) for a in w])
    assert hlo.as_text().count("dot_general") == 1


def _lm():
    cfg = decoder_lm.Config.tiny(vocab_size=40).replace(d_model=32, n_heads=4, d_ff=64)
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 40)

    def loss(params):
        return jnp.mean(jnp.square(decoder_lm.apply(graphdef, params, tokens)))

    return params, loss


def test_models_are_plain_einsums_unless_the_cpu_products_are_installed():
    """The library default lowers to plain dots; ``cpu.OPS`` gives the same values and grads."""
    params, loss = _lm()
    assert ops.current() is ops.DEFAULT
    plain_hlo = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    assert "optimization_barrier" not in plain_hlo and "custom_jvp" not in plain_hlo
    want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(params)
    with ops.use(cpu.OPS):
        tuned_hlo = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
        got_loss, got_grad = jax.jit(jax.value_and_grad(loss))(params)
    assert "optimization_barrier" in tuned_hlo
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)
    assert ops.current() is ops.DEFAULT  # the scope ended


def test_tune_for_platform_installs_the_cpu_products_only_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(backends.allocator, "tune_host_allocator", lambda: calls.append(1))
    previous = ops.install(ops.DEFAULT)
    try:
        monkeypatch.setattr(backends.allocator, "runs_on_cpu", lambda: False)
        assert backends.tune_for_platform() is None
        assert ops.current() is ops.DEFAULT and not calls
        monkeypatch.setattr(backends.allocator, "runs_on_cpu", lambda: True)
        assert backends.tune_for_platform(host_allocator=False) == "cpu"
        assert ops.current() is cpu.OPS and not calls
        assert backends.tune_for_platform() == "cpu" and calls == [1]
    finally:
        ops.install(previous)
