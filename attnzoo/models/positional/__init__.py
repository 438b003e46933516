"""Positional encodings behind one interface (see ``base``): pick one with ``PositionConfig.kind``.

Kinds: ``sinusoidal``, ``learned``, ``shaw``, ``t5``, ``rope``, ``alibi``, ``xpos``, ``none``.
"""

from attnzoo.models.positional import (  # noqa: F401  (importing a kind registers it)
    alibi,
    learned,
    none,
    rope,
    shaw,
    sinusoidal,
    t5,
    xpos,
)
from attnzoo.models.positional.alibi import alibi_bias, alibi_slopes
from attnzoo.models.positional.base import (
    Encoding,
    LayerEncoding,
    PositionConfig,
    kinds,
    make_encoding,
    make_layer_encoding,
    register,
    validate,
)
from attnzoo.models.positional.rope import apply_rope, rope_inv_freq
from attnzoo.models.positional.sinusoidal import sinusoidal_table
from attnzoo.models.positional.t5 import t5_bucket
from attnzoo.models.positional.xpos import apply_xpos

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "apply_xpos",
    "rope_inv_freq",
    "t5_bucket",
    "Encoding",
    "LayerEncoding",
    "PositionConfig",
    "kinds",
    "make_encoding",
    "make_layer_encoding",
    "register",
    "sinusoidal_table",
    "validate",
]
