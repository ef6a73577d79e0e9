"""The package's import layers (pyproject.toml, [tool.importlinter]): nothing imports upward, so the
import cycle that once ran through config, methods, export and train cannot come back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_layer_contract_is_kept():
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is a test dependency: pip install -e '.[test]'"
    done = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path):
    """The check can fail: a copy of the package where config imports train breaks it."""
    lint = shutil.which("lint-imports")
    assert lint
    shutil.copytree(
        REPO / "lowmem_ft", tmp_path / "lowmem_ft", ignore=shutil.ignore_patterns("tiny", "configs")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    config = tmp_path / "lowmem_ft" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward():\n    from lowmem_ft import train  # noqa\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([lint], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "lowmem_ft.config -> lowmem_ft.train" in done.stdout, done.stdout[-2000:]


def test_every_module_of_the_package_has_a_layer():
    """A module left out of the contract may import anything: each one must be named in a layer."""
    import tomllib

    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    package = REPO / "lowmem_ft"
    modules = {
        f"lowmem_ft.{path.stem}"
        for path in package.iterdir()
        if (path.suffix == ".py" and path.stem not in ("__init__", "__main__"))
        or (path / "__init__.py").is_file()
    }
    assert modules - named == set(), "add these modules to a layer in pyproject.toml"
    assert named - modules == set(), "these layers name modules that are gone"


def test_no_module_is_over_400_lines():
    """Issue 16's rule, kept: a module that grows past it is split along what it does."""
    long = {
        str(path.relative_to(REPO)): n
        for path in (REPO / "lowmem_ft").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}, "split these modules"
