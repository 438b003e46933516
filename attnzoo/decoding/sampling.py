"""Token samplers: small pure functions over next-token logits ``[B, V]``.

Each filter returns logits with the disallowed tokens set to ``-inf``, so they compose in the
order Hugging Face applies them (repetition penalty, temperature, top-k, top-p, min-p) and the
final draw is one ``jax.random.categorical``. Everything is traceable: the whole decoding loop,
sampler included, compiles into one XLA program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SAMPLERS = ("greedy", "sample", "top_k", "top_p", "min_p")


def validate(
    sampler: str,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> None:
    """Raises a ValueError naming the bad option and the fix."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    options = {"top_k": top_k, "top_p": top_p, "min_p": min_p}
    if options.get(sampler, 0) is None:
        raise ValueError(f"sampler={sampler!r} needs {sampler}=...; pass e.g. {sampler}=0.9")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to disable), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (or None to disable), got {min_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")


def greedy(logits: jax.Array) -> jax.Array:
    """logits: [B, V] -> [B] int32 argmax (the lowest id among ties, as torch/HF).

    Two plain reductions (max, then the smallest index holding it) rather than ``jnp.argmax``,
    whose paired (value, index) reduction some backends lower to a scalar loop
    (``benchmarks/README.md``, "Where each CPU measure lives").
    """
    # materialise [B, V]: fused into a transposed producer, both reductions would stride over V
    logits = jax.lax.optimization_barrier(logits)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, ids, logits.shape[-1]), axis=-1)


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """CTRL (Keskar et al. 2019) as Hugging Face applies it, to every token already seen.

    A seen token's logit is divided by ``penalty`` when positive and multiplied when negative,
    so ``penalty > 1`` always makes it less likely.

    logits: [B, V]; seen: [B, V] bool -> [B, V].
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest logits per row (and any tied with the k-th). [B, V] -> [B, V]."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (B, 1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus (Holtzman et al. 2020): the smallest set of most likely tokens with mass >= p.

    The most likely token is always kept. [B, V] -> [B, V].
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # (B, V) descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = mass_before < p
    # the smallest kept logit is the threshold; ties with it are kept too
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def min_p_filter(logits: jax.Array, min_p: float | jax.Array) -> jax.Array:
    """min-p (Nguyen et al. 2024): keeps tokens with prob >= min_p * max prob. [B, V] -> [B, V].

    Compared in log space: log p_i >= log min_p + log p_max  <=>  l_i >= l_max + log min_p.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits < top + jnp.log(min_p), -jnp.inf, logits)


def sample(
    logits: jax.Array,
    rng: jax.Array,
    *,
    sampler: str = "sample",
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    min_p: float | jax.Array | None = None,
) -> jax.Array:
    """Draws one token per row. logits: [B, V] -> [B] int32.

    ``sampler="greedy"`` is the argmax; every other sampler draws from the softmax of the
    temperature-scaled logits after whichever of ``top_k`` / ``top_p`` / ``min_p`` are set
    (``"top_k"`` etc. only insist that their option is given). ``top_k`` is static (it sets a
    shape); the float options may be traced, so changing them does not recompile.
    """
    if sampler == "greedy":
        return greedy(logits)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
