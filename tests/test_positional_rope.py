"""RoPE and its scalings against Hugging Face transformers' PyTorch code (random inputs, 1e-5).

References: LLaMA's ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` (half layout, all
``ROPE_INIT_FUNCTIONS`` scalings), GPT-J's ``apply_rotary_pos_emb`` (interleaved), GPT-NeoX's
(partial rotary). Plus the relative-position property and bad-input errors.
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox import modeling_gpt_neox as hf_neox
from transformers.models.gptj import modeling_gptj as hf_gptj
from transformers.models.llama import modeling_llama as hf_llama

from attnzoo.models.positional import PositionConfig
from attnzoo.models.positional.rope import apply_rope, rope_inv_freq

B, T, N, H = 2, 12, 3, 16
ORIGINAL = 64  # short pre-extension context so positions below exceed it


def _close(got, want, *, atol, label):
    """assert_allclose (absolute) printing the max abs error (``pytest -s | grep max_abs_err``)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()
    print(f"max_abs_err {label}: {err:.1e}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


# (our keyword options, Hugging Face rope_parameters)
SCALINGS = {
    "default": ({}, {"rope_type": "default"}),
    "linear": ({"scaling": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ({"scaling": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
    "yarn": (
        {"scaling": "yarn", "factor": 8.0, "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "original_max_position_embeddings": ORIGINAL,
        },
    ),
    "llama3": (
        {
            "scaling": "llama3",
            "factor": 8.0,
            "llama3_low_freq_factor": 1.0,
            "llama3_high_freq_factor": 4.0,
        },
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
    ),
}


def _llama_config(rope_parameters: dict, *, base: float = 500.0) -> LlamaConfig:
    # a small base spreads the frequencies so every YaRN / Llama-3 band holds some dims
    return LlamaConfig(
        hidden_size=N * H,
        num_attention_heads=N,
        head_dim=H,
        max_position_embeddings=ORIGINAL,
        rope_parameters={"rope_theta": base, **rope_parameters},
    )


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _positions(max_pos: int, seed=1):
    return np.sort(np.random.default_rng(seed).integers(0, max_pos, (B, T)), axis=1)


@pytest.mark.parametrize("name", SCALINGS)
def test_inv_freq_matches_hf_rope_init_functions(name):
    ours, hf = SCALINGS[name]
    hf_cfg = _llama_config(hf)
    config = PositionConfig(
        kind="rope",
        rope_base=500.0,
        rope_original_max_len=ORIGINAL,
        rope_scaling=ours.get("scaling"),
        rope_factor=ours.get("factor", 1.0),
        **{k: v for k, v in ours.items() if k not in ("scaling", "factor")},
    )
    for seq_len in (ORIGINAL, 3 * ORIGINAL):
        if name == "default":
            want, want_factor = hf_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
                hf_cfg
            )
        else:
            want, want_factor = ROPE_INIT_FUNCTIONS[name](hf_cfg, None, seq_len=seq_len)
        got, got_factor = rope_inv_freq(config, H, seq_len=seq_len)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        assert got_factor == pytest.approx(want_factor, rel=1e-7)
    if name == "yarn":
        assert got_factor > 1.0  # the mscale really is exercised


@pytest.mark.parametrize("name", SCALINGS)
def test_half_layout_matches_llama_apply_rotary_pos_emb(name):
    ours, hf = SCALINGS[name]
    q, k = _random((B, T, N, H), 0), _random((B, T, N, H), 1)
    pos = _positions(4 * ORIGINAL)  # beyond the original context: dynamic NTK kicks in
    rotary = hf_llama.LlamaRotaryEmbedding(_llama_config(hf))
    cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(pos))
    want_q, want_k = hf_llama.apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(k), cos, sin, unsqueeze_dim=2
    )  # [B, T, N, H]
    kw = dict(base=500.0, original_max_len=ORIGINAL, **ours)
    got_q = apply_rope(jnp.asarray(q), jnp.asarray(pos), **kw)
    got_k = apply_rope(jnp.asarray(k), jnp.asarray(pos), **kw)
    _close(got_q, want_q.numpy(), atol=1e-5, label=f"rope {name} vs llama q")
    _close(got_k, want_k.numpy(), atol=1e-5, label=f"rope {name} vs llama k")
    assert not np.allclose(got_q, q, atol=1e-2)  # something was rotated


@pytest.mark.parametrize("rotary_dim", [H, 8])
def test_interleaved_layout_matches_gptj(rotary_dim):
    x = _random((B, T, N, H))
    pos = _positions(200)
    cfg = GPTJConfig(n_embd=N * H, n_head=N, rotary_dim=rotary_dim, n_positions=256)
    sin, cos = hf_gptj.GPTJRotaryEmbedding(cfg)(torch.from_numpy(x), torch.from_numpy(pos))
    xt = torch.from_numpy(x)
    rot = hf_gptj.apply_rotary_pos_emb(xt[..., :rotary_dim], sin, cos)
    want = torch.cat([rot, xt[..., rotary_dim:]], dim=-1).numpy()
    got = apply_rope(
        jnp.asarray(x), jnp.asarray(pos), layout="interleaved", fraction=rotary_dim / H
    )
    _close(got, want, atol=1e-5, label=f"rope interleaved R={rotary_dim} vs gptj")


def test_partial_rotary_matches_gpt_neox():
    q, k = _random((B, T, N, H), 2), _random((B, T, N, H), 3)
    pos = _positions(300)
    cfg = GPTNeoXConfig(
        hidden_size=N * H, num_attention_heads=N, rotary_pct=0.25, max_position_embeddings=512
    )
    cos, sin = hf_neox.GPTNeoXRotaryEmbedding(cfg)(torch.from_numpy(q), torch.from_numpy(pos))
    want_q, _ = hf_neox.apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(k), cos, sin, unsqueeze_dim=2
    )
    got = apply_rope(jnp.asarray(q), jnp.asarray(pos), fraction=0.25)
    _close(got, want_q.numpy(), atol=1e-5, label="rope partial 0.25 vs gpt-neox")
    np.testing.assert_array_equal(got[..., 4:], q[..., 4:])  # the unrotated 3/4 pass through


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(-500, 500),
    layout=st.sampled_from(["half", "interleaved"]),
    scaling=st.sampled_from([None, "linear", "yarn", "llama3"]),
)
def test_scores_depend_only_on_offset(m, n, shift, layout, scaling):
    q, k = _random((1, 1, 1, H), 4), _random((1, 1, 1, H), 5)
    kw = dict(layout=layout, scaling=scaling, factor=4.0, original_max_len=ORIGINAL)

    def score(mq, nk):
        rq = apply_rope(q, jnp.full((1, 1), mq), **kw)
        rk = apply_rope(k, jnp.full((1, 1), nk), **kw)
        return float(jnp.sum(rq * rk))

    shift = max(shift, -min(m, n))  # keep positions non-negative
    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=2e-4)


def test_bfloat16_in_bfloat16_out_computed_in_float32():
    x = _random((B, T, N, H))
    pos = _positions(100)
    got = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos))
    assert got.dtype == jnp.bfloat16
    want = apply_rope(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), jnp.asarray(pos))
    np.testing.assert_allclose(got.astype(np.float32), want, atol=3e-2)


def test_jit_grad_vmap():
    x = jnp.asarray(_random((B, T, N, H)))
    pos = jnp.asarray(_positions(100))
    f = jax.jit(lambda x: apply_rope(x, pos, scaling="dynamic", factor=2.0, original_max_len=8))
    np.testing.assert_allclose(
        f(x), apply_rope(x, pos, scaling="dynamic", factor=2.0, original_max_len=8), atol=1e-6
    )
    # a rotation preserves norms, so d|R x|^2 / dx = 2x
    g = jax.grad(lambda x: jnp.sum(apply_rope(x, pos) ** 2))(x)
    np.testing.assert_allclose(g, 2 * x, atol=1e-5)
    per_row = jax.vmap(lambda xi, pi: apply_rope(xi[None], pi[None])[0])(x, pos)
    np.testing.assert_allclose(per_row, apply_rope(x, pos), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fraction=0.2), "must be even"),  # int(16 * 0.2) = 3 dims
        (dict(scaling="ntk"), "unknown rope_scaling"),
        (dict(layout="gptj"), "unknown rope_layout"),
        (dict(scaling="linear", factor=0.5), "rope_factor must be >= 1"),
        (
            dict(
                scaling="llama3",
                factor=8.0,
                llama3_low_freq_factor=4.0,
                llama3_high_freq_factor=1.0,
            ),
            "llama3_high_freq_factor",
        ),
    ],
)
def test_bad_options_have_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_rope(jnp.zeros((1, 2, 1, H)), jnp.zeros((1, 2), jnp.int32), **kwargs)
