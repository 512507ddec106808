"""Clustered (truly sparse) entmax attention against dense entmax15 and dense softmax attention, in one run.

Methods, each on the same q, k, v:

- ``dense entmax15``: ``entmax.entmax15(q k^T / sqrt(d)) v`` (full sort; the reference output);
- ``dense entmax15_fast``: the same with :func:`sparsefinder.kernels.entmax15.entmax15_fast` (top-k, exact);
- ``dense softmax (SDPA)``: ``torch.nn.functional.scaled_dot_product_attention`` (the dense floor);
- ``clustered entmax15``: :func:`sparsefinder.kernels.sparse_attention.clustered_entmax_attention` on the
  predicted graph (same cluster, or within the window), never forming the n x n matrix;
- ``exact entmax15 (bounds)``: :func:`sparsefinder.kernels.exact_bounds.exact_sparse_entmax_attention`
  (seeded with the same window and the first/last key; exact by construction). Its row also gives the
  share of the n^2 pairs it scored and of the query x block bounds it evaluated.

Above ``--dense-max-n`` the dense entmax methods (10 GB at n = 4096) are skipped; errors are then
measured on ``--check-rows`` queries per head against float64 dense 1.5-entmax of those rows.

Inputs:

1. *Gaussian mixture* (``--n``, 12 heads, d = 64): per head, ``C`` component means
   :math:`\\mu_c \\sim N(0, I_d)` rescaled to norm :math:`\\sqrt{0.75 d}`; each query and key draws a
   component uniformly and is :math:`\\mu_c + \\varepsilon`, :math:`\\varepsilon \\sim N(0, I_d)`,
   so a query's largest scores are with keys of its own component. ``C`` = ``--components``
   (default :math:`\\sqrt n`). Tokens are assigned to the *nearest known component mean*.
2. *Real model*: the default model (``minilm-entmax15``, 12 heads, d = 32) on validation sentences of
   the default corpus concatenated up to its 512-token limit; q, k as its attention function
   receives them and v from its value projections, all 6 layers stacked as the batch. Clusters:
   the shipped projections (``data/projections/minilm-entmax15``) and k-means centroids
   (``data/fitted/minilm-entmax15``, ``--real-clusters``) of each layer and head, nearest centroid.

Every (input, method) runs in a fresh subprocess: wall time is the median of ``--repeats`` calls
after one warm-up (dense entmax15 runs ``--dense-repeats`` times; it takes ~15 s at n = 4096);
peak memory is the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` after the inputs are loaded) over its resident set before the first
call, on CUDA ``torch.cuda.max_memory_allocated`` over the memory allocated before it (a call on
an 8-token slice first loads lazy imports and kernels). Recall is the predicted graph's
``|G ∩ Ĝ| / |G|`` against the gold graph (the support of dense 1.5-entmax, computed per head with
``entmax15_fast``, whose supports equal ``entmax15``'s), over all queries and heads
(micro-averaged); sparsity is ``1 - |Ĝ| / (B H n^2)``. Errors are against the dense entmax15
output: max abs, and the cosine of each query's output vector (mean and min over queries and heads).

    .venv/bin/python bench/sparse_attention.py [--n 1024 4096] [--threads 1] [--repeats 5] [--no-real]
        [--real-clusters 4] [--real-window 3] [--noise 1.0] [--dense-max-n 4096] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("dense entmax15", "dense entmax15_fast", "dense softmax (SDPA)", "clustered entmax15",
           "exact entmax15 (bounds)")
DENSE = ("dense entmax15", "dense entmax15_fast")


# ---------------------------------------------------------------------- methods


def run_method(method: str, inp: dict) -> torch.Tensor:
    q, k, v = inp["q"], inp["k"], inp["v"]
    scale = q.shape[-1] ** -0.5
    if method == "dense softmax (SDPA)":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if method in ("dense entmax15", "dense entmax15_fast"):
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if method == "dense entmax15":
            from entmax import entmax15

            probs = entmax15(scores, dim=-1)
        else:
            from sparsefinder.kernels.entmax15 import entmax15_fast

            probs = entmax15_fast(scores)
        del scores
        return torch.matmul(probs, v)
    if method == "clustered entmax15":
        from sparsefinder.kernels.sparse_attention import clustered_entmax_attention

        return clustered_entmax_attention(q, k, v, inp["q_clusters"], inp["k_clusters"], window=inp["window"],
                                          scaling=scale)
    if method == "exact entmax15 (bounds)":
        return exact_result(inp).output
    raise ValueError(method)


def exact_result(inp: dict):
    from sparsefinder.kernels.exact_bounds import exact_sparse_entmax_attention

    return exact_sparse_entmax_attention(inp["q"], inp["k"], inp["v"], window=inp["window"], global_keys=True)


# ---------------------------------------------------------------------- memory


def _status(field: str) -> int:
    """``/proc/self/status`` field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    method = args.worker
    inp = {key: (val.to(device) if isinstance(val, torch.Tensor) else val)
           for key, val in torch.load(args.inputs, weights_only=True).items()}
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        # Lazy imports, thread pools and kernels are set up by a call on a small slice, before the baseline.
        small = {key: (val[..., :8, :] if isinstance(val, torch.Tensor) and val.dim() == 4 else
                       val[..., :8] if isinstance(val, torch.Tensor) else val) for key, val in inp.items()}
        run_method(method, small)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset = _reset_peak()
            base = _status("VmRSS")
        out = run_method(method, inp)  # the first call: peak memory (and warm-up)
        sync()
        peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            run_method(method, inp)
            sync()
            times.append(time.perf_counter() - t0)
    result = {"out": out.float().cpu(), "times": torch.tensor(times, dtype=torch.float64), "peak": peak,
              "exact_peak": cuda or reset, "threads": torch.get_num_threads()}
    if method == "exact entmax15 (bounds)":
        with torch.inference_mode():
            res = exact_result(inp)
        result.update(pairs_scored=int(res.pairs_scored.sum()), bound_evaluations=int(res.bound_evaluations.sum()),
                      rounds=int(res.rounds.max()))
    if method == "dense entmax15":
        # The gold graph (p > 0) and the predicted graph's recall, after the measurements.
        result.update(recall_counts(inp))
    torch.save(result, args.result)


def recall_counts(inp: dict) -> dict:
    """|G ∩ Ĝ| and |G| over all queries and heads, one (batch, head) at a time (bounded memory)."""
    from sparsefinder.kernels.entmax15 import entmax15_fast
    from sparsefinder.kernels.sparse_attention import predicted_graph

    q, k = inp["q"], inp["k"]
    scale = q.shape[-1] ** -0.5
    hits = gold_edges = pred_edges = 0
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            gold = entmax15_fast(q[b, h] @ k[b, h].T * scale) > 0  # same support as entmax15
            pred = predicted_graph(inp["q_clusters"][b, h][None, None], inp["k_clusters"][b, h][None, None],
                                   inp["window"])[0, 0]
            hits += int((gold & pred).sum())
            gold_edges += int(gold.sum())
            pred_edges += int(pred.sum())
    return {"hits": hits, "gold_edges": gold_edges, "pred_edges": pred_edges}


# ---------------------------------------------------------------------- inputs


def mixture_inputs(n: int, heads: int, d: int, components: int, window: int, seed: int, noise: float = 1.0) -> dict:
    """The documented Gaussian mixture (module docstring; ``noise`` scales the N(0, I) part); clusters = nearest
    known component mean."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(heads, components, d, generator=g)
    mu = mu / mu.norm(dim=-1, keepdim=True) * math.sqrt(0.75 * d)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randint(components, (heads, n), generator=g)
        x = mu.gather(1, z[..., None].expand(-1, -1, d)) + noise * torch.randn(heads, n, d, generator=g)
        return x, torch.cdist(x, mu).argmin(-1)

    q, qc = draw()
    k, kc = draw()
    v = torch.randn(heads, n, d, generator=g)
    return {"q": q[None], "k": k[None], "v": v[None], "q_clusters": qc[None], "k_clusters": kc[None],
            "window": window}


def real_inputs(n_clusters: int, window: int) -> tuple[dict, int]:
    """q, k, v of every layer of the default model on ~512 tokens of validation text (layers as the batch)."""
    from sparsefinder.corpora.readers import default_corpus
    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.evaluation.sweep import canonical_params
    from sparsefinder.model.entmax_model import TruncationWarning, load_model
    from sparsefinder.predictors.paper import top_centroids
    from sparsefinder.training.projections import Projections

    model = load_model("minilm-entmax15", device="cpu")
    texts = default_corpus("validation").texts()
    parts, tokens = [], 0
    for t in texts:
        parts.append(t)
        tokens += len(model.tokenizer(t, add_special_tokens=False)["input_ids"])
        if tokens >= model.max_length:
            break
    values: list[torch.Tensor] = []
    hooks = [m.value.register_forward_hook(lambda _m, _i, o: values.append(o.detach()))
             for m in model.attention_modules]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            ex = model.extract([" ".join(parts)], keep_probs=False)
    finally:
        for h in hooks:
            h.remove()
    heads = ex.num_heads
    n = int(ex.lengths[0])
    q = torch.cat(ex.queries)[:, :, :n]
    k = torch.cat(ex.keys)[:, :, :n]
    d = q.shape[-1]
    v = torch.cat([x.view(1, x.shape[1], heads, d).transpose(1, 2) for x in values])[:, :, :n].float()
    proj = Projections.load(ROOT / "data/projections/minilm-entmax15")
    fitted = load_fitted(ROOT / "data/fitted/minilm-entmax15")["kmeans"][canonical_params({"n_clusters": n_clusters})]
    qc, kc = [], []
    for layer in range(q.shape[0]):
        qp, kp = proj.project(layer, q[layer : layer + 1], k[layer : layer + 1])
        cent = fitted[layer].centroids_
        qc.append(top_centroids(qp, cent, 1)[..., 0])
        kc.append(top_centroids(kp, cent, 1)[..., 0])
    return {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous(), "q_clusters": torch.cat(qc),
            "k_clusters": torch.cat(kc), "window": window}, n


# ---------------------------------------------------------------------- driver


def measure(method: str, path: Path, args: argparse.Namespace, repeats: int) -> dict:
    result = path.with_suffix(f".{METHODS.index(method)}.pt")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--inputs", str(path),
           "--result", str(result), "--repeats", str(repeats), "--threads", str(args.threads),
           "--device", args.device]
    subprocess.run(cmd, check=True)
    return torch.load(result, weights_only=True)


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
    return float((out - ref).abs().max()), float(cos.mean()), float(cos.min())


def sampled_reference(inp: dict, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query indices (evenly spaced, ``rows`` per head) and their float64 dense 1.5-entmax outputs."""
    from entmax import entmax15

    q, k, v = inp["q"].double(), inp["k"].double(), inp["v"].double()
    idx = torch.linspace(0, q.shape[2] - 1, min(rows, q.shape[2])).round().long()
    p = entmax15(q[:, :, idx] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return idx, p @ v


def report(title: str, inp: dict, args: argparse.Namespace, tmp: Path) -> list[dict]:
    path = tmp / "inputs.pt"
    torch.save(inp, path)
    b, h, n, _ = inp["q"].shape
    dense_ok = n <= args.dense_max_n
    methods = [m for m in METHODS if dense_ok or m not in DENSE]
    results = {m: measure(m, path, args, args.dense_repeats if m == "dense entmax15" else args.repeats)
               for m in methods}
    pairs = b * h * n * n
    print(f"\n## {title}")
    if dense_ok:
        ref = results["dense entmax15"]
        recall = ref["hits"] / max(ref["gold_edges"], 1)
        print(f"predicted graph: recall {recall:.4f}, sparsity {1 - ref['pred_edges'] / pairs:.4f} "
              f"(gold sparsity {1 - ref['gold_edges'] / pairs:.4f}), window {inp['window']}")
        rows, ref_out = slice(None), ref["out"]
    else:
        rows, ref_out = sampled_reference(inp, args.check_rows)
        print(f"dense entmax skipped (n > {args.dense_max_n}): errors on {len(rows)} queries per head against "
              f"float64 dense 1.5-entmax of those rows; window {inp['window']}")
    ex = results["exact entmax15 (bounds)"]
    print(f"exact (bounds): pairs scored {ex['pairs_scored'] / pairs:.4f} of n^2, bound evaluations "
          f"{ex['bound_evaluations'] / pairs:.4f} of n^2, rounds {ex['rounds']}")
    print(f"{'method':<24} {'time s':>9} {'peak MiB':>9} {'max|err|':>9} {'cos mean':>9} {'cos min':>9} "
          f"{'vs SDPA time':>12} {'vs entmax15 time':>16} {'vs entmax15 mem':>15}")
    t_ref = statistics.median(results["dense entmax15"]["times"].tolist()) if dense_ok else math.nan
    t_sdpa = statistics.median(results["dense softmax (SDPA)"]["times"].tolist())
    out_rows = []
    for m in methods:
        r = results[m]
        t = statistics.median(r["times"].tolist())
        err, cmean, cmin = compare(r["out"][:, :, rows].double(), ref_out.double())
        peak = r["peak"] / 2**20
        ref_peak = results["dense entmax15"]["peak"] if dense_ok else math.nan
        mem_ratio = ref_peak / r["peak"] if r["peak"] > 0 else float("inf")
        print(f"{m:<24} {t:>9.4f} {peak:>9.1f} {err:>9.2e} {cmean:>9.5f} {cmin:>9.5f} "
              f"{t_sdpa / t:>11.2f}x {t_ref / t:>15.2f}x {mem_ratio:>14.2f}x")
        row = {"input": title, "n": n, "method": m, "time_s": t, "peak_mib": peak, "max_err": err,
               "cos_mean": cmean, "cos_min": cmin, "sdpa_time_ratio": t_sdpa / t, "entmax15_time_ratio": t_ref / t}
        if m == "exact entmax15 (bounds)":
            row.update(pairs_scored_share=r["pairs_scored"] / pairs, bound_share=r["bound_evaluations"] / pairs,
                       rounds=r["rounds"])
        out_rows.append(row)
    if not all(r["exact_peak"] for r in results.values()):
        print("(VmHWM could not be reset: peak memory includes earlier peaks of the process)")
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[1024, 4096], help="mixture lengths (none: skip)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--components", type=int, default=None, help="mixture components (default sqrt(n))")
    ap.add_argument("--window", type=int, default=3, help="window of the mixture case")
    ap.add_argument("--real-window", type=int, default=3, help="window of the real-model case")
    ap.add_argument("--real-clusters", type=int, default=4, help="k-means size of the shipped fit (2, 4, ..., 20)")
    ap.add_argument("--no-real", action="store_true", help="skip the real-model case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-repeats", type=int, default=1, help="timed calls of dense entmax15 (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=1.0, help="scale of the mixture's N(0, I) noise (1: documented)")
    ap.add_argument("--dense-max-n", type=int, default=4096, help="skip dense entmax above this n")
    ap.add_argument("--check-rows", type=int, default=256, help="queries per head checked when dense is skipped")
    ap.add_argument("--json", type=Path, default=None, help="also write the table rows to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    mem = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM rise (fresh process)"
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, repeats {args.repeats} "
          f"(dense entmax15: {args.dense_repeats}), time = median wall s, peak memory = {mem}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            c = args.components or max(1, round(math.sqrt(n)))
            inp = mixture_inputs(n, args.heads, args.d, c, args.window, args.seed, args.noise)
            noise = "" if args.noise == 1.0 else f", noise {args.noise:g}"
            rows += report(f"Gaussian mixture: n = {n}, {args.heads} heads, d = {args.d}, {c} components{noise}",
                           inp, args, Path(tmp))
        if not args.no_real:
            inp, n = real_inputs(args.real_clusters, args.real_window)
            b, h, _, d = inp["q"].shape
            rows += report(f"default model (minilm-entmax15), real q/k/v: n = {n}, {b} layers x {h} heads, d = {d}, "
                           f"k-means C = {args.real_clusters} on the shipped projections", inp, args, Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
