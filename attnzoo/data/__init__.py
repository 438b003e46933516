"""Data: tfds builders for the bundled corpora, tokenizers and grain input pipelines.

Every dataset (bundled ``shakespeare`` and ``bible_en_es``; ``lm1b`` and ``wmt14_translate/de-en``
for users with internet) is prepared as ArrayRecord by tfds, read with ``tfds.data_source`` and
fed through grain. See ``attnzoo/data/corpora/README.md`` for provenance and licences.
"""

from attnzoo.data.pipeline import lm_batches, mt_batches
from attnzoo.data.sources import DATASETS, data_source, default_data_dir, text_pairs, texts
from attnzoo.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "DATASETS",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "data_source",
    "default_data_dir",
    "get_tokenizer",
    "lm_batches",
    "mt_batches",
    "text_pairs",
    "texts",
]
