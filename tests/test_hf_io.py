"""Hugging Face in and out: ``convert.save_pretrained`` read by transformers (random-weight
torch models, no download), ``convert.from_pretrained`` without torch, the Hub path offline,
the config.json defaults and the byte tokenizer's ``tokenizer.json``."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from attnzoo.data import hf_tokenizer
from attnzoo.data.tokenizers import ByteTokenizer
from attnzoo.models import _hf_configs, convert, decoder_lm, hf_files
from attnzoo.models import encoder_decoder as ed
from attnzoo.models._hf_families import FAMILY
from attnzoo.models.positional import PositionConfig

V = 96
TOL = 1e-4

CONFIGS = {
    "gpt2": decoder_lm.Config.gpt2_small().replace(
        vocab_size=V, d_model=64, n_layers=2, n_heads=4, d_ff=96,
        position=PositionConfig(kind="learned", max_len=32),
    ),
    "llama": decoder_lm.Config.llama_small(V).replace(
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
        position=PositionConfig(kind="rope", max_len=128),
    ),
    "llama3_rope": decoder_lm.Config.llama_small(V).replace(
        d_model=64, n_layers=1, n_heads=4, n_kv_heads=1, d_ff=96, tie_embeddings=True,
        position=PositionConfig(
            kind="rope", max_len=128, rope_base=500000.0, rope_scaling="llama3", rope_factor=8.0,
            rope_original_max_len=64, llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0,
        ),
    ),
    "marian": ed.Config(
        vocab_size=V, d_model=64, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_ff=96,
        activation="silu", norm_eps=1e-5, final_logits_bias=True,
        position=PositionConfig(kind="learned", max_len=32),
    ),
    "t5": ed.Config.t5_small(V).replace(
        d_model=64, n_encoder_layers=2, n_decoder_layers=2, n_heads=4, head_dim=16, d_ff=128,
        position=PositionConfig(kind="t5", num_buckets=8, max_distance=16),
    ),
    "t5_v1_1": ed.Config.t5_v1_1_small(V).replace(
        d_model=64, n_encoder_layers=2, n_decoder_layers=1, n_heads=6, head_dim=16, d_ff=96,
        position=PositionConfig(kind="t5", num_buckets=8, max_distance=16),
    ),
}  # fmt: skip


def _params(cfg, seed=0):
    """Random params, every leaf perturbed (zero biases and unit norms would hide mistakes);
    Marian's position tables are its fixed sinusoids (transformers recomputes them)."""
    module = decoder_lm if isinstance(cfg, decoder_lm.Config) else ed
    graphdef, params = module.init(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(tree, noisy)
    if isinstance(cfg, ed.Config) and cfg.position.kind == "learned":
        pure = nnx.to_pure_dict(params)
        for side in ("encoder", "decoder"):
            pure[f"{side}_position"]["table"] = convert.marian_sinusoids(cfg.position.max_len, 64)
        nnx.replace_by_pure_dict(params, pure)
    return graphdef, params


def _tokens(seed, shape):
    return np.random.RandomState(seed).randint(2, V, shape)


def _ours_and_theirs(cfg, graphdef, params, directory):
    """(attnzoo logits, transformers logits of the saved directory) on the same tokens."""
    if isinstance(cfg, decoder_lm.Config):
        tokens = _tokens(0, (2, 20))
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            ref = model(torch.from_numpy(tokens)).logits.numpy()
        return np.asarray(decoder_lm.apply(graphdef, params, jnp.asarray(tokens))), ref
    src, tgt = _tokens(1, (2, 14)), _tokens(2, (2, 9))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(src), decoder_input_ids=torch.from_numpy(tgt)
        ).logits.numpy()
    return np.asarray(ed.apply(graphdef, params, jnp.asarray(src), jnp.asarray(tgt))), ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_pretrained_loads_in_transformers_with_the_same_logits(name, tmp_path):
    cfg = CONFIGS[name]
    graphdef, params = _params(cfg)
    convert.save_pretrained(cfg, params, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == name.split("_")[0].replace("llama3", "llama")
    ours, theirs = _ours_and_theirs(cfg, graphdef, params, tmp_path)
    diff = float(np.abs(ours - theirs).max())
    print(f"\n{name}: max abs logit diff {diff:.3g}")
    assert diff < TOL
    # and back, torch-free: the same model (its config.json) and exactly the same params
    back_cfg, _, back = convert.from_pretrained(tmp_path)
    assert convert.hf_config(back_cfg) == convert.hf_config(cfg)
    for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(back), strict=True):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_scanned_params_save_like_unrolled(tmp_path):
    cfg = CONFIGS["gpt2"]
    graphdef, params = _params(cfg)
    scan_cfg, _, scanned = decoder_lm.relayout(cfg, params, scan_layers=True)
    convert.save_pretrained(scan_cfg, scanned, tmp_path / "scanned")
    convert.save_pretrained(cfg, params, tmp_path / "unrolled")
    a = hf_files.load_tensors(tmp_path / "scanned")
    b = hf_files.load_tensors(tmp_path / "unrolled")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        (decoder_lm.Config.tiny(V), "position.kind='sinusoidal' (gpt2 has 'learned')"),
        (CONFIGS["gpt2"].replace(qk_norm=True), "qk_norm=True (gpt2 has False)"),
        (CONFIGS["llama"].replace(sliding_window=8), "sliding_window=8 (llama has None)"),
        (CONFIGS["gpt2"].replace(embed_scale=True), "embed_scale=True"),
        (ed.Config.tiny(V), "position.kind='sinusoidal' (marian has 'learned')"),
        (CONFIGS["t5"].replace(scale_tied_logits=False), "tie_embeddings=True (t5 has False)"),
    ],
)
def test_configs_without_a_hugging_face_equivalent_are_refused_by_setting(cfg, named, tmp_path):
    with pytest.raises(ValueError, match="no Hugging Face equivalent") as e:
        convert.save_pretrained(cfg, nnx.State({}), tmp_path)
    assert named in str(e.value)
    assert not (tmp_path / "config.json").exists()


def test_a_trained_marian_position_table_is_refused(tmp_path):
    cfg = CONFIGS["marian"]
    _, params = ed.init(cfg, jax.random.key(0))  # random "learned" tables, not the sinusoids
    with pytest.raises(ValueError, match="encoder_position holds a learned table"):
        convert.save_pretrained(cfg, params, tmp_path)


@pytest.mark.parametrize(
    "hf_config",
    [
        transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, activation_function="relu"),
        transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4),
        transformers.MarianConfig(d_model=64, encoder_layers=1, decoder_layers=3),
        transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # pyright: ignore[reportCallIssue]
        transformers.T5Config(num_layers=3, d_model=64),
    ],
    ids=["gpt2", "llama", "marian", "t5_v1_1", "t5"],
)
def test_config_json_reads_like_transformers(hf_config):
    """config.json holds only what differs from PretrainedConfig's defaults: the rest must be
    filled as transformers' config class does (the reference: its parsed config object)."""
    saved = json.loads(hf_config.to_json_string())  # use_diff=True, as save_pretrained writes
    family = hf_config.model_type
    make_cfg = FAMILY[family][0]
    assert make_cfg(_hf_configs.read_hf_config(saved)) == make_cfg(hf_config)


def test_sharded_checkpoint_and_unsafe_shard_names(tmp_path):
    cfg = CONFIGS["gpt2"]
    _, params = _params(cfg)
    convert.save_pretrained(cfg, params, tmp_path)
    tensors = hf_files.load_tensors(tmp_path)
    keys = sorted(tensors)
    (tmp_path / "model.safetensors").unlink()
    shards = {"model-1.safetensors": keys[::2], "model-2.safetensors": keys[1::2]}
    for name, names in shards.items():
        hf_files.save_tensors({k: np.asarray(tensors[k]) for k in names}, tmp_path / name)
    index = {"weight_map": {k: n for n, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, _, back = convert.from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(back), strict=True):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
    index["weight_map"][keys[0]] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        convert.from_pretrained(tmp_path)


def test_missing_weights_and_paths_are_clear(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no model.safetensors \(it has pytorch_model.bin"):
        convert.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'.*supported: gpt2, llama"):
        convert.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither an existing directory nor a Hugging Face Hub"):
        convert.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_hub_names_download_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    cfg = CONFIGS["gpt2"]
    _, params = _params(cfg)
    convert.save_pretrained(cfg, params, tmp_path / "snapshot")
    calls = []

    def download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    got_cfg, _, _ = convert.from_pretrained("someorg/tiny-gpt2", revision="main")
    assert got_cfg == cfg and calls[0][0] == "someorg/tiny-gpt2"
    assert calls[0][1]["revision"] == "main" and "*.bin" not in calls[0][1]["allow_patterns"]

    def offline(repo_id, **kw):
        raise errors.LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache.*download"):
        convert.from_pretrained("someorg/tiny-gpt2")


_NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # import torch now raises ImportError
    sys.modules["transformers"] = None
    import numpy as np, jax.numpy as jnp
    from attnzoo.models import convert, decoder_lm
    cfg, graphdef, params = convert.from_pretrained(sys.argv[1])
    tokens = np.arange(2 * 20).reshape(2, 20) % cfg.vocab_size
    np.save(sys.argv[2], np.asarray(decoder_lm.apply(graphdef, params, jnp.asarray(tokens))))
    try:
        convert.from_pretrained("someorg/not-cached")
    except ValueError as e:
        print("OFFLINE:", e)
    try:
        import torch
    except ImportError:
        print("NO TORCH")
    """
)


def test_from_pretrained_needs_no_torch_and_fails_clearly_offline(tmp_path):
    cfg = CONFIGS["llama"]
    _, params = _params(cfg)
    convert.save_pretrained(cfg, params, tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(tmp_path / "hf"), str(tmp_path / "logits.npy")],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "NO TORCH" in out
    assert "OFFLINE: cannot download someorg/not-cached: HF_HUB_OFFLINE is set" in out
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.arange(2 * 20).reshape(2, 20) % V
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(np.load(tmp_path / "logits.npy") - ref).max() < TOL


@pytest.mark.parametrize(
    "text", ["plain ascii", "héllo wörld\n\ttabs  and  spaces ", "日本語 🎉", " lead", ""]
)
def test_byte_tokenizer_json_gives_the_byte_tokenizers_ids(text, tmp_path):
    hf_tokenizer.save_tokenizer(ByteTokenizer(), tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )
    ours, byte = hf_tokenizer.HFTokenizer.load(tmp_path), ByteTokenizer()
    ids = byte.encode(text)
    assert ours.encode(text) == ids
    assert ours.decode([1, *ids, 2, 0]) == byte.decode([1, *ids, 2, 0]) == text
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 0, 259)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(text, add_special_tokens=False).input_ids == ids


def test_hf_tokenizer_without_tokenizer_json_or_eos_is_clear(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match="only a sentencepiece tokenizer.model"):
        hf_tokenizer.HFTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(hf_tokenizer.byte_tokenizer_json())
    with pytest.raises(ValueError, match="eos_token_id"):
        hf_tokenizer.HFTokenizer.load(tmp_path)
