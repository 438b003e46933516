"""The notebooks run top to bottom, are committed without outputs, and match their sources.

Each notebook is executed headlessly with nbclient in a kernel running *this* interpreter (the
venv's python, via a temporary kernelspec), with ``ATTNZOO_NOTEBOOK_QUICK=1`` (few steps) and
``MPLBACKEND=Agg``. The kernel inherits this process's environment, so conftest's 8 fake CPU
devices (and its fast-compile XLA flags) apply there too and the sharding cells run on a real
multi-device mesh.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Per cell; the slowest cells train small models on 2 shared CPU cores.
CELL_TIMEOUT_S = 600
# Plots each notebook must save when ATTNZOO_NOTEBOOK_FIGURES names a directory.
FIGURES = {
    "01_quickstart": ["01_loss"],
    "02_positional_encodings": [
        "02_sinusoidal",
        "02_rope_rotation",
        "02_rope_relative",
        "02_bias_per_head",
        "02_trained_attention",
        "02_loss_by_kind",
    ],
    "03_translation": ["03_loss", "03_cross_attention"],
    "04_use_in_your_jax_code": ["04_custom_loop_loss"],
}
NAMES = list(FIGURES)


def _load(name: str):
    """A helper script of notebooks/ as a module (notebooks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, NOTEBOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory) -> str:
    """A kernelspec whose argv runs sys.executable, so notebooks use the tested environment."""
    from jupyter_client.kernelspec import KernelSpecManager

    runner = _load("make_figures")
    dirs = runner.write_kernelspec(tmp_path_factory.mktemp("jupyter"))
    found = KernelSpecManager(kernel_dirs=[dirs]).get_kernel_spec(runner.KERNEL)
    assert found.argv[0] == sys.executable
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_dirs, tmp_path):
    start = time.perf_counter()
    nb = _load("make_figures").execute(
        NOTEBOOKS / f"{name}.ipynb",
        kernel_dirs=kernel_dirs,
        workdir=tmp_path / "cwd",
        figures=tmp_path / "figures",
        quick=True,
        cell_timeout_s=CELL_TIMEOUT_S,
    )
    elapsed = time.perf_counter() - start
    print(f"{name}: {elapsed:.1f} s")
    n_code = sum(cell.cell_type == "code" for cell in nb.cells)
    executed = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    assert len(executed) == n_code, "every code cell must have run"
    saved = sorted(p.stem for p in (tmp_path / "figures").glob("*.png"))
    assert set(FIGURES[name]) <= set(saved), f"missing figures: {set(FIGURES[name]) - set(saved)}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_source(name):
    builder = _load("build_notebooks")
    src = NOTEBOOKS / "src" / f"{name}.py"
    expected = builder.render(builder.build(src))
    assert (NOTEBOOKS / f"{name}.ipynb").read_text() == expected, (
        "notebook is stale: run python notebooks/build_notebooks.py"
    )


@pytest.mark.parametrize("name", NAMES)
def test_first_cell_installs_only_on_colab(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code").source
    assert "import google.colab" in first_code
    assert '%pip install -q "attnzoo[tpu] @ git+https://github.com/attnzoo/attnzoo"' in first_code
    # every non-Colab line before the install is the guard itself
    assert first_code.index("if IN_COLAB:") < first_code.index("%pip")


def test_parser_splits_code_and_markdown():
    builder = _load("build_notebooks")
    script = "# header\n# %% [markdown]\n# # Title\n#\n# text\n# %%\nx = 1\n\n# %%\n"
    cells = builder.parse(script + "if x:\n    # %pip install y\n# not %magic\n")
    assert [c.cell_type for c in cells] == ["markdown", "code", "code"]
    assert cells[0].source == "# Title\n\ntext"
    assert cells[1].source == "x = 1"
    assert cells[2].source == "if x:\n    %pip install y\n# not %magic"
    with pytest.raises(ValueError, match="must start with '# '"):
        builder.parse("# %% [markdown]\nnot a comment\n")


def test_every_notebook_has_a_source_and_vice_versa():
    sources = {p.stem for p in (NOTEBOOKS / "src").glob("*.py")}
    notebooks = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert sources == notebooks == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_reads_no_files_of_its_own(name):
    """On Colab only the notebook and the installed package exist: no helper modules or paths."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for forbidden in ("sys.path", "open(", ".read_text(", "../", "notebooks/", "import build_"):
        assert forbidden not in code, f"{name} uses {forbidden!r}"


def test_main_figures_are_committed():
    """notebooks/figures holds every notebook's main plots (python notebooks/make_figures.py)."""
    committed = {p.stem for p in (NOTEBOOKS / "figures").glob("*.png")}
    expected = {f for figures in FIGURES.values() for f in figures}
    assert expected <= committed, f"missing: {sorted(expected - committed)}"
