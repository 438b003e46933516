"""Builds notebooks/*.ipynb from the percent-format scripts in notebooks/src/.

Each ``src/NN_name.py`` is a plain Python file split into cells by ``# %%`` lines (code) and
``# %% [markdown]`` lines (markdown, every line prefixed with ``# ``), the format jupytext and
VS Code use. IPython magics are commented out in the script (``# %pip install ...``, as jupytext
does) so that it stays valid Python for ruff; the notebook gets them uncommented.

Reviewing a notebook is reviewing that script; the .ipynb files are generated, committed
without outputs, and checked to be up to date by tests/test_notebooks.py.

    python notebooks/build_notebooks.py           # rewrite every notebook
    python notebooks/build_notebooks.py --check   # exit 1 if a notebook is stale
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = HERE / "src"
REPO_URL = "https://github.com/attnzoo/attnzoo"

_CODE, _MARKDOWN = "# %%", "# %% [markdown]"
_MAGIC = re.compile(r"^(\s*)# (%[a-z].*)$")  # "# %pip ..." -> "%pip ..." (not "# %%")


def _markdown_line(line: str) -> str:
    if line in ("#", ""):  # blank lines separate a markdown cell from the next marker
        return ""
    if not line.startswith("# "):
        raise ValueError(f"markdown cell lines must start with '# ', got {line!r}")
    return line[2:]


def parse(text: str) -> list[nbformat.NotebookNode]:
    """Percent-format script -> cells. Anything before the first ``# %%`` is a file comment."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith(_MARKDOWN):
            flush()
            kind, lines = "markdown", []
        elif line.startswith(_CODE):
            flush()
            kind, lines = "code", []
        elif kind == "markdown":
            lines.append(_markdown_line(line))
        elif kind == "code":
            lines.append(_MAGIC.sub(r"\1\2", line))
    flush()
    if not cells:
        raise ValueError("no '# %%' cells found")
    return cells


def build(source: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook of one percent-format script (no outputs, stable cell ids)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = parse(source.read_text())
    for i, cell in enumerate(nb.cells):
        # Deterministic ids keep regenerated notebooks byte-identical (clean diffs).
        cell.id = f"{source.stem[:2]}-{i:03d}"
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        # Opened from GitHub, Colab starts a TPU runtime for these notebooks.
        "accelerator": "TPU",
        "colab": {"provenance": [], "toc_visible": True},
    }
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def targets() -> dict[pathlib.Path, pathlib.Path]:
    """src script -> notebook path."""
    return {src: HERE / f"{src.stem}.ipynb" for src in sorted(SOURCES.glob("[0-9][0-9]_*.py"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is stale")
    args = parser.parse_args(argv)
    stale = []
    for src, out in targets().items():
        text = render(build(src))
        if args.check:
            if not out.exists() or out.read_text() != text:
                stale.append(out.name)
        else:
            out.write_text(text)
            print(f"wrote {out.relative_to(HERE.parent)}")
    if stale:
        print(f"stale notebooks (run python notebooks/build_notebooks.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
