"""Decoding: sampling-based generation for decoder LMs and beam search for translation.

Both run as one compiled program (prefill, then a ``lax.while_loop`` over new tokens with the
models' functional KV caches); ``cli`` wraps them as ``attnzoo-generate``,
``attnzoo-translate`` and ``attnzoo-eval``.
"""

from attnzoo.decoding import sampling
from attnzoo.decoding.generation import generate, pad_prompts

__all__ = ["generate", "pad_prompts", "sampling"]
