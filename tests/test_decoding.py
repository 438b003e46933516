"""generate(): cached decoding vs full forward passes, batching, stop tokens, errors, compiles."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.decoding import generation as gen
from attnzoo.models import decoder_lm, positional
from attnzoo.models.positional import PositionConfig

PROMPTS = [[3, 9, 4, 1, 7], [12], [5, 6, 30]]  # different lengths on purpose


def _cfg(kind: str, **kw) -> decoder_lm.Config:
    # A large embedding init and an untied head spread the logits so that greedy paths vary
    # token to token (a tied head mostly repeats the last token).
    return decoder_lm.Config(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        embed_init_std=1.0,
        tie_embeddings=False,
        position=PositionConfig(kind=kind, max_len=64),
    ).replace(**kw)


@pytest.fixture(scope="module")
def lm():
    cfg = _cfg("learned")
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


REF_LEN = 16  # every reference sequence fits: one compilation per model


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
    return decoder_lm.apply(graphdef, params, tokens)


def _next_logits(graphdef, params, seqs):
    """Next-token logits after each sequence, from full forward passes without a cache: [B, V].

    Rows are right-padded to REF_LEN so that one compilation serves every call; causal
    attention keeps the padding out of each row's real positions.
    """
    tokens = np.zeros((len(seqs), REF_LEN), np.int32)
    for row, seq in zip(tokens, seqs, strict=True):
        row[: len(seq)] = seq
    logits = np.asarray(_forward(graphdef, params, jnp.asarray(tokens)))
    return logits[np.arange(len(seqs)), [len(seq) - 1 for seq in seqs]]


def _naive_greedy(graphdef, params, prompts, n, stop=()):
    """Re-runs the whole model on the growing sequences and takes the argmax each step.

    Returns [B, n] new tokens, 0 after a row's stop token.
    """
    seqs, out = [list(p) for p in prompts], np.zeros((len(prompts), n), np.int32)
    done = np.zeros(len(prompts), bool)
    for t in range(n):
        for b, tok in enumerate(np.argmax(_next_logits(graphdef, params, seqs), axis=-1)):
            if not done[b]:
                out[b, t] = tok
                seqs[b].append(int(tok))
                done[b] = int(tok) in stop
    return out


VARIANTS = {kind: {} for kind in positional.kinds()} | {
    "rope-gqa-window": dict(n_kv_heads=2, sliding_window=4),
    "learned-scanned": dict(scan_layers=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_full_forward_every_step(variant):
    kind = variant.split("-")[0]
    cfg = _cfg(kind, **VARIANTS[variant])
    graphdef, params = decoder_lm.init(cfg, jax.random.key(1))
    tokens, lengths = gen.pad_prompts(PROMPTS)
    # the cache starts with room for 3 steps and grows once (as between generate's stages)
    n_steps, grow_at = 6, 3
    forced = np.asarray(jax.random.randint(jax.random.key(2), (len(PROMPTS), n_steps), 1, 64))
    prefill = jax.jit(partial(gen.prefill, graphdef, cfg=cfg, cache_len=tokens.shape[1] + 3))
    step = jax.jit(partial(gen.decode_step, graphdef))

    logits, cache = prefill(params, tokens=tokens, lengths=lengths)
    seqs = [list(p) for p in PROMPTS]
    for t in range(n_steps + 1):
        want = _next_logits(graphdef, params, seqs)
        np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)
        if t == n_steps:
            break
        if t == grow_at:
            cache = cache.grow(tokens.shape[1] + n_steps)
        logits, cache = step(params, forced[:, t], jnp.asarray(lengths + t), cache)
        for seq, tok in zip(seqs, forced[:, t], strict=True):
            seq.append(int(tok))


def test_greedy_equals_naive_full_model_loop(lm):
    cfg, graphdef, params = lm
    out = np.asarray(gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=8))
    want = _naive_greedy(graphdef, params, PROMPTS, 8)
    np.testing.assert_array_equal(out, want)
    assert len({tuple(r) for r in want}) > 1 and any(len(set(r)) > 2 for r in want)


def test_batched_prompts_equal_each_alone(lm):
    cfg, graphdef, params = lm
    batched = np.asarray(gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=8))
    for b, p in enumerate(PROMPTS):
        alone = np.asarray(gen.generate(graphdef, params, cfg, [p], max_new_tokens=8))
        np.testing.assert_array_equal(batched[b], alone[0])


def test_array_prompts_with_lengths_equal_lists(lm):
    cfg, graphdef, params = lm
    tokens, lengths = gen.pad_prompts(PROMPTS, pad_id=0)
    a = gen.generate(graphdef, params, cfg, tokens, lengths=lengths, max_new_tokens=5)
    b = gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=5)
    np.testing.assert_array_equal(a, b)


def test_stop_tokens_pad_the_rest(lm):
    cfg, graphdef, params = lm
    free = _naive_greedy(graphdef, params, PROMPTS, 8)
    stop = free[0][2]  # row 0 stops at its third token (or earlier if it repeats)
    out = np.asarray(
        gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=8, stop_tokens=(stop,))
    )
    want = _naive_greedy(graphdef, params, PROMPTS, 8, stop=(stop,))
    np.testing.assert_array_equal(out, want)
    assert (out[0, 3:] == 0).all()


@pytest.mark.parametrize("stages", [1, 3])
def test_loop_exits_once_every_row_has_stopped(lm, stages):
    cfg, graphdef, params = lm
    free = _naive_greedy(graphdef, params, PROMPTS, 8)
    # each row stops at a different step: rows' 1st, 3rd and 2nd tokens (first occurrences)
    stops = (int(free[0, 0]), int(free[1, 2]), int(free[2, 1]))
    tokens, lengths = gen.pad_prompts(PROMPTS)
    out, steps = gen._generate(
        graphdef, params, tokens, lengths, jax.random.key(0), 1.0, 1.0, 0.0, 1.0, cfg=cfg,
        max_new_tokens=8, cache_len=16, sampler="greedy", top_k=None, use_top_p=False,
        use_min_p=False, use_penalty=False, stop_tokens=stops, pad_id=0, stages=stages,
    )  # fmt: skip
    ends = [min(int(np.flatnonzero(np.isin(r, stops))[0]) + 1, 8) for r in free]
    assert int(steps) == max(ends) < 8  # no decoding after the last row stopped
    want = _naive_greedy(graphdef, params, PROMPTS, 8, stop=stops)
    np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize("variant", ["learned-scanned"])  # unrolled: the stop-token test
def test_staged_loop_over_a_growing_cache_equals_naive_greedy(variant):
    kind = variant.split("-")[0]
    cfg = _cfg(kind, **VARIANTS.get(variant, {}))
    graphdef, params = decoder_lm.init(cfg, jax.random.key(3))
    out = np.asarray(gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=9, stages=4))
    want = _naive_greedy(graphdef, params, PROMPTS, 9)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize(
    "P,N,cache_len,stages",
    [(5, 9, 14, 4), (16, 128, 144, 4), (3, 2, 5, 4), (4, 1, 5, 3), (7, 10, 40, 1), (2, 5, 7, 9)],
)
def test_stage_plan_gives_every_step_the_slots_it_reads(P, N, cache_len, stages):
    ends, sizes = gen.stage_plan(P, N, cache_len, stages)
    assert ends[-1] == N and sizes[-1] == cache_len
    assert ends == sorted(set(ends)) and sizes == sorted(sizes)
    assert len(ends) == min(stages, max(N - 1, 1))
    start = 1
    for end, size in zip(ends, sizes, strict=True):
        # step t writes slot <= P + t - 1 and attends to slots < P + t; the prefill needs P
        assert all(P + t <= size for t in range(start, end)) and P <= size
        if end < ends[-1]:  # and no bigger than that: only the last stage has the whole cache
            assert size == max(P, *(P + t for t in range(start, end)))
        start = end


def test_cache_grow_keeps_contents_and_adds_empty_slots(lm):
    cfg, graphdef, params = lm
    tokens, lengths = gen.pad_prompts(PROMPTS)
    _, cache = gen.prefill(graphdef, params, cfg, tokens, lengths, cache_len=6)
    grown = cache.grow(9)
    assert grown.positions.shape == (3, 9)
    np.testing.assert_array_equal(grown.positions[:, :6], cache.positions)
    assert (np.asarray(grown.positions[:, 6:]) == gen.EMPTY_POSITION).all()
    np.testing.assert_array_equal(grown.index, cache.index)
    for old, new in zip(cache.layers, grown.layers, strict=True):
        np.testing.assert_array_equal(new.k[:, :, :6], old.k)
        np.testing.assert_array_equal(new.v[:, :, :6], old.v)
        assert not np.asarray(new.k[:, :, 6:]).any()
    with pytest.raises(ValueError, match="can only grow"):
        cache.grow(4)


def test_sampling_reproducible_and_temperature_zero_is_greedy(lm):
    cfg, graphdef, params = lm
    kw = dict(max_new_tokens=8, sampler="sample", temperature=1.5)
    a = gen.generate(graphdef, params, cfg, PROMPTS, rng=jax.random.key(7), **kw)
    b = gen.generate(graphdef, params, cfg, PROMPTS, rng=jax.random.key(7), **kw)
    c = gen.generate(graphdef, params, cfg, PROMPTS, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=8)
    cold = gen.generate(
        graphdef, params, cfg, PROMPTS, max_new_tokens=8, sampler="sample",
        temperature=1e-4, rng=jax.random.key(9),
    )  # fmt: skip
    np.testing.assert_array_equal(cold, greedy)
    zero = gen.generate(graphdef, params, cfg, PROMPTS, max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(zero, greedy)


def test_repetition_penalty_changes_greedy_path_and_avoids_repeats(lm):
    cfg, graphdef, params = lm
    out = np.asarray(
        gen.generate(graphdef, params, cfg, [PROMPTS[1]], max_new_tokens=6, repetition_penalty=1e6)
    )[0]
    # a huge penalty pushes every seen token below every unseen one (unless all are negative)
    seen = set(PROMPTS[1])
    for tok in out:
        assert tok not in seen
        seen.add(int(tok))


def test_same_shapes_compile_once(lm):
    cfg, graphdef, params = lm
    kw = dict(max_new_tokens=4, sampler="top_p", top_p=0.9, rng=jax.random.key(0))
    gen.generate(graphdef, params, cfg, [[1, 2], [3, 4]], **kw)
    n = gen._generate._cache_size()
    gen.generate(graphdef, params, cfg, [[5, 6], [7, 8]], **kw)
    gen.generate(graphdef, params, cfg, [[9, 10], [11]], **{**kw, "top_p": 0.5})
    gen.generate(
        graphdef, params, cfg, [[9, 10], [11]], **{**kw, "temperature": 0.7, "min_p": None}
    )
    assert gen._generate._cache_size() == n


def test_bad_inputs_raise_clear_errors(lm):
    cfg, graphdef, params = lm
    with pytest.raises(ValueError, match="empty prompt in rows \\[1\\]"):
        gen.generate(graphdef, params, cfg, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the cache"):
        gen.generate(graphdef, params, cfg, [[1] * 10], max_new_tokens=4, cache_len=12)
    with pytest.raises(ValueError, match="learned position table"):
        gen.generate(graphdef, params, cfg, [[1] * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="unknown sampler 'nucleus'"):
        gen.generate(graphdef, params, cfg, [[1]], max_new_tokens=2, sampler="nucleus")
    with pytest.raises(ValueError, match="needs top_p="):
        gen.generate(graphdef, params, cfg, [[1]], max_new_tokens=2, sampler="top_p")
    with pytest.raises(ValueError, match="needs rng"):
        gen.generate(graphdef, params, cfg, [[1]], max_new_tokens=2, sampler="sample")
    with pytest.raises(ValueError, match="vocabulary"):
        gen.generate(graphdef, params, cfg, [[1, 64]], max_new_tokens=2)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        gen.generate(graphdef, params, cfg, [[1]], max_new_tokens=4, stages=0)
    with pytest.raises(ValueError, match="no prompts"):
        gen.generate(graphdef, params, cfg, [], max_new_tokens=2)
