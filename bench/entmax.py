"""Time exact 1.5-entmax (:func:`sparsefinder.entmax15_fast.entmax15_fast`) against
:func:`entmax.entmax15` (full sort) and :func:`torch.softmax`, in one run.

Scores are ``q @ k.T / 8`` for seeded Gaussian ``q, k`` of shape ``(1, 12, n, 64)``
(12 heads, head dim 64), for each ``n``; every timing is the median of ``--repeats``
calls, with torch's thread count as set (``--threads`` to change it). Also checks
that the fast function agrees with ``entmax15`` (same supports, max abs difference).

    .venv/bin/python bench/entmax.py [--n 128 512 2048] [--repeats 7] [--k 32] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and this file would shadow the entmax package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402
from entmax import entmax15  # noqa: E402

from sparsefinder.entmax15_fast import entmax15_fast  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=32, help="initial candidates per row of entmax15_fast")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, heads {args.heads}, d {args.d}, k {args.k}")
    print(
        f"{'n':>6} {'entmax15 ms':>12} {'fast ms':>9} {'softmax ms':>11} {'entmax15/fast':>14} {'fast/softmax':>13}"
        f" {'supp med/max':>13} {'max|diff|':>10} {'same supp':>9}"
    )
    g = torch.Generator().manual_seed(args.seed)
    for n in args.n:
        q = torch.randn(1, args.heads, n, args.d, generator=g)
        k = torch.randn(1, args.heads, n, args.d, generator=g)
        scores = q @ k.transpose(-1, -2) / args.d**0.5
        with torch.no_grad():
            ref = entmax15(scores, dim=-1)
            out = entmax15_fast(scores, k=args.k)
            t_ref = median_ms(lambda s=scores: entmax15(s, dim=-1), args.repeats)
            t_fast = median_ms(lambda s=scores: entmax15_fast(s, k=args.k), args.repeats)
            t_soft = median_ms(lambda s=scores: torch.softmax(s, dim=-1), args.repeats)
        supp = (ref > 0).sum(-1).float()
        print(
            f"{n:>6} {t_ref:>12.2f} {t_fast:>9.2f} {t_soft:>11.2f} {t_ref / t_fast:>14.2f} {t_fast / t_soft:>13.2f}"
            f" {f'{supp.median():.0f}/{supp.max():.0f}':>13} {(out - ref).abs().max().item():>10.1e}"
            f" {str(torch.equal(out > 0, ref > 0)):>9}"
        )


if __name__ == "__main__":
    main()
