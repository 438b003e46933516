"""Building blocks against independent float64 references."""

import math

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
