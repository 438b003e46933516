"""attnzoo: attention-based sequence models in JAX/Flax NNX.

Import model definitions from ``attnzoo.models``; training from ``attnzoo.training``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnzoo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from attnzoo.models import PositionConfig, decoder_lm, dot_product_attention  # noqa: E402

__all__ = ["PositionConfig", "__version__", "decoder_lm", "dot_product_attention"]
