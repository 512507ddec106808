"""Your own catalogue (``sparsefinder models add``) and models trained with entmax (#13, items 2 and 3).

A model whose ``config.json`` declares ``entmax_alpha`` runs with that alpha and no adapter; checked by
recomputing the probabilities from the captured q/k with the entmax package's own functions at that alpha.
"""

from __future__ import annotations

import json

import pytest
import torch
from entmax import entmax15, entmax_bisect

from sparsefinder.cli import main
from sparsefinder.graphs import valid_pair_mask
from sparsefinder.model.catalogue import load_registry, user_catalogue_path
from sparsefinder.model.entmax_model import load_model
from sparsefinder.model.user_catalogue import add_model, remove_model

TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello there."]


@pytest.fixture
def catalogue(tmp_path, monkeypatch):
    path = tmp_path / "config" / "models.json"
    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(path))
    return path


def _recomputed(ex, layer: int, alpha) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, p = ex.queries[layer].double(), ex.keys[layer].double(), ex.probs[layer].double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    valid = valid_pair_mask(ex.lengths, q.shape[2], causal=ex.causal)
    scores = scores.masked_fill(~valid, -1e9)
    if isinstance(alpha, torch.Tensor):
        a = alpha.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        want = entmax_bisect(scores, alpha=a, dim=-1, n_iter=100)
    elif alpha == 1.5:
        want = entmax15(scores, dim=-1)
    else:
        want = entmax_bisect(scores, alpha=alpha, dim=-1, n_iter=100)
    real = ex.padding_mask()[:, None, :, None]
    return p * real, want.masked_fill(~valid, 0) * real


def test_user_path_comes_from_the_environment_or_the_config_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(tmp_path / "x.json"))
    assert user_catalogue_path() == tmp_path / "x.json"
    monkeypatch.delenv("SPARSEFINDER_CATALOGUE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert user_catalogue_path() == tmp_path / "cfg" / "sparsefinder" / "models.json"


def test_add_merges_with_the_shipped_catalogue_and_loads_by_name(catalogue, tiny_model_dir, capsys):
    shipped = set(load_registry())
    path = tiny_model_dir("llama")
    assert main(["models", "add", "my-llama", str(path), "--alpha", "2", "--description", "tiny"]) == 0
    assert str(catalogue) in capsys.readouterr().out
    specs = load_registry()
    assert set(specs) == shipped | {"my-llama"}
    assert specs["my-llama"].source == "user" and specs["my-llama"].alpha == 2.0
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "my-llama" in listed and "[user]" in listed and "[shipped]" in listed
    model = load_model("my-llama", device="cpu")
    assert model.alpha == 2.0 and model.alpha_source == "catalogue"
    ex = model.extract(TEXT)
    got, want = _recomputed(ex, 0, 2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert main(["models", "remove", "my-llama"]) == 0
    assert "my-llama" not in load_registry()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["models", "add", "x", "{missing}"], "no such directory"),
        (["models", "add", "x", "{empty}"], "no config.json"),
        (["models", "add", "minilm-entmax15", "{llama}"], "already in the catalogue"),
        (["models", "add", "bad name", "{llama}"], "use letters"),
        (["models", "add", "x", "{llama}", "--adapter", "{empty}"], "not an adapter directory"),
        (["models", "remove", "minilm-entmax15"], "it is a shipped model"),
    ],
)
def test_bad_additions_are_refused_in_one_line(catalogue, tiny_model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    fill = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "llama": tiny_model_dir("llama")}
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not catalogue.exists()


def test_a_model_outside_the_attention_interface_is_named_and_refused(catalogue, tmp_path, capsys):
    import transformers

    from tests.conftest import _minilm_dir

    tok = transformers.AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)
    config = transformers.MPNetConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=66)
    out = tmp_path / "mpnet"
    transformers.MPNetModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    assert main(["models", "add", "mpnet", str(out)]) == 1
    err = capsys.readouterr().err
    assert "MPNetModel" in err and "attention interface" in err
    assert not catalogue.exists()


def test_a_corrupt_user_catalogue_names_its_file(catalogue):
    catalogue.parent.mkdir(parents=True)
    catalogue.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="models.json: not readable JSON"):
        load_registry()
    catalogue.write_text(json.dumps({"models": {"minilm-entmax15": {"path": "/x"}}}), encoding="utf-8")
    with pytest.raises(ValueError, match="already names a shipped model"):
        load_registry()


@pytest.mark.parametrize("kind", ["scalar", "per-layer", "per-head"])
def test_a_model_trained_with_entmax_runs_with_its_own_alpha_and_no_adapter(tiny_model_dir, tmp_path, kind):
    import transformers

    path = tiny_model_dir("bert")
    config = transformers.AutoConfig.from_pretrained(path)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    own = {"scalar": 1.75, "per-layer": [1.3, 2.0],
           "per-head": [[1.2 + 0.1 * (h + layers * i) for h in range(heads)] for i in range(layers)]}[kind]
    native = tmp_path / "native"
    transformers.AutoModel.from_pretrained(path).save_pretrained(native)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(native)
    config.entmax_alpha = own
    config.save_pretrained(native)

    model = load_model(str(native), device="cpu")
    assert model.native and model.alpha_source == "model config" and model.adapter_manifest is None
    expected = torch.as_tensor(own, dtype=torch.float32)
    if kind == "per-layer":
        expected = expected[:, None].expand(layers, heads)
    ex = model.extract(TEXT)
    for layer in range(layers):
        alpha = expected if kind == "scalar" else expected[layer]
        got, want = _recomputed(ex, layer, float(alpha) if kind == "scalar" else alpha)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The caller's alpha still wins over the model's own.
    assert load_model(str(native), device="cpu", alpha=1.5).alpha_source == "argument"


def test_a_saved_model_of_this_project_reloads_as_trained_with_entmax(tiny_model_dir, tmp_path):
    base = load_model(str(tiny_model_dir("bert")), device="cpu", alpha=[[1.5, 1.6, 1.7, 1.8], [2.0, 1.5, 1.5, 1.2]])
    assert not base.native
    saved = base.save_pretrained(tmp_path / "saved")
    again = load_model(str(saved), device="cpu")
    assert again.native and again.alpha_source == "model config"
    torch.testing.assert_close(again.alpha, base.alpha)
    a, b = base.extract(TEXT), again.extract(TEXT)
    for layer in range(a.num_layers):
        assert torch.equal(a.probs[layer] > 0, b.probs[layer] > 0)
        torch.testing.assert_close(a.probs[layer], b.probs[layer], atol=1e-6, rtol=0)


def test_remove_of_an_unknown_name_and_a_nan_alpha_are_clear_errors(catalogue, tiny_model_dir):
    with pytest.raises(KeyError, match="no such entry"):
        remove_model("nothing-here")
    with pytest.raises(ValueError, match="finite number"):
        add_model("x", tiny_model_dir("llama"), alpha=float("nan"))
    assert not catalogue.exists()
