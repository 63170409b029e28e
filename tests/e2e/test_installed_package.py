"""lorafit as pip installs it from a wheel, not from this checkout: the shipped configs come inside the package
(setup.py copies configs/*.yaml into the wheel as lorafit/configs/), so `lorafit configs list|cp` work there too.

The wheel is built from a copy of the sources (nothing is written into the checkout), installed with
`pip install --no-deps --target` (its dependencies are this venv's), and run with that folder first on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed into)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    shutil.copytree(REPO / "configs", source / "configs", ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (work / "dist").glob("lorafit-*.whl")
    site = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return wheel, site


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # before this venv's editable install of the checkout
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_every_shipped_config(installed):
    wheel, _site = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {f"lorafit/configs/{name}" for name in SHIPPED} <= names
        assert archive.read("lorafit/configs/chat_sft.yaml") == (REPO / "configs" / "chat_sft.yaml").read_bytes()


def test_configs_list_and_cp_work_from_the_installed_package(installed, tmp_path):
    _wheel, site = installed
    where = _run_installed(
        site, tmp_path, "-c", "import lorafit.commands.configs as c; print(c.__file__); print(c.configs_folder())"
    )
    assert where.returncode == 0, where.stderr
    module_file, folder = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(folder) == site / "lorafit" / "configs"

    listing = _run_installed(site, tmp_path, "-m", "lorafit", "configs", "list")
    assert listing.returncode == 0, listing.stderr
    for name in SHIPPED:
        assert f"\n{Path(name).stem} " in f"\n{listing.stdout}"
    assert f"(in {site / 'lorafit' / 'configs'};" in listing.stdout

    copy = _run_installed(site, tmp_path, "-m", "lorafit", "configs", "cp", "chat_sft", "mine.yaml")
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "mine.yaml").read_bytes() == (REPO / "configs" / "chat_sft.yaml").read_bytes()
