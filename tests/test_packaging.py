"""The installed package is what the source tree holds: every subpackage is listed in pyproject.toml.

CI installs in editable mode, which finds subpackages by themselves; a wheel holds only the listed ones.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "hf_minivllm").rglob("__init__.py")}
    found |= {f"hf_minivllm.{name}" for name in setuptools["package-dir"].values()}
    assert found <= listed, f"missing from pyproject.toml's packages: {sorted(found - listed)}"
