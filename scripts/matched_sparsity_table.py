"""Best recall per method at mean sparsity >= 0.7 / 0.8 / 0.9 (with its efficiency) over one or more sweep tables.

    .venv/bin/python scripts/matched_sparsity_table.py data/sweeps/minilm-entmax15-validation.parquet ...
    .venv/bin/python scripts/matched_sparsity_table.py --y mass_recall data/sweeps/...   # best mass recall instead
"""
import argparse

import pandas as pd

from sparsefinder.evaluation.pareto import best_recall_at
from sparsefinder.evaluation.sweep import load_sweep

parser = argparse.ArgumentParser()
parser.add_argument("--y", default="recall", choices=["recall", "mass_recall"])
parser.add_argument("paths", nargs="+")
args = parser.parse_args()
frame = pd.concat([load_sweep(p) for p in args.paths], ignore_index=True)
other = "mass_recall" if args.y == "recall" else "recall"
rows = {}
for level in (0.7, 0.8, 0.9):
    best = best_recall_at(frame, level, y=args.y)
    for _, r in best.iterrows():
        found = isinstance(r["params"], str)
        cell = (f"{r[args.y]:.3f} ({other} {r[other]:.3f}; eff. {r['efficiency']:.2f}; `{r['params']}`)"
                if found else "—")
        rows.setdefault(r["method"], {})[level] = cell
fam = frame.drop_duplicates("method").set_index("method")["family"]
print(f"| method | family | {args.y} @ sparsity ≥ 0.7 | ≥ 0.8 | ≥ 0.9 |")
print("|---|---|---|---|---|")
for m, cells in rows.items():
    print(f"| {m} | {fam[m]} | " + " | ".join(cells[level] for level in (0.7, 0.8, 0.9)) + " |")
