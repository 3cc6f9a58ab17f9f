"""An installed wheel, not a checkout, is what operations.md deploys: it must run on its own."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from daemon import REPO

_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def test_a_wheel_installed_elsewhere_creates_and_checks_the_schema(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves a build/ folder in the tree it builds.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("dicomai", "workers", "migrations"):
        shutil.copytree(REPO / name, source / name, ignore=_IGNORED)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dicomai-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("share/dicomai/migrations/env.py") for n in names), names

    # An environment of its own gets the wheel from its own pip (ensurepip's, offline): pip
    # run from the test venv with --prefix would uninstall the test venv's dicomai first. The
    # test venv's libraries come after it on PYTHONPATH as a plain folder, so the checkout's
    # editable dicomai, which a .pth file there would install, stays out.
    prefix = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True, timeout=300)
    installed = subprocess.run(
        [str(prefix / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
         "-q", str(wheel)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
        "PYTHONNOUSERSITE": "1",
    }
    config = tmp_path / "dicomai.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(prefix / "bin" / "python"), "-m", "dicomai", "--config", str(config), *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, check=False, timeout=120,
        )  # fmt: skip

    where = subprocess.run(
        [str(prefix / "bin" / "python"), "-c", "import dicomai; print(dicomai.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(prefix)), f"not the installed dicomai: {where.stdout}"
    upgraded = run("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert "database at revision" in upgraded.stdout
    again = run("db", "upgrade")
    assert "already current" in again.stdout, again.stdout + again.stderr
