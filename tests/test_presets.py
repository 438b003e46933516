"""Parameter counts of every preset via ``jax.eval_shape`` (no memory), against independent
formulas and published numbers (Hugging Face checkpoints; Table 3 of Vaswani et al. 2017)."""

import jax
import pytest

from attnzoo.models import decoder_lm
from attnzoo.models import encoder_decoder as ed


def _gpt2(V, D, L, P=1024):
    # wte + wpe + L * (qkv+o weights 4D^2 and biases 4D, mlp 8D^2 + 5D, two LayerNorms 4D) + ln_f
    return V * D + P * D + L * (12 * D * D + 13 * D) + 2 * D


def _llama(V, D, L, N, K, F, H=None):
    H = H or D // N
    attn = D * N * H + 2 * D * K * H + N * H * D
    return 2 * V * D + L * (attn + 3 * D * F + 2 * D) + D  # untied head, RMSNorm scales only


def _post_ln_layer(D, F, attentions):
    # per attention: 4 (D^2 + D); FFN 2DF + F + D; one LayerNorm (2D) per sub-layer
    return attentions * (4 * (D * D + D) + 2 * D) + 2 * D * F + F + D + 2 * D


def _t5(V, D, L, N, F, H=None, gated=False, tied=True, buckets=32):
    H = H or D // N
    attn, ffn = 4 * D * N * H, (3 if gated else 2) * D * F
    enc = L * (attn + ffn + 2 * D) + D
    dec = L * (2 * attn + ffn + 3 * D) + D
    return (1 if tied else 2) * V * D + enc + dec + 2 * buckets * N  # one bias table per stack


DECODER_LM = {
    "tiny": 256 * 128 + 2 * _post_ln_layer(128, 512, 1) + 2 * 128,  # pre-LN: plus a final norm
    "vaswani_lm": 32000 * 512 + 6 * _post_ln_layer(512, 2048, 1),
    "gpt2": 124_439_808,  # Hugging Face "gpt2"
    "gpt2_small": 124_439_808,
    "gpt2_medium": _gpt2(50257, 1024, 24),  # 354,823,168
    "gpt2_large": _gpt2(50257, 1280, 36),  # 774,030,080
    "gpt2_xl": _gpt2(50257, 1600, 48),  # 1,557,611,200
    "llama": 6_738_415_616,  # LLaMA 7B (Touvron et al. 2023; Hugging Face "llama-7b")
    "llama_small": _llama(32000, 768, 12, 12, 4, 2048),
}

ENCODER_DECODER = {
    "tiny": 256 * 128 + 2 * _post_ln_layer(128, 512, 1) + 2 * _post_ln_layer(128, 512, 2),
    "transformer_base": 37000 * 512
    + 6 * _post_ln_layer(512, 2048, 1)
    + 6 * _post_ln_layer(512, 2048, 2),
    "transformer_big": 37000 * 1024
    + 6 * _post_ln_layer(1024, 4096, 1)
    + 6 * _post_ln_layer(1024, 4096, 2),
    "t5_small": 60_506_624,  # Hugging Face "t5-small"
    "t5_v1_1_small": 76_961_152,  # Hugging Face "google/t5-v1_1-small"
}


def test_every_preset_has_an_expected_count():
    assert set(DECODER_LM) == set(decoder_lm.Config.presets())
    assert set(ENCODER_DECODER) == set(ed.Config.presets())


def test_formulas_agree_with_published_numbers():
    assert _gpt2(50257, 768, 12) == 124_439_808
    assert _llama(32000, 4096, 32, 32, 32, 11008) == 6_738_415_616
    assert _t5(32128, 512, 6, 8, 2048) == 60_506_624
    assert _t5(32128, 512, 8, 6, 1024, H=64, gated=True, tied=False) == 76_961_152


@pytest.mark.parametrize("name", sorted(DECODER_LM))
def test_decoder_lm_param_count(name):
    assert decoder_lm.param_count(decoder_lm.Config.preset(name)) == DECODER_LM[name]


@pytest.mark.parametrize("name", sorted(ENCODER_DECODER))
def test_encoder_decoder_param_count(name):
    assert ed.param_count(ed.Config.preset(name)) == ENCODER_DECODER[name]


def test_paper_table3_sizes():
    """Table 3 lists 65M (base) and 213M (big) with a 37000-token shared vocabulary; the exact
    counts of the described architecture are 63.1M and 214.2M (the paper rounds loosely)."""
    base = ed.param_count(ed.Config.transformer_base())
    big = ed.param_count(ed.Config.transformer_big())
    assert abs(base - 65e6) / 65e6 < 0.05, base
    assert abs(big - 213e6) / 213e6 < 0.01, big


def test_scanned_layout_has_the_same_count_and_a_layers_axis():
    cfg = decoder_lm.Config.llama().replace(scan_layers=True)
    assert decoder_lm.param_count(cfg) == DECODER_LM["llama"]
    _, shapes = jax.eval_shape(lambda: decoder_lm.init(cfg, jax.random.key(0)))
    q = shapes["blocks"]["self_attn"]["q"]["kernel"]
    assert q.shape == (32, 4096, 32, 128)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
