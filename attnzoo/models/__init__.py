"""Model definitions: attention, positional encodings, and the model families.

Every model exposes pure ``init(config, rng) -> (graphdef, params)`` and ``apply(graphdef,
params, ...)`` functions over plain pytrees.
"""

from attnzoo.models import attention, decoder_lm, masks, positional
from attnzoo.models.attention import dot_product_attention
from attnzoo.models.mha import KVCache, MultiHeadAttention
from attnzoo.models.positional import PositionConfig

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "PositionConfig",
    "attention",
    "decoder_lm",
    "dot_product_attention",
    "masks",
    "positional",
]
