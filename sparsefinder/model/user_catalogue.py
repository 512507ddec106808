"""The user's own catalogue: models added by name without editing the package.

``sparsefinder models add NAME PATH`` checks the model before it writes: the
directory exists and holds a transformers model, the name is new, an adapter
(if given) is one, and a forward pass goes through transformers' attention
interface (otherwise entmax could not be swapped in and every page would fail
later with a less clear message). The file is
:func:`~sparsefinder.model.catalogue.user_catalogue_path`; the shipped
catalogue is never written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from sparsefinder.kernels.entmax import check_alpha
from sparsefinder.model.adapter import MANIFEST_FILE
from sparsefinder.model.catalogue import load_registry, read_catalogue, user_catalogue_path
from sparsefinder.model.entmax_model import TASKS, EntmaxModel, load_hf

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_model_dir(path: Path, task: str = "base") -> EntmaxModel:
    """Load ``path`` once with entmax attention; a clear error when it is not a usable model."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a transformers model directory (no config.json)")
    try:
        model, tokenizer = load_hf(path, task=task, device="cpu")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: transformers could not load it with a custom attention function ({e})") from None
    # EntmaxModel traces one forward pass and names the model class when no attention call reaches us.
    return EntmaxModel(model, tokenizer, name=path.name, device=None)


def add_model(
    name: str,
    path: Path | str,
    alpha: float | None = None,
    adapter: Path | str | None = None,
    description: str = "",
    task: str = "base",
    catalogue: Path | None = None,
) -> Path:
    """Check the model and record it in the user's catalogue; returns the catalogue file."""
    catalogue = Path(catalogue) if catalogue is not None else user_catalogue_path()
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    if name in load_registry(user=catalogue):
        raise ValueError(f"model name {name!r} is already in the catalogue (sparsefinder models)")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASKS)}")
    if alpha is not None:
        check_alpha(alpha, what="--alpha")
    path = Path(path).expanduser().resolve()
    entry: dict = {"path": str(path), "task": task, "description": description}
    if alpha is not None:
        entry["alpha"] = float(alpha)
    if adapter is not None:
        adapter = Path(adapter).expanduser().resolve()
        if not (adapter / MANIFEST_FILE).is_file():
            raise ValueError(f"{adapter}: not an adapter directory (no {MANIFEST_FILE})")
        entry["adapter"] = str(adapter)
    check_model_dir(path, task)
    raw = read_catalogue(catalogue) if catalogue.is_file() else {"models": {}}
    raw.setdefault("models", {})[name] = entry
    _write(catalogue, raw)
    return catalogue


def remove_model(name: str, catalogue: Path | None = None) -> Path:
    """Drop ``name`` from the user's catalogue (shipped models cannot be removed)."""
    catalogue = Path(catalogue) if catalogue is not None else user_catalogue_path()
    raw = read_catalogue(catalogue) if catalogue.is_file() else {"models": {}}
    if name not in raw.get("models", {}):
        shipped = name in load_registry(user=Path(os.devnull))
        why = "it is a shipped model" if shipped else "no such entry"
        raise KeyError(f"cannot remove {name!r} from {catalogue}: {why}")
    del raw["models"][name]
    _write(catalogue, raw)
    return catalogue


def _write(path: Path, raw: dict) -> None:
    # Replace atomically: a server reading the catalogue mid-write sees the old or the new file, never half.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".models-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(raw, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
