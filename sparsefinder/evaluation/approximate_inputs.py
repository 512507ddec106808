"""What an approximation run takes: layer subsets, seeded masking, prepared batches and a method's graphs.

docs/method.md §5. :func:`prepare_batches` tokenises the texts once (with the
seeded masked-LM masking of :func:`mask_tokens` and, for the syntax and lexical
masks, their per-batch context); :func:`method_graphs` turns a configuration
into the :data:`GraphFn` that gives each restricted layer its predicted graph
from its live queries and keys; :func:`parse_layers` reads a layer subset such
as ``"later"``. :mod:`sparsefinder.evaluation.approximate` runs the model on
them (its names re-export these).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsefinder.corpora.words import align_tokens, annotate
from sparsefinder.predictors.base import REGISTRY, Predictor, get_predictor
from sparsefinder.predictors.methods import SUPPLIED, parse_params, predict_layer, unsupported_reason

MASK_RATE = 0.15
"""Share of each text's real, non-special tokens replaced by the mask token for the masked-LM metrics."""

#: A layer's graph from its live inputs: ``(layer, q, k, batch) -> (B, H, N, N)`` bool edges.
GraphFn = Callable[[int, torch.Tensor, torch.Tensor, "Batch"], torch.Tensor]


def GOLD(layer: int, q: torch.Tensor, k: torch.Tensor, batch: Batch) -> torch.Tensor:  # noqa: N802
    """The oracle :data:`GraphFn`: :func:`~sparsefinder.evaluation.approximate.run_approximation` restricts
    each layer to the gold graph of its own live scores (so the outputs are exact, at the gold sparsity).
    Not callable on its own."""
    raise TypeError("GOLD is a marker for run_approximation, not a graph function")


# ---------------------------------------------------------------------- layer subsets


def parse_layers(spec: str | Iterable[int] | None, num_layers: int) -> tuple[int, ...]:
    """Layers to restrict: ``"all"``, ``"later"`` (the second half, ``L//2 .. L-1``),
    ``"earlier"`` (the first half), ``"3,4,5"``, ``"3-5"``, ``"none"``, or a list of ints.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return tuple(range(num_layers))
    if isinstance(spec, str):
        s = spec.strip()
        if s == "none":
            return ()
        if s == "later":
            return tuple(range(num_layers // 2, num_layers))
        if s == "earlier":
            return tuple(range(num_layers // 2))
        out: list[int] = []
        try:
            for part in s.split(","):
                if "-" in part.strip()[1:]:
                    a, b = part.split("-", 1)
                    out.extend(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise ValueError(f"layers must be 'all', 'later', 'earlier', 'none' or like '3,4' / '3-5', "
                             f"got {spec!r}") from None
        layers = out
    else:
        layers = [int(x) for x in spec]
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside the model's 0 .. {num_layers - 1}")
    return tuple(sorted(set(layers)))


def layers_label(spec: str | Iterable[int] | None, num_layers: int) -> str:
    """The table's ``layers`` value: a named subset as given, else ``"3,4,5"``."""
    if spec is None:
        return "all"
    if isinstance(spec, str) and spec.strip() in ("all", "later", "earlier", "none"):
        return spec.strip()
    return ",".join(map(str, parse_layers(spec, num_layers)))


# ---------------------------------------------------------------------- masking for the MLM metrics


def mask_tokens(
    input_ids: torch.Tensor, lengths: torch.Tensor, special: torch.Tensor, mask_id: int,
    sentence_ids: Sequence[int], seed: int = 0, rate: float = MASK_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded masking: ``(masked_ids, positions)``, both ``(B, N)``.

    Sentence ``s`` (its id, not its batch position) masks
    :math:`\\max(1, \\operatorname{round}(rate \\cdot m))` of its ``m`` real
    non-special tokens, chosen without replacement by ``default_rng([seed, s])``,
    so a sentence is masked the same way in any batch and in every run.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"mask rate must lie in (0, 1], got {rate}")
    masked = input_ids.clone()
    positions = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, sid in enumerate(sentence_ids):
        n = int(lengths[b])
        cand = np.flatnonzero(~special[b, :n].cpu().numpy().astype(bool))
        if cand.size == 0:
            continue
        count = max(1, int(round(rate * cand.size)))
        pick = np.random.default_rng([int(seed), int(sid)]).choice(cand, size=count, replace=False)
        positions[b, torch.from_numpy(np.sort(pick))] = True
    masked[positions] = int(mask_id)
    return masked, positions


# ---------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One padded batch of the texts, prepared once and reused by every configuration."""

    inputs: dict[str, torch.Tensor]
    lengths: torch.Tensor
    sentence_ids: torch.Tensor
    mlm_positions: torch.Tensor | None
    mlm_targets: torch.Tensor | None
    context: dict[str, Any] = field(default_factory=dict)


def is_masked_lm(model) -> bool:
    """Whether ``model`` (an :class:`~sparsefinder.model.entmax_model.EntmaxModel`) has a masked-LM head."""
    return type(model.model).__name__.endswith("ForMaskedLM")


def prepare_batches(
    model, texts: Sequence[str], batch_size: int = 32, seed: int = 0, masked_lm: bool | None = None,
    syntax: bool = False, lexical: bool = False,
) -> list[Batch]:
    """Tokenise ``texts`` into batches of similar length (less padding); sentence ids are positions in ``texts``.

    With ``masked_lm`` (default: the model has an MLM head) the inputs are masked
    by :func:`mask_tokens`. ``syntax``/``lexical`` add the syntax and lexical
    masks' context (spaCy parse aligned to tokens; input embeddings). Every batch's context
    holds ``tokens``, each sentence's token strings (the learned predictors' token priors).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    masked_lm = is_masked_lm(model) if masked_lm is None else masked_lm
    mask_id = model.tokenizer.mask_token_id
    if masked_lm and mask_id is None:
        raise ValueError("the model's tokenizer has no mask token, so masked-LM metrics cannot be computed")
    enc_all, _ = model.tokenize(texts)
    order = np.argsort(enc_all["attention_mask"].sum(1).numpy(), kind="stable")
    words = None
    if syntax:
        words = annotate(texts)
    embed = model.model.get_input_embeddings().weight.detach().cpu() if lexical else None
    batches = []
    for start in range(0, len(texts), batch_size):
        ids = order[start:start + batch_size].tolist()
        enc, _ = model.tokenize([texts[i] for i in ids])
        lengths = enc["attention_mask"].sum(1).cpu()
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        positions = targets = None
        if masked_lm:
            targets = inputs["input_ids"].clone()
            inputs["input_ids"], positions = mask_tokens(
                inputs["input_ids"], lengths, enc["special_tokens_mask"], mask_id, ids, seed=seed)
        # The learned predictors' token priors read each token's text, as on extracted sentences
        # (Extraction.tokens); the text of the ids the model is given, masked ones included.
        context: dict[str, Any] = {"tokens": [
            model.tokenizer.convert_ids_to_tokens(inputs["input_ids"][b, :int(lengths[b])].tolist())
            for b in range(len(ids))]}
        if words is not None:
            heads, word_ids = [], []
            for b, i in enumerate(ids):
                n = int(lengths[b])
                offsets = [tuple(map(int, o)) for o in enc["offset_mapping"][b, :n].tolist()]
                special = [bool(s) for s in enc["special_tokens_mask"][b, :n].tolist()]
                word_ids.append(align_tokens(offsets, special, [w.span for w in words[i]]))
                heads.append([int(w.head) for w in words[i]])
            context.update(word_heads=heads, word_ids=word_ids)
        if embed is not None:
            context["embeddings"] = embed[enc["input_ids"]]  # the unmasked tokens' embeddings
        batches.append(Batch(
            inputs={k: v.to(model.device) for k, v in inputs.items()}, lengths=lengths,
            sentence_ids=torch.tensor(ids, dtype=torch.long), mlm_positions=positions, mlm_targets=targets,
            context=context,
        ))
    return batches


# ---------------------------------------------------------------------- predicted graphs of a method


@dataclass
class _Live:
    """The minimal extraction :func:`~sparsefinder.predictors.methods.predict_layer` reads: one layer's live q, k."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    lengths: torch.Tensor
    causal: bool
    tokens: list[list[str]] | None = None


def method_graphs(
    method: str, params: str | Mapping[str, Any] | None = None, projections: Any = None,
    fitted: Mapping | None = None, predictors: Mapping[int, Predictor] | None = None, causal: bool = False,
) -> GraphFn:
    """The :data:`GraphFn` of a configuration.

    ``predictors`` (``{layer: fitted Predictor}``) runs those predictors on the
    raw queries/keys (e.g. :class:`sparsefinder.evaluation.windows.LearnedWindowPredictor`);
    otherwise ``method`` is a registered predictor run as
    :func:`~sparsefinder.predictors.methods.predict_layer` runs it (projections and fitted
    state as the dashboard uses them); syntax and lexical take their context
    from the batch (:func:`prepare_batches` with ``syntax``/``lexical``).
    """
    if predictors is not None:
        def run_given(layer: int, q: torch.Tensor, k: torch.Tensor, batch: Batch) -> torch.Tensor:
            if layer not in predictors:
                raise ValueError(f"no {method} predictor for layer {layer}")
            return predictors[layer].predict(q.float(), k.float(), batch.lengths.to(q.device),
                                             causal=causal).edges
        return run_given
    if method not in REGISTRY:
        raise KeyError(f"unknown predictor {method!r}; known: {list(REGISTRY)}")
    cls = REGISTRY[method]
    extra = set(cls.context_keys) - SUPPLIED
    if not extra:
        reason = unsupported_reason(method, projections, fitted)
        if reason is not None:
            raise ValueError(f"cannot run {method}: {reason}")

        def run_registered(layer: int, q: torch.Tensor, k: torch.Tensor, batch: Batch) -> torch.Tensor:
            live = _Live({layer: q}, {layer: k}, batch.lengths.to(q.device), causal, batch.context.get("tokens"))
            return predict_layer(live, layer, method, params, projections, fitted,
                                 sentence_ids=batch.sentence_ids).edges
        return run_registered
    pred = get_predictor(method, **parse_params(params))

    def run_context(layer: int, q: torch.Tensor, k: torch.Tensor, batch: Batch) -> torch.Tensor:
        missing = extra - set(batch.context)
        if missing:
            raise ValueError(f"{method} needs context {sorted(missing)}: prepare the batches with it")
        ctx = {c: batch.context[c] for c in cls.context_keys if c in batch.context}
        if "sentence_ids" in cls.context_keys:
            ctx["sentence_ids"] = batch.sentence_ids
        return pred.predict(q.float(), k.float(), batch.lengths.to(q.device), causal=causal, **ctx).edges
    return run_context
