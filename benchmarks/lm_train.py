"""lm_train: decoder LM V=8192 d=256 L=4 H=4 ff=1024 T=256 B=8, float32, fwd+bwd+AdamW.

The architecture matches the PyTorch peer (pre-LN, GELU, learned positions, untied head).
Usage: python -m benchmarks.lm_train
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from attnzoo import backends
from attnzoo.models import decoder_lm
from attnzoo.models.positional import PositionConfig
from attnzoo.training import losses
from benchmarks.protocol import LM, LR, emit, first_call, lm_flops_per_token, timeit


def config(n_layers: int = LM["n_layers"], scan_layers: bool | None = None) -> decoder_lm.Config:
    kw = {} if scan_layers is None else {"scan_layers": scan_layers}
    return decoder_lm.Config(
        vocab_size=LM["vocab"],
        d_model=LM["d_model"],
        n_layers=n_layers,
        n_heads=LM["n_heads"],
        d_ff=LM["d_ff"],
        activation="gelu",
        tie_embeddings=False,
        position=PositionConfig(kind="learned", max_len=LM["seq"]),
        **kw,
    )


def mean_cross_entropy(head, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """The library's training loss, mean over tokens: head and loss fused as ``attnzoo-train``
    computes them (``losses.fused_cross_entropy``; ``fused_loss=True`` by default)."""
    sums = losses.fused_cross_entropy(head, hidden, targets, jnp.ones(targets.shape, jnp.float32))
    return sums["loss"] / sums["weight"]


def make_step(cfg: decoder_lm.Config):
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    opt = optax.adamw(LR)

    def loss_fn(params, inputs, targets):
        hidden = decoder_lm.apply(graphdef, params, inputs, return_hidden=True)
        return mean_cross_entropy(decoder_lm.output_head(graphdef, params), hidden, targets)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    return step, params, opt.init(params)


def main(peer: str = "attnzoo") -> dict:
    cfg = config()
    step, params, opt_state = make_step(cfg)
    x = jax.random.randint(jax.random.key(1), (LM["batch"], LM["seq"] + 1), 0, LM["vocab"])
    inputs, targets = x[:, :-1], x[:, 1:]
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], inputs, targets)
        return loss

    _, first = first_call(run, sync=jax.block_until_ready)
    med, ts = timeit(run, warmup=2, iters=12, sync=jax.block_until_ready)
    fpt, _ = lm_flops_per_token()
    n_params = sum(p.size for p in jax.tree.leaves(state[0]))
    return emit(
        peer,
        "lm_train",
        "train_tokens_per_s",
        LM["batch"] * LM["seq"] / med,
        "tokens/s",
        n_params,
        fpt,
        dict(
            version="jax " + jax.__version__,
            step_s_median=round(med, 4),
            first_step_s=round(first, 2),
            step_s_min=round(min(ts), 4),
        ),
    )


if __name__ == "__main__":
    backends.tune_for_platform()  # as the CLIs do; before the backend starts
    jnp.zeros(())  # initialise the backend before timing
    main()
