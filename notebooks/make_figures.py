"""Executes the notebooks headlessly and saves their main plots under notebooks/figures/.

    python notebooks/make_figures.py                 # full runs (minutes each on CPU)
    python notebooks/make_figures.py --quick 04      # CI-sized run of notebooks matching "04"
    python notebooks/make_figures.py --executed /tmp/nb   # also keep the executed notebooks

Notebooks run in a kernel started from *this* interpreter (a temporary kernelspec pointing at
``sys.executable``), so they see exactly the environment the script runs in. The committed
notebooks stay output-free; executed copies only go where ``--executed`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
KERNEL = "attnzoo-notebooks"


def write_kernelspec(root: pathlib.Path) -> str:
    """A kernelspec directory under ``root`` whose kernel runs ``sys.executable``."""
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"attnzoo ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(root / "kernels")


def execute(
    path: pathlib.Path,
    *,
    kernel_dirs: str,
    workdir: pathlib.Path,
    figures: pathlib.Path | None,
    quick: bool,
    cell_timeout_s: int = 600,
    extra_env: dict[str, str] | None = None,
) -> nbformat.NotebookNode:
    """Runs every cell of ``path`` in a fresh kernel; raises ``CellExecutionError`` on any error.

    The kernel gets this process's environment plus ``MPLBACKEND=Agg``, the notebook switches
    (``ATTNZOO_NOTEBOOK_QUICK``, ``ATTNZOO_NOTEBOOK_FIGURES``) and ``extra_env``.
    Returns the executed notebook (with outputs).
    """
    import nbclient
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("ATTNZOO_NOTEBOOK_QUICK", None)
    env.pop("ATTNZOO_NOTEBOOK_FIGURES", None)
    if quick:
        env["ATTNZOO_NOTEBOOK_QUICK"] = "1"
    if figures is not None:
        env["ATTNZOO_NOTEBOOK_FIGURES"] = str(figures)
    env.update(extra_env or {})
    km = KernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dirs])
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=cell_timeout_s,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="substrings of the notebooks to run (default all)")
    parser.add_argument("--quick", action="store_true", help="CI-sized runs")
    parser.add_argument("--figures", default=str(HERE / "figures"), help="where PNGs go")
    parser.add_argument("--executed", help="directory to write the executed notebooks to")
    args = parser.parse_args(argv)
    paths = [
        p
        for p in sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
        if not args.only or any(s in p.name for s in args.only)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        kernel_dirs = write_kernelspec(pathlib.Path(tmp))
        for path in paths:
            start = time.perf_counter()
            nb = execute(
                path,
                kernel_dirs=kernel_dirs,
                workdir=pathlib.Path(tmp) / path.stem,
                figures=pathlib.Path(args.figures),
                quick=args.quick,
            )
            print(f"{path.name}: {time.perf_counter() - start:.1f} s", flush=True)
            if args.executed:
                out = pathlib.Path(args.executed)
                out.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, out / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
