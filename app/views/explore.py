"""Explore: gold entmax sparsity of every layer and head for a text, and one head's probabilities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import state
from sparsefinder.plots import attention_heatmap, sparsity_heatmap

ss = st.session_state


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
    name = ss[state.MODEL]
    spec = state.registry()[name]

    st.title("Explore gold attention")
    st.caption(
        "The gold graph of a head is the support of its entmax probabilities (p > 0); "
        "its sparsity is the share of token pairs that get exactly zero attention."
    )

    text = state.persistent_widget(
        st.text_area,
        state.TEXT,
        "Text to analyse",
        height=110,
        help="Each sentence (or each line) is analysed as one item of a batch.",
    )
    col_split, col_button = st.columns([3, 1], vertical_alignment="bottom")
    with col_split:
        split = state.persistent_widget(
            st.radio,
            state.SPLIT,
            "Analyse one item per",
            options=state.SPLIT_MODES,
            horizontal=True,
        )
    with col_button:
        # Any change of the text reruns the page; the button reruns it explicitly.
        st.button("Analyse", type="primary", icon=":material/play_arrow:")

    texts = state.split_texts(text, split)
    if not texts:
        st.warning("Enter some text to analyse: the text area is empty.")
        return
    if len(texts) > state.MAX_TEXTS:
        st.warning(f"{len(texts)} sentences given; only the first {state.MAX_TEXTS} are analysed.")
        texts = texts[: state.MAX_TEXTS]
    texts = tuple(texts)

    with st.spinner(f"Loading model {name}…", show_time=True):
        outcome = state.get_model(name)
    if outcome.model is None:
        st.error(
            f"Could not load model **{name}**: {outcome.error}\n\n"
            "Choose another registered model in the sidebar."
        )
        return

    version = state.model_version(spec)
    alpha = state.alpha_key(spec.alpha)
    key = state.text_hash(texts)
    try:
        with st.spinner(f"Running {name} on {len(texts)} text(s)…", show_time=True):
            result = state.analyse(name, version, alpha, key, texts)
    except Exception as e:  # shown in the page; the app keeps serving
        st.error(f"Analysis failed: {type(e).__name__}: {e}")
        return

    # Extraction.truncated carries what model.tokenize's TruncationWarning says, per text.
    # It is used instead of warnings.catch_warnings, which swaps process-wide globals
    # and is not safe while other sessions run the shared model in other threads.
    for i, cut in enumerate(result.truncated):
        if cut:
            st.warning(
                f"Text {i + 1} is longer than the model's maximum of {result.max_length} tokens "
                f"and was truncated to its first {result.max_length} tokens."
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

    grid = result.sparsity[b]
    tokens = result.tokens[b]
    c1, c2, c3 = st.columns(3)
    c1.metric("Mean gold sparsity", f"{grid.mean():.4f}", help="Mean over all layers and heads of this sentence.")
    c2.metric("Tokens", len(tokens))
    c3.metric("Layers × heads", f"{result.num_layers} × {result.num_heads}")

    st.plotly_chart(sparsity_heatmap(grid), key="sparsity_heatmap")
    frame = sparsity_frame(grid)
    st.dataframe(
        frame,
        hide_index=False,
        column_config={c: st.column_config.NumberColumn(c, format="%.4f") for c in frame.columns},
    )
    with st.expander("Values as a plain table"):
        with st.container(key="gold_table"):
            st.table(frame.map(lambda v: f"{v:.4f}"), hide_index=False)

    st.subheader("One head")
    col_layer, col_head = st.columns(2)
    with col_layer:
        layer = state.persistent_widget(st.selectbox, state.LAYER, "Layer", options=range(result.num_layers))
    with col_head:
        head = state.persistent_widget(st.selectbox, state.HEAD, "Head", options=range(result.num_heads))

    try:
        with st.spinner(f"Computing layer {layer}, head {head}…"):
            probs = state.head_probabilities(name, version, alpha, key, b, layer, head, texts)
    except Exception as e:
        st.error(f"Could not compute the probabilities: {type(e).__name__}: {e}")
        return
    title = f"Layer {layer}, head {head}: entmax probabilities (gold sparsity {grid[layer, head]:.4f})"
    st.plotly_chart(attention_heatmap(probs, list(tokens), title=title), key="head_heatmap")
    zeros = int((probs == 0).sum())
    st.caption(
        f"Rows are queries, columns keys. Grey cells are exact zeros (no edge): "
        f"{zeros} of {probs.size} pairs. Repeated tokens carry their position, e.g. `the·7`."
    )


main()
