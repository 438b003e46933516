"""attnzoo.evaluation: the scores the training loop and attnzoo-eval share."""

import math

import numpy as np
import pytest
import sacrebleu

from attnzoo import evaluation


def test_corpus_bleu_is_sacrebleu_13a():
    hyps = ["the cat sat on the mat .", "a dog barked loudly at night"]
    refs = ["the cat sat on the mat.", "the dog barked at night"]
    got = evaluation.corpus_bleu(hyps, refs)
    want = sacrebleu.corpus_bleu(hyps, [refs])
    assert got.score == want.score and str(got) == str(want)
    assert evaluation.corpus_bleu(refs, refs).score == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        evaluation.corpus_bleu(hyps, refs[:1])


def test_bleu_signature_is_sacrebleus_signature_not_the_score_line():
    sig = evaluation.bleu_signature()
    fields = dict(item.split(":", 1) for item in sig.split("|"))
    assert fields == {
        "nrefs": "1",
        "case": "mixed",
        "eff": "no",
        "tok": "13a",
        "smooth": "exp",
        "version": sacrebleu.__version__,
    }
    assert "BLEU" not in sig and "=" not in sig


def test_perplexity_is_token_weighted_over_batches():
    batches = [{"nll": np.float32(2.0), "w": np.float32(4.0)}, {"nll": 6.0, "w": 4.0}]
    sums = lambda b: (b["nll"], b["w"])
    got = evaluation.perplexity(sums, batches)
    assert got == {"nll_per_token": 1.0, "perplexity": math.e, "tokens": 8.0}
    assert evaluation.perplexity(sums, batches, max_batches=1)["nll_per_token"] == 0.5
    with pytest.raises(ValueError, match="no tokens"):
        evaluation.perplexity(sums, [{"nll": 0.0, "w": 0.0}])
