"""Load an encoder (or decoder) with entmax attention and extract what it attends to.

One :meth:`EntmaxModel.extract` call returns, per layer, the queries and keys of
every head exactly as the attention function received them, the entmax
probabilities, and the tokens with character offsets and word ids. The gold
graph of a layer is the support of its probabilities (docs/method.md §1).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.kernels.entmax import Alpha, check_alpha
from sparsefinder.mass import attention_scores, layer_alpha
from sparsefinder.model import attention
from sparsefinder.model.adapter import apply_adapter, weights_checksum
from sparsefinder.model.catalogue import CONFIG_ALPHA, DEFAULT_ALPHA, ModelSpec, get_spec, native_alpha
from sparsefinder.model.gold_bits import unpack_batch

TASKS = {"base": AutoModel, "masked-lm": AutoModelForMaskedLM}


class TruncationWarning(UserWarning):
    """An input was longer than the model's maximum length and was cut."""


# The dtypes a model may compute in (its weights and hidden states). Entmax itself always runs in float32:
# the attention function upcasts q and k before q·k (sparsefinder.model.attention), so the gold graph is
# the float32 support of what a bfloat16/float16 model's q and k score.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_compute_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A model compute dtype from its name (``float32``, ``bfloat16``, ``float16``; None: the checkpoint's)."""
    if value is None or isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    name = str(value).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {value!r}")
    return COMPUTE_DTYPES[name]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Extraction:
    """Everything one forward saw, for a right-padded batch of B texts.

    ``queries[l]``, ``keys[l]``: ``(B, H, N, d)``; ``probs[l]``: ``(B, H, N, N)``
    float32 (empty when not kept); ``lengths``: real tokens per text.

    A gold-bits extraction (``extract(..., gold_bits=True)``, for long inputs) keeps no probabilities:
    ``gold_packed[l][b]`` is sentence ``b``'s packed support (the bytes of
    :meth:`AttentionGraph.pack`), from which :meth:`gold` unpacks the graph.
    """

    texts: list[str]
    tokens: list[list[str]]
    offsets: list[list[tuple[int, int]]]
    word_ids: list[list[int | None]]
    special: list[list[bool]]
    lengths: torch.Tensor
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    probs: list[torch.Tensor]
    hidden: torch.Tensor
    causal: bool
    truncated: list[bool]
    # Per layer: the sliding window (largest |i - j| allowed), None for full attention.
    windows: list[int | None] | None = None
    # Per layer: the values per query head (B, H, N, d_v; empty when probabilities were not kept) and how the
    # attention scored q against k (sparsefinder.mass.attention_scores), for the output error of a prediction.
    values: list[torch.Tensor] | None = None
    scaling: list[float] | None = None
    softcaps: list[float | None] | None = None
    alphas: list | None = None
    # Per layer, per sentence: the packed gold support (uint8, AttentionGraph.pack layout); gold-bits mode only.
    gold_packed: list[list[np.ndarray]] | None = None
    # Per layer, per sentence: (H, m, m) float32 largest probability and int32 gold edges per block of tokens,
    # at most ``block_max_side`` blocks a side (sparsefinder.model.blocks); only when extract() was asked to.
    blocks: list[list[tuple[np.ndarray, np.ndarray]]] | None = None
    block_max_side: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.queries)

    @property
    def num_heads(self) -> int:
        return int(self.queries[0].shape[1])

    def padding_mask(self) -> torch.Tensor:
        """``(B, N)`` True on real tokens."""
        n = self.queries[0].shape[2]
        return torch.arange(n)[None, :] < self.lengths[:, None]

    def gold(self, layer: int) -> AttentionGraph:
        """Gold graph of one layer: ``p_ij > 0`` (unpacked from the bits in a gold-bits extraction)."""
        if self.gold_packed is not None:
            n = int(self.queries[layer].shape[2])
            edges = unpack_batch(self.gold_packed[layer], self.lengths, self.num_heads, n)
            return AttentionGraph(edges, self.lengths, self.causal, self.window(layer))
        if self.probs[layer].numel() == 0:
            raise ValueError("probabilities were not kept in this extraction")
        return AttentionGraph(self.probs[layer].cpu() > 0, self.lengths, self.causal, self.window(layer))

    def gold_bits(self, layer: int, b: int) -> np.ndarray:
        """Sentence ``b``'s packed gold support in one layer (:meth:`AttentionGraph.pack`'s bytes), either mode."""
        if self.gold_packed is not None:
            return self.gold_packed[layer][b]
        return self.gold(layer).pack(b)

    def window(self, layer: int) -> int | None:
        return None if self.windows is None else self.windows[layer]

    def scores(self, layer: int) -> torch.Tensor:
        """``(B, H, N, N)`` float32 attention scores of one layer, as its attention computed them
        (scaling, soft-capping; the pairs its mask forbids at the float minimum)."""
        return attention_scores(self.queries[layer], self.keys[layer], self.lengths, self.causal, self.window(layer),
                                None if self.scaling is None else self.scaling[layer],
                                None if self.softcaps is None else self.softcaps[layer])

    def alpha(self, layer: int):
        """One layer's alpha as :func:`~sparsefinder.kernels.entmax.entmax` takes it (float or ``(1, H, 1, 1)``)."""
        return layer_alpha(1.5 if self.alphas is None else self.alphas[layer], self.num_heads)

    def has_values(self) -> bool:
        return self.values is not None and all(v.numel() for v in self.values)

    def mean_pooled(self) -> torch.Tensor:
        """Mean of the last hidden states over real tokens (sentence-transformers pooling)."""
        mask = self.padding_mask().to(self.hidden.device, self.hidden.dtype)[..., None]
        return (self.hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class EntmaxModel:
    """A transformers model running alpha-entmax attention, shared safely across threads."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        name: str,
        alpha: Alpha = 1.5,
        device: torch.device | None = None,
        adapter_manifest: dict | None = None,
        base_checksum: str | None = None,
        alpha_source: str = "argument",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device or next(model.parameters()).device
        self.adapter_manifest = adapter_manifest
        self.base_checksum = base_checksum
        # Where alpha came from: "argument", "catalogue", "model config" (trained with entmax) or "default".
        self.alpha_source = alpha_source
        # Rust tokenizers mutate their truncation/padding state per call.
        self._tokenizer_lock = threading.Lock()
        config = model.config
        self.max_length = int(
            min(
                getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512),
                getattr(tokenizer, "model_max_length", 10**9) or 10**9,
            )
        )
        self.attention_modules, self.causal = self._trace_attention()
        self.num_layers = len(self.attention_modules)
        self.num_heads = int(
            getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or config.n_heads
        )
        self.windows = layer_windows(config, self.num_layers, self.causal)
        self.set_alpha(alpha)

    # -- setup -------------------------------------------------------------
    def _trace_attention(self) -> tuple[list[torch.nn.Module], bool]:
        enc = self.tokenizer(["a b c"], return_tensors="pt").to(self.device)
        with torch.inference_mode(), attention.trace_modules() as calls:
            self.model(**_model_inputs(enc))
        if not calls:
            raise RuntimeError(
                f"model {self.name!r} ({type(self.model).__name__}) made no call to the registered attention "
                "function: its attention is written inside the model class instead of going through "
                "transformers' attention interface, so entmax cannot be swapped in"
            )
        modules = [m for m, _ in calls]
        for i, m in enumerate(modules):
            m.sparsefinder_layer = i
        _, mask = calls[0]
        causal = bool(mask is not None and mask.shape[-1] > 1 and float(mask[0, 0, 0, 1]) < 0)
        return modules, causal

    def set_alpha(self, alpha: Alpha) -> None:
        """Set alpha: a float, or a ``(layers, heads)`` tensor/list (per-head alpha)."""
        if isinstance(alpha, list | tuple):
            alpha = torch.tensor(alpha, dtype=torch.float32)
        check_alpha(alpha)
        if isinstance(alpha, torch.Tensor) and alpha.numel() > 1:
            if tuple(alpha.shape) != (self.num_layers, self.num_heads):
                raise ValueError(
                    f"per-head alpha must be (layers, heads) = ({self.num_layers}, {self.num_heads}), "
                    f"got {tuple(alpha.shape)}"
                )
            for i, m in enumerate(self.attention_modules):
                m.entmax_alpha = alpha[i].to(self.device).view(1, -1, 1, 1)
        else:
            a = float(alpha)
            for m in self.attention_modules:
                m.entmax_alpha = a
        self.alpha = alpha

    @property
    def native(self) -> bool:
        """True when the model's own config declares its entmax alpha (a model trained with entmax)."""
        return getattr(self.model.config, CONFIG_ALPHA, None) is not None

    def save_pretrained(self, path: Path | str) -> Path:
        """Save weights (adapter applied), tokenizer and config, with ``entmax_alpha`` recorded in the config.

        The directory then loads with :func:`load_model` as a model trained with
        entmax: its own alpha, no adapter.
        """
        path = Path(path)
        alpha = self.alpha
        self.model.config.update({CONFIG_ALPHA: alpha.tolist() if isinstance(alpha, torch.Tensor) else float(alpha)})
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    # -- tokenisation --------------------------------------------------------
    def tokenize(self, texts: list[str]):
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("no texts to analyse")
        with self._tokenizer_lock:
            full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            enc = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                return_tensors="pt",
            )
        truncated = [len(ids) > self.max_length for ids in full]
        if any(truncated):
            warnings.warn(
                f"{sum(truncated)} text(s) longer than the model's maximum of {self.max_length} tokens "
                "were truncated",
                TruncationWarning,
                stacklevel=2,
            )
        return enc, truncated

    # -- forward -------------------------------------------------------------
    def extract(self, texts: list[str], keep_probs: bool = True, gold_bits: bool = False,
                block_max_side: int | None = None) -> Extraction:
        """Run the model on ``texts`` and capture every layer's q, k and entmax probs.

        ``gold_bits=True`` (long inputs, corpus stores): each layer's gold support is packed into bits
        inside the attention call and no float probabilities are kept, so memory is ``H N² / 8`` bytes
        per layer instead of ``4 H N²`` (the extraction has no ``probs``; :meth:`Extraction.gold` works).
        ``block_max_side`` also keeps each head's block summary for drawing it (:attr:`Extraction.blocks`).
        """
        enc, truncated = self.tokenize(texts)
        inputs = _model_inputs(enc.to(self.device))
        lengths = enc["attention_mask"].sum(1).cpu()
        with torch.inference_mode(), attention.capture(
            keep_probs=keep_probs, gold_bits=gold_bits, lengths=lengths.tolist(), causal=self.causal,
            windows=list(self.windows), blocks_max_side=block_max_side,
        ) as sink:
            out = self.model(**inputs)
        hidden = _last_hidden(out)
        tokens, offsets, word_ids, special = [], [], [], []
        for b in range(len(lengths)):
            n = int(lengths[b])
            tokens.append(self.tokenizer.convert_ids_to_tokens(enc["input_ids"][b, :n].tolist()))
            offsets.append([tuple(map(int, o)) for o in enc["offset_mapping"][b, :n].tolist()])
            word_ids.append(enc.word_ids(b)[:n])
            special.append([bool(s) for s in enc["special_tokens_mask"][b, :n].tolist()])
        records = sink.records
        for layer, record in enumerate(records):
            check_mask(record.mask, lengths, self.causal, self.windows[layer], layer, self.name)
        return Extraction(
            texts=list(texts),
            tokens=tokens,
            offsets=offsets,
            word_ids=word_ids,
            special=special,
            lengths=lengths,
            queries=[r.queries.float().cpu() for r in records],
            keys=[r.keys.float().cpu() for r in records],
            probs=[r.probs.cpu() for r in records],
            hidden=hidden.float().cpu(),
            causal=self.causal,
            truncated=truncated,
            windows=list(self.windows),
            values=[r.values.float().cpu() if r.values is not None else torch.empty(0) for r in records],
            scaling=[r.scaling for r in records],
            softcaps=[r.softcap for r in records],
            alphas=[_layer_alpha_value(r.alpha) for r in records],
            gold_packed=[[bits.numpy() for bits in r.gold_bits] for r in records] if gold_bits else None,
            blocks=[[(top.numpy(), edges.numpy()) for top, edges in r.blocks] for r in records]
            if block_max_side else None,
            block_max_side=block_max_side,
        )

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states, without capturing attention."""
        enc, _ = self.tokenize(texts)
        inputs = _model_inputs(enc.to(self.device))
        with torch.inference_mode():
            hidden = _last_hidden(self.model(**inputs)).float()
        mask = inputs["attention_mask"].to(hidden.dtype)[..., None]
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()


def _layer_alpha_value(alpha):
    """A record's alpha as a float or a per-head list (small, picklable)."""
    if isinstance(alpha, torch.Tensor):
        return float(alpha) if alpha.numel() == 1 else alpha.detach().flatten().cpu().tolist()
    return float(alpha)


def layer_windows(config, num_layers: int, causal: bool) -> list[int | None]:
    """Each layer's sliding window as the largest ``|i - j|`` it allows, from the model's config.

    ``sliding_window`` W with ``layer_types`` (``"sliding_attention"`` per layer: Gemma-2/3,
    ModernBERT, Qwen2) or on every layer (Mistral, Phi-3). transformers' causal window keeps
    W keys (``j > i - W``), its bidirectional one ``|i - j| <= W``; :func:`check_mask`
    verifies this reading against the mask each layer actually receives.
    """
    width = getattr(config, "sliding_window", None)
    if not width:
        return [None] * num_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = [bool(getattr(config, "use_sliding_window", True))] * num_layers
    else:
        sliding = [t == "sliding_attention" for t in types][:num_layers]
        sliding += [False] * (num_layers - len(sliding))
    window = int(width) - 1 if causal else int(width)
    return [window if s else None for s in sliding]


def check_mask(
    mask: torch.Tensor | None, lengths: torch.Tensor, causal: bool, window: int | None, layer: int, name: str
) -> None:
    """Refuse an extraction whose layer mask allows other pairs than the valid pairs scored for it.

    Every metric's denominator is the valid pairs; a model whose mask differs (an unknown
    local-attention scheme, say) would otherwise be scored silently wrong.
    """
    if mask is None:
        return
    n = mask.shape[-2]
    lengths = lengths.to(mask.device)
    real = valid_pair_mask(lengths, n)
    allowed = (mask[..., :n, :n] == 0).expand(len(lengths), -1, -1, -1)[:, :1] & real
    if not torch.equal(allowed, valid_pair_mask(lengths, n, causal, window)):
        raise RuntimeError(
            f"model {name!r}, layer {layer}: its attention mask allows other pairs than the ones scored "
            f"(causal={causal}, window={window}); this local-attention scheme is not supported yet"
        )


def _model_inputs(enc) -> dict:
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v for k, v in enc.items() if k in keep}


def _last_hidden(out) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:  # task heads: take the final hidden states
        hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.logits
    return hidden


def load_hf(
    path: Path | str,
    attn_implementation: str = attention.ATTN_IMPLEMENTATION,
    task: str = "base",
    device: str | torch.device = "auto",
    compute_dtype: str | torch.dtype | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load weights and tokenizer from a local directory (never from a hub).

    ``compute_dtype`` casts the weights (e.g. ``bfloat16`` on a GPU: half the memory, tensor cores);
    None keeps the checkpoint's dtype.
    """
    dtype = resolve_compute_dtype(compute_dtype)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASKS)}")
    attention.register()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = TASKS[task].from_pretrained(
        path, config=config, attn_implementation=attn_implementation, local_files_only=True,
        **({} if dtype is None else {"dtype": dtype}),
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.to(resolve_device(device)), tokenizer


def load_model(
    name_or_path: str,
    alpha: Alpha | None = None,
    device: str | torch.device = "auto",
    task: str | None = None,
    use_adapter: bool = True,
    compute_dtype: str | torch.dtype | None = None,
) -> EntmaxModel:
    """Load a registered model by name, or a local model directory, with entmax attention.

    ``compute_dtype`` (``float32``, ``bfloat16``, ``float16``; default the checkpoint's) is the dtype the
    model runs in; entmax stays float32 (:data:`COMPUTE_DTYPES`).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        spec = ModelSpec(name=str(path), path=str(path.resolve()))
    else:
        spec = get_spec(name_or_path)
    model_dir = spec.resolve_path()
    model, tokenizer = load_hf(model_dir, task=task or spec.task, device=device, compute_dtype=compute_dtype)
    # The caller's alpha, else the catalogue's, else the model's own (trained with entmax), else the default.
    own = native_alpha(model.config)
    chosen = next(
        (a, source)
        for a, source in ((alpha, "argument"), (spec.alpha, "catalogue"), (own, "model config"),
                          (DEFAULT_ALPHA, "default"))
        if a is not None
    )
    manifest = None
    checksum = None
    adapter_dir = spec.resolve_adapter() if use_adapter else None
    if adapter_dir is not None:
        checksum = weights_checksum(model_dir)
        manifest = apply_adapter(model, adapter_dir, checksum)
    return EntmaxModel(
        model,
        tokenizer,
        name=spec.name,
        alpha=chosen[0],
        device=resolve_device(device),
        adapter_manifest=manifest,
        base_checksum=checksum,
        alpha_source=chosen[1],
    )
