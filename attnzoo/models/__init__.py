"""Model definitions: attention, positional encodings, and the model families.

Every model exposes pure ``init(config, rng) -> (graphdef, params)`` and ``apply(graphdef,
params, ...)`` functions over plain pytrees.
"""

from attnzoo.models import (
    attention,
    blockwise,
    convert,
    decoder_lm,
    encoder_decoder,
    masks,
    positional,
)
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.blockwise import blockwise_attention
from attnzoo.models.mha import KVCache, MultiHeadAttention
from attnzoo.models.positional import PositionConfig, apply_rope, rope_inv_freq

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "PositionConfig",
    "apply_rope",
    "attention",
    "blockwise",
    "blockwise_attention",
    "convert",
    "decoder_lm",
    "dot_product_attention",
    "encoder_decoder",
    "masks",
    "positional",
    "rope_inv_freq",
]
