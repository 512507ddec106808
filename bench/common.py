"""What several benchmarks share: the default model with its fallback, and the median timer.

Benchmarks run as ``python bench/X.py``, so this folder is first on ``sys.path`` and ``import common`` finds this file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sparsefinder.model.entmax_model import EntmaxModel

FALLBACK_MODEL = "minilm-entmax15-untuned"


def load_default_model(device: str = "cpu") -> EntmaxModel:
    """The registry's default model, or the untuned one when the default's adapter files are not there."""
    # Imported here: the model stack pulls in transformers, which reads the offline flags the benchmarks set first.
    from sparsefinder.model.adapter import ADAPTER_FILE, MANIFEST_FILE
    from sparsefinder.model.catalogue import default_model_name, get_spec
    from sparsefinder.model.entmax_model import load_model

    name = default_model_name()
    adapter = get_spec(name).resolve_adapter()
    if adapter is not None and not ((adapter / MANIFEST_FILE).is_file() and (adapter / ADAPTER_FILE).is_file()):
        print(f"note: adapter files of the default model {name!r} are missing ({adapter}); "
              f"falling back to {FALLBACK_MODEL!r}")
        name = FALLBACK_MODEL
    return load_model(name, device=device)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` in milliseconds, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))
