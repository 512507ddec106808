"""The models the project knows by name (``data/models.json``).

The web UI offers only these; the CLI also accepts a local directory. A
``path`` of the form ``pkg:MODULE`` is a model shipped inside an installed
Python package that exposes ``get_model_path()``; other relative paths are
relative to the data directory.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sparsefinder.kernels.entmax import Alpha, check_alpha


def data_dir() -> Path:
    """The shipped artifacts: ``$SPARSEFINDER_DATA``, else the wheel's own copy (``sparsefinder/_data``),
    else the checkout's ``data/`` (an editable install)."""
    env = os.environ.get("SPARSEFINDER_DATA")
    if env:
        return Path(env)
    packaged = Path(__file__).resolve().parents[1] / "_data"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    alpha: Alpha = 1.5
    adapter: str | None = None
    description: str = ""
    task: str = "base"
    # Shipped results for this model: projections, fitted predictors, sweep table (paths relative to data/).
    artifacts: tuple[tuple[str, str], ...] = ()

    def resolve_path(self) -> Path:
        return resolve_model_path(self.path)

    def artifact(self, kind: str) -> Path | None:
        """Path of a shipped artifact (``"projections"``, ``"fitted"``, ``"sweep"``), or None."""
        rel = dict(self.artifacts).get(kind)
        if rel is None:
            return None
        p = Path(rel)
        return p if p.is_absolute() else data_dir() / p

    def resolve_adapter(self) -> Path | None:
        if self.adapter is None:
            return None
        p = Path(self.adapter)
        return p if p.is_absolute() else data_dir() / p


def resolve_model_path(path: str) -> Path:
    if path.startswith("pkg:"):
        module_name = path[4:]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise FileNotFoundError(f"model package {module_name!r} is not installed ({e})") from e
        return Path(module.get_model_path())
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_dir() / p


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    """Read ``models.json``: ``{"default": NAME, "models": {NAME: {...}}}``."""
    path = path or data_dir() / "models.json"
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    specs = {}
    for name, entry in raw["models"].items():
        check_alpha(entry.get("alpha", 1.5), what=f"models.json: the alpha of {name!r}")
        specs[name] = ModelSpec(
            name=name,
            path=entry["path"],
            alpha=entry.get("alpha", 1.5),
            adapter=entry.get("adapter"),
            description=entry.get("description", ""),
            task=entry.get("task", "base"),
            artifacts=tuple(sorted(entry.get("artifacts", {}).items())),
        )
    return specs


def default_model_name(path: Path | None = None) -> str:
    path = path or data_dir() / "models.json"
    return json.loads(Path(path).read_text(encoding="utf-8"))["default"]


def get_spec(name: str) -> ModelSpec:
    """The registered model ``name``; a clear error lists the known names."""
    specs = load_registry()
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(specs))}")
    return specs[name]
