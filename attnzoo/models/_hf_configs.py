"""Hugging Face ``config.json`` for attnzoo configs, both ways, without ``transformers``.

* ``read_hf_config(d)``: a ``config.json`` dict -> an object with the attributes the family
  translators of ``_hf_families`` read; what the file leaves out (transformers saves only the
  values that differ from the defaults of ``PretrainedConfig``) is filled with the defaults of
  the transformers config class (``HF_DEFAULTS``).
* ``hf_config_dict(cfg)``: an attnzoo config -> ``(family, config.json dict)``. The dict is
  read back through the family translator, and every architecture setting that does not come
  back unchanged is named in the error: a config is exported only when Hugging Face's model
  computes exactly what attnzoo's does.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.models._hf_families import FAMILIES, FAMILY

# The transformers config classes' defaults (transformers 5) of the attributes read here.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        layer_norm_epsilon=1e-5, scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=None,
    ),
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, rope_scaling=None, rope_parameters=None, attention_bias=False,
        mlp_bias=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "marian": dict(
        vocab_size=58101, decoder_vocab_size=None, max_position_embeddings=1024,
        encoder_layers=12, encoder_ffn_dim=4096, encoder_attention_heads=16, decoder_layers=12,
        decoder_ffn_dim=4096, decoder_attention_heads=16, activation_function="gelu",
        d_model=1024, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
        scale_embedding=False, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100,
    ),
    "t5": dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
        num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="relu",
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ),
}  # fmt: skip

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "marian": "MarianMTModel",
    "t5": "T5ForConditionalGeneration",
}

# attnzoo activation -> the Hugging Face name (``ACT2FN``) of the same function
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# Settings that do not change what a trained model computes, so need no equivalent.
_NOT_ARCHITECTURE = frozenset(
    {"dropout", "attention_dropout", "activation_dropout", "embed_init_std", "dtype",
     "param_dtype", "remat", "remat_policy", "scan_layers", "attention_impl"}
)  # fmt: skip


def family_name(d: Mapping[str, Any]) -> str:
    """The attnzoo family of a ``config.json`` dict (its ``model_type``), or a clear error."""
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json has model_type {model_type!r}, which attnzoo cannot load; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return model_type


def read_hf_config(d: Mapping[str, Any]) -> types.SimpleNamespace:
    """A ``config.json`` dict -> its attributes, with transformers' defaults for those it omits
    and the derived values transformers' config classes compute in ``__init__``."""
    family = family_name(d)
    c = {**HF_DEFAULTS[family], **d}
    if family == "llama" and c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]
    if family == "marian":
        c["decoder_vocab_size"] = c["decoder_vocab_size"] or c["vocab_size"]
    if family == "t5":
        if c["num_decoder_layers"] is None:
            c["num_decoder_layers"] = c["num_layers"]
        parts = str(c["feed_forward_proj"]).split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"t5 feed_forward_proj {c['feed_forward_proj']!r} is not '<act>' or 'gated-<act>'"
            )
        derived = "gelu_new" if c["feed_forward_proj"] == "gated-gelu" else parts[-1]
        c.setdefault("dense_act_fn", derived)
        c.setdefault("is_gated_act", parts[0] == "gated")
    return types.SimpleNamespace(**c)


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    pos = cfg.position
    rp: dict[str, Any] = {"rope_type": pos.rope_scaling or "default", "rope_theta": pos.rope_base}
    if pos.rope_scaling is not None:
        rp["factor"] = pos.rope_factor
    if pos.rope_scaling in ("dynamic", "yarn", "llama3"):
        rp["original_max_position_embeddings"] = pos.rope_original_max_len
    if pos.rope_scaling == "llama3":
        rp["low_freq_factor"] = pos.llama3_low_freq_factor
        rp["high_freq_factor"] = pos.llama3_high_freq_factor
    if pos.rope_scaling == "yarn":
        rp["beta_fast"], rp["beta_slow"] = pos.yarn_beta_fast, pos.yarn_beta_slow
    return rp


def _activation(cfg: Any, family: str) -> str:
    if cfg.activation not in _HF_ACTIVATION:
        raise ValueError(f"activation={cfg.activation!r} (no {family} equivalent)")
    return _HF_ACTIVATION[cfg.activation]


def _write(cfg: Any, family: str) -> dict[str, Any]:
    """The ``config.json`` fields of ``cfg`` as ``family`` (architecture only)."""
    act, pos = _activation(cfg, family), cfg.position
    if family == "gpt2":
        return dict(
            vocab_size=cfg.vocab_size, n_positions=pos.max_len, n_embd=cfg.d_model,
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            activation_function=act, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.norm_eps,
            scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=cfg.tie_embeddings,
        )  # fmt: skip
    if family == "llama":
        return dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, hidden_act=act,
            max_position_embeddings=pos.max_len, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.use_bias,
            mlp_bias=cfg.use_bias, attention_dropout=cfg.attention_dropout,
            rope_parameters=_rope_parameters(cfg),
        )  # fmt: skip
    if family == "marian":
        return dict(
            vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size,
            max_position_embeddings=pos.max_len, d_model=cfg.d_model,
            encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
            encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
            encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=act,
            scale_embedding=cfg.embed_scale, share_encoder_decoder_embeddings=True,
            tie_word_embeddings=cfg.tie_embeddings, dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
            is_encoder_decoder=True,
        )  # fmt: skip
    gated = cfg.gated_mlp
    return dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_size, d_ff=cfg.d_ff,
        num_layers=cfg.n_encoder_layers, num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads, relative_attention_num_buckets=pos.num_buckets,
        relative_attention_max_distance=pos.max_distance, dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=("gated-gelu" if act == "gelu_new" else f"gated-{act}") if gated else act,
        tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.scale_tied_logits,
        is_encoder_decoder=True,
    )  # fmt: skip


def _position_fields(pos: Any) -> dict[str, Any]:
    """The ``PositionConfig`` fields that act for its kind (the others are unused)."""
    keep = {"kind"}
    if pos.kind == "learned":
        keep |= {"max_len"}
    elif pos.kind == "t5":
        keep |= {"num_buckets", "max_distance"}
    elif pos.kind == "rope":
        keep |= {"max_len", "rope_base", "rope_fraction", "rope_layout", "rope_scaling"}
        if pos.rope_scaling is not None:
            keep |= {"rope_factor"}
        if pos.rope_scaling in ("dynamic", "yarn", "llama3"):
            keep |= {"rope_original_max_len"}
        if pos.rope_scaling == "yarn":
            keep |= {f.name for f in dataclasses.fields(pos) if f.name.startswith("yarn_")}
        if pos.rope_scaling == "llama3":
            keep |= {"llama3_low_freq_factor", "llama3_high_freq_factor"}
    return {f"position.{k}": getattr(pos, k) for k in sorted(keep)}


def _architecture(cfg: Any) -> dict[str, Any]:
    """``cfg``'s fields that decide what it computes; head_dim / n_kv_heads as their values."""
    out = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in _NOT_ARCHITECTURE and f.name != "position"
    }
    out.update(head_dim=cfg.head_size, n_kv_heads=cfg.kv_heads)
    out.update(_position_fields(cfg.position))
    return out


def _differences(cfg: Any, family: str) -> tuple[list[str], dict[str, Any] | None]:
    """(the settings of ``cfg`` that ``family`` cannot express, its config.json fields)."""
    try:
        fields = _write(cfg, family)
        back = FAMILY[family][0](read_hf_config({"model_type": family, **fields}))
    except ValueError as e:
        return [str(e)], None
    ours, theirs = _architecture(cfg), _architecture(back)
    if cfg.position.kind != back.position.kind:  # the other position fields mean nothing then
        ours = {k: v for k, v in ours.items() if not k.startswith("position.")}
        theirs = {k: v for k, v in theirs.items() if not k.startswith("position.")}
        ours["position.kind"], theirs["position.kind"] = cfg.position.kind, back.position.kind
    diffs = [
        f"{k}={ours[k]!r} ({family} has {theirs.get(k)!r})"
        for k in ours
        if ours[k] != theirs.get(k)
    ]
    if family == "marian" and not cfg.tie_embeddings:
        diffs.append("tie_embeddings=False (attnzoo's marian rules write only a tied head)")
    return diffs, fields


def hf_config_dict(
    cfg: Any, *, family: str | None = None, token_ids: Mapping[str, int | None] | None = None
) -> tuple[str, dict[str, Any]]:
    """-> (family, the ``config.json`` dict of ``cfg``) for the family that expresses ``cfg``
    exactly (``family`` to insist on one).

    ``token_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``,
    ``decoder_start_token_id``, ...) are written as given.

    Raises:
      ValueError: no family computes what ``cfg`` does; names, per candidate family, each
        setting that has no equivalent (e.g. ``position.kind='sinusoidal' (gpt2 has
        'learned')``).
    """
    if isinstance(cfg, decoder_lm.Config):
        kind, candidates = "decoder_lm", ("gpt2", "llama")
    elif isinstance(cfg, encoder_decoder.Config):
        kind, candidates = "encoder_decoder", ("marian", "t5")
    else:
        raise ValueError(f"{type(cfg).__name__} is not an attnzoo model config")
    if family is not None:
        if family not in candidates:
            raise ValueError(
                f"family {family!r} cannot hold a {kind} model; valid: {', '.join(candidates)}"
            )
        candidates = (family,)
    reasons = []
    for name in candidates:
        diffs, fields = _differences(cfg, name)
        if not diffs and fields is not None:
            out = {"model_type": name, "architectures": [ARCHITECTURES[name]], **fields}
            return name, {**out, **(token_ids or {})}
        reasons.append(f"as {name}: {', '.join(diffs)}")
    raise ValueError(
        f"this {kind} config has no Hugging Face equivalent ({'; '.join(reasons)}); train with "
        "model_overrides so that one family matches, e.g. --config.model=gpt2_small or "
        "llama_small (decoder_lm), or t5_small (encoder_decoder)"
    )
