"""Absolute kinds: sinusoidal vs the paper's formula (NumPy float64), its fixed-linear-map
property, and the learned table's lookup and range errors."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from attnzoo.models.positional import PositionConfig, make_encoding, sinusoidal_table

D = 32


def _close(got, want, *, atol, label):
    """assert_allclose (absolute) printing the max abs error (``pytest -s | grep max_abs_err``)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
    print(f"max_abs_err {label}: {err:.1e}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def _paper_pe(positions: np.ndarray, d: int) -> np.ndarray:
    """Vaswani et al. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pe = np.zeros((*positions.shape, d))
    for i in range(d // 2):
        angle = positions.astype(np.float64) / 10000.0 ** (2 * i / d)
        pe[..., 2 * i], pe[..., 2 * i + 1] = np.sin(angle), np.cos(angle)
    return pe


def _encoding(kind: str, **options):
    return make_encoding(
        PositionConfig(kind=kind, **options),
        d_model=D,
        n_heads=4,
        head_dim=D // 4,
        causal=True,
        rngs=nnx.Rngs(0),
    )


def test_sinusoidal_matches_paper_formula():
    pos = np.random.default_rng(0).integers(0, 128, (3, 20))
    np.testing.assert_allclose(
        sinusoidal_table(jnp.asarray(pos), D), _paper_pe(pos, D), atol=1e-5, rtol=0
    )
    x = np.random.default_rng(1).standard_normal((3, 20, D)).astype(np.float32)
    got = _encoding("sinusoidal").embed(jnp.asarray(x), jnp.asarray(pos))
    _close(got, x + _paper_pe(pos, D), atol=1e-5, label="sinusoidal vs paper")


@settings(max_examples=30, deadline=None)
@given(pos=st.integers(0, 300), k=st.integers(-100, 300))
def test_sinusoidal_shift_is_a_fixed_linear_map(pos, k):
    """PE(pos + k) = M_k PE(pos), M_k block-diagonal rotations that depend on k alone (the
    paper's reason for choosing sinusoids)."""
    k = max(k, -pos)
    omega = 10000.0 ** (-2 * np.arange(D // 2) / D)
    c, s = np.cos(k * omega), np.sin(k * omega)
    m = np.zeros((D, D))
    for i in range(D // 2):  # (sin, cos)(a + b) from (sin a, cos a)
        m[2 * i, 2 * i], m[2 * i, 2 * i + 1] = c[i], s[i]
        m[2 * i + 1, 2 * i], m[2 * i + 1, 2 * i + 1] = -s[i], c[i]
    pe = lambda p: np.asarray(sinusoidal_table(jnp.asarray([p]), D), np.float64)[0]  # noqa: E731
    np.testing.assert_allclose(m @ pe(pos), pe(pos + k), atol=2e-4)


def test_sinusoidal_rejects_odd_width():
    with pytest.raises(ValueError, match="even d_model"):
        sinusoidal_table(jnp.arange(3), 7)


def test_learned_looks_up_its_table_and_learns():
    enc = _encoding("learned", max_len=16)
    pos = jnp.asarray([[0, 5, 15], [2, 2, 7]])
    x = jnp.ones((2, 3, D))
    table = np.asarray(enc.table[...])
    np.testing.assert_array_equal(enc.embed(x, pos), 1.0 + table[np.asarray(pos)])
    graphdef, state = nnx.split(enc)
    grad = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).embed(x, pos)))(state)
    counts = np.asarray(grad["table"][...])[:, 0]  # rows used twice get gradient 2
    want = np.zeros(16)
    np.add.at(want, np.asarray(pos).ravel(), 1.0)
    np.testing.assert_array_equal(counts, want)


def test_learned_positions_beyond_table():
    enc = _encoding("learned", max_len=8)
    x = jnp.zeros((1, 2, D))
    with pytest.raises(ValueError, match=r"position 8 is beyond .* \(max_len=8\); raise"):
        enc.embed(x, jnp.asarray([[7, 8]]))
    with pytest.raises(ValueError, match="exceeds the learned position table"):
        enc.embed(jnp.zeros((1, 9, D)), jnp.zeros((1, 9), jnp.int32))
    # under jit values are unknown: the out-of-table row reads NaN rather than a clamped row
    out = jax.jit(lambda x, p: enc.embed(x, p))(x, jnp.asarray([[7, 8]]))
    assert np.isfinite(out[0, 0]).all() and np.isnan(out[0, 1]).all()
