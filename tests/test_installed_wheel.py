"""The sidecar as a user installs it: a wheel built from this tree, installed into a fresh virtual environment
and run from outside the source tree, so a module or folder missing from pyproject.toml's package list fails
here and not in a user's container."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted(p for p in (ROOT / "policies").glob("*.yaml") if not p.name.endswith(".tests.yaml"))


class Installed:
    def __init__(self, venv: Path, wheel: Path, cwd: Path) -> None:
        self.bin = venv / "bin"
        self.venv = venv
        self.wheel = wheel
        self.cwd = cwd
        # No PYTHONPATH: the source tree (or /work/main's editable install) must not stand in for the wheel.
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A wheel of this tree installed into a new venv (which sees the already installed dependencies)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"  # a copy, so the build leaves no build/ or egg-info in the tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("sidecar", "policies"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"),
                            str(source)], timeout=120, capture_output=True, text=True)
    if built.returncode != 0:  # e.g. pyproject.toml names a package folder that does not exist
        pytest.fail("building the wheel failed:\n" + (built.stdout + built.stderr)[-3000:])
    (wheel,) = (base / "dist").glob("sidecar-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=120, capture_output=True)
    cwd = base / "elsewhere"
    cwd.mkdir()
    yield Installed(venv, wheel, cwd)


def test_wheel_holds_every_module_of_the_tree(installed: Installed) -> None:
    """Every .py file under sidecar/ is in the wheel (a subpackage left out of pyproject.toml would not be)."""
    tree = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sidecar").rglob("*.py")
            if "__pycache__" not in path.parts}
    with zipfile.ZipFile(installed.wheel) as wheel:
        packed = set(wheel.namelist())
    assert sorted(tree - packed) == []


def test_installed_package_is_the_wheel_not_the_source_tree(installed: Installed) -> None:
    """Run from another folder without PYTHONPATH, `import sidecar` finds the venv's copy."""
    result = installed.run(str(installed.bin / "python"), "-c", "import sidecar; print(sidecar.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.venv), result.stdout


@pytest.mark.parametrize("command", [["sidecar", "--help"], ["python", "-m", "sidecar", "--help"]],
                         ids=["console-script", "python-m"])
def test_help_runs_from_the_wheel(installed: Installed, command: list[str]) -> None:
    """`sidecar --help` and `python -m sidecar --help` from the installed wheel exit 0 and list the commands."""
    result = installed.run(str(installed.bin / command[0]), *command[1:])
    assert result.returncode == 0, result.stderr
    assert "check" in result.stdout and "run" in result.stdout


@pytest.mark.parametrize("policy", POLICIES, ids=[p.stem for p in POLICIES])
def test_bundled_policy_passes_check_from_the_wheel(installed: Installed, policy: Path) -> None:
    """`sidecar check --config` on each file in policies/ exits 0 with the installed wheel."""
    result = installed.run(str(installed.bin / "sidecar"), "check", "--config", str(policy))
    assert result.returncode == 0, result.stdout + result.stderr
