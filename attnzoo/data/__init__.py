"""Data: tfds builders for the bundled corpora, tokenizers and grain input pipelines.

Every dataset (bundled ``shakespeare`` and ``bible_en_es``; ``lm1b``, ``wmt14_translate/de-en``
and ``wmt17_translate/de-en`` (also ``/en-de``) for users with internet) is prepared as ArrayRecord
by tfds on first use, read as a tfds data source and fed through grain::

    tok = data.get_tokenizer("sentencepiece", dataset="shakespeare")  # trained once, cached
    it = data.lm_batches("shakespeare", "train", tokenizer=tok, seq_len=256, batch_size=8)
    batch = next(it)  # inputs, targets, segment_ids, positions, weights: each [8, 256]
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes at the next batch

Your own data uses the same path: ``text:<glob>`` (LM), ``tsv:<glob>`` / ``jsonl:<glob>`` (MT) and
``tfds:<name>`` with ``text_keys``; see ``attnzoo.data.local`` for the spelling and splits.

See ``attnzoo/data/corpora/README.md`` for provenance and licences of the bundled corpora.
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
