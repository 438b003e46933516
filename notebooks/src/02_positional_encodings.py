# Source of notebooks/02_positional_encodings.ipynb (build with notebooks/build_notebooks.py).

# %% [markdown]
# # Positional encodings, one picture each
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attnzoo/attnzoo/blob/main/notebooks/02_positional_encodings.ipynb)
#
# Attention is permutation-invariant: without positional information a Transformer sees a bag
# of tokens. attnzoo implements every common fix behind one interface
# (`attnzoo.models.positional`), and a model picks one with `PositionConfig(kind=...)`:
#
# | hook | acts on | kinds |
# |---|---|---|
# | `Encoding.embed(x, positions)` | token embeddings, once per stack | `sinusoidal`, `learned` |
# | `Encoding.attention_bias(q_pos, k_pos)` | logits, shared by all layers | `alibi`, `t5` |
# | `LayerEncoding.rotate(x, positions)` | queries and keys, every layer | `rope`, `xpos` |
# | `LayerEncoding.relative(q_pos, k_pos)` | relative key/value terms, every layer | `shaw` |
#
# (`none` does nothing: a causal mask alone still lets a decoder infer positions.) Below: what
# each kind computes, then the attention maps of small models trained with each.

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
import contextlib
import os
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import attnzoo.data
from attnzoo.models import attention, decoder_lm, mha, positional
from attnzoo.models.positional import PositionConfig

# CI sets this to run every cell quickly on CPU; the code path is the same either way.
QUICK = os.environ.get("ATTNZOO_NOTEBOOK_QUICK")
FIGURES = os.environ.get("ATTNZOO_NOTEBOOK_FIGURES")  # a directory: save the main plots there


def save(fig, name):
    if FIGURES:
        pathlib.Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(pathlib.Path(FIGURES) / f"{name}.png", dpi=110, bbox_inches="tight")


print("registered kinds:", ", ".join(positional.kinds()))

# %% [markdown]
# ## Sinusoidal (Vaswani et al. 2017, section 3.5)
#
# $PE(pos, 2i) = \sin(pos / 10000^{2i/d})$, $PE(pos, 2i+1) = \cos(pos / 10000^{2i/d})$: each
# pair of dimensions is a clock ticking at its own frequency, from one turn every $2\pi$
# positions down to one every $2\pi \cdot 10000$. The dot product of two encodings depends only
# on their distance (right), which is what lets attention find relative offsets.

# %%
d_model, n_pos = 64, 128
table = np.asarray(positional.sinusoidal_table(jnp.arange(n_pos), d_model))  # [P, D]

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
im = ax0.imshow(table.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
ax0.set(title="Sinusoidal encoding PE(pos, dim)", xlabel="position", ylabel="dimension")
fig.colorbar(im, ax=ax0, label="value")
im = ax1.imshow(table @ table.T, cmap="viridis", origin="lower")
ax1.set(title="PE(m) · PE(n): depends on m - n only", xlabel="position n", ylabel="position m")
fig.colorbar(im, ax=ax1, label="dot product")
save(fig, "02_sinusoidal")
plt.show()

# %% [markdown]
# ## RoPE (Su et al. 2021): rotate queries and keys
#
# Rotary embeddings split each head's dims into pairs and rotate pair $i$ of the token at
# position $m$ by the angle $m\,\theta_i$, $\theta_i = \text{base}^{-2i/H}$. With the default
# `rope_layout="half"` (GPT-NeoX, LLaMA) pair $i$ is dims $(i, i + H/2)$. Left: three pairs of
# a rotated all-ones vector moving around their circles, each at its own speed. Right: the
# measured rotation per position of every pair against the formula.

# %%
H, T = 32, 64
positions = jnp.arange(T)[None]  # [1, T]
rope = positional.make_layer_encoding(
    PositionConfig(kind="rope", rope_layout="half"),
    n_heads=1,
    head_dim=H,
    causal=True,
    rngs=nnx.Rngs(0),
)
x = jnp.ones((1, T, 1, H))  # [B, T, N, H]: the same vector at every position
y = np.asarray(rope.rotate(x, positions, is_key=False))[0, :, 0]  # [T, H]
first, second = y[:, : H // 2], y[:, H // 2 :]  # [T, H/2] each: the two coordinates of a pair
np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.sqrt(H), rtol=1e-5)  # pure rotation
angles = np.unwrap(np.arctan2(second, first), axis=0) - np.pi / 4  # [T, H/2], 0 at position 0
measured = angles[-1] / (T - 1)  # mean rotation per position step
expected = 10000.0 ** (-2 * np.arange(H // 2) / H)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
circle = np.linspace(0, 2 * np.pi, 200)
ax0.plot(np.sqrt(2) * np.cos(circle), np.sqrt(2) * np.sin(circle), color="0.85", zorder=0)
for i, color in zip((0, 3, 6), ("C0", "C1", "C2"), strict=True):
    ax0.scatter(
        first[:16, i],
        second[:16, i],
        c=color,
        s=12 + 3 * np.arange(16),
        label=f"pair {i}: θ = {expected[i]:.3f} rad/position",
    )
    for m in (1, 5, 15):
        ax0.annotate(
            str(m),
            (first[m, i], second[m, i]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
ax0.set(
    title="RoPE: pairs rotate at different speeds (positions 0-15, labelled)",
    xlabel="first coordinate",
    ylabel="second coordinate",
    aspect="equal",
)
ax0.legend(fontsize=8, loc="lower left")
ax1.semilogy(measured, "o", label="measured from rotate()")
ax1.semilogy(expected, "--", label=r"$\theta_i = 10000^{-2i/H}$")
ax1.set(
    title="Rotation per position of each pair",
    xlabel="pair index i",
    ylabel="angle per position (rad)",
)
ax1.legend()
save(fig, "02_rope_rotation")
plt.show()
np.testing.assert_allclose(measured, expected, rtol=1e-3)

# %% [markdown]
# ### The offset-only property
#
# Rotating the query by $m\theta$ and the key by $n\theta$ leaves their dot product a function
# of $m - n$ alone: $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$. Left: the
# score of one random query/key pair at every (m, n) is constant along diagonals. Right: the
# score against the offset, measured at three absolute starting positions, for RoPE and xPos
# (Sun et al. 2022: RoPE times a decay $\zeta^{(m-n)/\gamma}$, still relative only): the curves
# coincide.

# %%
q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, H))  # [B, T, N, H] each


def scores(encoding, q_positions, k_positions):
    """<rotate(q, m), rotate(k, n)> for every m in q_positions and n in k_positions -> [M, N]."""
    qs = encoding.rotate(
        jnp.broadcast_to(q, (1, len(q_positions), 1, H)),
        jnp.asarray(q_positions)[None],
        is_key=False,
    )
    ks = encoding.rotate(
        jnp.broadcast_to(k, (1, len(k_positions), 1, H)),
        jnp.asarray(k_positions)[None],
        is_key=True,
    )
    return np.asarray(jnp.einsum("mh,nh->mn", qs[0, :, 0], ks[0, :, 0]))


xpos = positional.make_layer_encoding(
    PositionConfig(kind="xpos"), n_heads=1, head_dim=H, causal=True, rngs=nnx.Rngs(0)
)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
im = ax0.imshow(scores(rope, range(T), range(T)), cmap="RdBu_r", origin="lower")
ax0.set(title="RoPE score of q at m and k at n", xlabel="key position n", ylabel="query position m")
fig.colorbar(im, ax=ax0, label="q · k")
offsets = np.arange(48)
for name, encoding, style in (("RoPE", rope, "-"), ("xPos", xpos, "--")):
    curves = []
    for start in (0, 200, 1000):
        # query at start + offset, key at start: one column of the score matrix
        curve = scores(encoding, start + offsets, [start])[:, 0]
        curves.append(curve)
        ax1.plot(offsets, curve, style, label=f"{name}, key at {start}", alpha=0.8)
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(curves[2], curves[0], rtol=1e-3, atol=1e-3)
ax1.set(
    title="Score vs offset m - n at three absolute positions", xlabel="offset m - n", ylabel="q · k"
)
ax1.legend(fontsize=8, ncol=2)
save(fig, "02_rope_relative")
plt.show()

# %% [markdown]
# ## Biases on the attention logits, per head
#
# * **ALiBi** (Press et al. 2022) adds $-s_h\,(m - n)$: a fixed linear penalty on distance
#   with a different slope $s_h$ per head (geometric, $2^{-8h/N}$), no parameters.
# * **T5** (Raffel et al. 2020) adds a *learned* scalar per head and per distance bucket;
#   buckets are exact for small distances and logarithmically wider for larger ones (here at
#   initialisation, so the values are random but the bucket bands are visible).
# * **Shaw et al. 2018** learn a vector $a^K_{m-n}$ per clipped distance that is added to the
#   keys, so the bias $q_m \cdot a^K_{m-n}$ depends on the query's content; shown for one fixed
#   random query per head (`shaw_max_distance=4`: beyond 4 positions every distance looks alike).
#
# Decoder (causal) setting: the future (upper triangle) is masked and left blank.

# %%
N, H, T = 4, 16, 24
pos = jnp.arange(T)[None]  # [1, T]
causal = np.tril(np.ones((T, T), bool))
biases = {}  # kind -> [N, T, S]
for kind in ("alibi", "t5"):
    encoding = positional.make_encoding(
        PositionConfig(kind=kind),
        d_model=N * H,
        n_heads=N,
        head_dim=H,
        causal=True,
        rngs=nnx.Rngs(0),
    )
    biases[kind] = np.broadcast_to(np.asarray(encoding.attention_bias(pos, pos))[0], (N, T, T))
shaw = positional.make_layer_encoding(
    PositionConfig(kind="shaw", shaw_max_distance=4),
    n_heads=N,
    head_dim=H,
    causal=True,
    rngs=nnx.Rngs(0),
)
rel_k, _ = shaw.relative(pos, pos)  # [1, T, S, H]
query = jax.random.normal(jax.random.key(2), (N, H))  # one query vector per head
biases["shaw"] = np.asarray(jnp.einsum("nh,tsh->nts", query, rel_k[0]))

fig, axes = plt.subplots(3, N, figsize=(3.6 * N, 9), constrained_layout=True)
for row, (kind, bias) in zip(axes, biases.items(), strict=True):
    for h, ax in enumerate(row):
        # One colour scale per head: ALiBi's slopes differ by 4x from head to head.
        lim = np.abs(bias[h][causal]).max()
        im = ax.imshow(np.where(causal, bias[h], np.nan), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set(title=f"{kind}, head {h}", xlabel="key position", ylabel="query position")
        fig.colorbar(im, ax=ax, label="logit bias", shrink=0.8)
save(fig, "02_bias_per_head")
plt.show()

# %% [markdown]
# ## Attention maps of trained models, one per kind
#
# A 2-layer, 2-head byte-level model per kind, trained for a few hundred steps on the same
# Shakespeare batches. To see the attention weights we record them as the model computes them:
# `recorded_attention` swaps the attention function the layers call for one that also keeps
# its softmax weights (and checks that they reproduce the layer's output).


# %%
@contextlib.contextmanager
def recorded_attention():
    """Collects every attention call's weights [B, N, T, S], in call order (eager calls only).

    The weights are read off the library's own ``dot_product_attention`` (same masks, biases,
    relative terms) by attending over one-hot values: with ``v[s] = e_s`` the output for query
    ``t`` is the weight row ``w[t, :]``, one head_dim-wide block of keys per call.
    """
    weights = []

    def weights_of(q, k, **kw):
        B, S, K, H = k.shape
        blocks = []
        for start in range(0, S, H):
            one_hot = jax.nn.one_hot(jnp.arange(S) - start, H)  # [S, H], zero outside the block
            v = jnp.broadcast_to(one_hot[None, :, None, :], k.shape)  # [B, S, K, H]
            blocks.append(attention.dot_product_attention(q, k, v, **kw))  # [B, T, N, H]
        return jnp.concatenate(blocks, axis=-1)[..., :S].transpose(0, 2, 1, 3)  # [B, N, T, S]

    def attend(q, k, v, **kw):
        out = attention.dot_product_attention(q, k, v, **kw)  # [B, T, N, H]
        w = weights_of(q, k, **{**kw, "rel_v": None})
        # Check: the weights mix the values into the layer's real output.
        v_all = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)  # [B, S, N, H] (GQA groups)
        mixed = jnp.einsum("bnts,bsnh->btnh", w, v_all)
        if kw.get("rel_v") is not None:
            mixed += jnp.einsum("bnts,btsh->btnh", w, kw["rel_v"])
        np.testing.assert_allclose(mixed, out, atol=1e-4)
        weights.append(w)
        return out

    with mock.patch.object(mha, "dot_product_attention", attend):
        yield weights


# %%
steps = 10 if QUICK else 300
seq_len = 48
tokenizer = attnzoo.data.get_tokenizer("byte")
stream = attnzoo.data.lm_batches(
    "shakespeare", "train", tokenizer=tokenizer, seq_len=seq_len, batch_size=16, seed=0
)
shared_batches = [next(stream) for _ in range(steps)]  # every kind sees the same data
sample = "ROMEO:\nBut soft, what light through yonder"
sample_tokens = jnp.asarray([[tokenizer.bos_id] + tokenizer.encode(sample)])[:, :seq_len]  # [1, T]


def train(kind):
    """A tiny LM with positional ``kind`` trained on ``shared_batches`` -> (graphdef, params,
    losses)."""
    cfg = decoder_lm.Config.tiny(vocab_size=tokenizer.vocab_size).replace(
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=128,
        embed_scale=True,
        position=PositionConfig(kind=kind, max_len=seq_len),
    )
    graphdef, params = decoder_lm.init(cfg, jax.random.key(0))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, max(steps // 10, 1), steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(params):
            logits = decoder_lm.apply(
                graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"]
            )  # [B, T, V]
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return (nll * batch["weights"]).sum() / batch["weights"].sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for batch in shared_batches:
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return graphdef, params, losses


maps, curves = {}, {}
for kind in positional.kinds():
    graphdef, params, curves[kind] = train(kind)
    with recorded_attention() as weights:
        decoder_lm.apply(graphdef, params, sample_tokens)
    maps[kind] = np.asarray(weights[-1][0])  # last layer, [N, T, S]
    print(f"{kind:11s} loss {curves[kind][0]:.2f} -> {curves[kind][-1]:.2f}")

# %%
panels = [(kind, h) for kind in maps for h in range(maps[kind].shape[0])]  # (kind, head)
labels = [tokenizer.decode([t]) if t >= 3 else "<s>" for t in np.asarray(sample_tokens[0])]
labels = [{"\n": "\\n", " ": "␣"}.get(c, c) for c in labels]
ticks = np.arange(0, len(labels), 4)
cols = 4
rows = -(-len(panels) // cols)
fig, axes = plt.subplots(
    rows, cols, figsize=(4.2 * cols, 4.4 * rows), squeeze=False, constrained_layout=True
)
for ax, (kind, h) in zip(axes.flat, panels, strict=False):
    im = ax.imshow(maps[kind][h], cmap="magma", vmin=0, vmax=1)
    ax.set(title=f"{kind}, head {h}", xlabel="key", ylabel="query")
    ax.set_xticks(ticks, [labels[t] for t in ticks])
    ax.set_yticks(ticks, [labels[t] for t in ticks])
for ax in axes.flat[len(panels) :]:
    ax.axis("off")
fig.colorbar(im, ax=axes, label="attention weight", shrink=0.5)
fig.suptitle(f"Last-layer attention on {sample!r} after {steps} steps")
save(fig, "02_trained_attention")
plt.show()

fig, ax = plt.subplots(figsize=(7, 4))
for kind, losses in curves.items():
    ax.plot(np.arange(1, steps + 1), losses, label=kind)
ax.set(
    title="Training loss by positional encoding (same data, same init seed)",
    xlabel="step",
    ylabel="cross-entropy (nats/byte)",
)
ax.legend(ncol=2)
ax.grid(alpha=0.3)
save(fig, "02_loss_by_kind")
plt.show()
