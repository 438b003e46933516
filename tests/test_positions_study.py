"""``python -m benchmarks.positions --smoke``: every kind trained and evaluated at every length,
learned positions n/a past their table; the RESULTS.md section is replaced between markers."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# benchmarks/ is not an installed package: load the script by its path
_spec = importlib.util.spec_from_file_location(
    "benchmarks_positions", ROOT / "benchmarks" / "positions.py"
)
assert _spec is not None and _spec.loader is not None
positions = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = positions  # (its dataclasses look their module up)
_spec.loader.exec_module(positions)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    results = out / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n| a | b |\n\n<!-- positions:begin -->\nold\n"
        "<!-- positions:end -->\n\n## Fault soak\n\nkept\n"
    )
    subprocess.run(
        [sys.executable, "-m", "benchmarks.positions", "--smoke", "--out", str(out),
         "--markdown", str(results), "--workdir_root", str(out / "runs")],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )  # fmt: skip
    return out


def test_smoke_table_has_every_kind_and_length(smoke):
    records = [json.loads(line) for line in (smoke / "positions.jsonl").read_text().splitlines()]
    lengths = positions.SMOKE.lengths
    train_len = positions.SMOKE.seq_len
    got = {(r["kind"], r["scaling"], r["length"]): r["perplexity"] for r in records}
    for kind in positions.KINDS:
        for n in lengths:
            ppl = got[(kind, None, n)]
            if kind == "learned" and n > train_len:
                assert ppl is None  # past the table: not applicable, not an error
            else:
                assert ppl is not None and 1.0 < ppl < 1e4, (kind, n, ppl)
    for scaling in positions.SCALINGS:
        for n in lengths:
            assert got[("rope", scaling, n)] is not None
        # factor 1 at the training length: every scaling is plain RoPE there
        assert got[("rope", scaling, train_len)] == pytest.approx(got[("rope", None, train_len)])
    table = (smoke / "positions.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| kind |"))
    assert header == "| kind | " + " | ".join(map(str, lengths)) + " |"
    learned = next(line for line in table.splitlines() if line.startswith("| learned |"))
    cells = [c.strip() for c in learned.split("|")[2:-1]]
    assert cells[0] != "n/a" and cells[1:] == ["n/a"] * (len(lengths) - 1)
    for kind in positions.KINDS:
        assert f"| {kind} |" in table
    assert "python -m benchmarks.positions --smoke" in table
    assert (smoke / "positions.png").stat().st_size > 1000


def test_results_section_is_replaced_between_its_markers(smoke):
    text = (smoke / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results\n\n| a | b |\n\n<!-- positions:begin -->\n")
    assert "old" not in text and text.count("<!-- positions:begin -->") == 1
    assert "## Positional encodings" in text and text.endswith("## Fault soak\n\nkept\n")


def test_study_trains_the_same_model_for_every_kind():
    configs = {k: positions.experiment_config(k, positions.FULL) for k in positions.KINDS}
    plain = {k: c.to_dict() for k, c in configs.items()}
    for c in plain.values():
        c["model_overrides"]["position"] = {}
    assert all(c == plain["rope"] for c in plain.values())
    assert configs["learned"].model_overrides.position.max_len == positions.FULL.seq_len == 256
    assert positions.FULL.lengths == (256, 512, 1024, 2048)
