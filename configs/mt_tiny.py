"""English -> Spanish on the bundled Bible corpus: a 2+2-layer Transformer, CPU minutes.

attnzoo-train --config attnzoo:mt_tiny --workdir runs/mt
"""

from attnzoo.training import schema


def get_config():
    c = schema.get_config()
    c.task = "mt"
    c.dataset = "bible_en_es"
    c.tokenizer = "sentencepiece"
    c.vocab_size = 2000  # shared source/target vocabulary, trained on the train split
    c.model = "tiny"
    c.model_overrides.d_model = 128
    c.model_overrides.n_encoder_layers = 2
    c.model_overrides.n_decoder_layers = 2
    c.model_overrides.n_heads = 4
    c.model_overrides.d_ff = 512
    c.model_overrides.dropout = 0.0
    c.steps = 600
    c.batch_size = 32
    c.seq_len = 64
    c.learning_rate = 3e-3
    c.warmup_steps = 50
    c.label_smoothing = 0.1  # the paper's epsilon_ls
    c.eval_every = 200
    c.checkpoint_every = 200
    # BLEU is computed after training by `attnzoo-eval`; set e.g. 40 for BLEU at every eval
    # (beam search adds ~20 s per eval on 2 CPU cores).
    c.bleu_sentences = 0
    return c
