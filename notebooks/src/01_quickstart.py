# Source of notebooks/01_quickstart.ipynb (build with notebooks/build_notebooks.py).

# %% [markdown]
# # attnzoo quickstart: train a tiny Shakespeare LM and sample from it
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attnzoo/attnzoo/blob/main/notebooks/01_quickstart.ipynb)
#
# In a few minutes on a Colab TPU (or CPU): find the accelerator, build a device mesh over all
# of it, train the `configs/lm_tiny.py` experiment (a byte-level Transformer on the bundled
# Shakespeare corpus) with a live loss plot, and generate text.
#
# The command-line equivalent is
#
# ```
# attnzoo-train --config attnzoo:lm_tiny --workdir runs/lm
# attnzoo-generate --workdir runs/lm --prompt "ROMEO:" --max_new_tokens 200
# ```

# %%
# On Colab, install attnzoo (with TPU support) from GitHub; elsewhere it is already installed.
try:
    import google.colab  # noqa: F401

    IN_COLAB = True
except ImportError:
    IN_COLAB = False
if IN_COLAB:
    # %pip install -q "attnzoo[tpu] @ git+https://github.com/attnzoo/attnzoo"
    print("installed attnzoo from GitHub")

# %%
import os
import pathlib
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython import display

from attnzoo import decoding
from attnzoo.training import checkpoint, experiment, input_pipeline, loop, schema, sharding, steps
from attnzoo.training.mesh import make_mesh

# CI sets this to run every cell quickly on CPU; the code path is the same either way.
QUICK = os.environ.get("ATTNZOO_NOTEBOOK_QUICK")
FIGURES = os.environ.get("ATTNZOO_NOTEBOOK_FIGURES")  # a directory: save the main plots there


def save(fig, name):
    if FIGURES:
        pathlib.Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(pathlib.Path(FIGURES) / f"{name}.png", dpi=110, bbox_inches="tight")


# %% [markdown]
# ## Backend and devices
#
# JAX picks the best backend it finds: `tpu` on a Colab TPU runtime, `gpu` on a GPU runtime,
# `cpu` otherwise. Every chip (or TPU core) is one device.

# %%
print("backend:", jax.default_backend())
print(f"{jax.device_count()} device(s):")
for d in jax.devices():
    print(f"  {d.id}: {d.device_kind}")

# %% [markdown]
# ## A mesh over all devices
#
# attnzoo lays devices out on a mesh with three named axes: `data` (each device its own slice
# of the batch), `fsdp` (parameters split too, gathered per layer) and `tensor` (attention heads
# and MLP columns split). `-1` means "all remaining devices". A tiny model wants plain data
# parallelism: the whole mesh on `data`.

# %%
mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
print(dict(mesh.shape))

# %% [markdown]
# ## The experiment
#
# An experiment is an `ml_collections.ConfigDict`: the task and dataset, a model preset with
# overrides, the optimizer and the mesh. `experiment.build` turns it into the model, the optax
# optimizer, the shardings of every parameter and the jitted train and eval steps.

# %%
config = schema.load_experiment("lm_tiny")  # configs/lm_tiny.py, shipped with attnzoo
config.steps = 30 if QUICK else 300
config.warmup_steps = min(config.warmup_steps, config.steps // 5)
config.eval_batches = 2 if QUICK else 8
print(config.model, dict(config.model_overrides))

tokenizer = input_pipeline.get_tokenizer(config)  # bytes: vocabulary 259
exp = experiment.build(config, vocab_size=tokenizer.vocab_size, mesh=mesh)
state = exp.init_state()  # created directly in its sharded layout
n_params = sum(x.size for x in jax.tree.leaves(state.params))
print(f"{n_params:,} parameters; batch {config.batch_size} x {config.seq_len} tokens")

# %% [markdown]
# ## Train, with a live loss plot
#
# The batches come from a grain pipeline over the bundled corpus (documents packed into rows
# of `seq_len` bytes). `put_batch` places each batch on the mesh, split along the batch axis.

# %%
batches = input_pipeline.batches(config, "train", tokenizer=tokenizer, batch_size=config.batch_size)
fig, ax = plt.subplots(figsize=(7, 3.5))
handle = display.display(fig, display_id=True)
history = []
for step in range(1, config.steps + 1):
    batch = sharding.put_batch(next(batches), exp.batch_sharding)
    state, metrics = exp.train_step(state, batch, steps.step_rng(state))
    history.append(float(metrics["loss"]))
    if step % 10 == 0 or step == config.steps:
        ax.clear()
        ax.plot(np.arange(1, step + 1), history, label="train")
        ax.set(
            title=f"Byte-level Shakespeare LM, step {step}/{config.steps}",
            xlabel="step",
            ylabel="cross-entropy (nats/byte)",
            xlim=(0, config.steps),
        )
        ax.grid(alpha=0.3)
        handle.update(fig)
plt.close(fig)

eval_metrics = loop.evaluate(
    config,
    state.params,
    eval_fn=exp.eval_step,
    tokenizer=tokenizer,
    batch_sharding=exp.batch_sharding,
)
ax.axhline(eval_metrics["eval_loss"], color="C1", ls="--", label="validation (end of training)")
ax.legend()
handle.update(fig)
save(fig, "01_loss")
print({k: round(v, 3) for k, v in eval_metrics.items()})

# %% [markdown]
# ## Generate
#
# `attnzoo.decoding.generate` runs the whole sampling loop as one jitted program
# (`lax.while_loop`s over a growing KV cache). Each training document starts with the BOS
# token, so prompts do too. After a few hundred steps the model has learned the shape of a
# play (names in capitals, line breaks, verse-like rhythm); the words come later.

# %%
prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in ("ROMEO:", "First Citizen:\n")]
new_tokens = decoding.generate(
    exp.graphdef,
    state.params,
    exp.model_cfg,
    prompts,
    # Trained on rows of seq_len bytes, the model has never seen later positions: stay inside.
    max_new_tokens=60 if QUICK else config.seq_len - max(map(len, prompts)),
    sampler="top_p",
    temperature=0.8,
    top_p=0.95,
    stop_tokens=(tokenizer.eos_id,),
    rng=jax.random.key(0),
)  # [B, max_new_tokens], padded with pad_id after a stop token
for prompt, row in zip(prompts, np.asarray(new_tokens), strict=True):
    print(tokenizer.decode(prompt) + tokenizer.decode(row))
    print("-" * 40)

# %% [markdown]
# ## Save a checkpoint, restore it for inference
#
# `attnzoo-train` saves orbax checkpoints (params, optimizer state, data-pipeline position and
# the experiment config) under `workdir/checkpoints`; `attnzoo-generate --workdir` restores
# them with `checkpoint.load_for_inference`, which rebuilds the model config and tokenizer from
# the saved experiment config and puts the params on one device, whatever mesh trained them.

# %%
workdir = tempfile.mkdtemp(prefix="attnzoo_quickstart_")
ckpt = checkpoint.Checkpoints(workdir)
ckpt.save(state, data_state=batches.get_state(), config=config, force=True)
ckpt.wait()
ckpt.close()

restored = checkpoint.load_for_inference(workdir)
print(f"restored step {restored.step} of a {restored.task!r} model, {restored.tokenizer}")
jax.tree.map(np.testing.assert_array_equal, restored.params, jax.device_get(state.params))
print("restored params == trained params")
