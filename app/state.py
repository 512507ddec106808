"""View state of the dashboard: what this session looks at, its URL, and the widgets bound to it.

View state (model, layer, head, text, sentence, result, method, configuration) lives in
``st.session_state``; model, layer, head, result, method and configuration are mirrored in
``st.query_params`` so a copied link reproduces the view. What sessions share (models,
per-text results, artifacts) is in :mod:`app.cache`; every decision about artifacts and
methods is the library's (:mod:`sparsefinder.results`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from importlib import metadata

import numpy as np
import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

from app import cache
from sparsefinder import results as rs
from sparsefinder.evaluation.analysis import SPLIT_MODES
from sparsefinder.model.catalogue import ModelSpec, default_model_name, load_registry
from sparsefinder.plots.export import MIME, figure_bytes, image_export_problem

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
#: Most sentences analysed in one batch (protects the shared server's memory).
MAX_TEXTS = 16
#: Most sentences of an uploaded corpus used for extraction (the shared server's time and disk).
MAX_EXTRACT_SENTENCES = 2000
VERSION_PACKAGES = ("sparsefinder", "torch", "transformers", "entmax", "streamlit", "plotly", "numpy", "pandas")

# Session-state keys of the view; URL_KEYS are mirrored in the query string.
MODEL = "model"
LAYER = "layer"
HEAD = "head"
TEXT = "text"
SPLIT = "split"
SENTENCE = "sentence"
SOURCE = "source"
SOURCES = ("type text", "sentence from the active corpus")
CORPUS_SENTENCE = "corpus_sentence"
OVERVIEW = "overview"
RESULT = "result"
METHOD = "method"
PARAMS = "params"
URL_KEYS = (MODEL, LAYER, HEAD, RESULT, METHOD, PARAMS)
_INITIALISED = "_view_initialised"
_URL_PARAMS = "_url_params"  # the params the URL asked for, until the sidebar has checked them
SHIPPED = rs.SHIPPED
NO_METHOD = "(gold only)"

# Extra view keys of the Pareto and Compare pages (session only, not in the URL).
GRAPH_TEXT = "graph_text"
RESOLUTION = "pareto_resolution"
CONFIG = "pareto_config"
METHODS = "compare_methods"
RESOLUTIONS = ("overall", "per layer", "per head")


def registry() -> dict[str, ModelSpec]:
    """The registered models (re-read each run: a small JSON file)."""
    return load_registry()


def default_model() -> str:
    return default_model_name()


def alpha_label(alpha) -> str:
    """Alpha as shown to people: ``1.5``, or ``per-head (L×H)`` for a per-head table."""
    if alpha is None:
        return "the model's own, else 1.5"
    arr = np.asarray(alpha, dtype=float)
    if arr.size == 1:
        return f"{float(arr):g}"
    return f"per-head ({arr.shape[0]}×{arr.shape[1]})" if arr.ndim == 2 else "per-head"


def page(title: str, caption: str) -> tuple[str, ModelSpec]:
    """A page's title and caption; returns the session's model name and its catalogue entry."""
    name = st.session_state[MODEL]
    st.title(title)
    st.caption(caption)
    return name, registry()[name]


def active_result(name: str) -> rs.Result:
    """The result this session selected in the sidebar (``st.session_state[RESULT]``), resolved."""
    return rs.resolve_result(name, st.session_state.get(RESULT, SHIPPED))


# -- errors -------------------------------------------------------------------------
LOG = logging.getLogger("sparsefinder.app")
#: Longest exception message shown on a page (the rest is in the server log).
MAX_ERROR_CHARS = 300


def error_message(e: BaseException) -> str:
    """What a visitor sees of an unexpected error: its type and the first line of its message, capped."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if len(first) > MAX_ERROR_CHARS:
        first = first[: MAX_ERROR_CHARS - 1] + "…"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextlib.contextmanager
def error_boundary(where: str = "page") -> Iterator[None]:
    """Show an unexpected error as one short message and log its traceback to the server log only.

    Wraps every page's run and every fragment (also usable as a decorator, under
    ``@st.fragment``), so a visitor never sees a stack trace with the server's paths.
    Streamlit's control flow (``st.rerun``, ``st.stop``, ``st.switch_page``) raises
    ``RerunException``/``StopException``: they are not errors and pass through.
    """
    try:
        yield
    except (RerunException, StopException):
        raise
    except Exception as e:
        LOG.exception("unexpected error in the %s", where)
        st.error(f"Something went wrong and this {where} stopped: {error_message(e)}. "
                 "The details are in the server log.", icon=":material/error:")


# -- view state ------------------------------------------------------------------
def _as_int(value, default: int = 0) -> int:
    try:
        v = int(str(value))
    except (TypeError, ValueError):
        return default
    return v if v >= 0 else default


def init_view_state() -> None:
    """Fill the session's view from the URL (first run of a session only)."""
    ss = st.session_state
    if ss.get(_INITIALISED):
        return
    specs = registry()
    qp = st.query_params
    model = qp.get(MODEL)
    ss[MODEL] = model if model in specs else default_model()
    ss[LAYER] = _as_int(qp.get(LAYER))
    ss[HEAD] = _as_int(qp.get(HEAD))
    ss[TEXT] = DEFAULT_TEXT
    ss[SPLIT] = SPLIT_MODES[0]
    ss[SENTENCE] = 0
    ss[SOURCE] = SOURCES[0]
    ss[CORPUS_SENTENCE] = 0
    # Checked against what exists when the widgets are drawn (persistent_widget falls back).
    for key in (RESULT, METHOD, PARAMS):
        if qp.get(key):
            ss[key] = str(qp.get(key))
    if not qp.get(METHOD):  # hyperparameters mean nothing without their method (sync drops them)
        ss.pop(PARAMS, None)
    elif qp.get(PARAMS):
        ss[_URL_PARAMS] = str(qp.get(PARAMS))
    ss[_INITIALISED] = True


def sync_query_params() -> None:
    """Mirror the view (model, layer, head, result, method, params) into the URL."""
    qp = st.query_params
    no_method = st.session_state.get(METHOD) in (None, "", NO_METHOD)
    for key in URL_KEYS:
        raw = st.session_state.get(key)
        value = "" if raw is None or (key == PARAMS and no_method) else str(raw)
        if key in (RESULT, METHOD, PARAMS) and value in ("", SHIPPED, NO_METHOD):
            if key in qp:  # the defaults stay out of the URL
                del qp[key]
            continue
        if qp.get(key) != value:
            qp[key] = value


def persistent_widget(widget, view_key: str, *args, options: Sequence | None = None, **kwargs):
    """Render ``widget`` bound to the view value ``st.session_state[view_key]``.

    Streamlit forgets a widget's state on runs where it is not drawn (another
    page); the view value outlives it and seeds the widget when it comes back.
    """
    ss = st.session_state
    wkey = f"_w_{view_key}"
    if options is not None:
        options = list(options)
        if ss.get(view_key) not in options:
            ss[view_key] = options[0]
        if wkey not in ss or ss[wkey] not in options:
            ss[wkey] = ss[view_key]
        value = widget(*args, options=options, key=wkey, **kwargs)
    else:
        if wkey not in ss:
            ss[wkey] = ss[view_key]
        value = widget(*args, key=wkey, **kwargs)
    ss[view_key] = value
    return value


def model_sidebar() -> ModelSpec:
    """Sidebar: the registered-model select and the model's alpha. Returns the spec."""
    specs = registry()
    names = list(specs)
    ss = st.session_state
    if ss.get(MODEL) not in specs:
        ss[MODEL] = default_model() if default_model() in specs else names[0]
    with st.sidebar:
        persistent_widget(
            st.selectbox,
            MODEL,
            "Model",
            options=names,
            format_func=lambda n: f"{n} (default)" if n == default_model() else n,
            help="Only catalogued models can be chosen: data/models.json and your own (sparsefinder models add).",
        )
        spec = specs[ss[MODEL]]
        st.markdown(f"**α (entmax alpha):** `{alpha_label(spec.alpha)}`")
        if spec.description:
            st.caption(spec.description)
    return spec


def versions() -> dict[str, str]:
    out = {}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# -- method and hyperparameters (sidebar) ------------------------------------------
def method_sidebar(name: str) -> tuple[str | None, str | None]:
    """Sidebar: the active result, the method and its hyperparameters. Returns ``(method, params)``."""
    ss = st.session_state
    requested = ss.pop(_URL_PARAMS, None)  # checked on this run only: later misses are method switches
    with st.sidebar:
        choices = rs.result_choices(name)
        persistent_widget(
            st.selectbox, RESULT, "Results", options=choices,
            format_func=lambda r: "shipped (default corpus)" if r == SHIPPED else f"saved: {r}",
            help="Corpus, projections, fitted predictors and sweep used by the pages: the model's shipped "
                 "artifacts, or a result saved on the Corpus page.",
        )
        result = active_result(name)
        found = cache.artifacts(name, result)
        methods = [NO_METHOD, *found.available_methods()]
        method = persistent_widget(st.selectbox, METHOD, "Method", options=methods,
                                   help="The predictor whose graph Explore overlays on the gold graph.")
        problem = found.learned[1]
        if problem is not None:
            st.caption(f"The learned predictors cannot be drawn: {problem}.")
        if method == NO_METHOD:
            return None, None
        options = rs.params_options(method, cache.sweep_table(result))
        if ss.get(PARAMS) not in options:
            fallback = rs.default_params(method, options)
            if requested is not None and ss.get(PARAMS) == requested:
                st.warning(f"The link's hyperparameters `{requested}` are not a configuration of {method}; "
                           f"showing its default `{fallback}`.")
            ss[PARAMS] = fallback
        params = persistent_widget(st.selectbox, PARAMS, "Hyperparameters", options=options)
    return method, params


def figure_html(fig) -> bytes:
    """A standalone HTML file of ``fig`` with plotly.js inlined (opens offline)."""
    return figure_bytes(fig, "html")


#: Download formats offered beside a figure: label → export format (sparsefinder.plots.export).
FIGURE_FORMATS = {"HTML (interactive)": "html", "PNG": "png", "SVG": "svg", "PDF": "pdf"}


def head_metrics(values: dict[str, float]) -> None:
    """One head's metrics on a text, three to a row (:data:`sparsefinder.metrics.HEAD_METRICS` names them)."""
    from sparsefinder.metrics import HEAD_METRICS

    helps = {"mass_recall": "Share of the gold entmax probability on the predicted pairs.",
             "output_error": "Relative L2 error of the head's output with entmax restricted to the predicted pairs "
                             "(0: the output is unchanged)."}
    names = list(values)
    for start in range(0, len(names), 3):
        for col, m in zip(st.columns(3), names[start:start + 3], strict=False):
            value = float(values[m])
            col.metric(HEAD_METRICS.get(m, m), "n/a" if value != value else f"{value:.4f}", help=helps.get(m))


def download_figure(fig, file_stem: str, key: str) -> None:
    """A format select, a paper-style toggle and one download button for ``fig``.

    The file (HTML with plotly.js inlined, ~5 MB; an image drawn by headless Chromium, ~2 s) is made
    only when the button is clicked: built eagerly it would be sent, or drawn, on every rerun of the page.
    """
    problem = image_export_problem()
    labels = [label for label, fmt in FIGURE_FORMATS.items() if fmt == "html" or problem is None]
    c1, c2, c3 = st.columns([2, 2, 3], vertical_alignment="bottom")
    label = c1.selectbox("Figure format", labels, key=f"{key}_format", label_visibility="collapsed",
                         help=f"PNG, SVG and PDF: {problem}." if problem else None)
    paper = c2.toggle("Paper style", key=f"{key}_style",
                      help="Print fonts, black axes and Okabe–Ito colours (the CLI's --style paper).")
    fmt, style = FIGURE_FORMATS[label], "paper" if paper else "default"
    c3.download_button(
        f"Download the figure ({fmt.upper()})", lambda: figure_bytes(fig, fmt, style=style),
        file_name=f"{file_stem}.{fmt}", mime=MIME[fmt], icon=":material/download:", key=key, on_click="ignore",
    )


def graph_text_input(label: str = "Sentence") -> str:
    """The sentence the Pareto and Compare pages predict on (shared by both)."""
    ss = st.session_state
    if GRAPH_TEXT not in ss:
        ss[GRAPH_TEXT] = DEFAULT_TEXT
    return persistent_widget(st.text_input, GRAPH_TEXT, label, max_chars=4000).strip()



