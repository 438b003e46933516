"""Parity with Hugging Face transformers (random-init torch models, no download) and round trips.

Each parity test prints its max abs logit difference (``pytest -s``); the bound is 1e-4 float32.
"""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from attnzoo.models import convert, decoder_lm
from attnzoo.models import encoder_decoder as ed

V = 96
TOL = 1e-4


def _padded(seed: int, shape: tuple[int, int], n_pad: int, low: int = 0):
    """Random tokens and a right-padded attention mask (last ``n_pad`` of row 1 are padding)."""
    tokens = np.random.RandomState(seed).randint(low, V, shape)
    mask = np.ones(shape, np.int64)
    mask[1, shape[1] - n_pad :] = 0
    return tokens, mask


def _max_diff(name: str, ours, ref, mask) -> float:
    real = mask.astype(bool)  # logits at padded positions are unspecified in both
    diff = float(np.abs(np.asarray(ours) - ref)[real].max())
    print(f"\n{name}: max abs logit diff {diff:.3g}")
    return diff


def _assert_round_trip(hf_model, cfg, params):
    sd = convert.to_transformers(cfg, params)
    ref = hf_model.state_dict()
    assert set(sd) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
    fresh = type(hf_model)(hf_model.config).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref[k]), k


# ---- GPT-2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=1,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_gpt2_parity_and_round_trip(gpt2, scan_layers):
    cfg, g, p = convert.from_transformers(gpt2, scan_layers=scan_layers)
    assert (cfg.activation, cfg.norm_eps, cfg.tie_embeddings) == ("gelu_tanh", 1e-5, True)
    assert cfg.position.kind == "learned" and cfg.scan_layers == scan_layers
    tokens, mask = _padded(0, (2, 16), n_pad=5)
    with torch.no_grad():
        ref = gpt2(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits
    ours = decoder_lm.apply(g, p, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
    assert (
        _max_diff(f"gpt2 ({'scanned' if scan_layers else 'unrolled'})", ours, ref.numpy(), mask)
        < TOL
    )
    _assert_round_trip(gpt2, cfg, p)


# ---- LLaMA ---------------------------------------------------------------------------------


ROPE_SCALINGS = {
    # llama3 with every band in use for head_dim 16: wavelengths 6.3 (kept), 63 (smoothly
    # interpolated between 16 and 64), 628 and 6283 (divided by the factor)
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "linear": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 32},
    "default": {},
}


def _llama(rope_type: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling={"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_SCALINGS[rope_type]},
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALINGS))
def test_llama_gqa_rope_scaling_parity_and_round_trip(rope_type):
    llama = _llama(rope_type)
    cfg, g, p = convert.from_transformers(llama)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.gated_mlp, cfg.use_bias) == (4, 2, True, False)
    want = None if rope_type == "default" else rope_type
    assert (cfg.position.rope_scaling, cfg.position.rope_factor) == (
        want,
        ROPE_SCALINGS[rope_type].get("factor", 1.0),
    )
    tokens, mask = _padded(1, (2, 24), n_pad=7)
    with torch.no_grad():
        ref = llama(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits
    ours = decoder_lm.apply(g, p, jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
    assert _max_diff(f"llama (GQA, rope {rope_type})", ours, ref.numpy(), mask) < TOL
    _assert_round_trip(llama, cfg, p)


# ---- Marian (the paper's encoder-decoder) ---------------------------------------------------


@pytest.fixture(scope="module")
def marian():
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=V,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        scale_embedding=True,
        activation_function="swish",
    )
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # zero at init; make it visible to the test
        model.final_logits_bias.normal_()
    return model


def _marian_batch():
    src, src_mask = _padded(2, (2, 12), n_pad=4, low=2)
    tgt, tgt_mask = _padded(3, (2, 9), n_pad=3, low=2)
    return src, src_mask, tgt, tgt_mask


def _seq2seq_logits(model, src, src_mask, tgt, tgt_mask):
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(src),
            attention_mask=torch.from_numpy(src_mask),
            decoder_input_ids=torch.from_numpy(tgt),
            decoder_attention_mask=torch.from_numpy(tgt_mask),
        ).logits.numpy()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_marian_parity_and_round_trip(marian, scan_layers):
    cfg, g, p = convert.from_transformers(marian, scan_layers=scan_layers)
    assert (cfg.pre_norm, cfg.embed_scale, cfg.activation) == (False, True, "silu")
    src, src_mask, tgt, tgt_mask = _marian_batch()
    ref = _seq2seq_logits(marian, src, src_mask, tgt, tgt_mask)
    ours = ed.apply(g, p, *map(jnp.asarray, (src, tgt, src_mask, tgt_mask)))
    name = f"marian ({'scanned' if scan_layers else 'unrolled'})"
    assert _max_diff(name, ours, ref, tgt_mask) < TOL
    _assert_round_trip(marian, cfg, p)


def test_marian_incremental_decoding_matches_torch(marian):
    cfg, g, p = convert.from_transformers(marian)
    src, src_mask, tgt, _ = _marian_batch()
    ones = np.ones_like(tgt)
    ref = _seq2seq_logits(marian, src, src_mask, tgt, ones)
    encoded = ed.encode(g, p, jnp.asarray(src), jnp.asarray(src_mask))
    cache = ed.init_cache(cfg, 2, tgt.shape[1])
    outs = []
    for t in range(tgt.shape[1]):
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = ed.decode_cached(
            g, p, encoded, jnp.asarray(src_mask), jnp.asarray(tgt[:, t : t + 1]), pos, cache
        )
        outs.append(logits)
    assert _max_diff("marian incremental", jnp.concatenate(outs, 1), ref, ones) < TOL


def test_marian_sinusoids_match_transformers(marian):
    table = marian.state_dict()["model.encoder.embed_positions.weight"].numpy()
    np.testing.assert_array_equal(convert.marian_sinusoids(*table.shape), table)


# ---- T5 ------------------------------------------------------------------------------------


def _t5(version: str):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=V,
        d_model=64,
        d_kv=16,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    if version == "v1_1":  # gated GELU (tanh), head not scaled, 6 heads of 16 dims != d_model
        kw.update(feed_forward_proj="gated-gelu", d_ff=96, num_heads=6, tie_word_embeddings=False)
    else:
        kw.update(feed_forward_proj="relu", d_ff=128)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**kw)).eval()


@pytest.mark.parametrize("version", ["v1_0", "v1_1"])
def test_t5_parity_and_round_trip(version):
    t5 = _t5(version)
    cfg, g, p = convert.from_transformers(t5)
    assert cfg.position.kind == "t5" and cfg.pre_norm and cfg.attention_scale == 1.0
    assert cfg.gated_mlp == (version == "v1_1") and cfg.scale_tied_logits == (version == "v1_0")
    # sequences longer than max_distance exercise the logarithmic buckets
    src, src_mask = _padded(4, (2, 24), n_pad=5, low=2)
    tgt, tgt_mask = _padded(5, (2, 20), n_pad=6, low=2)
    ref = _seq2seq_logits(t5, src, src_mask, tgt, tgt_mask)
    ours = ed.apply(g, p, *map(jnp.asarray, (src, tgt, src_mask, tgt_mask)))
    assert _max_diff(f"t5 {version}", ours, ref, tgt_mask) < TOL
    _assert_round_trip(t5, cfg, p)


# ---- safetensors and errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "marian"])
def test_from_safetensors_equals_from_transformers(name, request, tmp_path):
    hf_model = request.getfixturevalue(name)
    hf_model.save_pretrained(tmp_path)  # Marian drops its position tables on save
    _, _, want = convert.from_transformers(hf_model)
    cfg, _, got = convert.from_safetensors(tmp_path)
    assert cfg == convert.from_transformers(hf_model)[0]
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got), strict=True):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_bfloat16_safetensors_checkpoint(gpt2, tmp_path):
    """Real LLaMA-style checkpoints are bfloat16, which numpy cannot hold."""
    bf16 = copy.deepcopy(gpt2).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    _, _, got = convert.from_safetensors(tmp_path)
    _, _, want = convert.from_transformers(bf16)  # upcast by torch
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got), strict=True):
        assert b[...].dtype == jnp.float32
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_single_safetensors_file_needs_its_config(gpt2, tmp_path):
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hf_config"):
        convert.from_safetensors(tmp_path / "model.safetensors")
    cfg, _, _ = convert.from_safetensors(tmp_path / "model.safetensors", gpt2.config)
    assert cfg.n_layers == 2


def test_unsupported_family_and_shape_mismatch_are_clear(gpt2):
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        convert.from_transformers(
            transformers.BertForMaskedLM(
                transformers.BertConfig(
                    vocab_size=V,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                )
            )
        )
    wrong = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    with pytest.raises(ValueError, match="needs shape"):
        convert.from_state_dict("gpt2", wrong, gpt2.state_dict())
    with pytest.raises(ValueError, match="family"):
        convert.to_transformers(decoder_lm.Config.tiny(), None)
