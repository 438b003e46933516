"""Weight products in the operand layouts XLA:CPU runs fastest: ``attnzoo.ops`` for CPU.

XLA:CPU runs a dot on its fast YNNPACK kernels only when each operand's contracted dimension
is where a row-major matmul expects it; other dots fall back to a slower Eigen path. Three
places need help, chosen here so that model code stays plain ``jnp.einsum``:

* **Training**: reverse mode turns ``y = x W`` into ``dW = x^T dy``, a dot contracting the
  first dimension of both operands (Eigen). ``_rows_times_weight`` is a ``custom_jvp`` whose
  transpose makes the weight gradient a canonical ``[K, R] x [R, N]`` dot; forward mode and
  Hessians still work.
* **Incremental decoding** (``few_rows``): weight-stationary ``[out, in] x [in, rows]`` dots
  stream a weight 2-3x faster than ``[rows, in] x [in, out]`` when there are ~8 rows.
* **Shared-input projections** (``linear_many``): q, k and v as one wider dot.

The measurements behind each choice are in ``benchmarks/README.md`` ("Where each CPU
measure lives").
Results equal the plain einsum up to float32 summation order. ``enable()`` installs them;
``attnzoo.backends.tune_for_platform()`` does so when JAX runs on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo import ops

_FEW_ROWS = contextvars.ContextVar("attnzoo_few_row_matmuls", default=False)

# Few-row weights of this many elements (0.75-8 MB in float32) run as two half-matmuls.
# A decode step is bound by streaming weights from memory. One core streams a large weight
# (the [8192, 256] head) at the memory's full rate, so splitting it gains nothing; mid-size
# weights (QKV [768, 256], MLP [1024, 256] / [256, 1024]) reach half that rate on one core,
# and XLA:CPU's thunk executor runs two independent halves on two cores at once.
_SPLIT_ELEMENTS = (3 * 2**16, 2**21)


@contextlib.contextmanager
def few_rows(enabled: bool = True) -> Iterator[None]:
    """Products traced inside compute ``y^T = W^T x^T``, weights pre-transposed ``[out, in]``.

    Inside a generation ``while_loop`` the transposed weights depend only on the parameters,
    so XLA hoists the copy out of the loop; inside a ``lax.scan`` over stacked layers they
    would be re-copied every step, so callers pass ``enabled=False`` there. Mid-size weights
    run as two half-matmuls, which XLA:CPU schedules on two cores (``_SPLIT_ELEMENTS``).
    """
    token = _FEW_ROWS.set(enabled)
    try:
        yield
    finally:
        _FEW_ROWS.reset(token)


def linear(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(eqn, x, w)`` for ``x``-rows times weight, e.g. ``"btd,dnh->btnh"``.

    It runs as the 2-D product ``[rows, in] x [in, out]`` whose derivative keeps the weight
    gradient a canonical dot, or under ``few_rows`` as a weight-stationary ``[out, in] x
    [in, rows]`` dot; the answer is the same einsum either way. Other equations (rows summed
    away; per-head weights outside ``few_rows``) run as the einsum itself.
    """
    xs, ws, out, rows, contracted, feats = _labels(eqn)
    if sorted(rows + feats) != sorted(out):
        return jnp.einsum(eqn, x, w)  # not a plain rows-times-weight product
    if _FEW_ROWS.get():
        return _few_rows_linear(eqn, x, w)
    if any(c in xs for c in feats):  # a batch dimension (per-head weights): no 2-D form
        return jnp.einsum(eqn, x, w)
    size = dict(zip(xs, x.shape, strict=True)) | dict(zip(ws, w.shape, strict=True))
    C = math.prod(size[c] for c in contracted)
    # bitcasts for the usual "btd,df->btf"-style equations
    xm = jnp.transpose(x, [xs.index(c) for c in rows + contracted]).reshape(-1, C)
    wm = jnp.transpose(w, [ws.index(c) for c in contracted + feats]).reshape(C, -1)
    y = _rows_times_weight(xm, wm).reshape([size[c] for c in rows + feats])
    return jnp.transpose(y, [(rows + feats).index(c) for c in out])


@functools.lru_cache(maxsize=256)
def _labels(eqn: str) -> tuple[str, str, str, str, str, str]:
    """(x, w, out, rows, contracted, feats) labels of an ``x``-times-weight einsum."""
    ins, out = eqn.split("->")
    xs, ws = ins.split(",")
    rows = "".join(c for c in xs if c not in ws)
    feats = "".join(c for c in out if c in ws)
    contracted = "".join(c for c in ws if c in xs and c not in out)
    return xs, ws, out, rows, contracted, feats


def linear_many(eqn: str, x: jax.Array, ws: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """``linear(eqn, x, w)`` for each of ``ws`` (equal shapes) as one product of the stack.

    A wider dot runs closer to the matmul peak, and one launch replaces several. The stack's
    axis goes right before the weight's first output label, so a rules table that shards the
    heads axis shards the stack the same way.
    """
    if len(ws) == 1:
        return (linear(eqn, x, ws[0]),)
    xs, wl, out, rows, contracted, feats = _labels(eqn)
    p = next(c for c in "pqsuvwxyz" if c not in eqn)
    w_at, out_at = wl.index(feats[0]), out.index(feats[0])
    stacked_eqn = f"{xs},{wl[:w_at]}{p}{wl[w_at:]}->{out[:out_at]}{p}{out[out_at:]}"
    y = linear(stacked_eqn, x, jnp.stack(list(ws), axis=w_at))
    return tuple(jnp.moveaxis(y, out_at, 0))


def _few_rows_linear(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``linear`` under ``few_rows``: weight-stationary ``[out, in] x [in, rows]``."""
    xs, ws, out, rows, contracted, feats = _labels(eqn)
    if any(c in xs for c in feats):  # a batch dimension (per-head weights): no 2-D form
        wt_spec = feats + contracted
        wt = lax.optimization_barrier(jnp.transpose(w, [ws.index(c) for c in wt_spec]))
        yt = lax.optimization_barrier(jnp.einsum(f"{wt_spec},{xs}->{feats}{rows}", wt, x))
        return jnp.transpose(yt, [(feats + rows).index(c) for c in out])
    size = dict(zip(xs, x.shape, strict=True)) | dict(zip(ws, w.shape, strict=True))
    F = math.prod(size[c] for c in feats)
    C = math.prod(size[c] for c in contracted)
    # Both operands as 2-D matrices in the dot's own order: left to itself, XLA permutes the
    # (hoisted) weight inside the loop to match x's layout, instead of the tiny x.
    wt = jnp.transpose(w, [ws.index(c) for c in feats + contracted]).reshape(F, C)
    xt = jnp.transpose(x, [xs.index(c) for c in contracted + rows]).reshape(C, -1)  # (C, R)
    n = 2 if _SPLIT_ELEMENTS[0] <= F * C < _SPLIT_ELEMENTS[1] and F % 2 == 0 else 1
    # The barriers keep XLA from folding the transposes back into the dot's dimension numbers
    # (which would restore the slow orientation) and from merging the halves again.
    parts = [lax.optimization_barrier(p) for p in jnp.split(wt, n)]
    yt = jnp.concatenate([lax.optimization_barrier(p @ xt) for p in parts])  # (F, R)
    yt = yt.reshape([size[c] for c in feats + rows])
    return jnp.transpose(yt, [(feats + rows).index(c) for c in out])


@jax.custom_jvp
def _rows_times_weight(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [R, C] @ w [C, F] -> [R, F], differentiated as described in the module docstring."""
    return x @ w


@functools.partial(_rows_times_weight.defjvp, symbolic_zeros=True)
def _rows_times_weight_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    terms = []
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        terms.append(dx @ w)  # transposes to dy @ w^T, a dot XLA:CPU already runs well
    if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
        terms.append(_weight_term(x, dw))
    return x @ w, sum(terms[1:], terms[0])


def _weight_term(x: jax.Array, dw: jax.Array) -> jax.Array:
    """``x @ dw`` [R, F], written so that its transpose (the weight gradient) is canonical.

    Reverse mode transposes this linear map of ``dw``; the optimisation barriers are linear
    too (their transpose is a barrier on the cotangent), so they keep XLA from folding the
    materialised transposes back into the dot's dimension numbers.
    """
    C, F = dw.shape
    if C <= F:  # dW [C, F] = x^T [C, R] @ dy [R, F], x^T copied once in the forward pass
        xt = lax.optimization_barrier(x.T)
        # (the barrier on dw keeps a later transpose of dW, e.g. a tied [V, D] table's, from
        # being folded into the dot as dy^T x)
        return lax.dot_general(xt, lax.optimization_barrier(dw), (((0,), (0,)), ((), ())))
    # dW^T [F, C] = dy^T [F, R] @ x [R, C], then one small [F, C] -> [C, F] transpose
    y_t = lax.dot_general(lax.optimization_barrier(dw.T), x, (((1,), (1,)), ((), ())))
    return lax.optimization_barrier(y_t).T


OPS = ops.Ops("xla-cpu", linear=linear, linear_many=linear_many, few_rows=few_rows)


def enable() -> ops.Ops:
    """Installs these products for every model traced from now on; returns the previous ones."""
    return ops.install(OPS)
