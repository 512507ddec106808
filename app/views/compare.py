"""Compare: one head under several methods, predicted vs gold on a sentence, with the sweep's corpus numbers."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import cache, state
from sparsefinder import results as rs
from sparsefinder.evaluation.analysis import text_hash
from sparsefinder.evaluation.pareto import best_recall_at
from sparsefinder.metrics import HEAD_METRICS
from sparsefinder.plots.heatmaps import outcome_heatmap
from sparsefinder.predictors import REGISTRY

ss = st.session_state
RATIOS = tuple(HEAD_METRICS)
DEFAULT_METHODS = ("distance", "bucketing", "kmeans", "window")
MIN_SPARSITY = 0.5
PER_ROW = 3


def best_params(frame: pd.DataFrame | None) -> dict[str, str]:
    """Each method's best configuration (mean recall over heads) at mean sparsity ≥ 0.5."""
    if frame is None or frame.empty:
        return {}
    best = best_recall_at(frame, MIN_SPARSITY)
    return {m: p for m, p in zip(best["method"], best["params"], strict=True) if isinstance(p, str)}


def params_widget_key(method: str) -> str:
    return f"compare_params_{method}"


def main() -> None:
    name, spec = state.page("Compare methods",
                            "The same head under several methods: each method's predicted graph against the gold "
                            "graph on one sentence (TP blue, FP orange, FN pink), and its numbers here and over "
                            "the sweep corpus.")
    text = state.graph_text_input()
    if not text:
        st.warning("Enter a sentence to compare the methods on.")
        return
    with st.spinner(f"Loading model {name}…", show_time=True):
        outcome = cache.get_model(name)
    if outcome.model is None:
        st.error(f"Could not load model **{name}**: {outcome.error}\n\nChoose another registered model.")
        return
    version, alpha, key = cache.model_version(spec), cache.alpha_key(spec.alpha), text_hash([text])
    try:
        result = cache.analyse(name, version, alpha, key, (text,))
    except Exception as e:
        st.error(f"Analysis failed: {type(e).__name__}: {e}")
        return

    col_layer, col_head = st.columns(2)
    with col_layer:
        layer = state.persistent_widget(st.selectbox, state.LAYER, "Layer", options=range(result.num_layers))
    with col_head:
        head = state.persistent_widget(st.selectbox, state.HEAD, "Head", options=range(result.num_heads))

    frame = cache.sweep_table(state.active_result(name))
    if frame is None:
        st.info(f"The active results ({state.active_result(name).label}) have no sweep table: configurations "
                "come from each method's grid, and there are no corpus numbers.")
    best = best_params(frame)
    if not isinstance(ss.get(state.METHODS), list):
        ss[state.METHODS] = [m for m in DEFAULT_METHODS if m in REGISTRY]
    wkey = f"_w_{state.METHODS}"
    if wkey not in ss:  # seeded from the view value (the widget's state is dropped on other pages)
        ss[wkey] = [m for m in ss[state.METHODS] if m in REGISTRY]
    methods = st.multiselect(
        "Methods", options=list(REGISTRY), key=wkey,
        help="Registered methods; each starts at its best configuration at sparsity ≥ 0.5 in the sweep.",
    )
    ss[state.METHODS] = list(methods)
    if not methods:
        st.info("Choose one or more methods.")
        return

    result = state.active_result(name)
    chosen: dict[str, str] = {}
    cols = st.columns(min(len(methods), 4))
    for i, method in enumerate(methods):
        options = rs.params_options(method, frame)
        view = params_widget_key(method)
        if view not in ss:
            ss[view] = best.get(method) or rs.default_params(method, options)
        with cols[i % len(cols)]:
            chosen[method] = state.persistent_widget(
                st.selectbox, view, f"{method} configuration", options=options,
                format_func=lambda p, m=method: f"{p} (best @ ≥{MIN_SPARSITY:g})" if best.get(m) == p else p,
            )

    rows = []
    for start in range(0, len(methods), PER_ROW):
        row_cols = st.columns(PER_ROW)
        for col, method in zip(row_cols, methods[start:start + PER_ROW], strict=False):
            params = chosen[method]
            with col:
                reason = cache.artifacts(name, result).unsupported(method)
                if reason is not None:
                    st.info(f"**{method}**: {reason}.")
                    rows.append({"method": method, "params": params})
                    continue
                try:
                    hp = cache.head_prediction(name, version, alpha, key, layer, head, method, params, text,
                                              result.key, result)
                except Exception as e:
                    st.error(f"{method}: {type(e).__name__}: {e}")
                    rows.append({"method": method, "params": params})
                    continue
                m = hp.metrics
                title = f"{method} {params}<br>recall {m['recall']:.3f} · sparsity {m['sparsity']:.3f}"
                height = min(380 + 12 * len(hp.tokens), 900)
                fig = outcome_heatmap(hp.gold, hp.pred, hp.tokens, title, height=height, allowed=hp.allowed)
                fig.update_layout(title_font_size=13, xaxis_title=None, margin=dict(l=10, r=10, t=150, b=10))
                st.plotly_chart(fig, key=f"compare_heatmap_{method}")
                state.download_figure(fig, f"compare-{name}-L{layer}H{head}-{method}", key=f"compare_html_{method}")
                rows.append({"method": method, "params": params, **{m: hp.metrics[m] for m in RATIOS}})

    table = pd.DataFrame(rows, columns=["method", "params", *RATIOS])
    if frame is not None:
        sel = frame[(frame["layer"] == layer) & (frame["head"] == head)]
        stored = [c for c in RATIOS if c in sel.columns]  # a sweep has no output error (no values stored)
        corpus = sel.set_index(["method", "params"])[stored]
        corpus.columns = [f"corpus {c}" for c in stored]
        table = table.join(corpus, on=["method", "params"])
    st.subheader(f"Layer {layer}, head {head}")
    st.caption("Columns without a prefix are this sentence; `corpus …` are the sweep's means for this head.")
    st.dataframe(
        table, hide_index=True, key="compare_table",
        column_config={c: st.column_config.NumberColumn(c, format="%.4f") for c in table.columns[2:]},
    )
    st.download_button(
        "Download the table (CSV)", table.to_csv(index=False).encode("utf-8"),
        file_name=f"compare-{name}-L{layer}H{head}.csv", mime="text/csv", icon=":material/download:",
    )


main()
