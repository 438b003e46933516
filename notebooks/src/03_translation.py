# Source of notebooks/03_translation.ipynb (build with notebooks/build_notebooks.py).

# %% [markdown]
# # Translation: English -> Spanish with the paper's encoder-decoder
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attnzoo/attnzoo/blob/main/notebooks/03_translation.ipynb)
#
# Train the tiny encoder-decoder Transformer (`configs/mt_tiny.py`: 2+2 layers, d_model 128,
# post-LN, sinusoidal positions, label smoothing 0.1) on the bundled parallel Bible corpus,
# translate with beam search, score with sacreBLEU, and look at what the decoder attends to in
# the source. The command-line equivalent is
#
# ```
# attnzoo-train --config attnzoo:mt_tiny --workdir runs/mt
# attnzoo-translate --workdir runs/mt < english.txt
# attnzoo-eval --workdir runs/mt --split validation
# ```
#
# A few hundred steps on a tiny model learn frequent words and word order, not the Bible: expect
# low BLEU here, and much better with `transformer_base` on WMT (`configs/wmt14_ende_base.py`).

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
import sacrebleu

import attnzoo.data
from attnzoo import decoding
from attnzoo.models import attention, encoder_decoder, mha
from attnzoo.training import experiment, input_pipeline, loop, schema, sharding, steps
from attnzoo.training.mesh import make_mesh

# CI sets this to run every cell quickly on CPU; the code path is the same either way.
QUICK = os.environ.get("ATTNZOO_NOTEBOOK_QUICK")
FIGURES = os.environ.get("ATTNZOO_NOTEBOOK_FIGURES")  # a directory: save the main plots there


def save(fig, name):
    if FIGURES:
        pathlib.Path(FIGURES).mkdir(parents=True, exist_ok=True)
        fig.savefig(pathlib.Path(FIGURES) / f"{name}.png", dpi=110, bbox_inches="tight")


print(jax.default_backend(), jax.device_count(), "devices")

# %% [markdown]
# ## Data and tokenizer
#
# One sentencepiece vocabulary is shared by both languages; it is trained on the train split at
# first use and cached. Each training row packs several sentence pairs: equal segment ids on
# both sides mark one pair, so target segment *k* attends only to source segment *k*.

# %%
config = schema.load_experiment("mt_tiny")  # configs/mt_tiny.py, shipped with attnzoo
config.steps = 20 if QUICK else 600
config.warmup_steps = min(config.warmup_steps, config.steps // 5)
config.eval_batches = 2 if QUICK else 8
tokenizer = input_pipeline.get_tokenizer(config)
print(tokenizer)
english, spanish = attnzoo.data.text_pairs(config.dataset, "train")[0]
print(english, "\n->", spanish)
print("pieces:", [tokenizer.decode([i]) for i in tokenizer.encode(english)][:16])

# %% [markdown]
# ## Train

# %%
exp = experiment.build(
    config, vocab_size=tokenizer.vocab_size, mesh=make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
)
print(f"{encoder_decoder.param_count(exp.model_cfg):,} parameters on mesh {dict(exp.mesh.shape)}")
state = exp.init_state()
batches = input_pipeline.batches(config, "train", tokenizer=tokenizer, batch_size=config.batch_size)
history = []
for _ in range(config.steps):
    batch = sharding.put_batch(next(batches), exp.batch_sharding)
    state, metrics = exp.train_step(state, batch, steps.step_rng(state))
    history.append(float(metrics["loss"]))
eval_metrics = loop.evaluate(
    config,
    state.params,
    eval_fn=exp.eval_step,
    tokenizer=tokenizer,
    batch_sharding=exp.batch_sharding,
)
print({k: round(v, 3) for k, v in eval_metrics.items()})

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(np.arange(1, config.steps + 1), history, label="train (label-smoothed)")
ax.axhline(eval_metrics["eval_loss"], color="C1", ls="--", label="validation (end of training)")
ax.set(
    title="English -> Spanish, tiny encoder-decoder",
    xlabel="step",
    ylabel="cross-entropy (nats/token)",
)
ax.legend()
ax.grid(alpha=0.3)
save(fig, "03_loss")
plt.show()

# %% [markdown]
# ## Beam search and sacreBLEU
#
# `attnzoo.decoding.beam_search` encodes the source once, then runs beams over a KV cache with
# the GNMT length penalty $((5 + |y|) / 6)^\alpha$. Sources are formatted as in training
# (`tokens + [eos]`), padded with `pad_id` (0). For text in, text out (batching and length
# bucketing included) there is `attnzoo.decoding.translate(graphdef, params, cfg, tokenizer,
# sentences)`; here we stay at the token level to reuse the tokens below.

# %%
pairs = attnzoo.data.text_pairs(config.dataset, "validation")
pairs = [(s, t) for s, t in pairs if len(tokenizer.encode(s)) < config.seq_len]
pairs = pairs[: 8 if QUICK else 64]
sources = [tokenizer.encode(s) + [tokenizer.eos_id] for s, _ in pairs]
src_tokens = np.full((len(sources), max(map(len, sources))), tokenizer.pad_id, np.int32)
for row, ids in zip(src_tokens, sources, strict=True):
    row[: len(ids)] = ids  # [B, S]

out = np.asarray(
    decoding.beam_search(
        exp.graphdef,
        state.params,
        exp.model_cfg,
        jnp.asarray(src_tokens),
        beam_size=4,
        alpha=0.6,
        max_len=config.seq_len,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
    )
)  # [B, max_len]


def until_eos(ids):
    ids = [int(i) for i in ids if i not in (tokenizer.bos_id, tokenizer.pad_id)]
    return ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids


hypotheses = [tokenizer.decode(until_eos(row)) for row in out]
references = [t for _, t in pairs]
bleu = sacrebleu.corpus_bleu(hypotheses, [references])
print(bleu, "\n")
for (src, ref), hyp in list(zip(pairs, hypotheses, strict=True))[:3]:
    print(f"EN  {src}\nES  {ref}\nMT  {hyp}\n")

# %% [markdown]
# ## Where does the decoder look? Cross-attention alignment
#
# Each target token's cross-attention distributes one unit of weight over the source tokens.
# We record the weights while the model re-reads its own translation (teacher forcing on the
# beam output): `recorded_attention` swaps the attention function the layers call for one that
# also keeps its softmax weights, and checks that they reproduce the layer's output. Calls come
# in model order: the encoder's self-attention layers, then each decoder layer's self- and
# cross-attention.


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
i = int(np.argmin([len(s) for s in sources[:8]]))  # a short sentence reads best
src = jnp.asarray([sources[i]])  # [1, S]
tgt = jnp.asarray([[tokenizer.bos_id] + until_eos(out[i])])  # [1, T]
with recorded_attention() as weights:
    encoder_decoder.apply(exp.graphdef, state.params, src, tgt)
n_enc = exp.model_cfg.n_encoder_layers
cross = weights[n_enc + 1 :: 2]  # one [1, N, T, S] per decoder layer
assert len(cross) == exp.model_cfg.n_decoder_layers

src_labels = [tokenizer.decode([t]) or "</s>" for t in sources[i]]
# Row t is the decoder reading input t to predict target token t + 1: label rows by prediction.
tgt_labels = [tokenizer.decode([t]) for t in until_eos(out[i])] + ["</s>"]
fig, axes = plt.subplots(
    1, len(cross), figsize=(6.5 * len(cross), 6), squeeze=False, constrained_layout=True
)
for layer, (ax, w) in enumerate(zip(axes[0], cross, strict=True)):
    im = ax.imshow(np.asarray(w[0].mean(0)), cmap="Blues", vmin=0)  # [T, S], heads averaged
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt_labels)), tgt_labels, fontsize=8)
    ax.set(
        title=f"Decoder layer {layer}: cross-attention (mean over heads)",
        xlabel="source (English)",
        ylabel="predicted target token (Spanish, model output)",
    )
    fig.colorbar(im, ax=ax, label="attention weight", shrink=0.7)
save(fig, "03_cross_attention")
plt.show()
