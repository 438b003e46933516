"""Decoding: sampling-based generation for decoder LMs and beam search for translation.

Both run as one compiled program (prefill, then ``lax.while_loop``s over new tokens with the
models' functional KV caches, in stages over a growing cache: ``stages``); ``translate`` turns
text into text. Scores (BLEU, perplexity) are in ``attnzoo.evaluation``; ``cli`` wraps all of it
as ``attnzoo-generate``, ``attnzoo-translate`` and ``attnzoo-eval``.
"""

from attnzoo.decoding import sampling
from attnzoo.decoding.beam_search import beam_search
from attnzoo.decoding.generation import generate, pad_prompts
from attnzoo.decoding.translate import translate

__all__ = ["beam_search", "generate", "pad_prompts", "sampling", "translate"]
