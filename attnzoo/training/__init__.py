"""Training: config schema, sharding rules, mesh, optimizers, losses, pure steps, checkpoints, loop.

The curated API::

    from attnzoo import training
    from attnzoo.training import schema

    summary = training.train(schema.load_experiment("lm_tiny"), "runs/lm")  # attnzoo-train
    restored = training.load_for_inference("runs/lm")  # graphdef, params, tokenizer, configs

and, to write a loop of your own, ``make_optimizer`` (optax from the config), ``TrainState`` and
the pure ``train_step`` (jit and shard it as you like). The modules behind them: ``schema``
(config defaults, shipped experiments), ``rules`` (sharding tables), ``mesh``, ``sharding``,
``optim``, ``losses``, ``steps``, ``tasks``, ``experiment`` (a config -> jitted, sharded steps),
``checkpoint``, ``loop``; ``cli`` is ``attnzoo-train``. Importing this package starts no JAX
backend.
"""

from attnzoo.training.checkpoint import load_for_inference
from attnzoo.training.loop import train
from attnzoo.training.optim import make_optimizer
from attnzoo.training.steps import TrainState, train_step

__all__ = ["TrainState", "load_for_inference", "make_optimizer", "train", "train_step"]
