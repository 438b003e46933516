"""Packaging and documentation checks: devices, version, imports, README code, the built wheel
and sdist, links and the repository URL."""

import ast
import importlib
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_version_matches_pyproject():
    import attnzoo

    assert attnzoo.__version__ == _pyproject()["project"]["version"]


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "attnzoo").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject packages: {sorted(on_disk - listed)}"


def test_public_modules_import():
    names = sorted(
        {
            ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for p in (ROOT / "attnzoo").rglob("*.py")
        }
    )
    assert "attnzoo.models.decoder_lm" in names
    for name in names:
        importlib.import_module(name)
    # configs/ holds experiment files only (attnzoo.training.schema finds them), no package
    assert importlib.util.find_spec("attnzoo.configs") is None


def test_console_scripts_resolve():
    for spec in _pyproject()["project"]["scripts"].values():
        module, func = spec.split(":")
        assert callable(getattr(importlib.import_module(module), func)), spec


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_no_top_level_models_or_training_packages():
    assert not (ROOT / "models").exists() and not (ROOT / "training").exists()


def _attnzoo_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) ``attnzoo.*`` modules imported by the file at ``path``."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        names = {n for n in names if n.split(".")[0] == "attnzoo"}
        (top if node in tree.body else nested).update(names)
    return top, nested


def test_imports_run_one_way():
    """models <- decoding <- evaluation <- training <- CLIs, at module level and nowhere else."""
    layer = {"models": 0, "decoding": 1, "evaluation": 2, "training": 3}
    for path in sorted((ROOT / "attnzoo").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        top, nested = _attnzoo_imports(path)
        if module.split(".")[1] in ("decoding", "evaluation", "training"):
            assert not nested, f"{module}: function-level imports {sorted(nested)}"
        if module.endswith(".cli"):
            continue  # the CLIs sit on top of everything
        mine = layer.get(module.split(".")[1])
        if mine is None:
            continue
        for name in top:
            theirs = layer.get(name.split(".")[1]) if "." in name else None
            assert theirs is None or theirs <= mine, f"{module} imports {name} (upward)"
            # training scores translations through attnzoo.evaluation, never decoding itself
            assert not (mine == 3 and theirs == 1), f"{module} imports {name}"


def test_training_api():
    from attnzoo import training

    assert sorted(training.__all__) == [
        "TrainState",
        "load_for_inference",
        "make_optimizer",
        "train",
        "train_step",
    ]
    for name in training.__all__:
        assert getattr(training, name).__doc__, name


def test_model_code_branches_on_the_backend_in_one_place():
    """Only the attention dispatch (``attention.py`` and its fused kernels in
    ``attention_kernels.py``) may ask which backend runs; every other model module is plain
    JAX, and backend tuning reaches it only through ``attnzoo.ops``."""
    asks = re.compile(r"default_backend|jax\.devices\(|attnzoo\.backends|\bplatform\b")
    for path in sorted((ROOT / "attnzoo" / "models").rglob("*.py")):
        found = [
            f"{path.name}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if asks.search(line)
        ]
        if path.name == "attention.py":
            assert found, "the attention dispatch should choose by backend"
        elif path.name != "attention_kernels.py":
            assert not found, found


# Not copied when building from a copy of the checkout: environments, caches, build outputs.
_NOT_SOURCES = {".git", ".venv", ".pytest_cache", ".ruff_cache", ".hypothesis", "site", "build"}
_NOT_SOURCES |= {"dist", "runs", "workdir", "demo_workdir", "__pycache__"}


def _ignore(directory, names):
    return [n for n in names if n in _NOT_SOURCES or n.endswith(".egg-info")]


def test_wheel_and_sdist_ship_license_py_typed_and_urls(tmp_path):
    """The sdist is built from a copy of the checkout (setuptools' PEP 517 hook, offline; the
    checkout gets no build/ or egg-info), then the wheel from the unpacked sdist, as
    ``python -m build`` does: so the sdist is complete too."""
    project = _pyproject()["project"]
    name_version = f"attnzoo-{project['version']}"
    src, out = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=_ignore)
    sdist_hook = (
        "from setuptools import build_meta as b; print(b.build_sdist(__import__('sys').argv[1]))"
    )
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([sys.executable, "-c", sdist_hook, str(out)], cwd=src, **run)
    with tarfile.open(out / f"{name_version}.tar.gz") as tar:
        in_sdist = set(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    for path in ("LICENSE", "attnzoo/py.typed", "README.md", "configs/lm_tiny.py"):
        assert f"{name_version}/{path}" in in_sdist, path
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    pip_wheel += ["--no-index", "-q", "-w", str(out), str(tmp_path / "unpacked" / name_version)]
    subprocess.run(pip_wheel, **run)
    with zipfile.ZipFile(out / f"{name_version}-py3-none-any.whl") as whl:
        in_wheel = set(whl.namelist())
        license_text = whl.read(f"{name_version}.dist-info/licenses/LICENSE").decode()
        metadata = whl.read(f"{name_version}.dist-info/METADATA").decode()
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "attnzoo/py.typed" in in_wheel
    assert any(n.startswith("attnzoo/data/corpora/") and n.endswith(".xz") for n in in_wheel)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    for label, url in project["urls"].items():
        assert f"Project-URL: {label}, {url}" in metadata


def test_license_is_the_apache_2_text_the_spdx_string_names():
    text = (ROOT / "LICENSE").read_text()
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    assert _pyproject()["project"]["license-files"] == ["LICENSE"]
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text
    assert (ROOT / "attnzoo" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["attnzoo"]


def test_readme_links_are_absolute():
    """A package index renders the README away from the repository: relative links break."""
    readme = (ROOT / "README.md").read_text()
    readme = re.sub(r"```.*?```", "", readme, flags=re.S)  # code blocks hold no links
    targets = re.findall(r"\]\(([^)\s]+)", readme)  # [text](url) and ![alt](url)
    targets += re.findall(r"^\s*\[[^]]+\]:\s*(\S+)", readme, flags=re.M)  # [ref]: url
    targets += re.findall(r"(?:src|href)=[\"']([^\"']+)", readme)  # inline HTML
    assert targets, "no links found: has the README's link syntax changed?"
    relative = [t for t in targets if not t.startswith("https://")]
    assert not relative, f"make these README links absolute: {relative}"


def test_one_repository_url_in_pyproject_readme_and_notebooks():
    urls = _pyproject()["project"]["urls"]
    repo = urls["Repository"]
    assert repo.startswith("https://github.com/") and repo.count("/") == 4
    assert all(u.startswith(repo) for u in urls.values()), urls
    spec = importlib.util.spec_from_file_location("bn", ROOT / "notebooks" / "build_notebooks.py")
    assert spec is not None and spec.loader is not None
    build_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_notebooks)
    assert build_notebooks.REPO_URL == repo
    owner_name = repo.removeprefix("https://github.com/")
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts |= {p.name: p.read_text() for p in sorted((ROOT / "notebooks" / "src").glob("*.py"))}
    for name, text in texts.items():
        extras = r'pip install (?:-q )?"attnzoo(?:\[[a-z0-9,]+\])?'
        installs = re.findall(extras + r' @ ([^"]+)"', text)
        assert installs, f"{name}: no install line"
        assert set(installs) == {f"git+{repo}"}, f"{name}: {sorted(set(installs))}"
        assert not re.findall(extras + '"', text), f"{name}: an install line without the URL"
        github = re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+)", text)
        assert set(github) == {owner_name}, f"{name}: other repositories {sorted(set(github))}"
