"""Explore: gold entmax sparsity of every layer and head for a text, and one head's probabilities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import cache, state
from sparsefinder.corpora.corpus import CorpusError
from sparsefinder.evaluation.analysis import LONG_INPUT_TOKENS, MAX_TEXT_CHARS, SPLIT_MODES, split_texts, text_hash
from sparsefinder.metrics import HEAD_METRICS
from sparsefinder.plots.heatmaps import attention_heatmap, block_attention_heatmap, block_size, sparsity_heatmap

ss = st.session_state
GOLD, RECALL = "gold sparsity", "method recall"


def sparsity_frame(grid: np.ndarray) -> pd.DataFrame:
    """``layer`` rows × ``head 0..H-1`` columns."""
    layers, heads = grid.shape
    return pd.DataFrame(
        grid,
        index=pd.Index(range(layers), name="layer"),
        columns=[f"head {h}" for h in range(heads)],
    )


def sentence_label(i: int, text: str) -> str:
    short = text if len(text) <= 70 else text[:67] + "…"
    return f"{i + 1}. {short}"


def main() -> None:
    name, spec = state.page("Explore gold attention",
                            "The gold graph of a head is the support of its entmax probabilities (p > 0); "
                            "its sparsity is the share of token pairs that get exactly zero attention.")

    source = state.persistent_widget(st.radio, state.SOURCE, "Input", options=state.SOURCES, horizontal=True)
    split = SPLIT_MODES[0]
    if source == state.SOURCES[0]:
        text = state.persistent_widget(
            st.text_area,
            state.TEXT,
            "Text to analyse",
            height=110,
            max_chars=MAX_TEXT_CHARS,
            help=f"Each sentence (or each line) is analysed as one item of a batch; at most "
                 f"{state.MAX_TEXTS} items and {MAX_TEXT_CHARS:,} characters.",
        )
        col_split, col_button = st.columns([3, 1], vertical_alignment="bottom")
        with col_split:
            split = state.persistent_widget(
                st.radio,
                state.SPLIT,
                "Analyse one item per",
                options=SPLIT_MODES,
                horizontal=True,
            )
        with col_button:
            # Any change of the text reruns the page; the button reruns it explicitly.
            st.button("Analyse", type="primary", icon=":material/play_arrow:")
        if len(text) >= MAX_TEXT_CHARS:  # Streamlit cuts a longer value at max_chars, silently
            st.warning(f"The text is at the limit of {MAX_TEXT_CHARS:,} characters; anything beyond it was cut.")
        try:
            texts = split_texts(text, split)
        except CorpusError as e:
            st.error(f"Cannot analyse this text: {e}.")
            return
    else:
        result = state.active_result(name)
        try:
            corpus = cache.corpus_texts(state.active_result(name))
        except Exception as e:
            st.error(f"Could not read the corpus of {result.label}: {type(e).__name__}: {e}")
            return
        if not corpus:
            st.warning(f"The corpus of {result.label} has no sentences.")
            return
        i = state.persistent_widget(
            st.selectbox, state.CORPUS_SENTENCE, f"Sentence of the active corpus ({result.label}, "
            f"{len(corpus):,} sentences)", options=range(len(corpus)),
            format_func=lambda j: sentence_label(j, corpus[j]),
        )
        texts = [corpus[i]]

    if not texts:
        st.warning("Enter some text to analyse: the text area is empty.")
        return
    if len(texts) > state.MAX_TEXTS:
        unit = "line" if split == "lines" else "sentence"
        st.warning(f"{len(texts)} {unit}s given; only the first {state.MAX_TEXTS} are analysed: a batch holds at "
                   f"most {state.MAX_TEXTS} items, and in \"{split}\" mode each {unit} is one item.")
        texts = texts[: state.MAX_TEXTS]
    texts = tuple(texts)

    with st.spinner(f"Loading model {name}…", show_time=True):
        outcome = cache.get_model(name)
    if outcome.model is None:
        st.error(
            f"Could not load model **{name}**: {outcome.error}\n\n"
            "Choose another registered model in the sidebar."
        )
        return

    version = cache.model_version(spec)
    alpha = cache.alpha_key(spec.alpha)
    key = text_hash(texts)
    try:
        with st.spinner(f"Running {name} on {len(texts)} text(s)…", show_time=True):
            result = cache.analyse(name, version, alpha, key, texts)
    except Exception as e:  # shown in the page; the app keeps serving
        st.error(f"Analysis failed: {type(e).__name__}: {e}")
        return

    # Extraction.truncated carries what model.tokenize's TruncationWarning says, per text.
    # It is used instead of warnings.catch_warnings, which swaps process-wide globals
    # and is not safe while other sessions run the shared model in other threads.
    for i, cut in enumerate(result.truncated):
        if cut:
            st.warning(
                f"Text {i + 1} is longer than the model's maximum of {outcome.model.max_length} tokens "
                f"and was truncated to its first {outcome.model.max_length} tokens."
            )

    b = 0
    if len(texts) > 1:
        b = state.persistent_widget(
            st.selectbox,
            state.SENTENCE,
            f"Sentence ({len(texts)} analysed)",
            options=range(len(texts)),
            format_func=lambda i: sentence_label(i, texts[i]),
        )

    method, params = ss.get(state.METHOD), ss.get(state.PARAMS)
    if method in (None, state.NO_METHOD):
        method = params = None
    artifacts = state.active_result(name)
    prediction = None
    if method is not None and not result.probabilities:
        st.info(f"The {method} overlay is drawn on texts of up to {LONG_INPUT_TOKENS:,} tokens: a longer text is "
                "analysed without keeping every head's probabilities (its gold graphs only), to fit in memory.")
        method = params = None
    if method is not None:
        try:
            with st.spinner(f"Predicting {method} on every layer…"):
                prediction = cache.batch_prediction(name, version, alpha, key, method, params, artifacts.key,
                                                    texts, artifacts)
        except Exception as e:
            st.error(f"Could not predict with {method} {params}: {type(e).__name__}: {e}")

    grid = result.sparsity[b]
    tokens = result.tokens[b]
    # The head's section is laid out below the overview but filled first: a visitor who types a text looks
    # at the head view they were on, and its heatmap is sent (and drawn by the browser) before the overview's
    # figure and tables, not after them (bench/ui_latency.py "new text"). The page's layout is unchanged.
    overview, below = st.container(), st.container()
    with below:
        st.subheader("One head")
        head_section(name, version, alpha, key, texts, b, grid, tokens, result.num_layers, result.num_heads,
                     prediction, method, params)
    with overview:
        draw_overview(name, result, b, grid, tokens, prediction, method, params)


def draw_overview(name, result, b, grid, tokens, prediction, method, params) -> None:
    """The sentence's metrics, the layers × heads overview (gold sparsity or a method's recall) and its tables."""
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Mean gold sparsity", f"{grid.mean():.4f}", help="Mean over all layers and heads of this sentence.")
    c2.metric("Tokens", len(tokens))
    c3.metric("Layers × heads", f"{result.num_layers} × {result.num_heads}")
    if prediction is not None:
        c4.metric(f"Mean recall of {method}", f"{prediction.metrics['recall'][b].mean():.4f}",
                  f"mass recall {np.nanmean(prediction.metrics['mass_recall'][b]):.4f}", delta_color="off",
                  delta_arrow="off",
                  help=f"{method} {params}: mean over all layers and heads of this sentence; below it, the share "
                       "of the gold attention probability on its predicted pairs (docs/method.md §2.2).")

    colour = GOLD
    if prediction is not None:
        colour = state.persistent_widget(st.radio, state.OVERVIEW, "Colour the overview by",
                                         options=(GOLD, RECALL), horizontal=True)
    if colour == RECALL and prediction is not None:
        values, title = prediction.metrics["recall"][b], f"Recall of {method} {params} per layer and head"
        fig = sparsity_heatmap(values, title=title, value_name="recall")
        stem = f"recall-{name}-{method}"
    else:
        values, fig, stem = grid, sparsity_heatmap(grid), f"gold-sparsity-{name}"
    st.plotly_chart(fig, key="sparsity_heatmap")
    frame = sparsity_frame(values)
    st.dataframe(
        frame,
        hide_index=False,
        column_config={c: st.column_config.NumberColumn(c, format="%.4f") for c in frame.columns},
    )
    c1, c2 = st.columns(2)
    with c1:
        st.download_button("Download the table (CSV)", frame.to_csv().encode("utf-8"), file_name=f"{stem}.csv",
                           mime="text/csv", icon=":material/download:", key="grid_csv", on_click="ignore")
    with c2:
        state.download_figure(fig, stem, key="grid_html")
    with st.expander("Values as a plain table"):
        with st.container(key="gold_table"):
            st.table(frame.map(lambda v: f"{v:.4f}"), hide_index=False)



@st.fragment
@state.error_boundary("part of the page")
def head_section(name, version, alpha, key, texts, b, grid, tokens, num_layers, num_heads, prediction, method, params):
    """Layer/head selects and the head's heatmap, as a fragment: changing the head reruns only this part
    (not the model select, the overview and its tables), which keeps the switch fast in the browser."""
    col_layer, col_head = st.columns(2)
    with col_layer:
        layer = state.persistent_widget(st.selectbox, state.LAYER, "Layer", options=range(num_layers))
    with col_head:
        head = state.persistent_widget(st.selectbox, state.HEAD, "Head", options=range(num_heads))

    title = f"Layer {layer}, head {head}: entmax probabilities (gold sparsity {grid[layer, head]:.4f})"
    try:
        with st.spinner(f"Computing layer {layer}, head {head}…"):
            if prediction is None:  # gold only: the head's drawing, small at any length
                view = cache.head_view(name, version, alpha, key, b, layer, head, texts)
            else:  # the overlay compares every pair (texts of up to LONG_INPUT_TOKENS tokens)
                probs = cache.head_probabilities(name, version, alpha, key, b, layer, head, texts)
                allowed = cache.allowed_pairs(name, version, alpha, key, b, layer, texts)
    except Exception as e:
        st.error(f"Could not compute the probabilities: {type(e).__name__}: {e}")
        return
    pred = None
    if prediction is None:
        fig = block_attention_heatmap(view.top, view.edges, view.allowed, list(tokens), view.size, title=title)
        zeros, forbidden, size, allowed_count = view.zeros, view.forbidden, view.size, int(view.allowed.sum())
    else:
        pred = prediction.edges(b, layer, len(tokens))[head]
        title = f"Layer {layer}, head {head}: entmax probabilities and {method} {params}"
        with st.container(key="head_metrics"):
            state.head_metrics({m: prediction.metrics[m][b, layer, head] for m in HEAD_METRICS})
        fig = attention_heatmap(probs, list(tokens), title=title, pred=pred, allowed=allowed)
        zeros, forbidden = int(((probs == 0) & allowed).sum()), int((~allowed).sum())
        size, allowed_count = block_size(len(tokens)), int(allowed.sum())
    st.plotly_chart(fig, key="head_heatmap")
    state.download_figure(fig, f"head-{name}-L{layer}H{head}", key="head_html")
    st.caption(
        f"Rows are queries, columns keys. Grey cells are exact zeros (no edge): "
        f"{zeros} of {allowed_count} allowed pairs. Repeated tokens carry their position, e.g. `the·7`."
        + (f" White cells ({forbidden}) are pairs this layer's mask forbids (future keys, or outside its "
           "sliding window): not part of any graph." if forbidden else "")
        + (" Marks: blue TP, orange FP, pink FN." if pred is not None else "")
        + (f" {len(tokens)} tokens are drawn as blocks of {size} so the page stays responsive: a block's colour "
           "is its largest probability, grey when none of its pairs is a gold edge, white when none is allowed."
           if size > 1 else "")
    )
    # A fragment rerun skips the entrypoint, which otherwise mirrors the view into the URL.
    state.sync_query_params()

main()
