"""Token-level losses: cross-entropy with label smoothing, z-loss, and padding weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _softmax_stats(logits: jax.Array, targets: jax.Array):
    """logits [..., V] float32, targets [...] int -> (log Z, label logit, sum of logits, max).

    Smoothed cross-entropy, z-loss and accuracy are all functions of these four, so the loss
    never materialises a one-hot [..., V] array or a second softmax for label smoothing, and
    accuracy needs no argmax (slow on XLA:CPU at large V).
    """
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z, label, jnp.sum(logits, axis=-1), jnp.max(logits, axis=-1)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Weighted sums of per-token losses; divide by ``weight`` for means.

    Args:
      logits: [B, T, V], any float dtype (the loss is computed in float32).
      targets: [B, T] int.
      weights: [B, T] float, 0 on padding.
      label_smoothing: the paper's epsilon_ls: the target distribution puts ``1 - eps`` on the
        label and ``eps / V`` on every class (section 5.4 uses 0.1).
      z_loss: coefficient of ``log(Z)^2`` (PaLM), keeping the softmax normaliser near 1.

    Returns:
      ``loss`` (what is optimised: smoothed CE + z-loss), ``nll`` (plain negative
      log-likelihood, for perplexity), ``z_loss``, ``weight`` (number of real tokens), and
      ``correct`` (argmax hits), all summed over tokens.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"logits {logits.shape}, targets {targets.shape} and weights {weights.shape} "
            "must agree on [B, T]"
        )
    V = logits.shape[-1]
    weights = weights.astype(jnp.float32)
    log_z, label_logit, total, max_logit = _softmax_stats(logits.astype(jnp.float32), targets)
    nll = log_z - label_logit
    # -sum_c q_c log p_c with q = (1 - eps) onehot + eps / V
    ce = nll
    if label_smoothing:
        ce = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - total / V)
    z = z_loss * jnp.square(log_z)
    # the label is the argmax when its logit is the maximum (ties count as hits)
    correct = (label_logit >= max_logit).astype(jnp.float32)
    total_of = lambda x: jnp.sum(x * weights)
    return dict(
        loss=total_of(ce + z),
        nll=total_of(nll),
        z_loss=total_of(z),
        weight=jnp.sum(weights),
        correct=total_of(correct),
    )
