"""Best recall per method at mean sparsity >= 0.7 / 0.8 / 0.9 (with its efficiency) over one or more sweep tables.

    .venv/bin/python scripts/matched_sparsity_table.py data/sweeps/minilm-entmax15-validation.parquet ...
"""
import sys

import pandas as pd

from sparsefinder.evaluation.pareto import best_recall_at
from sparsefinder.evaluation.sweep import load_sweep

paths = sys.argv[1:]
frame = pd.concat([load_sweep(p) for p in paths], ignore_index=True)
rows = {}
for level in (0.7, 0.8, 0.9):
    best = best_recall_at(frame, level)
    for _, r in best.iterrows():
        found = isinstance(r["params"], str)
        cell = f"{r['recall']:.3f} (eff. {r['efficiency']:.2f}; `{r['params']}`)" if found else "—"
        rows.setdefault(r["method"], {})[level] = cell
fam = frame.drop_duplicates("method").set_index("method")["family"]
print("| method | family | recall @ sparsity ≥ 0.7 | ≥ 0.8 | ≥ 0.9 |")
print("|---|---|---|---|---|")
for m, cells in rows.items():
    print(f"| {m} | {fam[m]} | " + " | ".join(cells[level] for level in (0.7, 0.8, 0.9)) + " |")
