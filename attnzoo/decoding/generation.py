"""Text generation with a decoder-only LM: one prefill pass, then a compiled token loop.

::

    new = generate(graphdef, params, cfg, [[5, 6, 7], [8]], max_new_tokens=32,
                   sampler="top_p", top_p=0.9, rng=jax.random.key(0), stop_tokens=(eos,))

Prompts of different lengths share one batch: they are left-aligned in a ``[B, P]`` array and
each row keeps its own length, so row ``b``'s next token is written at cache slot
``lengths[b] + t`` with position ``lengths[b] + t``. The padding the prefill wrote after a
short prompt is marked empty (``EMPTY_POSITION``) and later overwritten, so it is never
attended. Positions are real per-row positions, which is all RoPE, ALiBi, T5 and Shaw need.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import ops
from attnzoo.decoding import sampling
from attnzoo.decoding.stages import default_stages, stage_ends
from attnzoo.models import decoder_lm
from attnzoo.models.mha import EMPTY_POSITION


def pad_prompts(
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    pad_id: int = 0,
    lengths: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (tokens [B, P] int32 left-aligned and padded with ``pad_id``, lengths [B]).

    ``prompts`` is a list of token lists, or a [B, P] array whose rows are all full unless
    ``lengths`` says otherwise.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        tokens = np.asarray(prompts, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"prompts must be [batch, length] or lists, got {tokens.shape}")
        lengths = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else lengths
        lengths = np.asarray(lengths, np.int32)
    else:
        if lengths is not None:
            raise ValueError("lengths= is only for array prompts; lists carry their own lengths")
        prompts = [list(p) for p in prompts]
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        tokens = np.full((len(prompts), max(lengths, default=0)), pad_id, np.int32)
        for row, p in zip(tokens, prompts, strict=True):
            row[: len(p)] = p
    if tokens.shape[0] == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    if lengths.shape != (tokens.shape[0],) or (lengths > tokens.shape[1]).any():
        raise ValueError(f"lengths {lengths} do not fit prompts of shape {tokens.shape}")
    if (lengths < 1).any():
        bad = np.flatnonzero(lengths < 1).tolist()
        raise ValueError(
            f"empty prompt in rows {bad}: every prompt needs at least one token "
            "(start unconditioned text with the tokenizer's bos_id)"
        )
    return tokens, lengths


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: decoder_lm.Config,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    cache_len: int,
) -> tuple[jax.Array, decoder_lm.Cache]:
    """Runs all prompts through the model in one pass.

    Args:
      tokens: [B, P] left-aligned prompts; lengths: [B] tokens per row (>= 1).
      cache_len: cache slots S_max (>= P + the tokens still to be decoded).
    Returns:
      (logits [B, V] for each row's next token, cache ready for ``decode_step``).
    """
    B, P = tokens.shape
    cache = decoder_lm.init_cache(cfg, B, cache_len)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    hidden, cache = decoder_lm.apply_cached(
        graphdef, params, tokens, positions, cache, return_hidden=True
    )  # (B, P, D)
    # only each row's last prompt position needs logits: B rows through the head, not B * P
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # (B, 1, D)
    last = decoder_lm.output_head(graphdef, params)(last)[:, 0]  # (B, V)
    # slots past each prompt hold padding: mark them empty and write the next token there
    slot = jnp.arange(cache_len, dtype=jnp.int32)
    cache = cache.replace(
        index=lengths.astype(jnp.int32),
        positions=jnp.where(slot < lengths[:, None], cache.positions, EMPTY_POSITION),
    )
    return last, cache


def decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    cache: decoder_lm.Cache,
) -> tuple[jax.Array, decoder_lm.Cache]:
    """One token per row: tokens [B], positions [B] -> (logits [B, V], cache)."""
    logits, cache = decoder_lm.apply_cached(
        graphdef, params, tokens[:, None], positions[:, None], cache
    )
    return logits[:, 0], cache


@partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "cfg",
        "max_new_tokens",
        "cache_len",
        "sampler",
        "top_k",
        "use_top_p",
        "use_min_p",
        "use_penalty",
        "stop_tokens",
        "pad_id",
        "stages",
    ),
)
def _generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    penalty: jax.Array,
    *,
    cfg: decoder_lm.Config,
    max_new_tokens: int,
    cache_len: int,
    sampler: str,
    top_k: int | None,
    use_top_p: bool,
    use_min_p: bool,
    use_penalty: bool,
    stop_tokens: tuple[int, ...],
    pad_id: int,
    stages: int,
) -> tuple[jax.Array, jax.Array]:
    """The whole generation as one program: prefill, then ``while_loop``s over new tokens
    (one per stage of ``stage_plan``, the cache growing between them).

    Returns (new tokens [B, N], number of tokens decoded before every row stopped).
    """
    B, P = tokens.shape
    N, V = max_new_tokens, cfg.vocab_size
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    seen = None
    if use_penalty:  # [B, V] bool: every valid prompt token; padding scatters out of range
        ids = jnp.where(jnp.arange(P) < lengths[:, None], tokens, V)
        seen = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].set(True, mode="drop")

    def pick(logits, seen, t):
        if use_penalty:
            logits = sampling.repetition_penalty(logits, seen, penalty)
        tok = sampling.sample(
            logits,
            jax.random.fold_in(rng, t),
            sampler=sampler,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if use_top_p else None,
            min_p=min_p if use_min_p else None,
        )
        if use_penalty:
            seen = seen.at[jnp.arange(B), tok].set(True)
        return tok, seen

    ends, sizes = stage_plan(P, N, cache_len, stages)
    logits, cache = prefill(graphdef, params, cfg, tokens, lengths, cache_len=sizes[0])
    tok, seen = pick(logits, seen, 0)
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop)

    def cond(end):
        def stage_cond(state):
            t, _, done, *_ = state
            return (t < end) & ~jnp.all(done)

        return stage_cond

    def body(state):
        t, tok, done, out, cache, seen = state
        # the previous token sits at position lengths + t - 1 (the prompt fills 0..lengths-1)
        # B rows per matmul: a hint to the installed ops; not for scanned stacks
        with ops.few_rows(enabled=not cfg.scan_layers):
            logits, cache = decode_step(graphdef, params, tok, lengths + t - 1, cache)
        tok, seen = pick(logits, seen, t)
        tok = jnp.where(done, pad_id, tok)  # finished rows emit padding
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
        return t + 1, tok, done | jnp.isin(tok, stop), out, cache, seen

    state = (jnp.int32(1), tok, done, out, cache, seen)
    for end, size in zip(ends, sizes, strict=True):
        t, tok, done, out, cache, seen = state
        state = (t, tok, done, out, cache.grow(size), seen)
        state = jax.lax.while_loop(cond(end), body, state)
    steps, _, _, out, _, _ = state
    return out, steps


def stage_plan(
    prompt_len: int, max_new_tokens: int, cache_len: int, stages: int
) -> tuple[list[int], list[int]]:
    """Splits the token loop into stages over a growing cache -> (end step, cache slots) each.

    Step ``t`` (1 .. N-1; token 0 comes from the prefill) reads cache slots below
    ``P + t``, so a stage ending before step ``e`` needs only ``P + e - 1`` slots; the last
    stage has all ``cache_len``. Each step's attention then reads the slots its stage can have
    filled instead of the whole cache (see ``attnzoo.decoding.stages``).
    """
    ends = stage_ends(1, max_new_tokens, stages)
    sizes = [prompt_len + e - 1 for e in ends[:-1]] + [cache_len]
    return ends, sizes


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: decoder_lm.Config,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    sampler: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    rng: jax.Array | None = None,
    pad_id: int = 0,
    lengths: Sequence[int] | np.ndarray | None = None,
    cache_len: int | None = None,
    stages: int | None = None,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens -> new tokens [B, max_new_tokens].

    Args:
      prompts: a list of token-id lists (any lengths >= 1), or a [B, P] array (full rows, or
        padded rows with ``lengths`` [B]).
      sampler: one of ``sampling.SAMPLERS``; ``temperature=0`` means greedy.
      stop_tokens: a row that emits one of these stops; its later slots are ``pad_id``. The
        loop exits early once every row has stopped.
      rng: key for sampling (required unless greedy); the same key gives the same tokens.
      cache_len: KV-cache slots (default: the longest prompt + ``max_new_tokens``).
      stages: the token loop runs in this many stages over a growing cache, each step
        attending only over the slots its stage can have filled (``stage_plan``); each stage
        compiles its own loop body. Default ``stages.default_stages(max_new_tokens - 1)``.

    Compiles once per (config, batch, prompt length, max_new_tokens, sampler, top_k,
    stop_tokens, stages); temperature, top_p, min_p and the penalty are runtime values. Pad
    prompt lists to a fixed length with ``pad_prompts`` + ``lengths`` to reuse one compilation.
    """
    if not isinstance(cfg, decoder_lm.Config):
        raise ValueError(
            f"generate() is for decoder_lm models, got a {type(cfg).__name__}; "
            "translate with attnzoo.decoding.beam_search"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stages is not None:
        stage_ends(1, max_new_tokens, stages)  # validates
    if temperature == 0:
        sampler = "greedy"
    sampling.validate(
        sampler,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    if sampler != "greedy" and rng is None:
        raise ValueError(f"sampler={sampler!r} needs rng=jax.random.key(seed)")
    tokens, lengths = pad_prompts(prompts, pad_id=pad_id, lengths=lengths)
    B, P = tokens.shape
    needed = P + max_new_tokens
    cache_len = needed if cache_len is None else cache_len
    if needed > cache_len:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} = {needed} exceeds the cache "
            f"({cache_len} slots): shorten the prompt, lower max_new_tokens or raise cache_len"
        )
    if cfg.position.kind == "learned" and needed > cfg.position.max_len:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} = {needed} exceeds the "
            f"learned position table ({cfg.position.max_len} positions): shorten the prompt "
            "or lower max_new_tokens"
        )
    if ((tokens < 0) | (tokens >= cfg.vocab_size)).any():
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}) (the vocabulary)")
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    new_tokens, _ = _generate(
        graphdef,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.random.key(0) if rng is None else rng,
        f32(temperature),
        f32(1.0 if top_p is None else top_p),
        f32(0.0 if min_p is None else min_p),
        f32(repetition_penalty),
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
        sampler=sampler,
        top_k=top_k,
        use_top_p=top_p is not None,
        use_min_p=min_p is not None,
        use_penalty=repetition_penalty != 1.0,
        stop_tokens=tuple(int(s) for s in stop_tokens),
        pad_id=pad_id,
        stages=default_stages(max_new_tokens - 1) if stages is None else stages,
    )
    return new_tokens
