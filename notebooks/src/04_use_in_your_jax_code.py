# Source of notebooks/04_use_in_your_jax_code.ipynb (build with notebooks/build_notebooks.py).

# %% [markdown]
# # Use attnzoo in your own JAX code
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attnzoo/attnzoo/blob/main/notebooks/04_use_in_your_jax_code.ipynb)
#
# attnzoo models are two pure functions over plain pytrees:
#
# ```python
# graphdef, params = decoder_lm.init(cfg, rng)        # static structure + a pytree of arrays
# logits = decoder_lm.apply(graphdef, params, tokens)  # [B, T] int -> [B, T, V]
# ```
#
# so everything JAX does to pytrees (`jit`, `grad`, `vmap`, `device_put` with shardings, optax)
# works on them unchanged. This notebook shows each of those, then loads converted Hugging Face
# weights.

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
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import attnzoo.data
from attnzoo.models import decoder_lm

# CI sets this to run every cell quickly on CPU; the code path is the same either way.
QUICK = os.environ.get("ATTNZOO_NOTEBOOK_QUICK")
FIGURES = os.environ.get("ATTNZOO_NOTEBOOK_FIGURES")  # a directory: save the main plots there


def save(fig, name):
    if FIGURES:
        pathlib.Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(pathlib.Path(FIGURES) / f"{name}.png", dpi=110, bbox_inches="tight")


print(jax.default_backend(), jax.device_count(), "devices")

# %% [markdown]
# ## `init` and `apply`
#
# A `Config` is a frozen dataclass; presets are classmethods and `replace` varies a field. The
# byte tokenizer has a fixed 259-token vocabulary (256 bytes plus pad, bos, eos).

# %%
tokenizer = attnzoo.data.get_tokenizer("byte")
cfg = decoder_lm.Config.tiny(vocab_size=tokenizer.vocab_size).replace(
    d_model=64, n_layers=2, n_heads=4, d_ff=256, embed_scale=True
)
graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
print(f"{decoder_lm.param_count(cfg):,} parameters")

text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
ids = tokenizer.encode(text)
tokens = jnp.asarray([ids[i : i + 32] for i in (0, 10, 20, 30)])  # [B, T] = [4, 32]
logits = decoder_lm.apply(graphdef, params, tokens)  # [B, T, V]
print("tokens", tokens.shape, "-> logits", logits.shape)

# %% [markdown]
# `params` is an `nnx.State`: a nested dict of `nnx.Param` leaves. Each leaf records its
# *logical* axis names, which we use for sharding below.

# %%
for path, leaf in list(nnx.to_flat_state(params))[:6]:
    print(f"{'/'.join(map(str, path)):40s} {str(leaf.get_value().shape):14s} {leaf.out_sharding}")

# %% [markdown]
# ## `jax.jit`, `jax.grad`, `jax.vmap`
#
# The loss is the usual next-token cross-entropy: predict `tokens[:, 1:]` from `tokens[:, :-1]`.
# `graphdef` is static Python structure, so it is closed over rather than passed as an argument.


# %%
def loss_fn(params, tokens):
    """tokens: [B, T] -> mean next-token cross-entropy (a scalar)."""
    logits = decoder_lm.apply(graphdef, params, tokens[:, :-1])  # [B, T-1, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, tokens)
print(f"loss {loss:.3f} (uniform guess: ln V = {np.log(cfg.vocab_size):.3f})")
print(f"gradient global norm {optax.tree.norm(grads):.3f}")

# Per-example gradients: vmap the gradient over the batch, each row a batch of one.
per_example_grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(
    params,
    tokens[:, None, :],  # [B, 1, T]
)
norms = jax.vmap(optax.tree.norm)(per_example_grads)  # [B]
print("per-example gradient norms", np.round(np.asarray(norms), 3))
# Every row has the same number of targets, so the batch gradient is the mean of the rows'.
mean_grad = jax.tree.map(lambda g: g.mean(0), per_example_grads)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), mean_grad, grads)

# %% [markdown]
# ## A custom optax training loop
#
# Packed Shakespeare batches come from `attnzoo.data.lm_batches` (a resumable grain iterator).
# Each batch is a dict of `[batch, seq_len]` numpy arrays; `segment_ids` keep packed documents
# from attending to each other and `weights` zero out padding in the loss.

# %%
steps = 20 if QUICK else 300
batches = attnzoo.data.lm_batches(
    "shakespeare", "train", tokenizer=tokenizer, seq_len=64, batch_size=16, seed=0
)
schedule = optax.warmup_cosine_decay_schedule(
    0.0, 3e-3, warmup_steps=min(20, steps // 2), decay_steps=steps, end_value=3e-4
)
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98))
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state, batch):
    def batch_loss(params):
        logits = decoder_lm.apply(
            graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"]
        )  # [B, T, V]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return (nll * batch["weights"]).sum() / batch["weights"].sum()

    loss, grads = jax.value_and_grad(batch_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


losses = []
for _ in range(steps):
    params, opt_state, loss = train_step(params, opt_state, next(batches))
    losses.append(float(loss))
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {steps} steps")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, steps + 1), losses)
ax.set(
    title="Custom optax loop: byte-level Shakespeare LM",
    xlabel="step",
    ylabel="train cross-entropy (nats/byte)",
)
ax.grid(alpha=0.3)
save(fig, "04_custom_loop_loss")
plt.show()

# %% [markdown]
# ## Sharding the params over a mesh yourself
#
# Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...). A *rules
# table* maps each name to a mesh axis (or `None`: replicated). Below: a 2-D mesh with a `data`
# axis and a `model` axis, Megatron-style tensor parallelism over `model` (attention heads and
# the MLP hidden layer split across devices). A dimension that the mesh axis does not divide
# (the 259-entry byte vocabulary) stays replicated.

# %%
n = jax.device_count()
model_ways = 2 if n % 2 == 0 else 1
# Auto axes: XLA propagates shardings from params and inputs to every intermediate.
mesh = jax.make_mesh(
    (n // model_ways, model_ways), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto)
)
RULES = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "mlp": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "relpos": None,
    "position": None,
}


def mesh_spec(logical: PartitionSpec, shape: tuple[int, ...]) -> PartitionSpec:
    """Logical names of one array -> its mesh PartitionSpec (replicate what does not divide)."""
    axes = []
    for name, size in zip(logical, shape, strict=True):
        axis = RULES[name] if name is not None else None
        axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*axes)


logical_specs = nnx.get_partition_spec(params)  # same tree, a PartitionSpec of names per leaf
shardings = jax.tree.map(
    lambda x, spec: NamedSharding(mesh, mesh_spec(spec, x.shape)), params, logical_specs
)
sharded_params = jax.device_put(params, shardings)

for path, leaf in nnx.to_flat_state(sharded_params):
    x = leaf.get_value()
    if x.ndim < 2 or path[:2] == ("blocks", 1):  # the matrices of one block are enough
        continue
    print(
        f"{'/'.join(map(str, path)):34s} {str(x.sharding.spec):24s} "
        f"global {str(x.shape):14s} per device {x.sharding.shard_shape(x.shape)}"
    )

# %% [markdown]
# The forward pass needs no change: `jit` compiles one SPMD program for the whole mesh, and the
# logits match the single-device ones.

# %%
rows = jnp.tile(tokens, (mesh.shape["data"], 1))  # [4 * data, T]: divisible by the data axis
batch = jax.device_put(rows, NamedSharding(mesh, PartitionSpec(RULES["batch"], None)))
sharded_logits = jax.jit(lambda p, t: decoder_lm.apply(graphdef, p, t))(sharded_params, batch)
single_logits = decoder_lm.apply(graphdef, params, rows)
print("logits sharding:", sharded_logits.sharding.spec)
np.testing.assert_allclose(sharded_logits, single_logits, atol=1e-4, rtol=1e-4)
print("sharded == single-device logits")

# %% [markdown]
# `attnzoo.training` does the same with its own tables (`attnzoo.training.rules.RULES`:
# `dp`, `fsdp`, `fsdp_tp`) over a `("data", "fsdp", "tensor")` mesh:
# `attnzoo.training.sharding.tree_shardings(params, mesh, rules)`.
#
# ## Loading converted Hugging Face weights
#
# `attnzoo.models.convert.from_transformers` turns a transformers PyTorch model (GPT-2, LLaMA,
# Marian) into `(cfg, graphdef, params)` computing the same logits. Here the GPT-2 is tiny and
# randomly initialised from a `GPT2Config`, so the cell needs no download. With internet, pass
# a real pretrained model instead:
#
# ```python
# hf_model = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
# gpt2_cfg, gpt2_graphdef, gpt2_params = convert.from_transformers(hf_model)
# ```
#
# (or `convert.from_safetensors(checkpoint_dir)`, which needs no torch). `convert.to_transformers`
# goes the other way.

# %%
if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
    import torch
    import transformers

    from attnzoo.models import convert

    hf_config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    gpt2_cfg, gpt2_graphdef, gpt2_params = convert.from_transformers(hf_model)

    ids = np.random.default_rng(0).integers(0, hf_config.vocab_size, (2, 16))  # [B, T]
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(ids)).logits.numpy()  # [B, T, V]
    our_logits = np.asarray(decoder_lm.apply(gpt2_graphdef, gpt2_params, jnp.asarray(ids)))
    print(f"max |attnzoo - transformers| = {np.abs(our_logits - hf_logits).max():.2e}")
    np.testing.assert_allclose(our_logits, hf_logits, atol=1e-4, rtol=1e-4)
else:
    print("pip install torch transformers to run this section")
