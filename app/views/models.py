"""Models: the same text through two registered models, or one model at two alphas, head by head."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import cache, state
from sparsefinder.evaluation import analysis as an
from sparsefinder.evaluation.analysis import text_hash
from sparsefinder.plots.heatmaps import attention_heatmap, sparsity_heatmap

ss = st.session_state
OTHER = "models_other"
ALPHA_A, ALPHA_B = "models_alpha_a", "models_alpha_b"


def _side(label: str, model_key: str | None, alpha_key: str, default_model: str) -> tuple[str, float | None]:
    specs = state.registry()
    names = list(specs)
    if model_key is None:
        name = default_model
        st.markdown(f"**{label}:** `{name}` (the sidebar's model)")
    else:
        if ss.get(model_key) not in specs:
            ss[model_key] = default_model
        name = state.persistent_widget(st.selectbox, model_key, label, options=names)
    own = specs[name].alpha
    if own is None or np.asarray(own, dtype=float).size > 1:  # the model's own, or a per-head table
        st.caption(f"α: {state.alpha_label(own)}, as catalogued")
        return name, None
    default = float(own)
    if alpha_key not in ss:
        ss[alpha_key] = default
    alpha = state.persistent_widget(st.number_input, alpha_key, f"α of {label.lower()}", min_value=1.0,
                                    max_value=4.0, step=0.1, format="%.2f",
                                    help="1 is softmax; 1.5 is exact; other values use bisection.")
    return name, None if alpha == default else float(alpha)


def main() -> None:
    name, _ = state.page("Compare models",
                         "The same text through two models, or one model at two alphas: the gold sparsity of "
                         "each head on each side and the Jaccard overlap |A ∩ B| / |A ∪ B| of the two gold "
                         "graphs. Both sides must tokenise the text alike (e.g. a model and its distilled or "
                         "untuned copy).")
    specs = state.registry()
    other_default = next((n for n in specs if n != name and specs[n].path == specs[name].path), name)
    col_a, col_b = st.columns(2)
    with col_a:
        a = _side("Model A", None, ALPHA_A, name)
    with col_b:
        b = _side("Model B", OTHER, ALPHA_B, other_default)
    text = state.graph_text_input("Text")
    if not text:
        st.warning("Enter a text to compare the models on.")
        return
    key = text_hash([text])
    sides = [(n, cache.model_version(specs[n]), alpha) for n, alpha in (a, b)]
    with st.status("Running both models…", expanded=False) as status:
        for n, _, alpha in sides:
            outcome = cache.model_at(n, alpha)
            if outcome.model is None:
                status.update(label="A model could not be loaded", state="error")
                st.error(f"Could not load model **{n}**: {outcome.error}")
                return
        try:
            frame = cache.model_comparison(sides[0], sides[1], key, (text,))
        except ValueError as e:
            status.update(label="These models cannot be compared", state="error")
            st.error(str(e))
            return
        status.update(label="Both models ran", state="complete")
    layers, heads = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    label = {i: f"{'AB'[i]}: {n} (α {state.alpha_label(specs[n].alpha if alpha is None else alpha)})"
             for i, (n, alpha) in enumerate((a, b))}
    grids = {c: frame[c].to_numpy().reshape(layers, heads) for c in ("sparsity_a", "sparsity_b", "jaccard")}
    with st.container(key="models_summary"):
        cols = st.columns(3)
        cols[0].metric("Gold sparsity, A", f"{np.nanmean(grids['sparsity_a']):.4f}")
        cols[1].metric("Gold sparsity, B", f"{np.nanmean(grids['sparsity_b']):.4f}")
        cols[2].metric("Jaccard overlap", f"{np.nanmean(grids['jaccard']):.4f}")
    cols = st.columns(3)
    titles = (f"Gold sparsity, {label[0]}", f"Gold sparsity, {label[1]}", "Jaccard overlap of the gold graphs")
    for col, (column, grid), title in zip(cols, grids.items(), titles, strict=True):
        with col:
            fig = sparsity_heatmap(grid, title=title, value_name=column.replace("_", " "))
            st.plotly_chart(fig, key=f"models_{column}")
            state.download_figure(fig, f"models-{column}", key=f"models_{column}_html")
    with st.expander("Values as a table"):
        st.dataframe(frame, hide_index=True, key="models_table")

    st.subheader("One head, side by side")
    col_layer, col_head = st.columns(2)
    with col_layer:
        layer = state.persistent_widget(st.selectbox, state.LAYER, "Layer", options=range(layers))
    with col_head:
        head = state.persistent_widget(st.selectbox, state.HEAD, "Head", options=range(heads))
    cols = st.columns(2)
    for i, (col, side) in enumerate(zip(cols, sides, strict=True)):
        ex = cache.extraction_at(*side, key, (text,))
        probs = an.head_probabilities(ex, 0, layer, head)
        fig = attention_heatmap(probs, list(ex.tokens[0]), allowed=an.allowed_pairs(ex, 0, layer),
                                title=f"{label[i]}<br>layer {layer}, head {head}: gold sparsity "
                                      f"{grids['sparsity_a' if i == 0 else 'sparsity_b'][layer, head]:.4f}")
        with col:
            st.plotly_chart(fig, key=f"models_head_{i}")
    st.caption(f"Jaccard overlap of this head's gold graphs: {grids['jaccard'][layer, head]:.4f}.")


main()
