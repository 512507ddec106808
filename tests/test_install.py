"""A wheel built from the checkout works outside it: the shipped model adapter and artifacts come with it.

The wheel is built from a copy of the sources (so the checkout gets no build/ folder) without build
isolation (no network), installed with ``pip --target`` into a temporary folder, and run from another
working directory with that folder first on the path, so the installed copy, not the checkout's, is
imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_data")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "sparsefinder", src / "sparsefinder", ignore=ignore)
    shutil.copytree(ROOT / "data", src / "data", ignore=ignore)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    wheel = next(dist.glob("sparsefinder-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsefinder/_data/models.json" in names
    assert any(n.startswith("sparsefinder/_data/adapters/") for n in names)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SPARSEFINDER_DATA", None)
    env.pop("SPARSEFINDER_RUNS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_wheel_finds_its_own_data(installed, tmp_path):
    probe = ("import sparsefinder, sparsefinder.results as rs; from sparsefinder.model.catalogue import data_dir;"
             "print(sparsefinder.__file__); print(data_dir()); print(rs.default_runs_dir())")
    out = run_installed(installed, tmp_path, "-c", probe)
    assert out.returncode == 0, out.stderr
    package, data, runs = out.stdout.split()
    assert Path(package).is_relative_to(installed) and Path(data) == installed / "sparsefinder" / "_data"
    assert Path(runs) == tmp_path / "runs" / "ui"  # never inside the installed package


def test_installed_cli_runs_the_default_model_from_another_directory(installed, tmp_path):
    """Same text, same machine: the installed CLI prints what the checkout's prints."""
    text = "The quick brown fox jumps over the lazy dog."
    out = run_installed(installed, tmp_path, "-m", "sparsefinder.cli", "gold", "--device", "cpu", "--json", text)
    assert out.returncode == 0, out.stderr
    here = run_installed(ROOT, ROOT, "-m", "sparsefinder.cli", "gold", "--device", "cpu", "--json", text)
    assert here.returncode == 0, here.stderr
    got, want = json.loads(out.stdout), json.loads(here.stdout)
    assert got["model"] == want["model"] == "minilm-entmax15"
    assert len(got["gold_sparsity"]) == 6 and len(got["gold_sparsity"][0]) == 12
    assert got == want


def test_dockerfile_installs_what_setup_sh_installs():
    """Docker cannot build here: the image's install steps are checked against scripts/setup.sh instead
    (hadolint lints the Dockerfile in ./test.sh)."""
    import re

    docker = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pins = {f: set(re.findall(r"torch==([\w.]+)", text)) for f, text in
            (("Dockerfile", docker), ("setup.sh", setup), ("pyproject.toml", pyproject))}
    assert len(set().union(*pins.values())) == 1 and all(pins.values()), pins
    assert "-r requirements.txt" in docker and "-r \"$REQ\"" in setup
    for copied in ("pyproject.toml setup.py", "sparsefinder", "app", ".streamlit", "data"):
        assert re.search(rf"^COPY {re.escape(copied)}\b", docker, re.M), copied


def test_app_starts_from_another_directory(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARSEFINDER_DATA", raising=False)
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=300).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert {m.label: m.value for m in at.metric}["Layers × heads"] == "6 × 12"
