"""Corpus extraction on a Ray cluster: the same store as :func:`sparsefinder.corpora.extract.extract_corpus`.

How it runs, and why:

- The driver parses the corpus (the project's readers), cuts it into the shards the
  single-process path would write (``shard_size`` consecutive sentences each) and hands
  them to Ray Data as items ``{shard, first_sentence, texts}``. ``map_batches`` runs one
  model replica per actor (loaded once per actor; ``num_gpus`` when there are GPUs), and
  each actor writes whole shards into the output directory (a local or shared path) with
  the single-process shard writer. The driver joins the actors' manifest entries into one
  manifest as shards finish.
- Same bytes whatever the number of workers: a shard's content depends only on its
  sentences, the model, torch's thread count (fixed per actor) and the batch numbering,
  and the batch numbers are fixed up front (shard ``k`` starts at batch
  ``k * ceil(shard_size / batch_size)``, exactly where the single-process path's running
  count is). Only the timings in ``settings`` differ, and ``settings.engine`` records the
  Ray run.
- Faults: Ray Data restarts a killed actor and retries its shard (``max_restarts``,
  ``max_task_retries``); an actor's ``OSError`` (a flaky shared disk) is retried too. A
  shard is written to ``*.partial`` and renamed, so a retry simply rewrites it.
- Interrupted jobs: the manifest stays ``complete: false`` with the shards finished so far
  and a fingerprint of the plan (model weights, alpha, dtype, batch and shard size, the
  texts). Running again refuses such a directory unless asked to ``resume`` (only with the
  same plan: shards on disk are checked against the manifest and kept, the rest are
  extracted) or to ``overwrite``; nothing of two different runs is ever mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sparsefinder.distributed.cluster import connect, import_ray, root_cause, worker_cpus, worker_gpus

FAIL_ONCE_ENV = "SPARSEFINDER_RAY_FAIL_ONCE"
"""Test hook: ``"SHARD:MARKER[:exit]"`` makes the worker given shard ``SHARD`` fail once (raise, or with
``:exit`` die), recorded by creating the file ``MARKER`` so the retry succeeds."""


class InjectedFault(RuntimeError):
    """The failure the test hook injects (retried like a lost worker)."""


def _fail_once(spec: str | None, shard: int) -> None:
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != shard:
        return
    marker = Path(parts[1])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one failure across all workers
    except FileExistsError:
        return
    os.close(fd)
    if len(parts) > 2 and parts[2] == "exit":
        os._exit(1)  # a killed worker: Ray restarts the actor and retries the task
    raise InjectedFault(f"injected failure on shard {shard}")


class _ShardWriter:
    """A Ray Data actor: one model replica, writing the shards it is given."""

    def __init__(self, model: str, alpha: Any, device: str, out: str, batch_size: int, dtype: str,
                 head_dim: int, batches_per_shard: int, threads: int | None, fail_once: str | None,
                 catalogue: str | None = None) -> None:
        import torch

        from sparsefinder.model.catalogue import CATALOGUE_ENV
        from sparsefinder.model.entmax_model import load_model

        if catalogue:  # the driver's own catalogue, so a model added there loads by name here too
            os.environ[CATALOGUE_ENV] = catalogue
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model, alpha=alpha, device=device)
        self.out = Path(out)
        self.batch_size, self.dtype, self.head_dim = batch_size, dtype, head_dim
        self.batches_per_shard = batches_per_shard
        self.fail_once = fail_once

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from sparsefinder.corpora.extract import _write_shard
        from sparsefinder.corpora.shards import STORE_DTYPES

        entries = []
        for k, first, texts in zip(batch["shard"], batch["first_sentence"], batch["texts"], strict=True):
            k, first = int(k), int(first)
            _fail_once(self.fail_once, k)
            window = [str(t) for t in texts]
            t0 = time.perf_counter()
            with torch.no_grad():
                entry, _ = _write_shard(self.model, window, self.out, k, first, k * self.batches_per_shard,
                                        self.batch_size, STORE_DTYPES[self.dtype], self.head_dim, _NoBar())
            entry["_seconds"] = time.perf_counter() - t0
            entry["_device"] = str(self.model.device)
            entry["_torch_threads"] = torch.get_num_threads()
            entries.append(json.dumps(entry))
        return {"shard": np.asarray(batch["shard"], dtype=np.int64), "entry": np.asarray(entries, dtype=object)}


class _NoBar:
    def update(self, n: int) -> None:
        pass


def plan_fingerprint(manifest: dict[str, Any], texts: list[str]) -> str:
    """SHA-256 of what determines a store's bytes: model identity, alpha, dtype, batch/shard size and texts."""
    h = hashlib.sha256()
    keys = ("weights_sha256", "base_checksum", "alpha", "dtype", "max_length", "corpus", "split")
    h.update(json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True).encode())
    h.update(json.dumps([manifest["settings"]["batch_size"], manifest["settings"]["shard_size"]]).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _resume_or_refuse(out: Path, fingerprint: str, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of an interrupted run of the same plan to continue, or None to start afresh.

    Refuses (``FileExistsError``) a non-empty directory unless ``overwrite`` or a valid ``resume``.
    """
    from sparsefinder.artifacts import file_sha256
    from sparsefinder.corpora.extract import _prepare_dir
    from sparsefinder.corpora.shards import MANIFEST_FILE

    mpath = out / MANIFEST_FILE
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        _prepare_dir(out, overwrite=True)
        return None
    try:
        old = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or "complete" not in old:
        raise FileExistsError(f"{out} is not empty and holds no extraction; choose another --out or pass --overwrite")
    if old["complete"]:
        raise FileExistsError(f"{out} already holds a complete extraction; pass --overwrite to replace it")
    done = len(old.get("shards", []))
    if not resume:
        raise FileExistsError(
            f"{out} holds an interrupted extraction ({done} shard(s) finished); pass --resume to continue it "
            "or --overwrite to start over")
    engine = old.get("settings", {}).get("engine") or {}
    if engine.get("plan_sha256") != fingerprint:
        raise FileExistsError(
            f"{out} holds an interrupted extraction of another corpus, model or settings; it cannot be resumed "
            "with these (pass --overwrite to start over)")
    kept = []
    for entry in old["shards"]:
        f, s = out / entry["file"], out / entry["strings_file"]
        if (f.is_file() and s.is_file() and f.stat().st_size == entry["bytes"]
                and file_sha256(f) == entry["sha256"] and file_sha256(s) == entry["strings_sha256"]):
            kept.append(entry)
    old["shards"] = kept
    return old


def extract_corpus_ray(
    model: str,
    texts: list[str],
    out_dir: str | os.PathLike[str],
    *,
    alpha: Any = None,
    device: str = "auto",
    batch_size: int = 32,
    dtype: str = "float32",
    shard_size: int | None = None,
    workers: int = 1,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    threads: int | None = None,
    address: str | None = None,
    corpus_name: str = "",
    split: str = "",
    overwrite: bool = False,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    max_retries: int = 3,
    fail_once: str | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Path:
    """Extract ``texts`` with ``workers`` replicas of ``model`` (a registered name or a model directory) on Ray.

    Writes the store :func:`~sparsefinder.corpora.extract.extract_corpus` would write with the same
    ``batch_size``, ``dtype`` and ``shard_size`` (see the module docstring for what differs: timings,
    device and threads in ``settings``). ``address``: ``None`` (a running connection, else a local
    Ray), ``"auto"`` or ``ray://...``. ``cpus_per_worker`` defaults to a fraction that leaves Ray
    Data room to schedule its own tasks; ``gpus_per_worker`` to 1 where the cluster has GPUs.
    ``threads``: torch threads per actor (default: one per whole CPU asked for, at least one). On CPU
    the stores are bit-identical to the single-process path's run with the same torch thread count
    (another count rounds q/k differently in the last bits), whatever the number of workers.
    ``resume`` continues an interrupted run of the same plan in ``out_dir``. ``fail_once`` (or the
    environment variable :data:`FAIL_ONCE_ENV`) is the fault-injection hook of the tests.
    ``callback(done, total)``, if given, is called as each shard is entered in the manifest.
    """
    from tqdm.auto import tqdm

    from sparsefinder.artifacts import write_json_atomic
    from sparsefinder.corpora.extract import DEFAULT_SHARD_SIZE, _store_dtype, new_manifest
    from sparsefinder.corpora.shards import MANIFEST_FILE
    from sparsefinder.model.entmax_model import load_model

    import_ray()  # before any work: a missing Ray is one line, not a traceback after loading the model
    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to extract")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")
    dtype_name = _store_dtype(dtype)
    fail_once = fail_once or os.environ.get(FAIL_ONCE_ENV) or None
    t0 = time.perf_counter()

    # The driver loads the model once on the CPU for the manifest's identity fields (and to fail
    # early on a bad name); the workers load their own replicas.
    header = new_manifest(load_model(model, alpha=alpha, device="cpu"), dtype_name, corpus_name, split, batch_size,
                          shard_size, metadata)
    fingerprint = plan_fingerprint(header, texts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = _resume_or_refuse(out, fingerprint, resume, overwrite) or header
    shards = [(k, first, texts[first:first + shard_size]) for k, first in enumerate(range(0, len(texts), shard_size))]
    done = {int(e["first_sentence"]) // shard_size for e in manifest["shards"]}
    todo = [s for s in shards if s[0] not in done]

    ray, started = connect(address)
    try:
        cpus = worker_cpus(ray, workers, cpus_per_worker)
        gpus = worker_gpus(ray, gpus_per_worker)
        # Set, not left to Ray's OMP_NUM_THREADS: on CPU a forward pass rounds differently with another
        # thread count, so the threads are part of what makes two stores bit-identical.
        threads = threads or max(1, int(cpus))
        manifest["settings"]["engine"] = {
            "name": "ray", "ray_version": ray.__version__, "workers": workers, "cpus_per_worker": cpus,
            "gpus_per_worker": gpus, "torch_threads": threads, "plan_sha256": fingerprint,
            "resumed_shards": len(done) if manifest is not header else 0,
        }
        write_json_atomic(out / MANIFEST_FILE, manifest)
        bar = tqdm(total=len(texts), initial=len(texts) - sum(len(s[2]) for s in todo), unit="sent",
                   desc=f"extract {header['model']} (ray, {workers} worker(s))", disable=not progress,
                   dynamic_ncols=True)
        try:
            for entry in _run(ray, todo, model=model, alpha=alpha, device=device, out=out, batch_size=batch_size,
                              dtype=dtype_name, head_dim=header["head_dim"], shard_size=shard_size, workers=workers,
                              cpus=cpus, gpus=gpus, threads=threads, max_retries=max_retries, fail_once=fail_once):
                engine = manifest["settings"]["engine"]
                engine["worker_seconds"] = round(engine.get("worker_seconds", 0.0) + entry.pop("_seconds"), 3)
                manifest["settings"]["device"] = entry.pop("_device")
                manifest["settings"]["torch_threads"] = entry.pop("_torch_threads")
                manifest["truncated"] += entry.pop("_truncated")
                manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["first_sentence"])
                manifest["num_sentences"] += entry["num_sentences"]
                manifest["num_tokens"] += entry["num_tokens"]
                write_json_atomic(out / MANIFEST_FILE, manifest)
                bar.update(entry["num_sentences"])
                if callback is not None:
                    callback(manifest["num_sentences"], len(texts))
                bar.set_postfix(tokens=manifest["num_tokens"])
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()
    if manifest["num_sentences"] != len(texts):  # every shard came back exactly once, or this is a bug
        raise RuntimeError(f"ray extraction returned {manifest['num_sentences']} of {len(texts)} sentences")
    if manifest["truncated"]:
        from sparsefinder.model.entmax_model import TruncationWarning

        warnings.warn(f"{manifest['truncated']} text(s) longer than the model's maximum of {header['max_length']} "
                      "tokens were truncated (flagged per sentence in the store)", TruncationWarning, stacklevel=2)
    manifest["complete"] = True
    manifest["settings"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return out


def _run(ray: Any, todo: list[tuple[int, int, list[str]]], *, model: str, alpha: Any, device: str, out: Path,
         batch_size: int, dtype: str, head_dim: int, shard_size: int, workers: int, cpus: float, gpus: float,
         threads: int | None, max_retries: int, fail_once: str | None):
    """Yield the manifest entry of each shard of ``todo`` as its actor finishes it."""
    if not todo:
        return
    from ray.data import ActorPoolStrategy, DataContext

    from sparsefinder.model.catalogue import user_catalogue_path

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI's one bar counts sentences over the whole job
    # A lost worker is always retried; of the errors a shard's code raises, only I/O (a shared
    # disk's hiccup) and the injected fault are: a bad text fails the same way every time.
    ctx.actor_task_retry_on_errors = [OSError, InjectedFault]
    items = [{"shard": k, "first_sentence": first, "texts": window} for k, first, window in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():  # max_restarts/max_task_retries have no named parameter in Ray 2.60
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            _ShardWriter,
            fn_constructor_kwargs=dict(
                model=model, alpha=alpha, device=device, out=str(out.resolve()), batch_size=batch_size,
                dtype=dtype, head_dim=head_dim, batches_per_shard=math.ceil(shard_size / batch_size),
                threads=threads, fail_once=fail_once, catalogue=str(user_catalogue_path()),
            ),
            batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=min(workers, len(items))),
            num_cpus=cpus, num_gpus=gpus or None, max_restarts=max_retries, max_task_retries=max_retries,
        )
    try:
        for row in ds.iter_rows():
            yield json.loads(row["entry"])
    except Exception as e:  # Ray wraps the worker's error; show the user's own
        cause = root_cause(e)
        if cause is e:
            raise RuntimeError(f"ray extraction failed: {str(e).splitlines()[0]}") from e
        if not isinstance(cause, RuntimeError):
            raise cause from None
        raise RuntimeError(f"ray extraction failed: {cause}") from None
