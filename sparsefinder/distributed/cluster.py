"""Connecting to Ray and sizing workers; every function imports ``ray`` only when called."""

from __future__ import annotations

import math
import os
import re
from typing import Any

RAY_MISSING = "the ray engine needs Ray: pip install 'sparsefinder[ray]'"


def import_ray() -> Any:
    """``ray``, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> tuple[Any, bool]:
    """A connected ``ray`` module, and whether this call started the connection (so it should shut it down).

    ``address``: ``None`` reuses a running connection or starts a local Ray; ``"auto"`` joins the
    cluster this machine belongs to; ``ray://host:10001`` is Ray Client. The workers must import
    the same sparsefinder as the driver: the driver's ``sys.path`` entry of the package is passed
    on as ``PYTHONPATH`` (a checkout that is not installed works locally; on a cluster install
    sparsefinder in the nodes' image).
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    import sparsefinder

    root = os.path.dirname(os.path.dirname(os.path.abspath(sparsefinder.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPARSEFINDER_RUNS"):
        if key in os.environ:
            env[key] = os.environ[key]
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
    if address is None:
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
    return ray, True


def cluster_resources(ray: Any) -> tuple[float, float]:
    """``(cpus, gpus)`` of the whole cluster."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def worker_cpus(ray: Any, workers: int, requested: float | None = None) -> float:
    """CPUs each worker asks for: ``requested``, else at most one and never all of them.

    Ray Data's read and bookkeeping tasks need CPU next to the actors: with every CPU held by
    actors they wait forever (``backpressured: tasks(ResourceBudget)``; seen on a 2-core
    machine with two 1-CPU actors). So by default the actors together leave one worker's share
    free: ``cpus / (workers + 1)``, rounded down to a twentieth, capped at 1.
    """
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"cpus per worker must be > 0, got {requested}")
        return float(requested)
    cpus, _ = cluster_resources(ray)
    share = math.floor(20 * cpus / (workers + 1)) / 20
    return max(0.05, min(1.0, share))


def worker_gpus(ray: Any, requested: float | None) -> float:
    """GPUs each worker asks for: ``requested``, else one when the cluster has GPUs, else none."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"gpus per worker must be >= 0, got {requested}")
        return float(requested)
    _, gpus = cluster_resources(ray)
    return 1.0 if gpus >= 1 else 0.0


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Fault)): (.*)$")
_BUILTIN = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError, "OSError": OSError,
            "FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError, "RuntimeError": RuntimeError}


def root_cause(error: BaseException) -> BaseException:
    """The user's exception behind Ray's wrappers (``RayTaskError``, Ray Data's ``UserCodeException``).

    Ray Data does not ship the worker's exception object back, only its traceback text; the
    last ``Name: message`` line of that text is the worker's error. Built-in types come back as
    themselves (so the CLI's usage/failure exit codes hold), others as ``RuntimeError("Name: message")``;
    ``error`` itself when no such line is found.
    """
    found = None
    for line in str(error).splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and not m.group(1).startswith("ray."):
            found = m
    if found is None:
        return error
    name, message = found.group(1), found.group(2)
    short = name.rsplit(".", 1)[-1]
    if short in _BUILTIN and "." not in name:
        return _BUILTIN[short](message)
    return RuntimeError(f"{short}: {message}")
