"""How far can Cauchy-Schwarz block bounds prune on the bench's Gaussian mixture, at best?

Best case for :mod:`sparsefinder.kernels.exact_bounds`: the blocks are the true mixture components
and the threshold is the exact one (not a lower bound). Prints, per noise scale, the share of the n^2
pairs in blocks whose bound (alpha - 1)/sqrt(d) (q . c_B + |q| r_B) still exceeds tau: no iteration or
clustering can score fewer. One head, n = 4096, d = 64, 64 components (``bench/sparse_attention.py``).

    .venv/bin/python experiments/exact_bounds_ideal.py
"""

from __future__ import annotations

import math

import torch
from entmax import entmax15


def main() -> None:
    torch.manual_seed(0)
    n, d, c = 4096, 64, 64
    for noise in (1.0, 0.5, 0.25):
        mu = torch.randn(c, d)
        mu = mu / mu.norm(dim=-1, keepdim=True) * math.sqrt(0.75 * d)
        zq, zk = torch.randint(c, (n,)), torch.randint(c, (n,))
        q, k = mu[zq] + noise * torch.randn(n, d), mu[zk] + noise * torch.randn(n, d)
        z = (q @ k.T).double() / math.sqrt(d) / 2
        p = entmax15(2 * z, dim=-1)
        tau = (z - p.sqrt()).masked_fill(p == 0, math.inf).amin(-1)  # p = (z - tau)^2 on the support
        cent = torch.stack([k[zk == j].mean(0) for j in range(c)])
        rad = torch.stack([(k[zk == j] - cent[j]).norm(dim=-1).max() for j in range(c)])
        bound = ((q @ cent.T + q.norm(dim=-1, keepdim=True) * rad) / math.sqrt(d) / 2).double()
        sizes = torch.bincount(zk, minlength=c).double()
        share = ((bound > tau[:, None]).double() * sizes).sum() / n**2
        print(f"noise {noise}: support {float((p > 0).sum(-1).double().mean()):.1f} keys per query, "
              f"pairs in blocks the bounds cannot exclude {float(share):.4f} of n^2")


if __name__ == "__main__":
    main()
