"""decode_levers: what fewer weight bytes would buy lm_generate on this machine.

A float32 decode step is bound by DRAM bandwidth (``memory_floor``), so the only levers left
are fewer bytes per step. This times ``generate`` at the lm_generate protocol (B=8, prompt 16,
128 greedy new tokens) for three models in one process, calls alternating so that the VM's
neighbours slow all of them alike:

* ``float32``: the protocol's model;
* ``head_halved``: V=4096, i.e. a 4 MiB head instead of 8. No exact head screening (a
  bfloat16 or int8 copy of the head that picks the candidates for exact float32 logits) can
  stream fewer head bytes than this, so its ratio bounds what screening could gain;
* ``bfloat16``: parameters and matmuls in bfloat16 (outside the float32 protocol): every
  weight byte halved.

Each record's ``time_ratio`` is the median over rounds of (variant call / float32 call).
Not part of ``make bench`` (~3 minutes). Usage: python -m benchmarks.decode_levers [rounds]
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo import backends
from attnzoo.decoding import generate
from attnzoo.models import decoder_lm
from benchmarks.lm_train import config
from benchmarks.protocol import LM, emit


def variants() -> dict[str, decoder_lm.Config]:
    base = config()
    return {
        "float32": base,
        "head_halved": dataclasses.replace(base, vocab_size=base.vocab_size // 2),
        "bfloat16": dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16"),
    }


def main(rounds: int = 16) -> list[dict]:
    B, P, N = LM["batch"], LM["prompt"], LM["gen"]
    # ids valid in every variant's vocabulary; no stop tokens, so every call decodes N tokens
    prompts = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 1, LM["vocab"] // 2))
    calls = {}
    for name, cfg in variants().items():
        graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
        calls[name] = lambda g=graphdef, p=params, c=cfg: generate(
            g, p, c, prompts, max_new_tokens=N
        )
        jax.block_until_ready(calls[name]())  # compile
    ts = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts[name].append(time.perf_counter() - t0)
    base = np.asarray(ts["float32"])
    return [
        emit(
            "attnzoo",
            "decode_levers",
            "gen_tokens_per_s",
            B * N / float(np.median(t)),
            "tokens/s",
            extra=dict(
                variant=name,
                time_ratio=round(float(np.median(np.asarray(t) / base)), 3),
                best_tokens_per_s=round(B * N / min(t), 1),
                rounds=rounds,
            ),
        )
        for name, t in ts.items()
    ]


if __name__ == "__main__":
    backends.tune_for_platform()  # as the CLIs do; before the backend starts
    jnp.zeros(())
    main(*(int(a) for a in sys.argv[1:2]))
