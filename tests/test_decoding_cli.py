"""The decoding CLIs end to end on workdirs trained 20 steps (LM: Shakespeare, MT: Bible)."""

import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from attnzoo import evaluation
from attnzoo.decoding import beam_search, cli, generate
from attnzoo.decoding.translate import translate
from attnzoo.models import decoder_lm
from attnzoo.training.checkpoint import load_for_inference

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _train(workdir: pathlib.Path, config: str, *overrides: str) -> pathlib.Path:
    cmd = [
        str(BIN / "attnzoo-train"),
        f"--config={ROOT / 'configs' / config}",
        f"--workdir={workdir}",
        "--config.steps=20",
        "--config.checkpoint_every=20",
        "--config.eval_every=20",
        "--config.batch_size=8",
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    return workdir


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lm"), "lm_tiny.py", "--config.seq_len=64")


@pytest.fixture(scope="module")
def mt_workdir(tmp_path_factory):
    # mt_tiny's own tokenizer, in the suite's shared data dir: trained once per test run
    return _train(tmp_path_factory.mktemp("mt") / "run", "mt_tiny.py", "--config.seq_len=32")


def test_generate_cli_prints_prompt_and_the_library_continuation(lm_workdir, capsys):
    cli.generate_main(
        ["--workdir", str(lm_workdir), "--prompt", "ROMEO:", "--prompt", "To", "--max_new_tokens",
         "12"]
    )  # fmt: skip
    lines = capsys.readouterr().out
    r = load_for_inference(str(lm_workdir))
    tok = r.tokenizer
    ids = [[tok.bos_id, *tok.encode(p)] for p in ("ROMEO:", "To")]
    new = generate(
        r.graphdef, r.params, r.model_cfg, ids, max_new_tokens=12, stop_tokens=[tok.eos_id]
    )
    rows = [cli.strip(row, eos_id=tok.eos_id) for row in np.asarray(new)]
    want = [p + tok.decode(row) for p, row in zip(("ROMEO:", "To"), rows, strict=True)]
    assert lines == "\n".join(want) + "\n"


def test_generate_cli_rejects_bad_options(lm_workdir):
    with pytest.raises(SystemExit, match="needs top_p="):
        cli.generate_main(["--workdir", str(lm_workdir), "--sampler", "top_p"])
    with pytest.raises(SystemExit, match="needs a 'mt' one"):
        cli.translate_main(["--workdir", str(lm_workdir)])


def test_eval_perplexity_matches_the_training_eval(lm_workdir, capsys):
    # the trainer evaluated eval_batches (8) batches of batch_size (8) of the same split
    cli.eval_main(["--workdir", str(lm_workdir), "--max_batches", "8", "--batch_size", "8"])
    got = json.loads(capsys.readouterr().out)
    summary = json.loads((lm_workdir / "summary.json").read_text())
    assert got["task"] == "lm" and got["step"] == 20
    np.testing.assert_allclose(got["perplexity"], summary["eval_perplexity"], rtol=1e-4)


def test_generate_console_entry_point(lm_workdir):
    # what pyproject's attnzoo-generate script runs, in a fresh process
    entry = "from attnzoo.decoding.cli import generate_main; generate_main()"
    out = subprocess.run(
        [sys.executable, "-c", entry, "--workdir", str(lm_workdir), "--prompt", "KING",
         "--max_new_tokens", "5", "--sampler", "sample", "--seed", "3"],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.stdout.startswith("KING")


def test_translate_cli_stdin_and_file_match_library_beam_search(mt_workdir, tmp_path, capsys):
    sentences = ["In the beginning God created the heaven and the earth.", "And God said", "Amen."]
    path = tmp_path / "in.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    cli.translate_main(["--workdir", str(mt_workdir), "--input", str(path), "--max_len", "16"])
    from_file = capsys.readouterr().out.split("\n")[:-1]
    sys.stdin = io.StringIO("\n".join(sentences))
    try:
        cli.translate_main(["--workdir", str(mt_workdir), "--max_len", "16"])
    finally:
        sys.stdin = sys.__stdin__
    assert capsys.readouterr().out.split("\n")[:-1] == from_file
    assert len(from_file) == len(sentences)

    r = load_for_inference(str(mt_workdir))
    tok = r.tokenizer
    for sentence, line in zip(sentences, from_file, strict=True):
        src = np.asarray([tok.encode(sentence) + [tok.eos_id]])
        best = beam_search(
            r.graphdef, r.params, r.model_cfg, src, max_len=16, eos_id=tok.eos_id,
            bos_id=tok.bos_id,
        )  # fmt: skip
        assert line == tok.decode(cli.strip(np.asarray(best)[0], eos_id=tok.eos_id))


def test_eval_cli_reports_bleu_for_mt(mt_workdir, capsys):
    cli.eval_main(
        ["--workdir", str(mt_workdir), "--max_batches", "2", "--max_sentences", "4",
         "--max_len", "8"]
    )  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["task"] == "mt" and got["sentences"] == 4
    assert 0.0 <= got["bleu"] <= 100.0 and got["perplexity"] > 1.0
    # sacreBLEU's signature (the settings), not its score line ("BLEU = ...")
    sig = dict(item.split(":", 1) for item in got["bleu_signature"].split("|"))
    assert sig["nrefs"] == "1" and sig["tok"] == "13a" and sig["case"] == "mixed"
    assert sig["version"] == sacrebleu.__version__


def test_eval_bleu_on_any_parallel_text(mt_workdir, tmp_path, capsys):
    sources = ["In the beginning God created the heaven and the earth.", "And God said", "Amen."]
    refs = ["En el principio creó Dios los cielos y la tierra.", "Y dijo Dios", "Amén."]
    src, ref = tmp_path / "test.en", tmp_path / "test.es"
    src.write_text("\n".join(sources) + "\n", encoding="utf-8")
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    cli.eval_main(
        ["--workdir", str(mt_workdir), "--src_file", str(src), "--ref_file", str(ref),
         "--max_len", "16"]
    )  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["src_file"] == str(src) and got["ref_file"] == str(ref) and "split" not in got
    r = load_for_inference(str(mt_workdir))
    hyps = translate(
        r.graphdef, r.params, r.model_cfg, r.tokenizer, sources, beam_size=4, alpha=0.6,
        max_len=16, max_src_len=r.config.seq_len,
    )  # fmt: skip
    assert got["sentences"] == 3
    assert got["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert got["bleu_signature"] == evaluation.bleu_signature()


def test_eval_text_file_perplexity_matches_a_direct_computation(lm_workdir, tmp_path, capsys):
    text = "\n".join(["ROMEO:", "But soft, what light through yonder window breaks?"] * 3)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    cli.eval_main(["--workdir", str(lm_workdir), "--text_file", str(path), "--batch_size", "2"])
    got = json.loads(capsys.readouterr().out)
    assert got["text_file"] == str(path) and got["task"] == "lm" and "split" not in got
    # by hand: [bos] + tokens + [eos] in consecutive windows of seq_len predictions
    r = load_for_inference(str(lm_workdir))
    tok, window = r.tokenizer, r.config.seq_len
    ids = np.asarray([tok.bos_id, *tok.encode(text), tok.eos_id])
    assert len(ids) - 1 > 2 * window  # three windows, the last one partial, over two batches
    nll = 0.0
    for start in range(0, len(ids) - 1, window):
        inputs, targets = ids[:-1][start : start + window], ids[1:][start : start + window]
        logits = decoder_lm.apply(r.graphdef, r.params, jnp.asarray(inputs[None]))
        logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        nll -= float(np.take_along_axis(logp, targets[:, None], axis=-1).sum())
    assert got["tokens"] == len(ids) - 1
    np.testing.assert_allclose(got["perplexity"], np.exp(nll / (len(ids) - 1)), rtol=1e-4)


def test_eval_file_options_are_checked(lm_workdir, mt_workdir, tmp_path):
    src, ref, empty = tmp_path / "src.txt", tmp_path / "ref.txt", tmp_path / "empty.txt"
    src.write_text("a\nb\n")
    ref.write_text("a\n")
    empty.write_text("")
    lm, mt = ["--workdir", str(lm_workdir)], ["--workdir", str(mt_workdir)]
    with pytest.raises(SystemExit, match="--text_file needs a 'lm' run; .* holds a 'mt' model"):
        cli.eval_main([*mt, "--text_file", str(src)])
    with pytest.raises(SystemExit, match="--src_file/--ref_file needs a 'mt' run"):
        cli.eval_main([*lm, "--src_file", str(src), "--ref_file", str(ref)])
    with pytest.raises(SystemExit, match="--src_file and --ref_file go together"):
        cli.eval_main([*mt, "--src_file", str(src)])
    with pytest.raises(SystemExit, match=r"has 2 lines but --ref_file .* has 1: give one"):
        cli.eval_main([*mt, "--src_file", str(src), "--ref_file", str(ref)])
    with pytest.raises(SystemExit, match=r"--text_file .*empty.txt is empty"):
        cli.eval_main([*lm, "--text_file", str(empty)])
    with pytest.raises(SystemExit, match=r"No such file or directory: .*missing.txt"):
        cli.eval_main([*lm, "--text_file", str(tmp_path / "missing.txt")])


@pytest.mark.parametrize("main", [cli.generate_main, cli.translate_main, cli.eval_main])
def test_help_shows_every_flag_with_help_and_default(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    options = capsys.readouterr().out.split("options:\n", 1)[1]
    names = set()
    for block in re.split(r"\n(?=  -)", options.rstrip()):
        spec, _, text = re.split(r"(\s{2,})", block.strip(), maxsplit=1)
        if spec.startswith("-h, --help"):
            continue
        flags = re.findall(r"--([\w-]+)", spec)
        names.update(flags)
        for name in flags:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"--{name}: not --snake_case"
        assert len(text.split()) >= 3, f"{spec} has no help"
        assert "default" in text or "(required)" in text, f"{spec} shows no default: {text}"
    assert {"workdir", "step", "cpu_tuning", "nocpu_tuning"} <= names
    if main is cli.eval_main:
        assert {"text_file", "src_file", "ref_file"} <= names


def test_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*missing"):
        cli.generate_main(["--workdir", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    "argv_tail, program, tuned",
    [
        ([], False, 0),  # called from Python: the caller's process is left alone
        (["--cpu_tuning"], False, 1),
        ([], True, 1),  # run as a program (argv from sys.argv): tuned unless opted out
        (["--nocpu_tuning"], True, 0),  # absl's spelling, as attnzoo-train's
        (["--no-cpu_tuning"], True, 0),  # argparse's, still accepted
    ],
)
def test_cpu_tuning_flag(tmp_path, monkeypatch, argv_tail, program, tuned):
    calls = []
    monkeypatch.setattr(cli.backends, "tune_for_platform", lambda: calls.append(1))
    argv = ["--workdir", str(tmp_path / "missing"), *argv_tail]
    if program:
        monkeypatch.setattr(sys, "argv", ["attnzoo-generate", *argv])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        cli.generate_main(None if program else argv)
    assert len(calls) == tuned
