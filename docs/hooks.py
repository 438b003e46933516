"""mkdocs hook: serves repository files that live outside ``docs/`` at their repository paths.

``notebooks/figures/*.png`` (written by ``make figures``) and the notebooks themselves are added to
the site as ``notebooks/...``, so ``docs/notebooks.md`` embeds the figures and links the
notebooks, without copies of the files under ``docs/`` (the README, included in
``docs/guide.md``, links to them on GitHub: its links are absolute, to survive on a package
index). ``benchmarks/*.png`` (the study's and the recipes' plots) are served at the site
root, where ``docs/benchmarks.md`` includes ``benchmarks/RESULTS.md``, whose image links are
relative to ``benchmarks/``.
"""

from __future__ import annotations

import pathlib

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (pattern, site directory: "" keeps the repository path, "." is the site root)
SERVED = (("notebooks/figures/*.png", ""), ("notebooks/*.ipynb", ""), ("benchmarks/*.png", "."))


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for pattern, site_dir in SERVED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.name if site_dir == "." else path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
