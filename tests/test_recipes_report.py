"""benchmarks/recipes.py: which checkpoints it evaluates, with which commands, the minutes it
puts beside them, its cache and its RESULTS.md section (the evaluations themselves are
attnzoo-eval's, tested elsewhere; here they are stubbed)."""

import importlib
import json
import pathlib
import sys

import pytest

# benchmarks/ is not an installed package; recipes imports benchmarks.positions, so the
# checkout's root goes on the path (as `python -m benchmarks.recipes` from it has)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
recipes = importlib.import_module("benchmarks.recipes")


def _workdir(root, name, steps, *, elapsed_per_step=None, evals=()):
    w = root / name
    for s in steps:
        (w / "checkpoints" / str(s)).mkdir(parents=True)
    rows = []
    for s in range(100, max(steps) + 1, 100):
        row = {"step": s, "train_loss": 1.0}
        if elapsed_per_step is not None:
            row["train_elapsed_s"] = s * elapsed_per_step
        rows.append(row)
    rows += [{"step": s, "eval_loss": loss} for s, loss in evals]
    (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "summary.json").write_text(json.dumps({"seconds": max(steps) * 0.9, "step": max(steps)}))
    return w


@pytest.fixture
def evals(monkeypatch):
    calls = []

    def fake_run_json(cmd):
        calls.append(cmd)
        step = int(cmd[cmd.index("--step") + 1]) if "--step" in cmd else 2000
        averaged = "--average_last" in cmd
        return {
            "bleu": step / 100 + (1.5 if averaged else 0.0),
            "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.5.1",
            "nll_per_token": 10.0 / step,
            "tokens": 1234.0,
        }

    def fake_generate(cmd):
        calls.append(cmd)
        return "ROMEO: sample\n"

    monkeypatch.setattr(recipes, "run_json", fake_run_json)
    monkeypatch.setattr(recipes, "run_text", fake_generate)
    return calls


def test_mt_evaluates_every_kept_checkpoint_and_the_average(tmp_path, evals):
    w = _workdir(
        tmp_path, "mt", [500, 1000, 1500, 1600, 1700, 1800, 1900, 2000], elapsed_per_step=0.6
    )
    points = recipes.mt_points(w, {})
    assert [(p["step"], p["averaged"]) for p in points] == [
        (500, False),
        (1000, False),
        (1500, False),
        (2000, False),
        (2000, True),
    ]
    assert [p["bleu"] for p in points] == [5.0, 10.0, 15.0, 20.0, 21.5]
    assert [p["minutes"] for p in points] == pytest.approx([5.0, 10.0, 15.0, 20.0, 20.0])
    for cmd in evals:
        assert cmd[cmd.index("--split") + 1] == "test"
        assert cmd[cmd.index("--max_sentences") + 1] == "678"
    assert evals[-1][evals[-1].index("--average_last") + 1] == "5"


def test_cache_is_reused_and_runs_without_elapsed_fall_back_to_the_summary(tmp_path, evals):
    w = _workdir(tmp_path, "mt", [500, 1000])  # no train_elapsed_s: 0.9 s per step
    cache = {}
    first = recipes.mt_points(w, cache)
    assert len(evals) == 3
    assert [p["minutes"] for p in first] == pytest.approx([7.5, 15.0, 15.0])
    assert recipes.mt_points(w, cache) == first and len(evals) == 3


def test_lm_curve_section_and_plot(tmp_path, evals):
    mt = _workdir(tmp_path, "mt", [500, 1000], elapsed_per_step=0.6)
    lm = _workdir(
        tmp_path, "lm", [500, 1000], elapsed_per_step=0.75, evals=[(500, 1.9), (1000, 1.7)]
    )
    lm_points = recipes.lm_points(lm, {})
    assert [(p["step"], p["val_loss"], p["averaged"]) for p in lm_points] == [
        (500, 1.9, False),
        (1000, 1.7, False),
        (1000, 0.005, True),
    ]
    assert lm_points[-1]["sample"] == "ROMEO: sample"
    results = tmp_path / "RESULTS.md"
    results.write_text("# head\n\n## Other\nkept\n")
    recipes.main(
        ["--mt", str(mt), "--lm", str(lm), "--out", str(tmp_path), "--markdown", str(results)]
    )
    text = results.read_text()
    assert text.startswith("# head\n\n## Other\nkept\n")
    section = text.split(recipes.BEGIN, 1)[1].split(recipes.END, 1)[0]
    assert "| 1000 | 10.0 | mean of last 5 | 11.50 |" in section
    assert "| 1000 | 12.5 | mean of last 5 | 0.0050 |" in section
    assert "tok:13a" in section and "ROMEO: sample" in section
    assert (tmp_path / "recipes.png").stat().st_size > 0
    assert (
        len((tmp_path / "recipes.jsonl").read_text().splitlines()) == 4
    )  # mt 500, 1000, averaged; lm averaged
    recipes.main(
        ["--mt", str(mt), "--lm", str(lm), "--out", str(tmp_path), "--markdown", str(results)]
    )
    assert results.read_text().count(recipes.BEGIN) == 1


def test_every_picks_the_curve_points(tmp_path, evals):
    w = _workdir(tmp_path, "mt", [200, 300, 400, 500, 600], elapsed_per_step=0.6)
    points = recipes.mt_points(w, {}, every=200)
    assert [(p["step"], p["averaged"]) for p in points] == [
        (200, False),
        (400, False),
        (600, False),
        (600, True),
    ]
