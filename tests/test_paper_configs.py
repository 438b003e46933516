"""The shipped WMT14 En->De and LM1B experiments build, and read their data the right way round.

tfds is mocked (``tfds.testing.mock_data``, as in ``test_data_tfds_mock.py``): no download, no
training; the models are built as shapes only (``experiment.build`` uses ``jax.eval_shape``).
The data is read with the byte tokenizer (a 37k sentencepiece vocabulary cannot be trained on a
handful of mocked sentences); everything else is the experiment's own config.
"""

from typing import Any

import numpy as np
import pytest
import tensorflow_datasets as tfds

import attnzoo.data
from attnzoo.data import sources
from attnzoo.training import experiment, input_pipeline, loop, schema

BYTE = attnzoo.data.get_tokenizer("byte")
# (German, English): the source fed to the encoder must be the English side
PAIRS = [
    ("Guten Morgen, meine Freunde.", "Good morning, my friends."),
    ("Das Haus ist klein.", "The house is small."),
    ("Ich trinke gern Kaffee.", "I like to drink coffee."),
    ("Wo ist der Bahnhof?", "Where is the station?"),
]


@pytest.fixture(autouse=True)
def _tensorflow_installed(monkeypatch):
    """The WMT/LM1B builders check for TensorFlow before preparing; mocked preparation needs
    none."""
    monkeypatch.setattr(sources, "tensorflow_available", lambda: True)


def _params(exp: experiment.Experiment) -> int:
    import jax  # noqa: PLC0415

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))


@pytest.mark.parametrize(
    ("name", "millions", "average_last"),
    [("wmt14_ende_base", (60, 66), 5), ("wmt14_ende_big", (205, 220), 20)],
)
def test_wmt14_ende_builds_and_translates_english_into_german(
    name, millions, average_last, tmp_path
):
    config: Any = schema.load_experiment(name)
    config.data_dir = str(tmp_path)
    loop.validate_config(config)
    # the paper's evaluation (section 6.1): beam 4 and alpha 0.6 are the CLI defaults; outputs
    # up to the input length + 50; sources not cut to the training length; checkpoint averaging
    assert config.eval_max_len_offset == 50 and config.eval_source_len > config.seq_len
    assert config.average_last == average_last
    exp = experiment.build(config, vocab_size=config.vocab_size)
    assert millions[0] * 1e6 < _params(exp) < millions[1] * 1e6

    def as_data_source(self, split, **kwargs):
        return [{"de": de, "en": en} for de, en in PAIRS]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        pairs = attnzoo.data.text_pairs(
            config.dataset, "test", config.data_dir, text_keys=schema.text_keys(config)
        )
        batch = next(
            input_pipeline.batches(config, "train", tokenizer=BYTE, batch_size=4, num_epochs=1)
        )
    assert pairs == [(en, de) for de, en in PAIRS]  # (source, reference) = (English, German)
    sources_seen, targets_seen = set(), set()
    for r in range(4):
        for s in range(1, batch["src_segment_ids"][r].max() + 1):
            src = batch["src"][r][batch["src_segment_ids"][r] == s]
            tgt = batch["tgt_targets"][r][batch["tgt_segment_ids"][r] == s]
            sources_seen.add(BYTE.decode(src))
            targets_seen.add(BYTE.decode(tgt))
    assert sources_seen == {en for _, en in PAIRS}  # the encoder reads English
    assert targets_seen == {de for de, _ in PAIRS}  # the decoder predicts German


def test_lm1b_base_builds_and_reads_sentences(tmp_path):
    config: Any = schema.load_experiment("lm1b_base")
    config.data_dir = str(tmp_path)
    loop.validate_config(config)
    exp = experiment.build(config, vocab_size=config.vocab_size)
    assert _params(exp) > 30e6
    texts = ["The cat sat on the mat .", "Stocks rose sharply on Monday ."]

    def as_data_source(self, split, **kwargs):
        return [{"text": t} for t in texts]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        batch = next(
            input_pipeline.batches(config, "train", tokenizer=BYTE, batch_size=2, num_epochs=1)
        )
    got = BYTE.decode(batch["targets"][batch["weights"] > 0].ravel())
    assert all(t in got for t in texts)
