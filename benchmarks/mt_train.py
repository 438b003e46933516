"""mt_train: encoder-decoder V=8192 d=256 3+3 layers H=4 ff=1024 S=T=128 B=16, float32.

Matches the PyTorch peer's ``nn.Transformer`` (post-LN, GELU, shared embeddings tied to the
output head). Target tokens/s, median of 12 steps after compile.
Usage: python -m benchmarks.mt_train
"""

from __future__ import annotations

import jax
import optax

from attnzoo import backends
from attnzoo.models import encoder_decoder
from benchmarks.lm_train import mean_cross_entropy
from benchmarks.protocol import LR, MT, emit, first_call, mt_flops_per_tgt_token, timeit


def config() -> encoder_decoder.Config:
    return encoder_decoder.Config.tiny().replace(
        vocab_size=MT["vocab"],
        d_model=MT["d_model"],
        n_encoder_layers=MT["enc_layers"],
        n_decoder_layers=MT["dec_layers"],
        n_heads=MT["n_heads"],
        d_ff=MT["d_ff"],
        activation="gelu",
        pre_norm=False,
        dropout=0.0,
    )


def main(peer: str = "attnzoo") -> dict:
    cfg = config()
    graphdef, params = encoder_decoder.init(cfg, jax.random.key(0))
    opt = optax.adamw(LR)

    def loss_fn(params, src, tgt_in, tgt_out):
        hidden = encoder_decoder.apply(graphdef, params, src, tgt_in, return_hidden=True)
        head = encoder_decoder.output_head(graphdef, params)
        return mean_cross_entropy(head, hidden, tgt_out)

    def step(params, opt_state, src, tgt_in, tgt_out):
        loss, grads = jax.value_and_grad(loss_fn)(params, src, tgt_in, tgt_out)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    src = jax.random.randint(jax.random.key(1), (MT["batch"], MT["src"]), 1, MT["vocab"])
    tgt = jax.random.randint(jax.random.key(2), (MT["batch"], MT["tgt"] + 1), 1, MT["vocab"])
    state = [params, opt.init(params)]

    def run():
        state[0], state[1], loss = step(state[0], state[1], src, tgt[:, :-1], tgt[:, 1:])
        return loss

    _, first = first_call(run, sync=jax.block_until_ready)
    med, ts = timeit(run, warmup=2, iters=12, sync=jax.block_until_ready)
    fpt, _ = mt_flops_per_tgt_token()
    n_params = sum(p.size for p in jax.tree.leaves(state[0]))
    return emit(
        peer,
        "mt_train",
        "train_tokens_per_s",
        MT["batch"] * MT["tgt"] / med,
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
    main()
