"""The version is defined once: pyproject.toml reads it from ``bilevel.__version__``."""

import importlib.metadata
import pathlib

import pytest

import bilevel

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_installed_metadata_version_is_the_package_version():
    try:
        installed = importlib.metadata.version("bilevel")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bilevel is not installed (pip install -e .)")
    assert installed == bilevel.__version__


def test_pyproject_takes_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    dynamic = config["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "bilevel.__version__"}
