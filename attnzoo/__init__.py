"""attnzoo: attention-based sequence models in JAX/Flax NNX.

Model definitions live in ``attnzoo.models`` (both families, attention, masks, positional
encodings); data in ``attnzoo.data``; generation and beam search in ``attnzoo.decoding``;
training in ``attnzoo.training``. ``attnzoo.backends.tune_for_platform()`` switches on the
backend-specific tuning the CLIs use.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnzoo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from attnzoo.models import (  # noqa: E402
    MaskSpec,
    PositionConfig,
    decoder_lm,
    dot_product_attention,
    encoder_decoder,
)

__all__ = [
    "MaskSpec",
    "PositionConfig",
    "__version__",
    "decoder_lm",
    "dot_product_attention",
    "encoder_decoder",
]
