"""The one seam between training and data: tokenizers and batch iterators from the config.

Everything goes through ``attnzoo.data`` (``get_tokenizer``, ``lm_batches``, ``mt_batches``);
this module only translates experiment-config keys into their arguments.
"""

from __future__ import annotations

from typing import Any

import grain

import attnzoo.data
from attnzoo.training import schema


def get_tokenizer(config: schema.Config) -> attnzoo.data.Tokenizer:
    """The tokenizer named by ``config.tokenizer`` (trained and cached on first use)."""
    return attnzoo.data.get_tokenizer(
        config.tokenizer,
        dataset=config.dataset,
        vocab_size=config.vocab_size,
        data_dir=config.data_dir,
        seed=config.seed,
        text_keys=schema.text_keys(config),
    )


def batches(
    config: schema.Config,
    split: str,
    *,
    tokenizer: attnzoo.data.Tokenizer,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    seed: int | None = None,
) -> grain.DatasetIterator:
    """Per-process batches (dicts of ``[batch_size, seq_len]`` numpy arrays) for ``split``."""
    kw: dict[str, Any] = dict(
        tokenizer=tokenizer,
        seq_len=config.seq_len,
        batch_size=batch_size,
        seed=config.seed if seed is None else seed,
        data_dir=config.data_dir,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        packing=config.packing,
        text_keys=schema.text_keys(config),
    )
    make = {"lm": attnzoo.data.lm_batches, "mt": attnzoo.data.mt_batches}[config.task]
    return make(config.dataset, split, **kw)
