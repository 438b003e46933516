"""Packaging and documentation checks: devices, version, imports, README code."""

import ast
import importlib
import importlib.util
import pathlib
import re
import tomllib

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
    """Only the attention dispatch may ask which backend runs; every other model module is
    plain JAX, and backend tuning reaches it only through ``attnzoo.ops``."""
    asks = re.compile(r"default_backend|jax\.devices\(|attnzoo\.backends|\bplatform\b")
    for path in sorted((ROOT / "attnzoo" / "models").rglob("*.py")):
        found = [
            f"{path.name}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if asks.search(line)
        ]
        if path.name == "attention.py":
            assert found, "the attention dispatch should choose by backend"
        else:
            assert not found, found
