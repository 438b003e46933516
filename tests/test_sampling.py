"""Samplers against Hugging Face's logits processors and NumPy definitions of the allowed sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from attnzoo.decoding import sampling

V = 32


def _logits(seed: int, rows: int = 1, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, V)).astype(np.float32) * scale


def _allowed(logits: np.ndarray, *, top_k=None, top_p=None, min_p=None) -> np.ndarray:
    """The allowed set by the papers' definitions, in float64. [B, V] -> [B, V] bool."""
    x = logits.astype(np.float64)
    keep = np.ones_like(x, bool)
    if top_k is not None:  # the k most likely tokens
        keep &= x >= np.sort(x, axis=-1)[:, ::-1][:, top_k - 1 : top_k]
    p = np.exp(x - x.max(-1, keepdims=True))
    p = np.where(keep, p, 0.0)
    p /= p.sum(-1, keepdims=True)
    if top_p is not None:  # smallest most-likely prefix with mass >= top_p
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        keep_sorted = before < top_p
        keep &= np.take_along_axis(keep_sorted, np.argsort(order, -1), -1)
    if min_p is not None:
        keep &= p >= min_p * p.max(-1, keepdims=True)
    return keep


def _hf(processor, logits: np.ndarray, input_ids=None) -> np.ndarray:
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else input_ids
    return processor(ids, torch.from_numpy(logits.copy())).numpy()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, V))
def test_top_k_keeps_what_hf_keeps(seed, k):
    x = _logits(seed, rows=4)
    ours = np.isfinite(np.asarray(sampling.top_k_filter(jnp.asarray(x), k)))
    want = np.isfinite(_hf(TopKLogitsWarper(k, filter_value=-np.inf), x))
    np.testing.assert_array_equal(ours, want)
    assert (ours.sum(-1) == k).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 1.0))
def test_top_p_keeps_what_hf_and_the_definition_keep(seed, p):
    x = _logits(seed, rows=4)
    probs = np.sort(jax.nn.softmax(x.astype(np.float64), -1), -1)[:, ::-1]
    # float32 cumulative sums differ from float64 ones within ~1e-6 of the boundary
    assume(np.abs(np.cumsum(probs, -1) - p).min() > 1e-5)
    ours = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(x), p)))
    np.testing.assert_array_equal(ours, _allowed(x, top_p=p))
    want = np.isfinite(_hf(TopPLogitsWarper(p, filter_value=-np.inf), x))
    np.testing.assert_array_equal(ours, want)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.floats(0.0, 1.0))
def test_min_p_keeps_what_hf_keeps(seed, m):
    x = _logits(seed, rows=4)
    p = np.asarray(jax.nn.softmax(x.astype(np.float64), -1))
    assume(np.abs(p - m * p.max(-1, keepdims=True)).min() > 1e-6)
    ours = np.isfinite(np.asarray(sampling.min_p_filter(jnp.asarray(x), m)))
    np.testing.assert_array_equal(ours, _allowed(x, min_p=m))
    want = np.isfinite(_hf(MinPLogitsWarper(m, filter_value=-np.inf), x))
    np.testing.assert_array_equal(ours, want)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    key=st.integers(0, 2**31 - 1),
    k=st.one_of(st.none(), st.integers(1, 8)),
    p=st.one_of(st.none(), st.floats(0.05, 0.95)),
    m=st.one_of(st.none(), st.floats(0.01, 0.5)),
    temperature=st.floats(0.3, 3.0),
)
def test_samples_never_leave_the_allowed_set(seed, key, k, p, m, temperature):
    # 256 rows of the same logits: one call draws 256 independent samples
    x = np.repeat(_logits(seed), 256, axis=0)
    toks = np.asarray(
        sampling.sample(
            jnp.asarray(x), jax.random.key(key), temperature=temperature, top_k=k, top_p=p, min_p=m
        )
    )
    allowed = _allowed(x[:1] / temperature, top_k=k, top_p=p, min_p=m)[0]
    margin_ok = True
    if p is not None:  # the boundary token may flip between float32 and float64 sums
        probs = np.sort(np.asarray(jax.nn.softmax(x[0] / temperature)))[::-1]
        margin_ok = np.abs(np.cumsum(probs) - p).min() > 1e-5
    assume(margin_ok)
    assert allowed[toks].all(), (np.flatnonzero(allowed), np.unique(toks))


def test_sampling_follows_the_renormalised_distribution():
    x = np.repeat(_logits(0, scale=1.0), 20000, axis=0)
    toks = np.asarray(sampling.sample(jnp.asarray(x), jax.random.key(0), top_k=4))
    allowed = _allowed(x[:1], top_k=4)[0]
    want = np.where(allowed, np.exp(x[0].astype(np.float64)), 0.0)
    want /= want.sum()
    freq = np.bincount(toks, minlength=V) / len(toks)
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_same_key_same_tokens_and_cold_temperature_is_greedy():
    x = jnp.asarray(_logits(1, rows=16))
    a = sampling.sample(x, jax.random.key(3), temperature=1.0)
    b = sampling.sample(x, jax.random.key(3), temperature=1.0)
    np.testing.assert_array_equal(a, b)
    cold = sampling.sample(x, jax.random.key(4), temperature=1e-5)
    np.testing.assert_array_equal(cold, np.argmax(np.asarray(x), -1))
    np.testing.assert_array_equal(sampling.sample(x, None, sampler="greedy"), cold)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    x = _logits(2, rows=3)
    ids = torch.tensor([[1, 5, 5, 9], [0, 2, 3, 4], [31, 30, 1, 1]])
    seen = np.zeros((3, V), bool)
    np.put_along_axis(seen, ids.numpy(), True, axis=-1)
    ours = sampling.repetition_penalty(jnp.asarray(x), jnp.asarray(seen), penalty)
    want = _hf(RepetitionPenaltyLogitsProcessor(penalty), x, ids)
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-6)
    assert not np.allclose(np.asarray(ours), x)


def test_validate_names_the_problem():
    with pytest.raises(ValueError, match="unknown sampler 'beam'.*greedy, sample"):
        sampling.validate("beam")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        sampling.validate("sample", top_k=0)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\]"):
        sampling.validate("sample", top_p=1.5)
    with pytest.raises(ValueError, match="needs min_p="):
        sampling.validate("min_p")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling.validate("sample", temperature=-1.0)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        sampling.validate("greedy", repetition_penalty=0.0)


def test_greedy_is_numpy_argmax_with_lowest_id_on_ties():
    x = _logits(5, rows=8)
    x[0, [3, 7, 20]] = x[0].max() + 1.0  # a three-way tie: the lowest id wins, as np.argmax
    x[1, :] = 0.0
    np.testing.assert_array_equal(sampling.greedy(jnp.asarray(x)), np.argmax(x, -1))
