"""Token-level losses: cross-entropy with label smoothing, z-loss, and padding weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    label_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - label_logit
    if label_smoothing:
        one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
        smoothed = optax.smooth_labels(one_hot, label_smoothing)
        ce = optax.softmax_cross_entropy(logits, smoothed)
    else:
        ce = nll
    z = z_loss * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    total = lambda x: jnp.sum(x * weights)
    return dict(
        loss=total(ce + z),
        nll=total(nll),
        z_loss=total(z),
        weight=jnp.sum(weights),
        correct=total(correct),
    )
