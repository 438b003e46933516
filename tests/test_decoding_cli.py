"""The decoding CLIs end to end on workdirs trained 20 steps (LM: Shakespeare, MT: Bible)."""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from attnzoo.decoding import beam_search, cli, generate
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
    assert "BLEU" in got["bleu_signature"]


def test_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*missing"):
        cli.generate_main(["--workdir", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    "argv_tail, program, tuned",
    [
        ([], False, 0),  # called from Python: the caller's process is left alone
        (["--cpu_tuning"], False, 1),
        ([], True, 1),  # run as a program (argv from sys.argv): tuned unless opted out
        (["--no-cpu_tuning"], True, 0),
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
