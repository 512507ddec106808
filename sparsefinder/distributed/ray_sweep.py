"""Sweeps and sparsity–accuracy curves on a Ray cluster: the single-process tables, computed in parallel tasks.

- :func:`run_sweep_ray` runs one task per (layer, method family): each opens the store itself
  (it must be on a path every node sees), runs :func:`~sparsefinder.evaluation.sweep.run_sweep`
  on its layer and methods, and the driver merges the tables in the single-process order
  (configuration, layer, head). Sums over batches run in the same order as in one process, so
  the merged table equals the single-process one value for value.
- :func:`curves_ray` runs one task per method: each loads the model, computes the exact
  reference and the method's rows with
  :func:`~sparsefinder.evaluation.approximate.sparsity_accuracy_curve`; the first task also
  writes the reference rows. The driver concatenates them in the method order.

Tasks are retried when their worker dies, or on ``OSError``; the projections, fitted
predictors and context go to the workers through Ray's object store (pickled in memory,
never written to disk). On CPU, equal tables need the same torch thread count as the run
they are compared with (``threads``; default one per task).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from sparsefinder.distributed.cluster import cluster_resources, connect, import_ray, root_cause, worker_cpus
from sparsefinder.distributed.ray_extract import InjectedFault, _fail_once


def _task_cpus(ray: Any, workers: int | None, requested: float | None) -> float:
    """CPUs per task: ``requested``; else a share of the cluster for ``workers`` tasks at once; else one.

    Plain tasks need no CPU left over (unlike Ray Data's actor pools), so the share is the whole cluster's.
    """
    if requested is not None:
        return worker_cpus(ray, 1, requested)
    if workers:
        cpus, _ = cluster_resources(ray)
        return max(0.05, min(1.0, int(20 * cpus / workers) / 20))
    return 1.0


def _gather(ray: Any, refs: list[Any], desc: str, progress: bool) -> list[Any]:
    """Results of ``refs`` in their order, with one bar counting finished tasks; Ray's errors unwrapped."""
    from tqdm.auto import tqdm

    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", disable=not progress, dynamic_ncols=True) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                results[index[ready[0]]] = ray.get(ready[0])
            except Exception as e:
                for ref in pending:
                    ray.cancel(ref)
                cause = root_cause(e)
                if cause is e:
                    cause = getattr(e, "cause", None) or e
                if isinstance(cause, ValueError | TypeError | KeyError | OSError) and cause is not e:
                    raise cause from None
                raise RuntimeError(f"{desc} task failed: {cause}") from None
            bar.update(1)
    return results


def _sweep_task(store_path: str, task: int, threads: int, fail_once: str | None, kwargs: dict[str, Any]):
    _fail_once(fail_once, task)
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.sweep import run_sweep

    return run_sweep(ExtractionStore.open(store_path), progress=False, threads=threads, **kwargs)


def run_sweep_ray(
    store_path: str,
    projections: Any | None = None,
    methods: Sequence[str] | None = None,
    grids: Mapping[str, list[dict[str, Any]]] | None = None,
    layers: Sequence[int] | None = None,
    fitted: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    context: Any | None = None,
    threads: int = 1,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_task: float | None = None,
    max_retries: int = 3,
    progress: bool = True,
    fail_once: str | None = None,
) -> pd.DataFrame:
    """:func:`~sparsefinder.evaluation.sweep.run_sweep` of the store at ``store_path``, one Ray task per
    (layer, method family); returns the same table (``frame.attrs["sweep"]["engine"]`` records the run).

    ``workers`` bounds the tasks running at once through their CPU share (default: as many as fit);
    ``fail_once`` = ``"TASK:MARKER"`` is the tests' fault hook (task numbers in layer-major order).
    """
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.sweep.plan import _select_methods
    from sparsefinder.predictors.base import REGISTRY

    import_ray()
    t0 = time.perf_counter()
    store = ExtractionStore.open(store_path)
    context_keys = set(context.keys) if context is not None else set()
    chosen, skipped = _select_methods(methods, projections, fitted, context_keys)
    layer_ids = [store._layer_index(x) for x in (range(store.num_layers) if layers is None else layers)]
    if not chosen or not layer_ids:
        raise ValueError("nothing to sweep: no runnable method or no layer")
    families: dict[str, list[str]] = {}
    for m in chosen:
        families.setdefault(REGISTRY[m].family, []).append(m)
    grids = dict(grids or {})
    ray, started = connect(address)
    try:
        cpus = _task_cpus(ray, workers, cpus_per_task)
        try:
            shared = ray.put({"projections": projections, "fitted": fitted, "context": context})
        except TypeError as e:  # something unpicklable in a custom context or predictor
            raise RuntimeError(f"the sweep's projections, fitted predictors or context cannot be sent to Ray "
                               f"workers ({e}); use the local engine") from None
        task = ray.remote(_sweep_with_shared).options(
            num_cpus=cpus, max_retries=max_retries, retry_exceptions=[OSError, InjectedFault])
        plan = [(layer, fam, ms) for layer in layer_ids for fam, ms in families.items()]
        refs = [task.remote(str(store.path), i, threads, fail_once, shared,
                            dict(methods=ms, grids={m: grids[m] for m in ms if m in grids} or None,
                                 layers=[layer], batch_size=batch_size, seed=seed))
                for i, (layer, _, ms) in enumerate(plan)]
        frames = _gather(ray, refs, "sweep (ray)", progress)
        version = ray.__version__
    finally:
        if started:
            ray.shutdown()
    return _merge_sweeps(frames, chosen, skipped, layer_ids, time.perf_counter() - t0,
                         {"name": "ray", "ray_version": version, "tasks": len(plan), "cpus_per_task": cpus,
                          "torch_threads": threads, "unit": "(layer, method family)"})


def _sweep_with_shared(store_path: str, task: int, threads: int, fail_once: str | None, shared: dict[str, Any],
                       kwargs: dict[str, Any]):
    return _sweep_task(store_path, task, threads, fail_once, {**kwargs, **shared})


def _merge_sweeps(frames: list[pd.DataFrame], chosen: list[str], skipped: dict[str, str], layer_ids: list[int],
                  seconds: float, engine: dict[str, Any]) -> pd.DataFrame:
    """One table in the single-process order: configurations (method order, then grid order), layer, head."""
    config_rank: dict[tuple[str, str], int] = {}
    configurations: dict[str, dict[str, Any]] = {m: {} for m in chosen}
    for frame in frames:
        for m, cfgs in frame.attrs["sweep"]["configurations"].items():
            configurations[m].update(cfgs)
    for m in chosen:
        for key in configurations[m]:
            config_rank[(m, key)] = len(config_rank)
    frame = pd.concat(frames, ignore_index=True)
    order = pd.DataFrame({
        "c": [config_rank[(m, p)] for m, p in zip(frame["method"], frame["params"], strict=True)],
        "l": frame["layer"].map({x: i for i, x in enumerate(layer_ids)}), "h": frame["head"],
    })
    frame = frame.loc[order.sort_values(["c", "l", "h"], kind="stable").index].reset_index(drop=True)
    info = dict(frames[0].attrs["sweep"])
    parts: dict[str, float] = {}
    for f in frames:
        for k, v in f.attrs["sweep"]["seconds_by_part"].items():
            parts[k] = round(parts.get(k, 0.0) + v, 3)
    # Each task checked the supports of its own layers: mass recall stands only where every task's did.
    masses = [f.attrs["sweep"]["mass"] for f in frames]
    mass = {**masses[0], "scored": all(m["scored"] for m in masses),
            "support_mismatch": max(m["support_mismatch"] for m in masses)}
    if not mass["scored"]:
        mass["reason"] = next((m["reason"] for m in masses if "reason" in m), "mass recall was not asked for")
        frame[["mass_recall", "gold_mass", "mass_hits"]] = float("nan")
    info.update(methods=chosen, skipped=skipped, configurations=configurations, layers=layer_ids,
                seconds=round(seconds, 3), seconds_by_part=parts, engine=engine, mass=mass)
    frame.attrs["sweep"] = info
    return frame


def _curve_task(spec: dict[str, Any], texts: list[str], method: str | None, references: bool, threads: int,
                task: int, fail_once: str | None, kwargs: dict[str, Any]) -> pd.DataFrame:
    _fail_once(fail_once, task)
    import torch

    from sparsefinder.evaluation.approximate import sparsity_accuracy_curve
    from sparsefinder.model.entmax_model import load_model

    torch.set_num_threads(threads)
    model = load_model(spec["model"], alpha=spec.get("alpha"), device=spec.get("device", "auto"),
                       task=spec.get("task"))
    methods = [method] if method is not None else []
    learned = kwargs.pop("learned", None) or {}
    return sparsity_accuracy_curve(model, texts, methods, references=references,
                                   learned={m: v for m, v in learned.items() if m in methods}, progress=False,
                                   **kwargs)


def curves_ray(
    model: str,
    texts: Sequence[str],
    methods: Sequence[str],
    grids: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    layers: Sequence[str | Sequence[int]] = ("all",),
    artifacts: Callable[[str], tuple[Any, Mapping | None]] | None = None,
    learned: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    alpha: Any = None,
    device: str = "auto",
    task: str | None = None,
    threads: int = 1,
    address: str | None = None,
    cpus_per_task: float | None = None,
    gpus_per_task: float | None = None,
    max_retries: int = 3,
    progress: bool = True,
    fail_once: str | None = None,
) -> pd.DataFrame:
    """:func:`~sparsefinder.evaluation.approximate.sparsity_accuracy_curve` with one Ray task per method
    (``model`` a registered name or a model directory each task loads); returns the same table."""
    from sparsefinder.distributed.cluster import worker_gpus

    import_ray()
    t0 = time.perf_counter()
    methods = list(methods)
    texts = list(texts)
    spec = {"model": model, "alpha": alpha, "device": device, "task": task}
    ray, started = connect(address)
    try:
        cpus = _task_cpus(ray, None, cpus_per_task)
        gpus = worker_gpus(ray, gpus_per_task)
        remote = ray.remote(_curve_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries,
                                                 retry_exceptions=[OSError, InjectedFault])
        texts_ref = ray.put(texts)
        common = {"grids": dict(grids or {}), "layers": list(layers), "learned": dict(learned or {}),
                  "batch_size": batch_size, "seed": seed}
        # The reference rows (exact, gold) come from their own task; each method's task recomputes the
        # exact run it is measured against, which costs one forward pass of the corpus per method.
        units: list[str | None] = [None, *methods]
        refs = []
        for i, m in enumerate(units):
            kw = dict(common)
            if m is not None and artifacts is not None:
                proj, fit = artifacts(m)
                kw.update(projections=proj, fitted=fit)
            refs.append(remote.remote(spec, texts_ref, m, m is None, threads, i, fail_once, kw))
        frames = _gather(ray, refs, "curves (ray)", progress)
        version = ray.__version__
    finally:
        if started:
            ray.shutdown()
    frame = pd.concat(frames, ignore_index=True)
    info = dict(frames[0].attrs["curves"])
    info.update(seconds=time.perf_counter() - t0,
                engine={"name": "ray", "ray_version": version, "tasks": len(units), "cpus_per_task": cpus,
                        "gpus_per_task": gpus, "torch_threads": threads, "unit": "method"})
    frame.attrs["curves"] = info
    return frame
