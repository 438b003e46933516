"""Hugging Face model families for ``attnzoo.models.convert``: config mapping and weight rules.

Each family is a config translator (HF config -> our ``Config``) and one table of ``Rule``s: a
Hugging Face key, the attnzoo param path(s) it fills, and the two (inverse) array transforms.
Reading and writing walk the same table, so the round trip is exact by construction. Torch
``Linear`` stores ``[out, in]``; attnzoo keeps heads as their own dimension (``[D, N, H]``
queries, ``[N, H, D]`` output) so a rules table can shard them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.models.positional import PositionConfig

FAMILIES = ("gpt2", "llama", "marian", "t5")
Path = tuple[Any, ...]  # a param path in nnx.to_pure_dict(params), e.g. ("blocks", 0, "mlp", ...)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor <-> one or more attnzoo params."""

    hf_key: str
    paths: tuple[Path, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _same(path: Path, key: str) -> Rule:
    return Rule(key, (path,), lambda w: (w,), lambda a: a)


def _linear(path: Path, key: str) -> Rule:
    """torch Linear weight [out, in] <-> kernel [in, out]."""
    return Rule(key, (path,), lambda w: (w.T,), lambda a: a.T)


def _heads_in(path: Path, key: str, n: int, h: int) -> Rule:
    """q/k/v Linear weight [n*h, D] <-> kernel [D, n, h]."""
    return Rule(key, (path,), lambda w: (w.T.reshape(-1, n, h),), lambda a: a.reshape(-1, n * h).T)


def _heads_bias(path: Path, key: str, n: int, h: int) -> Rule:
    """q/k/v bias [n*h] <-> [n, h]."""
    return Rule(key, (path,), lambda b: (b.reshape(n, h),), lambda a: a.reshape(n * h))


def _heads_out(path: Path, key: str, n: int, h: int) -> Rule:
    """Output Linear weight [D, n*h] <-> kernel [n, h, D]."""
    return Rule(key, (path,), lambda w: (w.T.reshape(n, h, -1),), lambda a: a.reshape(n * h, -1).T)


def _norm(path: Path, key: str, bias: bool = True) -> list[Rule]:
    rules = [_same((*path, "scale"), f"{key}.weight")]
    return rules + [_same((*path, "bias"), f"{key}.bias")] if bias else rules


# ---- GPT-2 ---------------------------------------------------------------------------------

_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no attnzoo equivalent; valid: {_ACTIVATIONS}")
    return _ACTIVATIONS[name]


def _gpt2_config(c: Any) -> decoder_lm.Config:
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
    if not getattr(c, "tie_word_embeddings", True):
        raise ValueError("GPT-2 with an untied lm_head is not supported")
    return decoder_lm.Config.gpt2_small().replace(
        vocab_size=c.vocab_size,
        d_model=c.n_embd,
        n_layers=c.n_layer,
        n_heads=c.n_head,
        d_ff=c.n_inner or 4 * c.n_embd,
        activation=_activation(c.activation_function),
        norm_eps=c.layer_norm_epsilon,
        dropout=c.resid_pdrop,
        attention_dropout=c.attn_pdrop,
        position=PositionConfig(kind="learned", max_len=c.n_positions),
    )


def _gpt2_rules(cfg: decoder_lm.Config) -> Iterator[Rule]:
    D, N = cfg.d_model, cfg.n_heads
    H = D // N
    yield _same(("embed", "embedding"), "transformer.wte.weight")
    yield _same(("position", "table"), "transformer.wpe.weight")
    for i in range(cfg.n_layers):
        hf, ours = f"transformer.h.{i}", ("blocks", i)
        attn = (*ours, "self_attn")
        qkv = tuple((*attn, p, "kernel") for p in "qkv")
        # Conv1D c_attn: x @ W, W [D, 3D] = [W_q | W_k | W_v]
        yield Rule(
            f"{hf}.attn.c_attn.weight",
            qkv,
            lambda w: tuple(x.reshape(D, N, H) for x in np.split(w, 3, axis=1)),
            lambda *a: np.concatenate([x.reshape(D, D) for x in a], axis=1),
        )
        yield Rule(
            f"{hf}.attn.c_attn.bias",
            tuple((*attn, p, "bias") for p in "qkv"),
            lambda b: tuple(x.reshape(N, H) for x in np.split(b, 3)),
            lambda *a: np.concatenate([x.reshape(D) for x in a]),
        )
        yield Rule(
            f"{hf}.attn.c_proj.weight",
            ((*attn, "o", "kernel"),),
            lambda w: (w.reshape(N, H, D),),
            lambda a: a.reshape(D, D),
        )
        yield _same((*attn, "o", "bias"), f"{hf}.attn.c_proj.bias")
        yield from _norm((*ours, "self_attn_norm"), f"{hf}.ln_1")
        yield from _norm((*ours, "mlp_norm"), f"{hf}.ln_2")
        for theirs, mine in (("c_fc", "wi"), ("c_proj", "wo")):  # Conv1D is already [in, out]
            yield _same((*ours, "mlp", mine, "kernel"), f"{hf}.mlp.{theirs}.weight")
            yield _same((*ours, "mlp", mine, "bias"), f"{hf}.mlp.{theirs}.bias")
    yield from _norm(("final_norm",), "transformer.ln_f")
    yield _same(("embed", "embedding"), "lm_head.weight")  # tied: written back, never read


# ---- LLaMA ---------------------------------------------------------------------------------

_ROPE_SCALINGS = {
    "default": None,
    "linear": "linear",
    "dynamic": "dynamic",
    "yarn": "yarn",
    "llama3": "llama3",
}


def _llama_rope(c: Any) -> PositionConfig:
    rp = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in _ROPE_SCALINGS:
        raise ValueError(f"rope_type {kind!r} is not supported; valid: {sorted(_ROPE_SCALINGS)}")
    pos = PositionConfig(
        kind="rope",
        max_len=c.max_position_embeddings,
        rope_base=float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        rope_scaling=_ROPE_SCALINGS[kind],
        rope_factor=float(rp.get("factor", 1.0)),
        rope_original_max_len=int(
            rp.get("original_max_position_embeddings", c.max_position_embeddings)
        ),
    )
    if kind == "llama3":
        pos = pos.replace(
            llama3_low_freq_factor=float(rp["low_freq_factor"]),
            llama3_high_freq_factor=float(rp["high_freq_factor"]),
        )
    if kind == "yarn":
        pos = pos.replace(
            yarn_beta_fast=float(rp.get("beta_fast", 32.0)),
            yarn_beta_slow=float(rp.get("beta_slow", 1.0)),
        )
    return pos


def _llama_config(c: Any) -> decoder_lm.Config:
    if getattr(c, "mlp_bias", False) != getattr(c, "attention_bias", False):
        raise ValueError("LLaMA with mlp_bias != attention_bias is not supported")
    return decoder_lm.Config.llama().replace(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        d_ff=c.intermediate_size,
        activation=_activation(c.hidden_act),
        norm_eps=c.rms_norm_eps,
        use_bias=bool(getattr(c, "attention_bias", False)),
        tie_embeddings=bool(c.tie_word_embeddings),
        attention_dropout=c.attention_dropout,
        position=_llama_rope(c),
    )


def _attention_rules(
    ours: Path, hf: str, names: tuple[str, str, str, str], n: int, k: int, h: int, bias: bool
) -> Iterator[Rule]:
    """Separate q/k/v/o torch Linears (LLaMA, Marian) <-> our head-shaped Dense kernels."""
    for mine, theirs, heads in zip("qkvo", names, (n, k, k, n), strict=True):
        make = _heads_out if mine == "o" else _heads_in
        yield make((*ours, mine, "kernel"), f"{hf}.{theirs}.weight", heads, h)
        if bias:
            yield (
                _same((*ours, "o", "bias"), f"{hf}.{theirs}.bias")
                if mine == "o"
                else _heads_bias((*ours, mine, "bias"), f"{hf}.{theirs}.bias", heads, h)
            )


def _llama_rules(cfg: decoder_lm.Config) -> Iterator[Rule]:
    N, K = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    H = cfg.head_dim or cfg.d_model // N
    yield _same(("embed", "embedding"), "model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}", ("blocks", i)
        yield from _attention_rules(
            (*ours, "self_attn"),
            f"{hf}.self_attn",
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            N,
            K,
            H,
            cfg.use_bias,
        )
        for theirs, mine in (("gate_proj", "wg"), ("up_proj", "wi"), ("down_proj", "wo")):
            yield _linear((*ours, "mlp", mine, "kernel"), f"{hf}.mlp.{theirs}.weight")
            if cfg.use_bias:
                yield _same((*ours, "mlp", mine, "bias"), f"{hf}.mlp.{theirs}.bias")
        yield from _norm((*ours, "self_attn_norm"), f"{hf}.input_layernorm", bias=False)
        yield from _norm((*ours, "mlp_norm"), f"{hf}.post_attention_layernorm", bias=False)
    yield from _norm(("final_norm",), "model.norm", bias=False)
    if cfg.tie_embeddings:
        yield _same(("embed", "embedding"), "lm_head.weight")
    else:
        yield _linear(("head", "kernel"), "lm_head.weight")


# ---- Marian --------------------------------------------------------------------------------


def _marian_config(c: Any) -> encoder_decoder.Config:
    for a, b in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if getattr(c, a) != getattr(c, b):
            raise ValueError(f"Marian with {a} != {b} is not supported (one block config)")
    if not c.share_encoder_decoder_embeddings or (c.decoder_vocab_size or c.vocab_size) != (
        c.vocab_size
    ):
        raise ValueError("Marian with separate source/target vocabularies is not supported")
    # Marian's sinusoids put all sines before all cosines (not the paper's interleaving), so
    # the fixed tables travel as "learned" tables holding exactly Marian's values.
    return encoder_decoder.Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        n_encoder_layers=c.encoder_layers,
        n_decoder_layers=c.decoder_layers,
        n_heads=c.encoder_attention_heads,
        d_ff=c.encoder_ffn_dim,
        activation=_activation(c.activation_function),
        norm_eps=1e-5,
        pre_norm=False,
        tie_embeddings=bool(c.tie_word_embeddings),
        final_logits_bias=True,
        embed_scale=bool(c.scale_embedding),
        dropout=c.dropout,
        attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout,
        position=PositionConfig(kind="learned", max_len=c.max_position_embeddings),
    )


def marian_sinusoids(n_pos: int, dim: int) -> np.ndarray:
    """Marian's fixed position table [n_pos, dim]: sin(pos / 10000^(2i/d)) in the first half,
    cos in the second (checkpoints omit it: ``_keys_to_ignore_on_save``)."""
    j = np.arange(dim)
    angles = np.arange(n_pos)[:, None] / np.power(10000.0, 2 * (j // 2) / dim)
    half = (dim + 1) // 2
    out = np.empty((n_pos, dim))
    out[:, :half], out[:, half:] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return out.astype(np.float32)


def _marian_rules(cfg: encoder_decoder.Config) -> Iterator[Rule]:
    N = cfg.n_heads
    H = cfg.d_model // N
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    yield _same(("embed", "embedding"), "model.shared.weight")
    yield Rule(
        "final_logits_bias",
        (("logits_bias",),),
        lambda b: (b.reshape(-1),),
        lambda a: a.reshape(1, -1),
    )
    for side, n_layers in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        yield _same((f"{side}_position", "table"), f"model.{side}.embed_positions.weight")
        for i in range(n_layers):
            hf, ours = f"model.{side}.layers.{i}", (f"{side}_blocks", i)
            yield from _attention_rules(
                (*ours, "self_attn"), f"{hf}.self_attn", names, N, N, H, True
            )
            yield from _norm((*ours, "self_attn_norm"), f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                yield from _attention_rules(
                    (*ours, "cross_attn"), f"{hf}.encoder_attn", names, N, N, H, True
                )
                yield from _norm((*ours, "cross_attn_norm"), f"{hf}.encoder_attn_layer_norm")
            yield _linear((*ours, "mlp", "wi", "kernel"), f"{hf}.fc1.weight")
            yield _same((*ours, "mlp", "wi", "bias"), f"{hf}.fc1.bias")
            yield _linear((*ours, "mlp", "wo", "kernel"), f"{hf}.fc2.weight")
            yield _same((*ours, "mlp", "wo", "bias"), f"{hf}.fc2.bias")
            yield from _norm((*ours, "mlp_norm"), f"{hf}.final_layer_norm")
    # tied copies of the shared table: written back, never read
    for key in (
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "lm_head.weight",
    ):
        yield _same(("embed", "embedding"), key)


# ---- T5 ------------------------------------------------------------------------------------


def _t5_config(c: Any) -> encoder_decoder.Config:
    # T5 v1.0 ties the head to the shared table and scales the decoder output by d**-0.5;
    # v1.1 (saved with tie_word_embeddings=False) uses lm_head unscaled.
    scaled = bool(getattr(c, "scale_decoder_outputs", c.tie_word_embeddings))
    return encoder_decoder.Config.t5_small().replace(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        n_encoder_layers=c.num_layers,
        n_decoder_layers=c.num_decoder_layers,
        n_heads=c.num_heads,
        head_dim=c.d_kv,
        d_ff=c.d_ff,
        activation=_activation(c.dense_act_fn),
        gated_mlp=bool(c.is_gated_act),
        norm_eps=c.layer_norm_epsilon,
        tie_embeddings=scaled,
        scale_tied_logits=scaled,
        dropout=c.dropout_rate,
        position=PositionConfig(
            kind="t5",
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        ),
    )


def _t5_rules(cfg: encoder_decoder.Config) -> Iterator[Rule]:
    N = cfg.n_heads
    H = cfg.head_dim or cfg.d_model // N
    names = ("q", "k", "v", "o")
    yield _same(("embed", "embedding"), "shared.weight")
    for side, n_layers in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        # one relative-bias table per stack, stored on the first block in Hugging Face
        bias = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        yield _same((f"{side}_position", "table"), bias)
        for i in range(n_layers):
            hf, ours = f"{side}.block.{i}.layer", (f"{side}_blocks", i)
            yield from _attention_rules(
                (*ours, "self_attn"), f"{hf}.0.SelfAttention", names, N, N, H, False
            )
            yield from _norm((*ours, "self_attn_norm"), f"{hf}.0.layer_norm", bias=False)
            ff = 1
            if side == "decoder":
                yield from _attention_rules(
                    (*ours, "cross_attn"), f"{hf}.1.EncDecAttention", names, N, N, H, False
                )
                yield from _norm((*ours, "cross_attn_norm"), f"{hf}.1.layer_norm", bias=False)
                ff = 2
            mlp = f"{hf}.{ff}.DenseReluDense"
            if cfg.gated_mlp:  # act(wi_0 x) * wi_1 x
                yield _linear((*ours, "mlp", "wg", "kernel"), f"{mlp}.wi_0.weight")
                yield _linear((*ours, "mlp", "wi", "kernel"), f"{mlp}.wi_1.weight")
            else:
                yield _linear((*ours, "mlp", "wi", "kernel"), f"{mlp}.wi.weight")
            yield _linear((*ours, "mlp", "wo", "kernel"), f"{mlp}.wo.weight")
            yield from _norm((*ours, "mlp_norm"), f"{hf}.{ff}.layer_norm", bias=False)
        yield from _norm((f"{side}_norm",), f"{side}.final_layer_norm", bias=False)
        yield _same(("embed", "embedding"), f"{side}.embed_tokens.weight")  # tied copy
    if cfg.tie_embeddings:
        yield _same(("embed", "embedding"), "lm_head.weight")
    else:
        yield _linear(("head", "kernel"), "lm_head.weight")


# Tensors a family's checkpoints may carry that hold no parameter (transformers lists them as
# ``_keys_to_ignore_on_load_unexpected``): the causal-mask buffers of older GPT-2 saves, the
# RoPE inverse frequencies of older LLaMA saves, and a relative-bias table T5's first decoder
# cross-attention never reads. Any other tensor that no rule reads is an error, not dropped.
IGNORED: dict[str, re.Pattern[str]] = {
    "gpt2": re.compile(r"(transformer\.)?h\.\d+\.(attn|crossattention)\.(masked_)?bias"),
    "llama": re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.(original_)?inv_freq"),
    "marian": re.compile(r"(?!)"),  # matches nothing
    "t5": re.compile(
        r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"
    ),
}

# The per-layer key prefixes of each family and the Hugging Face config field that counts
# those layers, so that tensors of layers the config does not have are named by that field.
LAYER_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt2": (("transformer.h", "n_layer"),),
    "llama": (("model.layers", "num_hidden_layers"),),
    "marian": (
        ("model.encoder.layers", "encoder_layers"),
        ("model.decoder.layers", "decoder_layers"),
    ),
    "t5": (("encoder.block", "num_layers"), ("decoder.block", "num_decoder_layers")),
}


FAMILY = {
    "gpt2": (_gpt2_config, _gpt2_rules, decoder_lm),
    "llama": (_llama_config, _llama_rules, decoder_lm),
    "marian": (_marian_config, _marian_rules, encoder_decoder),
    "t5": (_t5_config, _t5_rules, encoder_decoder),
}
