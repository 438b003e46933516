"""The Flax reference peer: a Linen decoder LM written the way Flax's ``examples/lm1b`` is.

    python -m benchmarks.flax_peer {lm_train|lm_generate}

The issue targets name "a flax reference decoder with its decode cache" as the yardstick for
``lm_generate`` (target: 2.5x it) and Flax's reference examples for training. This is that
reference, rebuilt for the protocol's shapes (``benchmarks.protocol.LM``) because the examples
themselves download their data: the same architecture as ours and the PyTorch peer (pre-LN,
exact GELU, learned positions, untied head), with lm1b's structure. Linen's
``MultiHeadDotProductAttention(decode=True)`` keeps the KV cache in a ``"cache"`` collection;
generation follows ``lm1b/decode.py``'s ``temperature_sample``: one compiled ``while_loop`` that
feeds one token per step, prompt tokens included (no prefill), over the full-length cache,
taking the argmax (greedy). Training: ``optax.adamw`` on the Linen params, mean token cross
entropy, one jitted step with donated state.
"""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from benchmarks.protocol import LM, LR, emit, first_call, lm_flops_per_token, timeit


class Block(nn.Module):
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=LM["n_heads"], qkv_features=LM["d_model"], decode=self.decode
        )(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm()(x)
        y = nn.Dense(LM["d_ff"])(y)
        y = nn.gelu(y, approximate=False)
        return x + nn.Dense(LM["d_model"])(y)


class DecoderLM(nn.Module):
    """tokens [B, T] -> logits [B, T, V]; with ``decode=True``, T is 1 and the cache advances."""

    decode: bool = False
    max_len: int = LM["seq"]

    @nn.compact
    def __call__(self, tokens):
        B, T = tokens.shape
        x = nn.Embed(LM["vocab"], LM["d_model"])(tokens)  # (B, T, d)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, LM["d_model"]))
        if self.decode:  # lm1b's AddPositionEmbs: the position is a counter in the cache
            is_init = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            start = index.value if is_init else 0
            if is_init:
                index.value = index.value + T
            x = x + jax.lax.dynamic_slice_in_dim(pos, start, T)[None]
            mask = None  # the attention cache masks slots past its own index
        else:
            x = x + pos[None, :T]
            mask = nn.make_causal_mask(tokens)
        for _ in range(LM["n_layers"]):
            x = Block(decode=self.decode)(x, mask)
        x = nn.LayerNorm()(x)
        return nn.Dense(LM["vocab"])(x)  # (B, T, V), untied head


def lm_train() -> dict:
    model = DecoderLM()
    x = jax.random.randint(jax.random.key(1), (LM["batch"], LM["seq"] + 1), 0, LM["vocab"])
    inputs, targets = x[:, :-1], x[:, 1:]
    params = model.init(jax.random.key(0), inputs)["params"]
    opt = optax.adamw(LR)

    def loss_fn(params):
        logits = model.apply({"params": params}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, opt.init(params)]

    def run():
        state[0], state[1], loss = step(state[0], state[1])
        return loss

    _, first = first_call(run, sync=jax.block_until_ready)
    med, ts = timeit(run, warmup=2, iters=12, sync=jax.block_until_ready)
    fpt, _ = lm_flops_per_token()
    return emit(
        "flax-linen",
        "lm_train",
        "train_tokens_per_s",
        LM["batch"] * LM["seq"] / med,
        "tokens/s",
        sum(p.size for p in jax.tree.leaves(state[0])),
        fpt,
        dict(
            version="flax " + _flax_version(),
            step_s_median=round(med, 4),
            first_step_s=round(first, 2),
        ),
    )


def lm_generate() -> dict:
    B, P, N = LM["batch"], LM["prompt"], LM["gen"]
    L = P + N
    params = DecoderLM().init(jax.random.key(0), jnp.ones((B, P), jnp.int32))["params"]
    model = DecoderLM(decode=True)
    prompts = jnp.asarray(jax.random.randint(jax.random.key(1), (B, P), 1, LM["vocab"]))

    @jax.jit
    def generate(params, prompts):
        cache = model.init(jax.random.key(0), jnp.ones((B, L), jnp.int32))["cache"]
        seqs = jnp.zeros((B, L), jnp.int32).at[:, :P].set(prompts)

        def body(state):
            i, seqs, cache = state
            tok = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=1)  # (B, 1)
            logits, new = model.apply(
                {"params": params, "cache": cache}, tok, mutable=["cache"]
            )  # (B, 1, V)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            nxt = jnp.where(i + 1 < P, seqs[:, i + 1], nxt)  # still inside the prompt: force it
            seqs = jax.lax.dynamic_update_slice_in_dim(seqs, nxt[:, None], i + 1, axis=1)
            return i + 1, seqs, new["cache"]

        _, seqs, _ = jax.lax.while_loop(lambda s: s[0] < L - 1, body, (0, seqs, cache))
        return seqs

    def run():
        return generate(params, prompts)

    seqs, compile_s = first_call(run, sync=jax.block_until_ready)
    # The peer must be a correct greedy decoder, or the ratio means nothing: its cached tokens
    # are the argmax of one full (uncached) forward pass over the finished sequences.
    full = jnp.argmax(DecoderLM().apply({"params": params}, seqs)[:, P - 1 : L - 1], axis=-1)
    agree = float(jnp.mean(full == seqs[:, P:]))
    if agree < 0.99:
        raise AssertionError(
            f"flax peer: cached greedy tokens disagree with the full pass ({agree})"
        )
    med, ts = timeit(run, warmup=1, iters=10, sync=jax.block_until_ready)
    _, n = lm_flops_per_token()
    return emit(
        "flax-linen",
        "lm_generate",
        "gen_tokens_per_s",
        B * N / med,
        "tokens/s",
        sum(p.size for p in jax.tree.leaves(params)),
        2 * n + 4 * LM["n_layers"] * LM["d_model"] * (P + N // 2),
        dict(
            version="flax " + _flax_version(),
            compile_s=round(compile_s, 2),
            call_s_median=round(med, 4),
            best_tokens_per_s=round(B * N / min(ts), 1),
            agrees_with_full_pass=agree,
        ),
    )


def _flax_version() -> str:
    import flax

    return flax.__version__


TASKS = {"lm_train": lm_train, "lm_generate": lm_generate}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python -m benchmarks.flax_peer {{{'|'.join(TASKS)}}}")
    jnp.zeros(())  # initialise the backend before timing
    TASKS[sys.argv[1]]()
