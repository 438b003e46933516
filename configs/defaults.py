"""Defaults every experiment config starts from; experiment files override what they change.

Stable top-level keys (docs, notebooks and external tools rely on them): ``steps, batch_size,
seq_len, seed, learning_rate, eval_every, checkpoint_every, mesh.{data,fsdp,tensor}, model,
model_overrides, task, dataset, tokenizer, vocab_size``. ``attnzoo-train`` rejects any key that
is not here, so a typo in ``--config.lerning_rate`` fails instead of being ignored.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "lm"  # "lm" (attnzoo.models.decoder_lm) or "mt" (attnzoo.models.encoder_decoder)
    c.dataset = "shakespeare"
    c.tokenizer = "byte"  # "byte" or "sentencepiece"
    c.vocab_size = ml_collections.FieldReference(None, field_type=int)  # sentencepiece only
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.packing = True

    c.model = "tiny"  # a preset name of the task's model module (Config.preset)
    c.model_overrides = model_overrides()

    c.steps = 1000
    c.batch_size = 32  # global, across all processes and devices
    c.seq_len = 128
    c.seed = 0

    c.optimizer = "adamw"  # "adamw" or "adafactor"
    c.learning_rate = 1e-3  # peak; for schedule="rsqrt" a multiplier of the paper's formula
    c.schedule = "warmup_cosine"  # "warmup_cosine", "rsqrt" (the paper's), "constant"
    c.warmup_steps = 100
    c.final_lr_fraction = 0.1  # cosine decays to this fraction of the peak
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-9
    c.weight_decay = 0.0  # decoupled (AdamW); never applied to biases, norms
    c.clip_norm = 1.0  # global-norm clipping; 0 disables
    c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
    c.label_smoothing = 0.0
    c.z_loss = 0.0
    # head + loss in one chunked pass, never holding [B, T, V] logits (losses.fused_cross_entropy)
    c.fused_loss = True

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: remaining devices
    c.sharding = "dp"  # a table of attnzoo.configs.sharding.RULES

    c.eval_every = 200
    c.eval_batches = 8
    c.bleu_sentences = 0  # MT: sentences of the eval split translated for BLEU (0: skip)
    c.checkpoint_every = 200
    c.keep_checkpoints = 3  # latest N are kept, plus the best by eval loss
    c.async_checkpoints = True
    c.log_every = 10
    return c


# Model Config fields that can be overridden from the command line even when the experiment file
# does not set them (``--config.model_overrides.dtype=bfloat16``): ml_collections only accepts
# overrides of existing keys. ``None`` means "the preset's value". Experiment files may add any
# other field of the model's Config.
_OVERRIDABLE = {
    int: (
        "d_model",
        "n_layers",
        "n_encoder_layers",
        "n_decoder_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_ff",
    ),
    float: ("dropout", "attention_dropout", "activation_dropout"),
    str: ("dtype", "activation", "norm"),
    bool: ("remat", "embed_scale", "use_bias", "tie_embeddings"),
}


def model_overrides() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            name: ml_collections.FieldReference(None, field_type=kind)
            for kind, names in _OVERRIDABLE.items()
            for name in names
        }
    )
