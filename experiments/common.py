"""What the experiments share: the command line of a run over the default extractions and listwise projections.

Experiments run as ``python experiments/X.py``, so this folder is first on ``sys.path`` and ``import common`` finds
this file.
"""

from __future__ import annotations

import argparse


def experiment_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with ``--train``, ``--val``, ``--projections`` and ``--layers``; ``doc`` is its description."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="runs/default/train")
    ap.add_argument("--val", default="runs/default/val")
    ap.add_argument("--projections", default="data/projections/minilm-entmax15-listwise-r8")
    ap.add_argument("--layers", default="0,3")
    return ap
