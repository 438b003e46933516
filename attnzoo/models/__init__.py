"""Model definitions: attention, positional encodings, and the two model families.

Both families expose pure functions over plain pytrees::

    graphdef, params = decoder_lm.init(DecoderLMConfig.gpt2_small(), jax.random.key(0))
    logits = decoder_lm.apply(graphdef, params, tokens)           # [B, T] -> [B, T, V]

    graphdef, params = encoder_decoder.init(EncoderDecoderConfig.transformer_base(), rng)
    logits = encoder_decoder.apply(graphdef, params, src, tgt)    # -> [B, T, V]

The building blocks (``dot_product_attention``, ``MaskSpec``, ``MultiHeadAttention``,
``PositionConfig``, ``apply_rope``, ``layers``) are public for use in your own models.
"""

from attnzoo.models import (
    attention,
    blocks,
    convert,
    core,
    decoder_lm,
    encoder_decoder,
    layers,
    masks,
    positional,
)
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.blockwise import blockwise_attention
from attnzoo.models.core import Cache, ModelConfig
from attnzoo.models.masks import MaskSpec
from attnzoo.models.mha import KVCache, MultiHeadAttention
from attnzoo.models.positional import PositionConfig, apply_rope, rope_inv_freq

DecoderLMConfig = decoder_lm.Config
EncoderDecoderConfig = encoder_decoder.Config

__all__ = [
    "Cache",
    "DecoderLMConfig",
    "EncoderDecoderConfig",
    "KVCache",
    "MaskSpec",
    "ModelConfig",
    "MultiHeadAttention",
    "PositionConfig",
    "apply_rope",
    "attention",
    "blocks",
    "blockwise_attention",
    "convert",
    "core",
    "decoder_lm",
    "dot_product_attention",
    "encoder_decoder",
    "layers",
    "masks",
    "positional",
    "rope_inv_freq",
]
