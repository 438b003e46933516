"""Positional encodings behind one interface (see ``base``): pick one with ``PositionConfig.kind``.

Kinds: ``sinusoidal``, ``learned``, ``shaw``, ``t5``, ``rope``, ``alibi``, ``xpos``, ``none``.
"""

from attnzoo.models.positional import learned, none, rope, sinusoidal  # noqa: F401  (register kinds)
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
from attnzoo.models.positional.sinusoidal import sinusoidal_table

__all__ = [
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
