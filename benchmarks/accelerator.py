"""accelerator: the one-chip suite -- training MFU, attention kernels, generation.

* ``lm_train``: GPT-2 small (124M, ``decoder_lm.Config.gpt2_small``), seq 1024, bf16 compute,
  float32 params, AdamW, the library's ``steps.train_step`` (fused loss); tokens/s and MFU.
* ``mt_train``: ``encoder_decoder.Config.transformer_base``, src = tgt = 256, same step.
* ``attention``: causal self-attention forward+backward ms per implementation that runs on
  this backend (``default`` -- what the models pick --, ``einsum``, ``jax``, ``blockwise``
  everywhere, ``cudnn`` on CUDA, ``splash`` on TPU) at T = 1k, 4k, 16k (12 heads x 64,
  GPT-2 small's layer), bf16; a path that fails (out of memory) is recorded with ``"error"``.
* ``lm_generate``: GPT-2 small generation tokens/s at batch 1, 8 and 64 (prompt 128, 128 new
  tokens, greedy, KV cache).

MFU = tokens/s x FLOPs/token / peak, FLOPs/token = 6N + 12 L d T (``benchmarks.protocol``; N
= matmul weights incl. the output head). The peak is the chip's dense bf16 figure from
``PEAK_TFLOPS`` (by ``jax.devices()[0].device_kind``), unless ``PEAK_GFLOPS`` is set.

Prints one JSON line per measurement (the shared protocol, ``benchmarks.protocol.emit``), then
a markdown table. ``--smoke`` runs tiny shapes in float32 (CPU, the test suite).

Usage: python -m benchmarks.accelerator [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnzoo import backends
from attnzoo.decoding import generate
from attnzoo.models import attention, decoder_lm, encoder_decoder
from attnzoo.models.attention import dot_product_attention
from attnzoo.training import steps
from benchmarks.protocol import LR, emit, first_call, timeit

# Dense bf16 peak TFLOP/s per chip, matched (in order) against device_kind, lower-cased.
PEAK_TFLOPS = (
    ("h200", 989.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # v5p reports "TPU v5"
    ("tpu v4", 275.0),
)

FULL = dict(
    lm=dict(batch=16, seq=1024, steps=10),
    mt=dict(batch=64, seq=256, steps=10),
    attention=dict(lengths=(1024, 4096, 16384), heads=12, head_dim=64, iters=5),
    generate=dict(batches=(1, 8, 64), prompt=128, new=128),
    dtype="bfloat16",
)
SMOKE = dict(
    lm=dict(batch=2, seq=64, steps=2),
    mt=dict(batch=2, seq=32, steps=2),
    attention=dict(lengths=(128, 256), heads=2, head_dim=16, iters=2),
    generate=dict(batches=(1, 2), prompt=8, new=4),
    dtype="float32",
)


def chip() -> tuple[str, float | None]:
    """(device_kind, dense bf16 peak FLOP/s or None when the chip is not in the table)."""
    kind = jax.devices()[0].device_kind
    for key, tflops in PEAK_TFLOPS:
        if key in kind.lower():
            return kind, tflops * 1e12
    return kind, None


def _tiny_lm() -> decoder_lm.Config:
    return decoder_lm.Config.tiny(vocab_size=128).replace(d_model=64, n_layers=2, n_heads=2)


def _tiny_mt() -> encoder_decoder.Config:
    return encoder_decoder.Config.tiny(vocab_size=128).replace(d_model=64, n_heads=2)


def lm_config(smoke: bool, dtype: str) -> decoder_lm.Config:
    cfg = _tiny_lm() if smoke else decoder_lm.Config.gpt2_small()
    return cfg.replace(dtype=dtype, dropout=0.0)


def mt_config(smoke: bool, dtype: str) -> encoder_decoder.Config:
    cfg = _tiny_mt() if smoke else encoder_decoder.Config.transformer_base()
    return cfg.replace(dtype=dtype, dropout=0.0)


def lm_flops(cfg: decoder_lm.Config, T: int) -> tuple[int, int]:
    """(6N + 12 L d T per token, N): N = blocks' matmul weights + the output head."""
    d, L, f, V = cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.gated_mlp else 2) * d * f
    n = L * (4 * d * d + mlp) + d * V
    return 6 * n + 12 * L * d * T, n


def mt_flops(cfg: encoder_decoder.Config, S: int, T: int) -> tuple[int, int]:
    """Per target token: 6N + 12 d (Le S + Ld T + Ld S) (``protocol.mt_flops_per_tgt_token``)."""
    d, f, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    Le, Ld = cfg.n_encoder_layers, cfg.n_decoder_layers
    mlp = (3 if cfg.gated_mlp else 2) * d * f
    n = Le * (4 * d * d + mlp) + Ld * (8 * d * d + mlp) + d * V
    return 6 * n + 12 * d * (Le * S + Ld * T + Ld * S), n


def _train(task: str, cfg, init, batch: dict, n_steps: int):
    graphdef, params = init(cfg, jax.random.key(0))
    tx = optax.adamw(LR)
    step = jax.jit(
        functools.partial(steps.train_step, graphdef=graphdef, tx=tx, task=task),
        donate_argnums=0,
    )
    holder = [steps.create_state(params, tx, 0)]

    def run():
        holder[0], metrics = step(holder[0], batch, None)
        return metrics["loss"]

    loss, first = first_call(run, sync=jax.block_until_ready)
    med, ts = timeit(run, warmup=1, iters=n_steps, sync=jax.block_until_ready)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    return med, ts, first, float(loss), n_params


def bench_lm_train(smoke: bool, shapes: dict) -> dict:
    c = shapes["lm"]
    cfg = lm_config(smoke, shapes["dtype"])
    B, T = c["batch"], c["seq"]
    x = np.asarray(jax.random.randint(jax.random.key(1), (B, T + 1), 1, cfg.vocab_size))
    batch = dict(
        inputs=x[:, :-1],
        targets=x[:, 1:],
        segment_ids=np.ones((B, T), np.int32),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        weights=np.ones((B, T), np.float32),
    )
    batch = jax.tree.map(jnp.asarray, batch)
    med, ts, first, loss, n_params = _train("lm", cfg, decoder_lm.init, batch, c["steps"])
    fpt, _ = lm_flops(cfg, T)
    return emit(
        "attnzoo",
        "lm_train",
        "train_tokens_per_s",
        B * T / med,
        "tokens/s",
        n_params,
        fpt,
        _extra(batch=B, seq=T, dtype=cfg.dtype, step_s=med, first_s=first, loss=loss, ts=ts),
    )


def bench_mt_train(smoke: bool, shapes: dict) -> dict:
    c = shapes["mt"]
    cfg = mt_config(smoke, shapes["dtype"])
    B, T = c["batch"], c["seq"]
    rng = np.random.default_rng(0)
    tgt = rng.integers(1, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    ones = np.ones((B, T), np.int32)
    batch = dict(
        src=rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32),
        tgt_inputs=tgt[:, :-1],
        tgt_targets=tgt[:, 1:],
        src_segment_ids=ones,
        tgt_segment_ids=ones,
        src_positions=pos,
        tgt_positions=pos,
        tgt_weights=ones.astype(np.float32),
    )
    batch = jax.tree.map(jnp.asarray, batch)
    med, ts, first, loss, n_params = _train("mt", cfg, encoder_decoder.init, batch, c["steps"])
    fpt, _ = mt_flops(cfg, T, T)
    return emit(
        "attnzoo",
        "mt_train",
        "train_tgt_tokens_per_s",
        B * T / med,
        "tokens/s",
        n_params,
        fpt,
        _extra(batch=B, seq=T, dtype=cfg.dtype, step_s=med, first_s=first, loss=loss, ts=ts),
    )


def attention_paths() -> tuple[str, ...]:
    """The implementations this backend runs natively (splash is only interpreted on CPU)."""
    backend = jax.default_backend()
    kernels = {"gpu": ("cudnn",), "tpu": ("splash",)}.get(backend, ())
    return ("default", *attention.IMPLEMENTATIONS, *kernels)


def bench_attention(shapes: dict) -> list[dict]:
    c = shapes["attention"]
    dtype = jnp.dtype(shapes["dtype"])
    N, H = c["heads"], c["head_dim"]
    recs = []
    for T in c["lengths"]:
        keys = jax.random.split(jax.random.key(T), 4)
        q, k, v, dout = (jax.random.normal(key, (1, T, N, H), dtype) for key in keys)
        for path in attention_paths():

            def step(q, k, v, dout, path=path):
                impl = None if path == "default" else path  # default: what the models run
                attn = functools.partial(dot_product_attention, causal=True, implementation=impl)
                _, vjp = jax.vjp(attn, q, k, v)
                return vjp(dout)

            fn = jax.jit(step)
            extra: dict = dict(path=path, T=T, heads=N, head_dim=H, dtype=dtype.name)
            if path == "default":
                extra["default"] = attention.default_implementation(T)
            try:
                _, first = first_call(lambda fn=fn: fn(q, k, v, dout), sync=jax.block_until_ready)
                med, ts = timeit(
                    lambda fn=fn: fn(q, k, v, dout),
                    warmup=1,
                    iters=c["iters"],
                    sync=jax.block_until_ready,
                )
            except Exception as e:  # out of memory, or a kernel that refuses the shape
                extra["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                recs.append(emit("attnzoo", "attention", "fwd_bwd_ms", 0.0, "ms", extra=extra))
                continue
            # causal attention FLOPs (fwd 2 matmuls + bwd 5, half the [T, T] square each)
            flops = 7 * 2 * T * T * H * N / 2
            extra.update(first_s=round(first, 2), tflops=round(flops / med / 1e12, 2))
            recs.append(emit("attnzoo", "attention", "fwd_bwd_ms", med * 1e3, "ms", extra=extra))
    return recs


def bench_generate(smoke: bool, shapes: dict) -> list[dict]:
    c = shapes["generate"]
    cfg = lm_config(smoke, shapes["dtype"])
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    P, new = c["prompt"], c["new"]
    _, n = lm_flops(cfg, P + new)
    fpt = 2 * n + 4 * cfg.n_layers * cfg.d_model * (P + new // 2)
    recs = []
    for B in c["batches"]:
        prompts = np.asarray(jax.random.randint(jax.random.key(B), (B, P), 1, cfg.vocab_size))

        def run(prompts=prompts):
            return generate(graphdef, params, cfg, prompts, max_new_tokens=new)

        _, first = first_call(run, sync=jax.block_until_ready)
        med, ts = timeit(run, warmup=1, iters=3, sync=jax.block_until_ready)
        recs.append(
            emit(
                "attnzoo",
                "lm_generate",
                "gen_tokens_per_s",
                B * new / med,
                "tokens/s",
                sum(p.size for p in jax.tree.leaves(params)),
                fpt,
                _extra(batch=B, prompt=P, new_tokens=new, dtype=cfg.dtype, step_s=med,
                       first_s=first, ts=ts),
            )
        )  # fmt: skip
    return recs


def _extra(*, step_s: float, first_s: float, ts: list[float], **kw) -> dict:
    kind, _ = chip()
    return dict(
        kw,
        device=kind,
        version="jax " + jax.__version__,
        call_s_median=round(step_s, 4),
        call_s_min=round(min(ts), 4),
        first_call_s=round(first_s, 2),
    )


def table(recs: list[dict]) -> str:
    """The records as a markdown table."""
    rows = [
        "| task | metric | config | value | unit | MFU |",
        "|---|---|---|---:|---|---:|",
    ]
    for r in recs:
        if r["task"] == "attention":
            config = f"{r['path']} T={r['T']}"
        else:
            config = f"B={r['batch']} " + (
                f"T={r['seq']}" if "seq" in r else f"P={r['prompt']}+{r['new_tokens']}"
            )
        value = "error" if r.get("error") else f"{r['value']:,.2f}"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        rows.append(f"| {r['task']} | {r['metric']} | {config} | {value} | {r['unit']} | {mfu} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny float32 shapes (CPU, tests)")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=("lm_train", "mt_train", "attention", "lm_generate"),
        help="run only these parts",
    )
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    kind, peak = chip()
    if peak is not None and not os.environ.get("PEAK_GFLOPS"):
        os.environ["PEAK_GFLOPS"] = str(peak / 1e9)  # read by protocol.emit for the MFU
    parts = args.only or ("lm_train", "mt_train", "attention", "lm_generate")
    t0 = time.perf_counter()
    recs: list[dict] = []
    if "lm_train" in parts:
        recs.append(bench_lm_train(args.smoke, shapes))
    if "mt_train" in parts:
        recs.append(bench_mt_train(args.smoke, shapes))
    if "attention" in parts:
        recs += bench_attention(shapes)
    if "lm_generate" in parts:
        recs += bench_generate(args.smoke, shapes)
    peak_note = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (set PEAK_GFLOPS)"
    print(f"\n## {kind}: dense bf16 peak {peak_note}, {time.perf_counter() - t0:.0f} s\n")
    print(table(recs), flush=True)
    return recs


if __name__ == "__main__":
    backends.tune_for_platform()  # as the CLIs do; before the backend starts
    jnp.zeros(())  # initialise the backend before timing
    main()
