"""Packaging and documentation checks: devices, version, imports, README code."""

import importlib
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
    importlib.import_module("attnzoo.configs")


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
