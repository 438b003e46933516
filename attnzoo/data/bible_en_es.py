"""tfds builder ``attnzoo_bible_en_es``: 31,077 English-Spanish Bible verse pairs.

World English Bible / Reina-Valera 1909, both public domain. Fixed splits from the corpus README
so BLEU stays comparable: test = Mark, validation = Ruth, train = every other book. Prepared
offline into ArrayRecord files (``corpora.CorpusBuilder``), so once this module is imported
``tfds.data_source("attnzoo_bible_en_es", split="test")`` works without TensorFlow.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from attnzoo.data import corpora

SPLIT_BOOKS = {"validation": "Ruth", "test": "Mark"}


class AttnzooBibleEnEs(corpora.CorpusBuilder):
    """English -> Spanish verse pairs; examples keep their ``Book chapter:verse`` reference."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per verse."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {key: tfds.features.Text() for key in ("en", "es", "ref")}
            ),
            supervised_keys=("en", "es"),
            homepage="https://ebible.org/web/",
            license="Public domain",
            # Keep verse order so translations of a split read as the book.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is bundled
        verses = corpora.bible_verses()
        book_split = {book: split for split, book in SPLIT_BOOKS.items()}
        by_split = {"train": [], "validation": [], "test": []}
        for verse in verses:
            by_split[book_split.get(corpora.book_of(verse[0]), "train")].append(verse)
        empty = [s for s, v in by_split.items() if not v]
        if empty:
            raise ValueError(f"bundled Bible corpus has no verses for splits {empty}; reinstall")
        return {split: self._generate_examples(v) for split, v in by_split.items()}

    def _generate_examples(self, verses: list[tuple[str, str, str]]):
        for ref, en, es in verses:
            yield ref, {"en": en, "es": es, "ref": ref}
