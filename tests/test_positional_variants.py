"""The pure positional functions under chex variants (eager, jit, vmap over the batch): each
variant must agree with the eager call to float32 precision."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.models.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_xpos,
    sinusoidal_table,
    t5_bucket,
)

B, T, N, H = 3, 10, 2, 16

FUNCTIONS = {  # name -> (positions [B, T] -> array); inputs fixed inside
    "rope_yarn": lambda x, p: apply_rope(x, p, scaling="yarn", factor=4.0, original_max_len=8),
    "rope_dynamic": lambda x, p: apply_rope(
        x, p, scaling="dynamic", factor=2.0, original_max_len=4
    ),
    "rope_interleaved": lambda x, p: apply_rope(x, p, layout="interleaved", fraction=0.5),
    "xpos_key": lambda x, p: apply_xpos(x, p, is_key=True, scale_base=16.0),
    "alibi": lambda x, p: alibi_bias(p, p, jnp.asarray(alibi_slopes(6), jnp.float32)),
    "t5_bucket": lambda x, p: t5_bucket(
        p[:, None, :] - p[:, :, None], bidirectional=True, num_buckets=8, max_distance=12
    ),
    "sinusoidal": lambda x, p: sinusoidal_table(p, H),
}


class PositionalVariantsTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.x = jax.random.normal(jax.random.key(0), (B, T, N, H))
        # rows at different offsets (dynamic NTK then sees a different length per row under vmap)
        self.pos = jnp.arange(T, dtype=jnp.int32)[None] + jnp.array([[0], [4], [20]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        for name, fn in FUNCTIONS.items():
            got = self.variant(fn)(self.x, self.pos)
            np.testing.assert_allclose(got, fn(self.x, self.pos), atol=1e-6, err_msg=name)

    def test_vmap_over_rows_equals_row_by_row(self):
        # row by row (not the batched call): dynamic NTK's stretch follows each call's longest row
        for name, fn in FUNCTIONS.items():
            row = lambda x, p, fn=fn: fn(x[None], p[None])[0]  # noqa: E731
            got = jax.vmap(row)(self.x, self.pos)
            want = np.stack([row(self.x[i], self.pos[i]) for i in range(B)])
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)

    def test_grads_are_finite(self):
        for name in ("rope_yarn", "rope_interleaved", "xpos_key"):
            fn = functools.partial(FUNCTIONS[name], p=self.pos)
            g = jax.grad(lambda x, fn=fn: jnp.sum(fn(x) ** 3))(self.x)
            chex.assert_tree_all_finite(g)
            chex.assert_shape(g, (B, T, N, H))
