"""Beam search for encoder-decoder translation, as one compiled program of ``while_loop``s.

The paper (Vaswani et al. 2017, section 6.1) decodes with beam 4 and the GNMT length penalty
``lp(len) = ((5 + len) / 6) ** alpha`` with alpha 0.6 (Wu et al. 2016, eq. 14), stopping early
once the beams are settled. The bookkeeping follows Hugging Face's vectorised beam search, so
with ``length_penalty="power"`` (``lp = len ** alpha``) the tokens match
``generate(num_beams=K, length_penalty=alpha, early_stopping=True)``:

* each step keeps the 2K best continuations of the K live beams (so K non-EOS ones survive);
* a continuation that ends in EOS (or reaches ``max_len``) and ranks in the top K becomes a
  finished hypothesis scored ``logprob / lp(length)``; the K best finished are kept;
* a row stops taking hypotheses once it holds K finished ones (``early_stopping=True``) or no
  live beam can still beat its worst finished one; the loop exits when every row has stopped.

The encoder runs once and every decoder layer's cross-attention keys/values are projected once
into the cache; each step then costs one decoder token per beam. Nothing leaves the device
inside the loop, so it runs unchanged on params and inputs sharded over a mesh.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import ops
from attnzoo.decoding.stages import default_stages, stage_ends
from attnzoo.models import encoder_decoder as ed

LENGTH_PENALTIES = ("gnmt", "power")
# Hugging Face's "impossible" score: adding it (rather than -inf) keeps every score finite.
_NEG = -1.0e9


def length_penalty(length: jax.Array, alpha: float | jax.Array, *, kind: str = "gnmt"):
    """GNMT ``((5 + len) / 6) ** alpha`` or Hugging Face's ``len ** alpha``."""
    length = jnp.asarray(length, jnp.float32)
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    return length**alpha


def _gather_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: [B, M, ...], idx: [B, K] -> [B, K, ...]."""
    return jax.vmap(lambda row, i: row[i])(x, idx)


@partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "cfg",
        "beam_size",
        "max_len",
        "eos_id",
        "bos_id",
        "pad_id",
        "kind",
        "early_stopping",
        "stages",
    ),
)
def _beam_search(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    src_tokens: jax.Array,
    src_segment_ids: jax.Array,
    alpha: jax.Array,
    *,
    cfg: ed.Config,
    beam_size: int,
    max_len: int,
    eos_id: int,
    bos_id: int,
    pad_id: int,
    kind: str,
    early_stopping: bool,
    stages: int,
) -> tuple[jax.Array, jax.Array]:
    B, K, V = src_tokens.shape[0], beam_size, cfg.vocab_size
    encoded = ed.encode(graphdef, params, src_tokens, src_segment_ids)  # (B, S, D)
    # every beam of a row decodes against the same source: rows b*K .. b*K+K-1
    encoded = jnp.repeat(encoded, K, axis=0)  # (B*K, S, D)
    src_segment_ids = jnp.repeat(src_segment_ids, K, axis=0)  # (B*K, S)
    # step t writes self-attention slot t: a stage ending before step e needs e slots
    ends = stage_ends(0, max_len, stages)
    cache = ed.fill_cross_cache(
        graphdef, params, ed.init_cache(cfg, B * K, ends[0]), encoded
    )  # cross K/V projected once here, reused every step
    batch_axis = 1 if cfg.scan_layers else 0  # scanned caches carry a leading layer axis

    def lp(length):
        return length_penalty(length, alpha, kind=kind)

    def body(state):
        t, live, live_scores, fin, fin_scores, fin_flags, open_, _, cache = state
        prev = jnp.where(t == 0, bos_id, live[:, :, jnp.maximum(t - 1, 0)])  # (B, K)
        # B*K rows per matmul: a hint to the installed ops; not for scanned stacks
        with ops.few_rows(enabled=not cfg.scan_layers):
            logits, cache = ed.decode_cached(
                graphdef,
                params,
                encoded,
                src_segment_ids,
                prev.reshape(B * K, 1),
                jnp.full((B * K, 1), t, jnp.int32),
                cache,
            )
        logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)).reshape(B, K, V)
        cand = (live_scores[:, :, None] + logp).reshape(B, K * V)
        top_scores, top_idx = jax.lax.top_k(cand, 2 * K)  # (B, 2K)
        origin, token = top_idx // V, top_idx % V  # source beam and new token
        top_seqs = _gather_beams(live, origin).at[:, :, t].set(token)  # (B, 2K, max_len)
        hits = (token == eos_id) | (t + 1 >= max_len)  # (B, 2K)

        # live beams: the K best continuations that did not just finish
        run_scores, keep = jax.lax.top_k(top_scores + hits * _NEG, K)  # (B, K)
        live = _gather_beams(top_seqs, keep)
        parent = _gather_beams(origin, keep) + jnp.arange(B)[:, None] * K  # (B, K) flat rows
        layers = jax.tree.map(
            lambda a: jnp.take(a, parent.reshape(-1), axis=batch_axis), cache.layers
        )
        cache = cache.replace(layers=layers)

        # finished: top-K-ranked candidates that just hit EOS / max_len, while the row is open
        just = hits & (jnp.arange(2 * K) < K)
        row_full = jnp.all(fin_flags, axis=-1, keepdims=True) & early_stopping
        scored = top_scores / lp(t + 1)
        scored += (row_full | ~open_[:, None]) * _NEG + ~just * _NEG
        merged_scores = jnp.concatenate([fin_scores, scored], axis=1)  # (B, 3K)
        fin_scores, best = jax.lax.top_k(merged_scores, K)
        fin = _gather_beams(jnp.concatenate([fin, top_seqs], axis=1), best)
        fin_flags = _gather_beams(jnp.concatenate([fin_flags, just], axis=1), best)

        # can the best live beam still beat the worst finished one? (HF's heuristic)
        best_live = run_scores[:, 0] / lp(t + 1)
        worst_fin = jnp.where(fin_flags, jnp.min(fin_scores, -1, keepdims=True), _NEG)
        open_ &= jnp.any(best_live[:, None] > worst_fin, axis=-1)
        return t + 1, live, run_scores, fin, fin_scores, fin_flags, open_, jnp.all(hits), cache

    def cond(end):
        def stage_cond(state):
            t, *_, fin_flags, open_, all_hit, _ = state
            settled = jnp.all(fin_flags) & early_stopping
            return (t < end) & jnp.any(open_) & ~settled & ~all_hit

        return stage_cond

    seqs = jnp.full((B, K, max_len), pad_id, jnp.int32)
    state = (
        jnp.int32(0),
        seqs,
        jnp.zeros((B, K)).at[:, 1:].set(_NEG),  # only beam 0 is live at the start
        seqs,
        jnp.full((B, K), _NEG),
        jnp.zeros((B, K), bool),
        jnp.ones((B,), bool),
        jnp.bool_(False),
        cache,
    )
    for end in ends:  # stages over a growing self-attention cache
        state = (*state[:-1], state[-1].grow(end))
        state = jax.lax.while_loop(cond(end), body, state)
    _, _, _, fin, fin_scores, *_ = state
    return fin[:, 0], fin_scores[:, 0]


def beam_search(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cfg: ed.Config,
    src_tokens: jax.Array | np.ndarray,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len: int,
    eos_id: int,
    bos_id: int,
    pad_id: int = 0,
    src_segment_ids: jax.Array | np.ndarray | None = None,
    length_penalty: str = "gnmt",
    early_stopping: bool = True,
    return_scores: bool = False,
    stages: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Translates a batch: src_tokens [B, S] -> best target tokens [B, max_len].

    Args:
      src_tokens: [B, S] source ids, padded with ``pad_id`` (or give ``src_segment_ids``).
      beam_size: K, beams per sentence (the paper: 4).
      alpha: the length-penalty exponent (the paper: 0.6).
      max_len: target tokens to generate at most (EOS included).
      eos_id: the end token.
      bos_id: the decoder's start token (fed first, not returned).
      length_penalty: ``"gnmt"`` ``((5 + len) / 6) ** alpha`` or ``"power"`` ``len ** alpha``
        (Hugging Face's).
      early_stopping: stop a row once it has ``beam_size`` finished hypotheses.
      return_scores: also return the winners' penalised log-probabilities [B].
      stages: the loop runs in this many stages over a growing self-attention cache, each step
        reading only the slots its stage can have filled (``attnzoo.decoding.stages``; each
        stage compiles its own loop body). Default ``stages.default_stages(max_len)``.
    Returns:
      tokens [B, max_len] ending in ``eos_id`` (unless cut at ``max_len``), then ``pad_id``.
    """
    if not isinstance(cfg, ed.Config):
        raise ValueError(
            f"beam_search() is for encoder_decoder models, got a {type(cfg).__name__}; "
            "for decoder-only LMs use attnzoo.decoding.generate"
        )
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(
            f"unknown length_penalty {length_penalty!r}; valid: {', '.join(LENGTH_PENALTIES)}"
        )
    if stages is not None:
        stage_ends(0, max_len, stages)  # validates
    if 2 * beam_size > cfg.vocab_size:
        raise ValueError(f"beam_size {beam_size} needs a vocabulary of >= {2 * beam_size} tokens")
    if cfg.position.kind == "learned" and max_len > cfg.position.max_len:
        raise ValueError(
            f"max_len {max_len} exceeds the learned position table ({cfg.position.max_len}); "
            "lower max_len"
        )
    src_tokens = jnp.asarray(src_tokens, jnp.int32)
    if src_tokens.ndim != 2 or src_tokens.shape[1] == 0:
        raise ValueError(f"src_tokens must be [batch, length >= 1], got {src_tokens.shape}")
    if src_segment_ids is None:
        src_segment_ids = (src_tokens != pad_id).astype(jnp.int32)
    src_segment_ids = jnp.asarray(src_segment_ids, jnp.int32)
    if not bool(jnp.all(jnp.any(src_segment_ids > 0, axis=1))):
        raise ValueError("empty source sentence: every row needs at least one non-pad token")
    tokens, scores = _beam_search(
        graphdef,
        params,
        src_tokens,
        src_segment_ids,
        jnp.float32(alpha),
        cfg=cfg,
        beam_size=beam_size,
        max_len=max_len,
        eos_id=eos_id,
        bos_id=bos_id,
        pad_id=pad_id,
        kind=length_penalty,
        early_stopping=early_stopping,
        stages=default_stages(max_len) if stages is None else stages,
    )
    return (tokens, scores) if return_scores else tokens
