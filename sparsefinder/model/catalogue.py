"""The models the project knows by name: the shipped ``data/models.json`` merged with the user's catalogue.

The web UI offers only these; the CLI also accepts a local directory. A
``path`` of the form ``pkg:MODULE`` is a model shipped inside an installed
Python package that exposes ``get_model_path()``; other relative paths are
relative to the data directory.

The user's catalogue (:func:`user_catalogue_path`: ``$SPARSEFINDER_CATALOGUE``, else
``$XDG_CONFIG_HOME/sparsefinder/models.json``, else ``~/.config/sparsefinder/models.json``)
has the same format and holds absolute paths; ``sparsefinder models add`` writes it
(:mod:`sparsefinder.model.user_catalogue`). Its names may not shadow shipped ones.

A model trained with entmax says so in its own ``config.json``: a field
``entmax_alpha`` (a number, one per layer, or ``[layer][head]``) is the alpha it
runs with when neither the catalogue entry nor the caller gives one
(:func:`native_alpha`; docs/models.md).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefinder.kernels.entmax import Alpha, check_alpha


def data_dir() -> Path:
    """The shipped artifacts: ``$SPARSEFINDER_DATA``, else the wheel's own copy (``sparsefinder/_data``),
    else the checkout's ``data/`` (an editable install)."""
    env = os.environ.get("SPARSEFINDER_DATA")
    if env:
        return Path(env)
    packaged = Path(__file__).resolve().parents[1] / "_data"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "data"


#: The ``config.json`` field of a model trained (or saved) with entmax attention.
CONFIG_ALPHA = "entmax_alpha"
DEFAULT_ALPHA = 1.5
CATALOGUE_ENV = "SPARSEFINDER_CATALOGUE"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    # None: the model's own alpha (its config's ``entmax_alpha``), else DEFAULT_ALPHA.
    alpha: Alpha | None = None
    adapter: str | None = None
    description: str = ""
    task: str = "base"
    # Shipped results for this model: projections, fitted predictors, sweep table (paths relative to data/).
    artifacts: tuple[tuple[str, str], ...] = ()
    source: str = "shipped"  # or "user": the entry comes from the user's catalogue

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


def user_catalogue_path() -> Path:
    """Where the user's own catalogue lives (it need not exist)."""
    env = os.environ.get(CATALOGUE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "sparsefinder" / "models.json"


def read_catalogue(path: Path) -> dict:
    """One catalogue file as JSON, with a message naming the file when it is not one."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model catalogue {path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models", {}), dict):
        raise ValueError(f"model catalogue {path}: expected {{\"models\": {{NAME: {{...}}}}}}")
    return raw


def _specs(raw: dict, origin: Path, source: str) -> dict[str, ModelSpec]:
    specs = {}
    for name, entry in raw.get("models", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"model catalogue {origin}: entry {name!r} has no path")
        if entry.get("alpha") is not None:
            check_alpha(entry["alpha"], what=f"{origin.name}: the alpha of {name!r}")
        specs[name] = ModelSpec(
            name=name,
            path=entry["path"],
            alpha=entry.get("alpha"),
            adapter=entry.get("adapter"),
            description=entry.get("description", ""),
            task=entry.get("task", "base"),
            artifacts=tuple(sorted(entry.get("artifacts", {}).items())),
            source=source,
        )
    return specs


def load_registry(path: Path | None = None, user: Path | None = None) -> dict[str, ModelSpec]:
    """The shipped catalogue (``{"default": NAME, "models": {NAME: {...}}}``) followed by the user's.

    A user entry with a shipped name is refused rather than silently shadowing it:
    results and artifacts are keyed by model name.
    """
    path = Path(path or data_dir() / "models.json")
    specs = _specs(read_catalogue(path), path, "shipped")
    user = Path(user) if user is not None else user_catalogue_path()
    if user.is_file():
        extra = _specs(read_catalogue(user), user, "user")
        clash = sorted(set(extra) & set(specs))
        if clash:
            raise ValueError(f"model catalogue {user}: {', '.join(clash)} already names a shipped model; rename it")
        specs.update(extra)
    return specs


def native_alpha(config) -> Alpha | None:
    """The alpha a model's config declares (``entmax_alpha``), as a float or a ``(layers, heads)`` tensor.

    One value per layer is repeated over that layer's heads. None when the config
    declares none (a softmax model: entmax is swapped in by this project).
    """
    raw = getattr(config, CONFIG_ALPHA, None)
    if raw is None:
        return None
    check_alpha(raw, what=f"config.json: {CONFIG_ALPHA}")
    values = torch.as_tensor(raw, dtype=torch.float32)
    if values.dim() == 0:
        return float(values)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if values.dim() == 1 and heads:
        values = values[:, None].expand(-1, int(heads)).contiguous()
    if values.dim() != 2:
        raise ValueError(f"config.json: {CONFIG_ALPHA} must be a number, one per layer, or [layer][head]")
    return values


def default_model_name(path: Path | None = None) -> str:
    path = path or data_dir() / "models.json"
    return json.loads(Path(path).read_text(encoding="utf-8"))["default"]


def get_spec(name: str) -> ModelSpec:
    """The registered model ``name``; a clear error lists the known names."""
    specs = load_registry()
    if name not in specs:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(specs))}")
    return specs[name]
