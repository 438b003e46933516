"""Issue 22: perplexity per evaluation length, RoPE scaling at inference, checkpoint averaging.

Two LM runs of 30 steps (RoPE; learned positions with a 64-row table), trained at 32 tokens;
references are computed here with NumPy float64 from ``decoder_lm.apply``.
"""

import importlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnzoo.data
from attnzoo import length_eval
from attnzoo.decoding import cli
from attnzoo.models import decoder_lm, encoder_decoder
from attnzoo.training import averaging
from attnzoo.training.checkpoint import Checkpoints, load_for_inference

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the module (attnzoo.decoding.translate is also the name of its function)
translate_module = importlib.import_module("attnzoo.decoding.translate")
BIN = pathlib.Path(sys.executable).parent
TRAIN_LEN = 32
MAX_TOKENS = 300  # not a multiple of the lengths: the last window is partial


def _train(workdir: pathlib.Path, *overrides: str) -> pathlib.Path:
    cmd = [
        str(BIN / "attnzoo-train"),
        f"--config={ROOT / 'configs' / 'lm_tiny.py'}",
        f"--workdir={workdir}",
        "--config.steps=30",
        "--config.checkpoint_every=10",
        "--config.eval_every=30",
        "--config.eval_batches=4",
        "--config.batch_size=8",
        f"--config.seq_len={TRAIN_LEN}",
        "--config.model_overrides.d_model=32",
        "--config.model_overrides.d_ff=64",
        "--config.model_overrides.n_layers=1",
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    return workdir


@pytest.fixture(scope="module")
def rope_workdir(tmp_path_factory):
    # keep_checkpoints=1 but average_last=3: the run must keep 3 (10, 20, 30) itself
    return _train(
        tmp_path_factory.mktemp("rope"),
        "--config.model_overrides.position.kind=rope",
        "--config.keep_checkpoints=1",
        "--config.average_last=3",
    )


@pytest.fixture(scope="module")
def learned_workdir(tmp_path_factory):
    return _train(
        tmp_path_factory.mktemp("learned"),
        "--config.model_overrides.position.kind=learned",
        "--config.model_overrides.position.max_len=64",
    )


def _eval_lines(capsys, *argv: str) -> dict[int, dict]:
    cli.eval_main(list(argv))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {rec["length"]: rec for rec in lines}


def _reference_ppl(graphdef, params, ids: np.ndarray, length: int, n: int) -> float:
    """exp(mean NLL) of predicting ids[1 : n + 1], each window of ``length`` from position 0,
    in NumPy float64."""
    nll = 0.0
    for start in range(0, n, length):
        stop = min(start + length, n)
        inputs, targets = ids[start:stop], ids[start + 1 : stop + 1]
        logits = decoder_lm.apply(graphdef, params, jnp.asarray(inputs[None]))
        z = np.asarray(logits[0], np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, targets[:, None], axis=-1).sum())
    return float(np.exp(nll / n))


def _stream(r) -> np.ndarray:
    docs = attnzoo.data.texts(r.config.dataset, "validation", r.config.data_dir)
    ids = [r.tokenizer.bos_id]
    for doc in docs:
        ids += [*r.tokenizer.encode(doc), r.tokenizer.eos_id]
        if len(ids) > MAX_TOKENS + 1:
            break
        ids.append(r.tokenizer.bos_id)
    return np.asarray(ids[: MAX_TOKENS + 1])


def test_parsers_accept_the_documented_forms_and_name_bad_ones():
    assert length_eval.parse_lengths("256, 512,1024,2048") == [256, 512, 1024, 2048]
    assert length_eval.parse_lengths("64,64,32") == [64, 32]
    for bad, match in [("", "empty"), ("12,x", "'x' is not"), ("0", ">= 1")]:
        with pytest.raises(ValueError, match=match):
            length_eval.parse_lengths(bad)
    assert length_eval.parse_rope_scaling("yarn:factor=4") == {
        "rope_scaling": "yarn",
        "rope_factor": 4.0,
    }
    assert length_eval.parse_rope_scaling("linear:factor=2,original_max_len=128") == {
        "rope_scaling": "linear",
        "rope_factor": 2.0,
        "rope_original_max_len": 128,
    }
    assert length_eval.parse_rope_scaling("dynamic:factor=2")["rope_scaling"] == "dynamic"
    for bad, match in [
        ("ntk:factor=2", "unknown --rope_scaling kind 'ntk'"),
        ("linear", "needs factor=F"),
        ("linear:factor=0.5", "needs factor=F with F >= 1"),
        ("yarn:fator=4", "'fator=4' is not KEY=VALUE with a known key"),
        ("yarn:factor=four", "is not a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            length_eval.parse_rope_scaling(bad)


def test_eval_cli_parser_rejects_bad_lengths(capsys):
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--workdir", "x", "--lengths", "256,abc"])
    assert e.value.code == 2 and "'abc' is not one" in capsys.readouterr().err


def test_window_batches_cover_the_stream_once_at_fixed_shape():
    ids = np.arange(1, 12, dtype=np.int32)  # 10 predictions
    batches = list(length_eval.window_batches(ids, length=4, rows=2, pad_id=0))
    assert [b["inputs"].shape for b in batches] == [(2, 4), (2, 4)]
    w = np.concatenate([b["weights"].ravel() for b in batches])
    t = np.concatenate([b["targets"].ravel() for b in batches])
    np.testing.assert_array_equal(t[w > 0], ids[1:])
    np.testing.assert_array_equal(batches[1]["positions"][0], [0, 1, 0, 0])  # padding: 0
    assert length_eval.rows_for(2048, 4096) == 2 and length_eval.rows_for(8192, 4096) == 1


def test_lengths_rope_finite_and_matches_numpy(rope_workdir, capsys):
    got = _eval_lines(
        capsys, "--workdir", str(rope_workdir), "--lengths", "32,64,128",
        "--max_tokens", str(MAX_TOKENS), "--batch_size", "2",
    )  # fmt: skip
    assert sorted(got) == [32, 64, 128]
    for rec in got.values():
        assert rec["task"] == "lm" and rec["train_seq_len"] == TRAIN_LEN
        assert np.isfinite(rec["perplexity"]) and rec["tokens"] == MAX_TOKENS
    # batch adapted: 2 x 32 tokens per batch
    assert [got[n]["rows"] for n in (32, 64, 128)] == [2, 1, 1]
    r = load_for_inference(str(rope_workdir))
    ids = _stream(r)
    for n in (32, 128):
        want = _reference_ppl(r.graphdef, r.params, ids, n, MAX_TOKENS)
        np.testing.assert_allclose(got[n]["perplexity"], want, rtol=1e-4)


def test_lengths_learned_is_null_past_its_table(learned_workdir, capsys):
    got = _eval_lines(
        capsys, "--workdir", str(learned_workdir), "--lengths", "32,64,128",
        "--max_tokens", str(MAX_TOKENS),
    )  # fmt: skip
    assert np.isfinite(got[32]["perplexity"]) and np.isfinite(got[64]["perplexity"])
    assert got[128]["perplexity"] is None
    assert "64 rows (position.max_len)" in got[128]["reason"]


def test_rope_scaling_needs_a_rope_run(learned_workdir):
    with pytest.raises(SystemExit, match="position kind is 'learned'.*leave --rope_scaling out"):
        cli.eval_main(
            ["--workdir", str(learned_workdir), "--lengths", "32", "--rope_scaling",
             "linear:factor=2"]
        )  # fmt: skip


def test_rope_scaling_linear_changes_the_result_as_a_model_built_with_it(rope_workdir, capsys):
    common = ["--workdir", str(rope_workdir), "--lengths", "64", "--max_tokens", str(MAX_TOKENS)]
    plain = _eval_lines(capsys, *common)[64]
    scaled = _eval_lines(capsys, *common, "--rope_scaling", "linear:factor=2")[64]
    assert scaled["rope_scaling"] == "linear:factor=2"
    # 30 steps teach little about positions: a small change, but 10x the tolerance below
    assert abs(scaled["perplexity"] - plain["perplexity"]) > 5e-5 * plain["perplexity"]
    # the reference: a model built with that scaling, the checkpoint's params, NumPy float64
    r = load_for_inference(str(rope_workdir))
    position = r.model_cfg.position.replace(
        rope_scaling="linear", rope_factor=2.0, rope_original_max_len=TRAIN_LEN
    )
    cfg = r.model_cfg.replace(position=position)
    graphdef, _ = decoder_lm.init(cfg, jax.random.key(0))
    want = _reference_ppl(graphdef, r.params, _stream(r), 64, MAX_TOKENS)
    np.testing.assert_allclose(scaled["perplexity"], want, rtol=5e-6)
    unscaled = _reference_ppl(r.graphdef, r.params, _stream(r), 64, MAX_TOKENS)
    np.testing.assert_allclose(plain["perplexity"], unscaled, rtol=5e-6)


def test_average_of_checkpoints_is_their_mean_in_float64(rope_workdir):
    r = load_for_inference(str(rope_workdir))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), r.params)
    ckpt = Checkpoints(rope_workdir, read_only=True)
    try:
        assert ckpt.steps() == [10, 20, 30]  # keep_checkpoints=1 raised to average_last=3
        steps, avg = averaging.average_checkpoints(ckpt, abstract, 2)
        each = [ckpt.restore_params(abstract, s)[1] for s in (20, 30)]
    finally:
        ckpt.close()
    assert steps == [20, 30]
    leaves_avg, leaves_a, leaves_b = (jax.tree.leaves(t) for t in (avg, *each))
    assert len(leaves_avg) > 3
    differ = 0
    for got, a, b in zip(leaves_avg, leaves_a, leaves_b, strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        differ += not np.array_equal(a64, b64)
        assert got.dtype == a.dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), (a64 + b64) / 2, rtol=1e-6)
    assert differ  # the two checkpoints are different models


def test_average_trees_checks_its_inputs():
    a = {"w": jnp.ones(3, jnp.bfloat16), "n": jnp.array(2)}
    b = {"w": jnp.full(3, 2.0, jnp.bfloat16), "n": jnp.array(2)}
    out = averaging.average_trees([a, b])
    assert out["w"].dtype == jnp.bfloat16 and float(out["w"][0]) == 1.5 and int(out["n"]) == 2
    with pytest.raises(ValueError, match="at least one"):
        averaging.average_trees([])
    with pytest.raises(ValueError, match="non-float leaf"):
        averaging.average_trees([a, {**b, "n": jnp.array(3)}])
    with pytest.raises(ValueError, match="shape"):
        averaging.average_trees([a, {**b, "w": jnp.ones(4, jnp.bfloat16)}])
    with pytest.raises(ValueError, match=r"needs 4, but .* has 3 \(steps \[1, 2, 3\]\)"):
        averaging.last_steps([3, 1, 2], 4, where="w")


def test_training_reports_the_average_and_eval_reproduces_it(rope_workdir, capsys):
    summary = json.loads((rope_workdir / "summary.json").read_text())
    assert summary["avg_checkpoints"] == 3
    assert summary["avg_eval_loss"] != summary["eval_loss"]
    # the trainer evaluated eval_batches (4) batches of batch_size (8) of the validation split
    cli.eval_main(
        ["--workdir", str(rope_workdir), "--max_batches", "4", "--batch_size", "8",
         "--average_last", "3"]
    )  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["averaged_steps"] == [10, 20, 30]
    np.testing.assert_allclose(got["perplexity"], summary["avg_eval_perplexity"], rtol=1e-4)
    with pytest.raises(SystemExit, match="averaging the last 4 checkpoints needs 4"):
        cli.eval_main(["--workdir", str(rope_workdir), "--average_last", "4"])


def test_translate_output_limit_is_source_width_plus_offset(monkeypatch):
    cfg = encoder_decoder.Config.tiny(vocab_size=260).replace(d_model=32, d_ff=64)
    graphdef, params = encoder_decoder.init(cfg, jax.random.key(0))
    tok = attnzoo.data.get_tokenizer("byte")
    seen: list[int] = []
    real = translate_module.beam_search

    def spy(*args, max_len, **kw):
        seen.append(max_len)
        return real(*args, max_len=max_len, **kw)

    monkeypatch.setattr(translate_module, "beam_search", spy)
    sentences = ["a" * 20, "b" * 3]  # 21 and 4 tokens with eos: widths 32 and 8
    out = translate_module.translate(
        graphdef, params, cfg, tok, sentences, beam_size=2, max_len=100, max_src_len=64,
        batch_size=1, max_len_offset=5,
    )  # fmt: skip
    assert seen == [37, 13] and len(out) == 2
    translate_module.translate(
        graphdef, params, cfg, tok, sentences[:1], beam_size=2, max_len=30, max_src_len=64,
        batch_size=1, max_len_offset=5,
    )  # fmt: skip
    assert seen[-1] == 30  # max_len still caps it
