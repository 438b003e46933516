"""The programs that run on accelerators lower for TPU and CUDA from this CPU host.

The attention default is chosen at trace time from ``jax.default_backend()``: here an XLA path
(never splash-interpret or cuDNN), which lowers for every platform. An explicit
``attention_impl="splash"`` lowers the compiled Mosaic kernel for TPU (interpret mode is only
its CPU lowering).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.decoding import generation
from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.training import optim, schema, steps

PLATFORMS = ("tpu", "cuda")
B, T, V = 2, 128, 64


def _lm_cfg(**kw):
    return decoder_lm.Config.tiny(vocab_size=V).replace(d_model=64, n_layers=1, n_heads=2, **kw)


def _lm_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, V, (B, T + 1)).astype(np.int32)
    ids = np.ones((B, T), np.int32)
    ids[0, T // 2 :] = 2
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=ids,
        positions=np.stack([np.tile(np.arange(T // 2), 2), np.arange(T)]).astype(np.int32),
        weights=np.ones((B, T), np.float32),
    )


def _mt_batch():
    rng = np.random.default_rng(0)
    tgt = rng.integers(1, V, (B, T + 1)).astype(np.int32)
    ids = np.ones((B, T), np.int32)
    pos = np.arange(T, dtype=np.int32)[None].repeat(B, 0)
    return dict(
        src=rng.integers(1, V, (B, T)).astype(np.int32),
        tgt_inputs=tgt[:, :-1],
        tgt_targets=tgt[:, 1:],
        src_segment_ids=ids,
        tgt_segment_ids=ids,
        src_positions=pos,
        tgt_positions=pos,
        tgt_weights=np.ones((B, T), np.float32),
    )


def _train_step(task, cfg, init):
    graphdef, params = init(cfg, jax.random.key(0))
    c = schema.get_config()
    tx, _ = optim.make_optimizer(c, d_model=cfg.d_model)
    step = functools.partial(steps.train_step, graphdef=graphdef, tx=tx, task=task)
    return steps.create_state(params, tx, 0), step


def _export(fn, platform, *args):
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lm_forward_and_train_step_lower_for(platform):
    cfg = _lm_cfg()
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    batch = _lm_batch()
    forward = functools.partial(decoder_lm.apply, graphdef)
    _export(forward, platform, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    state, step = _train_step("lm", cfg, decoder_lm.init)
    text = _export(step, platform, state, batch, jax.random.key(1))
    assert "tpu_custom_call" not in text  # the CPU host's default is an XLA path


@pytest.mark.parametrize("platform", PLATFORMS)
def test_mt_train_step_lowers_for(platform):
    cfg = encoder_decoder.Config.tiny(vocab_size=V).replace(d_model=64, n_heads=2)
    state, step = _train_step("mt", cfg, encoder_decoder.init)
    _export(step, platform, state, _mt_batch(), jax.random.key(1))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_generate_lowers_for(platform):
    cfg = _lm_cfg()
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

    def generate(params, tokens, lengths):
        return generation._generate(
            graphdef,
            params,
            tokens,
            lengths,
            jax.random.key(0),
            f32(1.0),
            f32(1.0),
            f32(0.0),
            f32(1.0),
            cfg=cfg,
            max_new_tokens=4,
            cache_len=12,
            sampler="greedy",
            top_k=None,
            use_top_p=False,
            use_min_p=False,
            use_penalty=False,
            stop_tokens=(),
            pad_id=0,
            stages=2,
        )

    tokens = jnp.ones((B, 8), jnp.int32)
    _export(generate, platform, params, tokens, jnp.full((B,), 8, jnp.int32))


def test_lm_train_step_with_splash_lowers_the_kernel_for_tpu():
    state, step = _train_step("lm", _lm_cfg(attention_impl="splash"), decoder_lm.init)
    text = _export(step, "tpu", state, _lm_batch(), jax.random.key(1))
    assert "tpu_custom_call" in text
