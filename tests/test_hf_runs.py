"""Hugging Face and training runs: ``--config.init_from`` (a run starts from converted GPT-2
weights), ``attnzoo-export`` (a run read by transformers) and ``attnzoo-generate --hf_dir``."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

from attnzoo.data.tokenizers import ByteTokenizer
from attnzoo.decoding import cli
from attnzoo.models import convert, decoder_lm
from attnzoo.training import (
    experiment,
    hf_export,
    init_from,
    input_pipeline,
    load_for_inference,
    loop,
    schema,
)
from attnzoo.training.losses import cross_entropy

V = ByteTokenizer.vocab_size  # 259


def _config(**kw):
    """A GPT-2-shaped byte-level run: 1 layer, d_model 32, 2 steps, one device."""
    c = schema.load_experiment("lm_tiny")
    c.model = "gpt2_small"
    o = c.model_overrides
    o.d_model, o.n_layers, o.n_heads, o.d_ff = 32, 1, 2, 64
    o.embed_scale = False  # lm_tiny's sqrt(d) scale has no GPT-2 equivalent
    o.position.max_len = 64
    c.mesh.data = 1
    c.update(
        dict(steps=2, batch_size=8, seq_len=32, eval_every=2, checkpoint_every=2,
             eval_batches=1, log_every=1, warmup_steps=1, async_checkpoints=False),
        **kw,
    )  # fmt: skip
    return c


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A transformers GPT-2 of the run's shape, saved by transformers. Its token table has
    std 1 (not 0.02), so its loss is far from a fresh model's log(V)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_inner=64, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 1.0)
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run(hf_gpt2, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = _config(init_from=str(hf_gpt2))
    loop.train(config, str(workdir))
    return config, workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    summary = hf_export.export_run(run[1], out)
    assert summary["family"] == "gpt2" and summary["step"] == 2
    assert "tokenizer.json" in summary["files"]
    return out


def _flat(params):
    return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}


def test_first_logged_loss_is_the_converted_models_loss(run, hf_gpt2):
    config, workdir = run
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    # the same first batch, through the params convert reads from the directory
    _, graphdef, params = convert.from_pretrained(hf_gpt2)
    batch = next(input_pipeline.batches(config, "train", tokenizer=ByteTokenizer(), batch_size=8))
    logits = decoder_lm.apply(
        graphdef, params, *(jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))
    )
    sums = cross_entropy(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"]))
    want = float(sums["loss"] / sums["weight"])
    print(f"\nfirst logged loss {first['train_loss']:.6f}, converted model's {want:.6f}")
    assert first["train_loss"] == pytest.approx(want, rel=1e-5)
    assert abs(want - math.log(V)) > 1.0  # a fresh init (~log V) could not pass


@pytest.mark.parametrize("source", ["directory", "safetensors"])
def test_init_from_params_are_the_converted_ones_and_the_optimizer_is_fresh(hf_gpt2, source):
    path = hf_gpt2 if source == "directory" else hf_gpt2 / "model.safetensors"
    config = _config(init_from=str(path))
    exp = experiment.build(config, vocab_size=V)
    state = init_from.initial_state(config, exp)
    want = _flat(convert.from_pretrained(hf_gpt2)[2])
    got = _flat(state.params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert int(state.step) == 0
    for leaf in jax.tree.leaves(state.opt_state):
        assert not np.asarray(leaf).any()  # AdamW's count and moments start at zero


def test_init_from_mismatches_are_named(hf_gpt2):
    config = _config(init_from=str(hf_gpt2))
    config.model_overrides.d_ff = 128
    exp = experiment.build(config, vocab_size=V)
    want = (
        r"param blocks/0/mlp/wi/bias has shape \(64,\) there, but the config's model needs "
        r"\(128,\); set --config.model_overrides"
    )
    with pytest.raises(ValueError, match=want):
        init_from.initial_state(config, exp)
    config = _config(init_from=str(hf_gpt2 / "missing"))
    with pytest.raises(ValueError, match="no such file or directory; give a training workdir"):
        init_from.initial_state(config, experiment.build(config, vocab_size=V))


def test_resume_ignores_init_from(run, tmp_path):
    config, workdir = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(".lock"))
    # a changed (even missing) init_from neither fails the config check nor is read
    summary = loop.train(_config(steps=3, init_from="/no/such/checkpoint"), str(copy))
    assert (summary["start_step"], summary["step"]) == (2, 3)


def test_exported_run_loads_in_transformers_with_the_same_logits(run, exported):
    r = load_for_inference(str(run[1]))
    tokens = np.random.RandomState(0).randint(0, V, (2, 24))
    ours = np.asarray(decoder_lm.apply(r.graphdef, r.params, jnp.asarray(tokens)))
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert tok("ROMEO: wherefore", add_special_tokens=False).input_ids == ByteTokenizer().encode(
        "ROMEO: wherefore"
    )


def test_generate_hf_dir_prints_what_the_run_prints(run, exported, capsys):
    args = ["--prompt", "ROMEO:", "--prompt", "To be", "--max_new_tokens", "10"]
    cli.generate_main(["--workdir", str(run[1]), *args])
    from_run = capsys.readouterr().out
    cli.generate_main(["--hf_dir", str(exported), *args])
    assert capsys.readouterr().out == from_run
    assert from_run.startswith("ROMEO:")
    with pytest.raises(SystemExit, match="either --workdir"):
        cli.generate_main(["--hf_dir", str(exported), "--workdir", str(run[1])])


def test_export_cli_refuses_a_model_without_hugging_face_equivalent(tmp_path, capsys):
    config = _config(steps=1, eval_every=1, checkpoint_every=1)
    config.model = "tiny"  # sinusoidal positions
    loop.train(config, str(tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        hf_export.export_main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert str(e.value).startswith("attnzoo-export: error: the 'lm' model of")
    assert "position.kind='sinusoidal' (gpt2 has 'learned')" in str(e.value)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_generate_hf_dir_with_a_word_level_tokenizer(tmp_path, capsys):
    """A checkpoint transformers wrote and a tokenizer.json built with ``tokenizers``; the
    reference is transformers' own greedy ``generate``."""
    words = ["<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "[UNK]"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=len(words), n_embd=32, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 1.0)  # decisive argmaxes
    model.save_pretrained(tmp_path)
    cli.generate_main(["--hf_dir", str(tmp_path), "--prompt", "the cat", "--max_new_tokens", "6"])
    printed = capsys.readouterr().out
    prompt = [1, *tok.encode("the cat", add_special_tokens=False).ids]
    with torch.no_grad():
        out = model.generate(  # pyright: ignore[reportAttributeAccessIssue]
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
    new = out[: out.index(2)] if 2 in out else out
    assert printed == "the cat" + tok.decode(new, skip_special_tokens=True) + "\n"
    assert len(printed) > len("the cat\n")
