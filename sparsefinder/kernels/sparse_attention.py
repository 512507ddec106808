r"""Clustered ("truly sparse") alpha-entmax attention: score only the pairs of the predicted graph.

Per (sentence, head), given a cluster id for every query and key (the nearest
k-means centroid of the projected :math:`q'_i, k'_j`, :class:`~sparsefinder.predictors.paper.KMeansPredictor`
with ``top_t = 1``; ``-1`` = in no cluster) and a window ``w``, the predicted graph is

.. math::
    \hat G = \{(i, j) : c(q_i) = c(k_j) \ge 0\} \;\cup\; \{(i, j) : |i - j| \le \lfloor w/2 \rfloor\}

minus padding keys (and, when causal, minus :math:`j > i`). The output is dense
entmax attention restricted to :math:`\hat G` (docs/method.md §5):

.. math::
    s_{ij} = \gamma\, q_i \cdot k_j, \qquad
    p_i = \alpha\text{-entmax}\big((s_{ij})_{j \in \hat G_i}\big), \qquad
    o_i = \sum_{j \in \hat G_i} p_{ij} v_j ,

(:math:`\gamma` = ``scaling``, default :math:`d^{-1/2}`), but it never forms the
:math:`n \times n` score matrix:

1. *Buckets.* Keys are stable-sorted by (row, cluster) into a padded table of
   key positions per cluster; queries are sorted the same way and cut into
   *chunks* of at most ``block_size`` queries of one cluster (a large cluster
   takes several chunks). Chunks are grouped into *width classes* by their
   cluster's key count rounded up to a multiple of 16, so a few large
   clusters do not pad every row to their size.
2. *Cluster scores.* Per class, one batched matmul: each chunk's ``b`` queries
   against the :math:`L` keys of its cluster, ``(M, b, d) @ (M, d, L)``.
3. *Window scores.* For each offset :math:`o \in [-\lfloor w/2 \rfloor, \lfloor w/2 \rfloor]`
   the band :math:`s_{i, i+o}` is a dot product with shifted keys,
   ``(R, n, W)`` with :math:`W = 2\lfloor w/2 \rfloor + 1`. A band key in the
   query's own cluster is masked there, so every pair is a candidate exactly once.
4. Each query's candidate list is [cluster part | window part], length
   :math:`L + W`, non-edges at the dtype's minimum (finite, as transformers
   masks). 1.5-entmax over it by :func:`entmax15_fixed_point` (exact, no sort:
   a sort or top-k per short row costs more in per-row overhead than in work);
   other alpha by bisection and softmax at 1 (:func:`sparsefinder.kernels.entmax.entmax`),
   as is 1.5 when gradients are needed (the backward of
   :func:`~sparsefinder.kernels.entmax15.entmax15_fast`).
5. :math:`o = P_{\text{cluster}} V_{\text{cluster}}` (batched) :math:`+ \sum_o P_{\text{window}, o}\, v_{i+o}`,
   scattered back to token order.

Work and memory are :math:`O(\sum_{\text{chunks}} b\,(L + W))` scores and
:math:`O(\sum_c |Q_c| L_c d + n W d)` flops: :math:`n^2 / C` pairs for ``C``
balanced clusters instead of :math:`n^2`. Every step is a tensor op, so the same
code runs on CPU and CUDA. A query with no candidate at all (its cluster has no
key and no window key is valid) gets a zero output and an empty support.
"""

from __future__ import annotations

import torch

from sparsefinder.kernels.entmax import entmax, is_scalar_alpha
from sparsefinder.kernels.entmax15 import entmax15_fast

DEFAULT_BLOCK_SIZE = 32
DEFAULT_WIDTH_STEP = 16


def entmax15_fixed_point(x: torch.Tensor, max_iter: int = 20) -> torch.Tensor:
    r"""Exact 1.5-entmax over the last dim of ``x`` by a support fixed point (no sort; forward only).

    With :math:`z = (x - \max x)/2`, a threshold :math:`\tau` has the support
    :math:`S = \{j : z_j > \tau\}`, :math:`\rho = |S|`, and with :math:`d = [z - \tau]_+`,
    :math:`a = \sum_j d_j`, :math:`b = \sum_j d_j^2` (so :math:`\rho\sigma^2_S = b - a^2/\rho`)
    the sort-based threshold of :mod:`sparsefinder.kernels.entmax15` restricted to :math:`S` is

    .. math::
        T(\tau) = \mu_S - \sqrt{\big[(1 - \rho\sigma^2_S)/\rho\big]_+}
                 = \tau + \frac{a}{\rho} - \sqrt{\Big[\frac{1 - b + a^2/\rho}{\rho}\Big]_+}.

    We iterate :math:`\tau \leftarrow T(\tau)` from :math:`\tau = -1` (a lower bound:
    :math:`p_{\max} \le 1`). When the new threshold has a support of the same size as
    the set it was computed from (supports of thresholds are nested, so the sets are
    equal) and :math:`1 - \rho\sigma^2_S \ge 0`, it is exact:
    :math:`\sum_j [z_j - \tau]_+^2 = \sum_{j \in S} (z_j - \tau)^2 = 1`, whose root is unique.
    Rows without that certificate after ``max_iter`` steps (rare; it usually comes
    after 3-5) are solved by :func:`~sparsefinder.kernels.entmax15.entmax15_fast`. Each
    step is a few whole-tensor passes, so many short rows (the candidate lists of
    :func:`clustered_entmax_attention`) cost no per-row overhead, unlike a sort or top-k.
    Agrees with :func:`entmax.entmax15` to float rounding; the supports agree except
    that an entry exactly at the threshold (a tie such as ``[0, 0, 0, 0, -1]``) may come
    out as ~1e-14 instead of 0, the threshold being summed in another order.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    shape = x.shape
    length = shape[-1]
    z = x.reshape(-1, length)
    z = (z - z.amax(-1, keepdim=True)).mul_(0.5)
    rows = z.shape[0]
    tau_out = torch.zeros(rows, 1, dtype=z.dtype, device=z.device)
    certified = torch.zeros(rows, dtype=torch.bool, device=z.device)
    active = torch.arange(rows, device=z.device)  # rows still iterating; certified ones drop out in batches
    zt = z
    tau = torch.full((rows, 1), -1.0, dtype=z.dtype, device=z.device)
    rho_prev = ok_prev = None
    for step in range(max_iter + 1):
        d = (zt - tau).clamp_(min=0)
        rho = torch.sign(d).sum(-1, keepdim=True)  # d >= 0: sign counts the support
        if rho_prev is not None:
            ok = ((rho == rho_prev) & ok_prev).squeeze(-1)
            done = active[ok]
            tau_out[done] = tau[ok]
            certified[done] = True
            if step == max_iter or bool(ok.all()):
                break
            if 2 * int(ok.sum()) >= ok.numel():  # worth compacting
                keep = ~ok
                active, zt, tau, d, rho = active[keep], zt[keep], tau[keep], d[keep], rho[keep]
        a = d.sum(-1, keepdim=True)
        b = torch.linalg.vecdot(d, d).unsqueeze(-1)
        slack = 1 - (b - a * a / rho)
        tau = tau + a / rho - torch.sqrt(torch.clamp(slack / rho, min=0))
        rho_prev, ok_prev = rho, slack >= 0
    p = z.sub_(tau_out).clamp_(min=0).square_()
    todo = ~certified
    if bool(todo.any()):
        p[todo] = entmax15_fast(x.reshape(-1, length)[todo])
    return p.view(shape)


def _bucket(
    q_clusters: torch.Tensor, k_clusters: torch.Tensor, block_size: int, width_step: int = DEFAULT_WIDTH_STEP
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    r"""Sort queries and keys by (row, cluster); chunk queries, pad keys (module docstring, step 1).

    Returns one ``(query_index (M_c, b), key_index (M_c, L_c))`` pair per width
    class: chunks whose cluster has :math:`\le L_c` keys, :math:`L_c` a multiple of
    ``width_step`` (or the largest cluster), so a few large clusters do not pad
    every row to their size. Flat positions are ``row * n + position``; ``-1`` = empty slot.

    ``q_clusters`` ``(R, n_q)``, ``k_clusters`` ``(R, n_k)`` int64, ``-1`` = no cluster
    (padding keys arrive as ``-1``). Unclustered queries go to an extra null
    group ``C`` that holds no key, so they still get a row for their window.
    """
    device = q_clusters.device
    rows, n_q = q_clusters.shape
    n_k = k_clusters.shape[1]
    top = max(int(c.max()) if c.numel() else -1 for c in (q_clusters, k_clusters))
    groups = max(top + 1, 0) + 1
    row_ids = torch.arange(rows, device=device)[:, None]

    # Keys: the group's keys in position order (a stable sort of flat positions keeps it).
    k_valid = k_clusters >= 0
    k_group = (k_clusters + groups * row_ids)[k_valid]
    k_pos = torch.arange(rows * n_k, device=device).view(rows, n_k)[k_valid]
    k_count = torch.bincount(k_group, minlength=rows * groups)
    width = int(k_count.max().item()) if k_count.numel() else 0
    order = torch.argsort(k_group, stable=True)
    k_group, k_pos = k_group[order], k_pos[order]
    k_start = torch.cumsum(k_count, 0) - k_count
    k_rank = torch.arange(k_group.numel(), device=device) - k_start[k_group]
    key_table = torch.full((rows * groups, width), -1, dtype=torch.long, device=device)
    key_table[k_group, k_rank] = k_pos

    # Queries: chunks of at most b queries of one group.
    q_group = (q_clusters.masked_fill(q_clusters < 0, groups - 1) + groups * row_ids).reshape(-1)
    q_count = torch.bincount(q_group, minlength=rows * groups)
    b = max(1, min(block_size, int(q_count.max().item()) if q_count.numel() else 1))
    n_chunks = (q_count + b - 1) // b
    chunk_start = torch.cumsum(n_chunks, 0) - n_chunks
    order = torch.argsort(q_group, stable=True)
    q_sorted = q_group[order]
    q_start = torch.cumsum(q_count, 0) - q_count
    q_rank = torch.arange(q_sorted.numel(), device=device) - q_start[q_sorted]
    m = int(n_chunks.sum().item())
    query_table = torch.full((m, b), -1, dtype=torch.long, device=device)
    query_table[chunk_start[q_sorted] + q_rank // b, q_rank % b] = order
    chunk_group = torch.repeat_interleave(torch.arange(rows * groups, device=device), n_chunks)
    step = max(1, width_step)
    chunk_width = ((k_count[chunk_group] + step - 1) // step * step).clamp(max=width)
    classes = []
    for w in torch.unique(chunk_width).tolist():
        sel = chunk_width == w
        classes.append((query_table[sel], key_table[chunk_group[sel], : int(w)]))
    return classes


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_clusters: torch.Tensor,
    k_clusters: torch.Tensor,
    window: int,
    key_padding_mask: torch.Tensor | None,
    block_size: int,
    alpha: float | torch.Tensor,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if tuple(q_clusters.shape) != tuple(q.shape[:3]) or tuple(k_clusters.shape) != tuple(k.shape[:3]):
        raise ValueError(f"q_clusters {tuple(q_clusters.shape)} / k_clusters {tuple(k_clusters.shape)} must be "
                         f"(B, H, N) like q {tuple(q.shape[:3])} / k {tuple(k.shape[:3])}")
    for name, c in (("q_clusters", q_clusters), ("k_clusters", k_clusters)):
        if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
            raise ValueError(f"{name} must be integer cluster ids, got {c.dtype}")
        if c.numel() and int(c.min()) < -1:
            raise ValueError(f"{name} must be >= -1 (-1 = in no cluster), got {int(c.min())}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must be bool (B, N_k) = {(k.shape[0], k.shape[2])}, "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() > 1 and tuple(alpha.shape) != (q.shape[1],):
            raise ValueError(f"per-head alpha must have shape (H,) = ({q.shape[1]},), got {tuple(alpha.shape)}")
        if alpha.numel() == 0 or bool(torch.any(alpha < 1)):
            raise ValueError("every alpha must be >= 1 (1 = softmax)")
    elif isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 1:
        raise ValueError(f"alpha must be a number >= 1 (1 = softmax), got {alpha!r}")
    devices = {t.device for t in (q, k, v, q_clusters, k_clusters)}
    if key_padding_mask is not None:
        devices.add(key_padding_mask.device)
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def clustered_entmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_clusters: torch.Tensor,
    k_clusters: torch.Tensor,
    window: int = 0,
    alpha: float | torch.Tensor = 1.5,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    return_support: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Alpha-entmax attention over the clustered predicted graph only (module docstring).

    ``q`` ``(B, H, N_q, d)``, ``k`` ``(B, H, N_k, d)``, ``v`` ``(B, H, N_k, d_v)``;
    ``q_clusters`` ``(B, H, N_q)`` and ``k_clusters`` ``(B, H, N_k)`` integer
    cluster ids (``-1``: the token is in no cluster, only its window counts).
    ``window`` = ``w``: keys with :math:`|i - j| \le \lfloor w/2 \rfloor` are candidates
    too (0: none; 1: the diagonal). ``alpha``: a float :math:`\ge 1` or an ``(H,)``
    tensor (one per head). ``scaling`` defaults to :math:`d^{-1/2}`.
    ``key_padding_mask`` ``(B, N_k)`` bool, True on padding keys (torch's
    convention): never candidates. ``causal``: only :math:`j \le i`.
    ``block_size``: queries per chunk (speed only, not the result).

    Returns the output ``(B, H, N_q, d_v)`` in ``v``'s dtype (computed in float32),
    equal to dense alpha-entmax attention with the scores outside the graph masked;
    with ``return_support`` also the probabilities as a coalesced sparse COO
    tensor ``(B, H, N_q, N_k)`` holding only the support (the non-zero :math:`p_{ij}`).
    """
    _check(q, k, v, q_clusters, k_clusters, window, key_padding_mask, block_size, alpha)
    batch, heads, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    rows = batch * heads
    device = q.device
    if scaling is None:
        scaling = d**-0.5

    qc = q_clusters.reshape(rows, n_q).long()
    kc = k_clusters.reshape(rows, n_k).long()
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :].expand(batch, heads, n_k).reshape(rows, n_k)
        kc = kc.masked_fill(pad, -1)
    qf = q.reshape(rows * n_q, d).float()
    kf = k.reshape(rows * n_k, d).float()
    vf = v.reshape(rows * n_k, d_v).float()
    classes = _bucket(qc, kc, block_size)

    # Window part, once, in token order (R n_q, W); each chunk slot gathers its query's row.
    half = window // 2 if window > 0 else -1
    offsets = range(-half, half + 1)
    n_win = len(offsets)
    scores_w = ok_w = None
    if n_win:
        scores_w, ok_w = _window_scores(qf.view(rows, n_q, d), kf.view(rows, n_k, d), qc, kc, pad, half, causal)
        scores_w = scores_w.mul_(scaling).view(rows * n_q, n_win)
        ok_w = ok_w.view(rows * n_q, n_win)
    if isinstance(alpha, torch.Tensor) and alpha.numel() > 1:
        alpha = alpha.to(device=device, dtype=torch.float32)

    # Padding slots and isolated queries write to a dummy last row.
    dummy = rows * n_q
    out = torch.zeros(dummy + 1, d_v, device=device)
    p_w = torch.zeros(dummy + 1, n_win, device=device) if n_win else None
    parts = []
    for q_idx, k_idx in classes:
        probs, has = _chunk_probs(qf, kf, q_idx, k_idx, scores_w, ok_w, n_q, n_k, heads, scaling, alpha, causal)
        width = k_idx.shape[1]
        dest = torch.where(has, q_idx, dummy).reshape(-1)
        out.index_copy_(0, dest, torch.bmm(probs[..., :width], _rows(vf, k_idx.clamp(min=0))).reshape(-1, d_v))
        if n_win:
            p_w.index_copy_(0, dest, probs[..., width:].reshape(-1, n_win))
        if return_support:
            parts.append(_support(probs * has[:, :, None], q_idx, k_idx, offsets, n_q, n_k, heads))
    if n_win:
        right = half + max(0, n_q - n_k)
        v_pad = torch.nn.functional.pad(vf.view(rows, n_k, d_v), (0, 0, half, right))
        p_w3 = p_w[:dummy].view(rows, n_q, n_win)
        out3 = out[:dummy].view(rows, n_q, d_v)
        for t, o in enumerate(offsets):
            out3.addcmul_(p_w3[:, :, t, None], v_pad[:, half + o : half + o + n_q])
    out = out[:dummy].view(batch, heads, n_q, d_v).to(v.dtype)
    if not return_support:
        return out
    if parts:
        indices = torch.cat([i for i, _ in parts], dim=1)
        values = torch.cat([x for _, x in parts])
    else:
        indices = torch.zeros(4, 0, dtype=torch.long, device=device)
        values = torch.zeros(0, device=device)
    support = torch.sparse_coo_tensor(indices, values, size=(batch, heads, n_q, n_k), check_invariants=False)
    return out, support.coalesce()


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a 2-D ``x``: ``index_select`` copies whole rows, much faster than advanced indexing on CPU."""
    return torch.index_select(x, 0, index.reshape(-1)).view(*index.shape, x.shape[1])


def _chunk_probs(
    qf: torch.Tensor,
    kf: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    scores_w: torch.Tensor | None,
    ok_w: torch.Tensor | None,
    n_q: int,
    n_k: int,
    heads: int,
    scaling: float,
    alpha: float | torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entmax over the candidate lists of one width class: ``(M, b, L + W)`` probabilities, ``(M, b)`` has-candidates.

    Columns ``[:L]`` are the chunk's cluster keys ``k_idx``, ``[L:]`` the window offsets.
    """
    m, b = q_idx.shape
    width = k_idx.shape[1]
    q_ok = q_idx >= 0
    q_at = q_idx.clamp(min=0)
    k_ok = k_idx >= 0
    k_at = k_idx.clamp(min=0)
    # Cluster part (M, b, L): only the key slot (and causality) decides what is a candidate.
    scores = torch.bmm(_rows(qf, q_at), _rows(kf, k_at).transpose(1, 2)).mul_(scaling)
    if causal:
        ok = k_ok[:, None, :] & ((k_at % n_k)[:, None, :] <= (q_at % n_q)[:, :, None])
    else:
        ok = k_ok[:, None, :].expand(m, b, width)
    if scores_w is not None:
        ok_win = _rows(ok_w, q_at)
        scores = torch.cat([scores, _rows(scores_w, q_at)], dim=-1)
        ok = torch.cat([ok, ok_win], dim=-1)
    if causal:
        has = ok.any(-1)
    else:
        has = k_ok.any(-1, keepdim=True).expand(m, b)
        if scores_w is not None:
            has = has | ok_win.any(-1)
    has = has & q_ok
    scores.masked_fill_(~ok, torch.finfo(scores.dtype).min)
    if isinstance(alpha, torch.Tensor) and alpha.numel() > 1:
        # Chunk -> its row -> its head; one alpha per chunk.
        alpha = alpha[(q_at[:, 0] // n_q) % heads].view(m, 1, 1)
    if not scores.shape[-1]:
        return scores, has
    if is_scalar_alpha(alpha, 1.5) and not (torch.is_grad_enabled() and scores.requires_grad):
        # An all-masked row is uniform here (finite minimum); the caller drops it.
        return entmax15_fixed_point(scores), has
    # Other alpha (bisection, softmax), or gradients wanted (entmax15_fast's backward).
    # An all-minimum row is NaN under bisection: give empty rows zeros (dropped by the caller).
    return entmax(scores.masked_fill(~has[:, :, None], 0.0), alpha), has


def _window_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    qc: torch.Tensor,
    kc: torch.Tensor,
    pad: torch.Tensor | None,
    half: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Band scores :math:`q_i \cdot k_{i+o}` ``(R, n_q, W)`` (unscaled) and which are candidates.

    A band key is a candidate if it exists (:math:`0 \le i + o < n_k`), is not
    padding, is not in the query's own cluster (the cluster part has it), and,
    when causal, :math:`o \le 0`. One shifted elementwise product per offset, so
    memory stays :math:`O(n d)` besides the ``(R, n_q, W)`` result.
    """
    rows, n_q, d = q.shape
    n_k = k.shape[1]
    right = half + max(0, n_q - n_k)
    k_pad = torch.nn.functional.pad(k, (0, 0, half, right))
    kc_pad = torch.nn.functional.pad(kc, (half, right), value=-1)
    pad_pad = None if pad is None else torch.nn.functional.pad(pad, (half, right), value=True)
    pos = torch.arange(n_q, device=q.device)
    n_win = 2 * half + 1
    scores = torch.empty(rows, n_q, n_win, device=q.device)
    ok = torch.empty(rows, n_q, n_win, dtype=torch.bool, device=q.device)
    own = qc >= 0
    for t, o in enumerate(range(-half, half + 1)):
        sl = slice(half + o, half + o + n_q)
        scores[:, :, t] = torch.linalg.vecdot(q, k_pad[:, sl])
        j = pos + o
        exists = (j >= 0) & (j < n_k)
        if causal:
            exists &= o <= 0
        keep = exists[None, :] & ~((kc_pad[:, sl] == qc) & own)
        if pad_pad is not None:
            keep &= ~pad_pad[:, sl]
        ok[:, :, t] = keep
    return scores, ok


def _support(
    probs: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, offsets: range, n_q: int, n_k: int, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """COO ``(4, nnz)`` indices (b, h, i, j) and values of the non-zero probabilities of one width class."""
    width = k_idx.shape[1]
    chunk, slot, col = (probs > 0).nonzero(as_tuple=True)
    flat_q = q_idx[chunk, slot]
    row, i = flat_q // n_q, flat_q % n_q
    if width:
        j_cluster = k_idx[chunk, col.clamp(max=width - 1)] % n_k
    else:
        j_cluster = torch.zeros_like(col)
    j_window = i + (col - width) + (offsets.start if len(offsets) else 0)
    j = torch.where(col < width, j_cluster, j_window)
    return torch.stack([row // heads, row % heads, i, j]), probs[chunk, slot, col]


def predicted_graph(
    q_clusters: torch.Tensor,
    k_clusters: torch.Tensor,
    window: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    r"""Dense ``(B, H, N_q, N_k)`` bool :math:`\hat G` of :func:`clustered_entmax_attention` (for metrics on small n).

    :math:`(i, j) \in \hat G \iff (c(q_i) = c(k_j) \ge 0 \lor |i - j| \le \lfloor w/2 \rfloor)`,
    the key not padding and, if causal, :math:`j \le i`.
    """
    n_q, n_k = q_clusters.shape[-1], k_clusters.shape[-1]
    device = q_clusters.device
    graph = (q_clusters[..., :, None] == k_clusters[..., None, :]) & (q_clusters >= 0)[..., :, None]
    pos_q = torch.arange(n_q, device=device)[:, None]
    pos_k = torch.arange(n_k, device=device)[None, :]
    if window > 0:
        graph = graph | ((pos_q - pos_k).abs() <= window // 2)
    if key_padding_mask is not None:
        graph = graph & ~key_padding_mask[:, None, None, :]
    if causal:
        graph = graph & (pos_k <= pos_q)
    return graph
