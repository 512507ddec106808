r"""The predictor protocol, the registry, and the helpers every predictor shares.

A *predictor* turns the queries and keys of all heads of one layer, for a
right-padded batch, into a predicted attention graph :math:`\hat G`
(:class:`~sparsefinder.graphs.AttentionGraph`). It follows scikit-learn's
estimator convention:

- every hyperparameter is a keyword argument of ``__init__``, stored unchanged
  as an attribute of the same name (no validation or logic in ``__init__``;
  :meth:`Predictor.get_params` reads them back from the signature, so
  ``type(p)(**p.get_params())`` is an unfitted copy);
- :meth:`Predictor.fit` learns what the method learns (centroids), sets
  attributes ending in ``_`` and returns ``self``; it is a no-op for fixed
  patterns;
- :meth:`Predictor.predict` is pure: the same inputs, hyperparameters (``seed``
  included) and fitted state give the same graph, and nothing is mutated.

Inputs, for a batch of ``B`` sentences of padded length ``N`` and ``H`` heads:
``q, k`` are ``(B, H, N, r)`` (what ``r`` means depends on the method: see the
class attribute :attr:`Predictor.input_space`), ``lengths`` is ``(B,)``: sentence
``b`` has real tokens ``0 .. lengths[b] - 1``. Extra per-batch inputs (head
dimension, dependency trees, embeddings, sentence ids) are keyword *context*
arguments, listed per class in :attr:`Predictor.context_keys`.

Every predictor ORs in two shared patterns (hyperparameters ``window`` and
``global_tokens``, both off by default except where a method is defined with
them):

.. math::
    W_w = \{(i, j) : |i - j| \le \lfloor w/2 \rfloor\} \quad (w \ge 1;\ w = 0 \text{ adds nothing}),

.. math::
    \Gamma = \{(i, j) : i \in \{0, n_b - 1\} \text{ or } j \in \{0, n_b - 1\}\},

where :math:`n_b` is sentence ``b``'s *own* length (its last real token, not the
last padded position). The result is intersected with the valid pairs (both
positions real; :math:`j \le i` when ``causal``), so padding never gets an edge
and a causal graph never points to the future.

Cost (:meth:`Predictor.predict_with_cost`): the number of (query, key) pairs a
real kernel must score, per (sentence, head). It is the method's own *core*
cost (by default :math:`|\hat G_{\text{core}}|`; the grouped computation for
bucketing and clustering; :math:`|V| \cdot r/d` for distance) plus the window and
global edges that the core prediction did not already contain:

.. math:: \mathrm{cost} = \mathrm{cost}_{\text{core}} + |\hat G \setminus \hat G_{\text{core}}|.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import torch

from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.predictors.constraints import Bool, Constraint, Int

CoreResult = tuple[torch.Tensor, Callable[[], torch.Tensor] | None]
"""What :meth:`Predictor._core` returns: ``(B, H | 1, N, N)`` edges and a lazy core cost."""


class NotFittedError(ValueError, AttributeError):
    """Raised when :meth:`Predictor.predict` is called on a method that must be fitted first."""


class Predictor:
    """Base class of every predictor (see the module docstring for the contract).

    Subclasses set the class attributes, define ``__init__`` with every
    hyperparameter as a keyword argument (``window`` and ``global_tokens``
    included), and implement :meth:`_core` (and :meth:`_fit` if they learn).
    """

    name: ClassVar[str] = ""
    """Registry key."""
    family: ClassVar[str] = ""
    """``"sparsefinder"``, ``"baseline"``, ``"pattern"``, ``"learned"`` or ``"exact"`` (for grouping in the UI and
    the sweep)."""
    input_space: ClassVar[str] = "shape"
    """What ``q``/``k`` must be: ``"projected"`` (q', k' of the learned projections, last dim r),
    ``"any"`` (any vectors; the paper feeds the projected ones), ``"raw"`` (the raw queries and keys, never
    projected: the exact methods) or ``"shape"`` (only the shape is used)."""
    requires_fit: ClassVar[bool] = False
    """Whether :meth:`fit` must run before :meth:`predict`."""
    stochastic: ClassVar[bool] = False
    """Whether the graph depends on the ``seed`` hyperparameter."""
    context_keys: ClassVar[tuple[str, ...]] = ()
    """Context keyword arguments that :meth:`predict` uses (documented per class)."""
    default_sweep: ClassVar[bool] = True
    """Whether a sweep with ``methods=None`` runs it (False: opt-in, e.g. slow to fit for little gain)."""
    fitted_tensors: ClassVar[tuple[str, ...]] = ()
    """Fitted tensor attributes (ending in ``_``) saved by :meth:`state_dict`."""
    fit_uses_gold: ClassVar[bool] = False
    """Whether :meth:`fit` reads the gold graphs of the training split (the learned predictors)."""
    predict_only_params: ClassVar[frozenset[str]] = frozenset()
    """Hyperparameters that change :meth:`predict` but not what :meth:`fit` learns (besides ``window`` and
    ``global_tokens``): a sweep fits once for configurations that differ only in them."""
    param_grid: ClassVar[dict[str, Sequence[Any]]] = {}
    """The paper's grid, ``{hyperparameter: values}``, expanded by :meth:`grid` (``{}``: the defaults only)."""
    constraints: ClassVar[dict[str, Constraint]] = {"window": Int(0), "global_tokens": Bool()}
    """Admissible values per hyperparameter (:mod:`.constraints`), merged with the base classes' by
    :meth:`all_constraints` and checked by :meth:`_check_params`."""

    window: int
    global_tokens: bool

    def __init__(self, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _init_params(self, params: dict[str, Any]) -> None:
        """Store every hyperparameter ``__init__`` received, unchanged (``self._init_params(locals())``).

        No validation here, as in scikit-learn: :meth:`_check_params` runs at ``fit``/``predict``.
        """
        for name in self._param_names():
            setattr(self, name, params[name])

    @classmethod
    def needs_projections(cls) -> bool:
        """Whether it can only run on projected queries and keys (``input_space == "projected"``)."""
        return cls.input_space == "projected"

    @classmethod
    def reads_projections(cls, available: bool) -> bool:
        """Whether its q, k go through the learned projections: always for ``"projected"``; for ``"any"``
        when projections are ``available`` (the paper hashes and clusters q', k'); never for ``"shape"``."""
        return cls.input_space == "projected" or (cls.input_space == "any" and available)

    # ------------------------------------------------------------------ estimator API

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind in kinds]

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """The hyperparameters, as passed to the constructor (``deep`` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Predictor:
        """Set hyperparameters by name; fitted state is kept (refit if it depends on them)."""
        names = set(self._param_names())
        for key, value in params.items():
            if key not in names:
                raise ValueError(f"{type(self).__name__} has no hyperparameter {key!r}; it has {sorted(names)}")
            setattr(self, key, value)
        return self

    def clone(self, **params: Any) -> Predictor:
        """An unfitted copy with the same hyperparameters, updated by ``params``."""
        return type(self)(**{**self.get_params(), **params})

    @classmethod
    def grid(cls) -> list[dict[str, Any]]:
        """The paper's hyperparameter grid: a list of ``set_params`` dicts (one per point of :attr:`param_grid`)."""
        names = list(cls.param_grid)
        return [dict(zip(names, point, strict=True)) for point in itertools.product(*cls.param_grid.values())]

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        shown = []
        for name in self._param_names():
            value = getattr(self, name)
            default = sig.parameters[name].default
            if default is inspect.Parameter.empty or value != default:
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def is_fitted(self) -> bool:
        return all(getattr(self, attr, None) is not None for attr in self.fitted_tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors only (for ``safetensors.torch.save_file``); hyperparameters are in :meth:`get_params`."""
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} is not fitted")
        return {attr.rstrip("_"): getattr(self, attr).detach().contiguous().cpu() for attr in self.fitted_tensors}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Predictor:
        """Inverse of :meth:`state_dict`; shapes are checked by :meth:`_check_state`."""
        missing = [attr.rstrip("_") for attr in self.fitted_tensors if attr.rstrip("_") not in state]
        extra = sorted(set(state) - {attr.rstrip("_") for attr in self.fitted_tensors})
        if missing or extra:
            raise ValueError(f"{type(self).__name__}: state lacks {missing} / has unknown {extra}")
        self._check_state({k: torch.as_tensor(v) for k, v in state.items()})
        for attr in self.fitted_tensors:
            setattr(self, attr, torch.as_tensor(state[attr.rstrip("_")]).clone())
        return self

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` if loaded tensors do not fit the hyperparameters."""

    # ------------------------------------------------------------------ fit / predict

    def fit(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
            gold: AttentionGraph | None = None, **kw: Any) -> Self:
        """Learn from padded ``(B, H, N, r)`` training queries/keys: check the hyperparameters, then :meth:`_fit`.

        Keyword arguments past ``gold`` go to :meth:`_fit` (the learned predictors take ``tokens`` there).
        """
        self._check_params()
        self._fit(queries, keys, lengths, gold, **kw)
        return self

    def _fit(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, gold: AttentionGraph | None,
             **kw: Any) -> None:
        """Set the fitted attributes (ending in ``_``) from checked hyperparameters; nothing for fixed patterns."""

    @classmethod
    def fit_many(cls, predictors: Sequence[Predictor], queries: torch.Tensor, keys: torch.Tensor,
                 lengths: torch.Tensor, gold: AttentionGraph | None = None, **kw: Any) -> None:
        """:meth:`fit` each of ``predictors`` (instances of this class) on the same data.

        Each ends as its own :meth:`fit` would leave it; subclasses may share work
        between them (the centroid methods fit every ``n_clusters`` at once).
        """
        for pred in predictors:
            pred.fit(queries, keys, lengths, gold, **kw)

    def predict(self, q: torch.Tensor, k: torch.Tensor | None, lengths: torch.Tensor | Sequence[int],
                causal: bool = False, **context: Any) -> AttentionGraph:
        """The predicted graph of every head of one layer (``k=None`` means ``k = q``)."""
        return self._run(q, k, lengths, causal, context, with_cost=False)[0]

    def cost(self, q: torch.Tensor, k: torch.Tensor | None, lengths: torch.Tensor | Sequence[int],
             causal: bool = False, **context: Any) -> torch.Tensor:
        """``(B, H)`` float64 pairs a real kernel must score (module docstring)."""
        return self._run(q, k, lengths, causal, context, with_cost=True)[1]

    def predict_with_cost(self, q: torch.Tensor, k: torch.Tensor | None, lengths: torch.Tensor | Sequence[int],
                          causal: bool = False, **context: Any) -> tuple[AttentionGraph, torch.Tensor]:
        """:meth:`predict` and :meth:`cost` from one computation."""
        graph, cost = self._run(q, k, lengths, causal, context, with_cost=True)
        assert cost is not None
        return graph, cost

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool, **context: Any
    ) -> CoreResult:
        """The method's own edges (before window/global) and an optional lazy core cost.

        Edges may be ``(B, 1, N, N)`` for head-independent patterns and may
        include invalid pairs (they are masked afterwards); the cost callable,
        if any, must count valid pairs only.
        """
        raise NotImplementedError

    def _run(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        lengths: torch.Tensor | Sequence[int],
        causal: bool,
        context: dict[str, Any],
        with_cost: bool,
    ) -> tuple[AttentionGraph, torch.Tensor | None]:
        self._check_params()
        # A sweep passes one context to every method, so keys other methods use are
        # ignored; a key no registered method knows is a typo and an error.
        known = set(self.context_keys).union(*(cls.context_keys for cls in REGISTRY.values()))
        unknown = set(context) - known
        if unknown:
            raise TypeError(f"{type(self).__name__}.predict got unknown context {sorted(unknown)}; "
                            f"known context keys: {sorted(known)}")
        context = {key: value for key, value in context.items() if key in self.context_keys}
        if self.requires_fit and not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        q, k, lengths = check_inputs(q, k, lengths, same_dim=self.input_space != "shape")
        batch, heads, n = q.shape[:3]
        core, core_cost = self._core(q, k, lengths, causal, **context)
        valid = valid_pair_mask(lengths, n, causal)
        core = (core & valid).expand(batch, heads, n, n)
        edges = core
        extra = shared_pattern(lengths, n, self.window, self.global_tokens)
        if extra is not None:
            edges = core | (extra & valid)
        graph = AttentionGraph(edges, lengths, causal)
        if not with_cost:
            return graph, None
        base = core.sum(dim=(-1, -2)).double() if core_cost is None else core_cost().double()
        added = (edges & ~core).sum(dim=(-1, -2)).double()
        return graph, torch.broadcast_to(base, (batch, heads)) + added

    @classmethod
    def all_constraints(cls) -> dict[str, Constraint]:
        """The declared constraints of this class and its bases (a subclass's entry wins)."""
        merged: dict[str, Constraint] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("constraints", {}))
        return merged

    def _check_params(self) -> None:
        """Check the declared constraints (called by fit and predict, per the scikit-learn convention).

        Override only for a check that relates several hyperparameters, calling ``super()`` first.
        """
        for name, constraint in self.all_constraints().items():
            constraint.check(name, getattr(self, name))


# ---------------------------------------------------------------------- registry

REGISTRY: dict[str, type[Predictor]] = {}
"""Predictor classes by :attr:`Predictor.name`, in registration order."""

P = TypeVar("P", bound=type[Predictor])


def register(cls: P) -> P:
    """Class decorator adding a predictor to :data:`REGISTRY` under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Predictor)):
        raise TypeError("only Predictor subclasses can be registered")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"predictor name {cls.name!r} already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


def get_predictor(name: str, **params: Any) -> Predictor:
    """A new predictor ``name`` with hyperparameters ``params``."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown predictor {name!r}; known: {list_predictors()}") from None
    return cls(**params)


def list_predictors(family: str | None = None) -> list[str]:
    """Registered names (optionally of one family), in registration order."""
    return [name for name, cls in REGISTRY.items() if family is None or cls.family == family]


def expand_methods(names: str | Sequence[str]) -> list[str]:
    """Method names, each given as itself or as its family (``"baseline"``: every default-sweep member).

    So a script names what it means (``sparsefinder,baseline,pattern``: the paper's
    comparison) instead of a hand-kept list that the next registered method misses.
    Duplicates are dropped, order kept; an unknown name raises ``KeyError``.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    families = {cls.family for cls in REGISTRY.values()}
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if name in REGISTRY:
            members = [name]
        elif name in families:
            members = [m for m, cls in REGISTRY.items() if cls.family == name and cls.default_sweep]
        else:
            raise KeyError(f"unknown predictor or family {name!r}; predictors: {list(REGISTRY)}, "
                           f"families: {sorted(families)}")
        out += [m for m in members if m not in out]
    return out


# ---------------------------------------------------------------------- shared helpers


def check_inputs(
    q: torch.Tensor, k: torch.Tensor | None, lengths: torch.Tensor | Sequence[int], same_dim: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes; return float (≥ 32-bit) ``q``, ``k`` and int64 ``lengths`` on ``q``'s device."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (B, H, N, r) tensor, got {getattr(q, 'shape', type(q))}")
    k = q if k is None else k
    if k.dim() != 4 or k.shape[:3] != q.shape[:3]:
        raise ValueError(f"k must be (B, H, N, r) like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if same_dim and k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have the same last dimension, got {q.shape[-1]} and {k.shape[-1]}")
    lengths = torch.as_tensor(lengths, device=q.device).long()
    batch, _, n = q.shape[:3]
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be ({batch},), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > n):
        raise ValueError(f"lengths must lie in [0, N = {n}], got {lengths.tolist()}")
    # Half precision would make distances and ranks differ from what the tests (and users) expect.
    if q.dtype != torch.float64:
        q = q.float()
    if k.dtype != torch.float64:
        k = k.float()
    return q, k, lengths


def window_mask(n: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    r"""``(N, N)`` band :math:`|i - j| \le \lfloor w/2 \rfloor`; empty for ``window == 0``."""
    if window <= 0:
        return torch.zeros(n, n, dtype=torch.bool, device=device)
    pos = torch.arange(n, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window // 2


def edge_positions(lengths: torch.Tensor, n: int, first: int, last: int) -> torch.Tensor:
    """``(B, N)`` True on each sentence's first ``first`` and own last ``last`` real tokens."""
    pos = torch.arange(n, device=lengths.device)[None, :]
    real = pos < lengths[:, None]
    return real & ((pos < first) | (pos >= lengths[:, None] - last))


def star_mask(positions: torch.Tensor) -> torch.Tensor:
    """``(B, 1, N, N)`` edges from and to the ``(B, N)`` global ``positions`` (rows and columns)."""
    return (positions[:, :, None] | positions[:, None, :])[:, None]


def global_token_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, 1, N, N)``: the first token and each sentence's own last real token attend and are attended to by all."""
    return star_mask(edge_positions(lengths, n, 1, 1))


def shared_pattern(lengths: torch.Tensor, n: int, window: int, global_tokens: bool) -> torch.Tensor | None:
    """``(B, 1, N, N)`` window ∪ global-token edges, or ``None`` when both are off (before validity masking)."""
    out = None
    if window > 0:
        out = window_mask(n, window, lengths.device)[None, None].expand(lengths.shape[0], 1, n, n)
    if global_tokens:
        glob = global_token_mask(lengths, n)
        out = glob if out is None else out | glob
    return out


def grouped_cost(q_member: torch.Tensor, k_member: torch.Tensor, causal: bool) -> torch.Tensor:
    r"""Valid pairs scored by a grouped kernel: :math:`\sum_g |\{(i, j) \in Q_g \times K_g\ \text{valid}\}|`.

    ``q_member``/``k_member`` are ``(B, H, G, N)`` bool memberships of queries
    and keys in each group, already False on padding. A pair in several groups
    is scored once per group (that is what the grouped computation does).
    With ``causal`` only :math:`j \le i` counts: the keys of group ``g`` at or
    before ``i`` are a cumulative sum.
    """
    qm = q_member.long()
    km = k_member.long()
    if causal:
        return (qm * km.cumsum(dim=-1)).sum(dim=(-1, -2)).double()
    return (qm.sum(dim=-1) * km.sum(dim=-1)).sum(dim=-1).double()


def sentence_rng(seed: int, b: int, n: int, sentence_ids: Sequence[int] | torch.Tensor | None) -> np.random.Generator:
    """The random stream of sentence ``b`` of a batch: ``default_rng([seed, n])`` or ``[seed, n, sentence_id]``.

    It depends on the sentence (its length, and its id when the caller passes
    ``sentence_ids``), never on its position in the batch or the padded size,
    so a sentence gets the same random pattern alone or in any batch. Without
    ids, sentences of equal length share a pattern; pass ids to decorrelate them.
    """
    entropy = [int(seed), int(n)]
    if sentence_ids is not None:
        entropy.append(int(sentence_ids[b]))
    return np.random.default_rng(entropy)


def check_sentence_ids(sentence_ids: Any, batch: int) -> Sequence[int] | None:
    if sentence_ids is None:
        return None
    ids = [int(x) for x in (sentence_ids.tolist() if isinstance(sentence_ids, torch.Tensor) else sentence_ids)]
    if len(ids) != batch or min(ids, default=0) < 0:
        raise ValueError(f"sentence_ids must give {batch} non-negative ids, got {ids}")
    return ids


def shared_group_edges(q_member: torch.Tensor, k_member: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, N)``: query and key share at least one group, from ``(B, H, G, N)`` memberships."""
    # A float matmul counts shared groups exactly (counts ≤ G are small integers).
    return torch.einsum("bhgi,bhgj->bhij", q_member.float(), k_member.float()) > 0


class BandPredictor(Predictor):
    r"""A band around the diagonal, :math:`\{(i, j) : |i - j| \le \lfloor w/2 \rfloor\}`, and nothing else.

    The band is the shared ``window`` pattern that every predictor ORs in, so the
    method's own edges are empty. Subclasses name it and choose its grid
    (``window`` of the baselines, ``position`` of the Breaking BERT masks).
    """

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"window": (0, *range(1, 28, 2))}
    """:math:`w \\in \\{0, 1, 3, 5, \\ldots, 27\\}`."""

    def __init__(self, window: int = 3, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        batch, _, n = q.shape[:3]
        return torch.zeros(batch, 1, n, n, dtype=torch.bool, device=q.device), None


class CentroidPredictor(Predictor):
    r"""Shared by the methods that fit ``n_clusters`` centroids per head (k-means, blocks, Routing).

    :attr:`centroids_` is ``(H, C, r)`` (``(H, C, b·r)`` for blocks); the grid is
    :math:`C \in \{2, 4, \ldots, 20\}` and each point needs its own fit. Subclasses define
    :meth:`_fit_centroids` and either :meth:`_members` (a query and a key are linked when they
    share a centroid's group) or their own :meth:`_core`.
    """

    requires_fit: ClassVar[bool] = True
    fitted_tensors: ClassVar[tuple[str, ...]] = ("centroids_",)

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"n_clusters": range(2, 21, 2)}
    """:math:`C \\in \\{2, 4, \\ldots, 20\\}` (each point needs its own fit)."""

    centroids_: torch.Tensor | None = None
    n_clusters: int

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        c = state["centroids"]
        if c.dim() != 3 or c.shape[1] != self.n_clusters:
            raise ValueError(f"centroids must be (H, C = {self.n_clusters}, r), got {tuple(c.shape)}")

    def _fit(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, gold: AttentionGraph | None,
             **kw: Any) -> None:
        self.centroids_ = self._fit_centroids(*self._fit_inputs(queries, keys, lengths))

    @staticmethod
    def _fit_inputs(queries: torch.Tensor, keys: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # As in check_inputs: float64 stays float64, and half precision is clustered in float32.
        dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        return queries.to(dtype), keys.to(dtype), torch.as_tensor(lengths, device=queries.device).long()

    def _fit_centroids(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(H, C, ·)`` centroids from float training queries/keys ``(B, H, N, r)`` and int64 ``lengths``."""
        raise NotImplementedError

    def _fit_centroids_many(self, cluster_counts: Sequence[int], queries: torch.Tensor, keys: torch.Tensor,
                            lengths: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`_fit_centroids` for each of ``cluster_counts``, the other hyperparameters this instance's.

        Each entry must equal a lone fit with that ``n_clusters``; this default makes
        one fit per count, subclasses share the pooling, seeding and passes.
        """
        return [self.clone(n_clusters=c)._fit_centroids(queries, keys, lengths) for c in cluster_counts]

    @classmethod
    def fit_many(cls, predictors: Sequence[Predictor], queries: torch.Tensor, keys: torch.Tensor,
                 lengths: torch.Tensor, gold: AttentionGraph | None = None, **kw: Any) -> None:
        """Fit together ``predictors`` that differ only in ``n_clusters`` or in what prediction alone reads.

        The result of each is its own :meth:`fit`'s (:meth:`_fit_centroids_many`).
        """
        groups: dict[str, list[CentroidPredictor]] = {}
        # What the fit does not read: the count (shared work) and what only prediction uses.
        skip = {"n_clusters", "window", "global_tokens"} | cls.predict_only_params
        for pred in predictors:
            assert isinstance(pred, CentroidPredictor)
            pred._check_params()
            rest = {k: v for k, v in pred.get_params().items() if k not in skip}
            groups.setdefault(repr(sorted(rest.items())), []).append(pred)
        for group in groups.values():
            counts = sorted({p.n_clusters for p in group})
            fitted = group[0]._fit_centroids_many(counts, *cls._fit_inputs(queries, keys, lengths))
            fits = dict(zip(counts, fitted, strict=True))
            for pred in group:
                # Each its own tensor, as separate fits would give (in-place edits stay local).
                pred.centroids_ = fits[pred.n_clusters].clone()

    def _fitted_centroids(self, q: torch.Tensor, width: int) -> torch.Tensor:
        """The fitted centroids on ``q``'s device, checked against the heads of ``q``, ``width`` and ``n_clusters``."""
        centroids = self.centroids_
        assert centroids is not None
        if centroids.shape[0] != q.shape[1] or centroids.shape[2] != width:
            raise ValueError(f"centroids are {tuple(centroids.shape)} (H, C, {width}) but q is {tuple(q.shape)}")
        if centroids.shape[1] != self.n_clusters:
            raise ValueError(f"fitted with {centroids.shape[1]} clusters, n_clusters is {self.n_clusters}: refit")
        return centroids.to(q.device)

    def _members(self, x: torch.Tensor, centroids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, H, C, N)`` bool: the real tokens of ``x`` ``(B, H, N, r)`` in each centroid's group."""
        raise NotImplementedError

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        centroids = self._fitted_centroids(q, q.shape[3])
        mq = self._members(q, centroids, lengths)
        mk = self._members(k, centroids, lengths)
        return shared_group_edges(mq, mk), lambda: grouped_cost(mq, mk, causal)
