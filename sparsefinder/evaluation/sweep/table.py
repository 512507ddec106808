"""The sweep table on disk: Parquet plus a JSON sidecar."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from sparsefinder.evaluation.sweep.configs import SWEEP_COLUMNS, SWEEP_FORMAT, SWEEP_FORMAT_VERSION, _jsonable
from sparsefinder.metrics import CONFIG_COLUMNS, RATIO_COLUMNS


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_sweep(frame: pd.DataFrame, path: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``frame`` as Parquet at ``path`` and its provenance as JSON next to it (``path`` with ``.json``).

    The sidecar holds ``frame.attrs["sweep"]`` (store, projections, fits,
    configurations, timing) updated by ``manifest``, the row count, the
    columns and the Parquet file's SHA-256. Returns ``path``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {**dict(frame.attrs.get("sweep", {})), **dict(manifest or {})}
    plain = frame.copy()
    plain.attrs = {}  # provenance lives in the sidecar, in one place
    tmp = out.with_name(out.name + ".tmp")
    plain.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    side = {**info, "format": SWEEP_FORMAT, "format_version": SWEEP_FORMAT_VERSION, "rows": len(frame),
            "columns": list(frame.columns), "parquet_file": out.name, "parquet_sha256": digest}
    tmp_json = _sidecar(out).with_name(_sidecar(out).name + ".tmp")
    tmp_json.write_text(json.dumps(side, indent=1, sort_keys=True, default=_jsonable), encoding="utf-8")
    os.replace(tmp_json, _sidecar(out))
    return out


def load_sweep(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`save_sweep`; its sidecar (if present) becomes ``frame.attrs["sweep"]``."""
    src = Path(path)
    frame = pd.read_parquet(src)
    # Tables written before mass recall existed lack its columns: unknown, not zero.
    for col in ("mass_recall", "gold_mass", "mass_hits"):
        if col not in frame.columns and "recall" in frame.columns:
            frame[col] = float("nan")
    missing = [c for c in CONFIG_COLUMNS + ("layer", "head") + RATIO_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{src} is not a sweep table: columns {missing} are missing")
    if set(SWEEP_COLUMNS) <= set(frame.columns):
        frame = frame[list(SWEEP_COLUMNS) + [c for c in frame.columns if c not in SWEEP_COLUMNS]]
    side = _sidecar(src)
    if side.is_file():
        info = json.loads(side.read_text(encoding="utf-8"))
        if info.get("format") != SWEEP_FORMAT:
            raise ValueError(f"{side} is not a sweep sidecar")
        frame.attrs["sweep"] = info
    return frame
