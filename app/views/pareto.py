"""Pareto: recall against sparsity per method from the model's shipped sweep, and one configuration on a sentence."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import cache, state
from sparsefinder.evaluation.analysis import text_hash
from sparsefinder.evaluation.pareto import best_recall_table, pareto_front
from sparsefinder.metrics import HEAD_METRICS
from sparsefinder.plots.heatmaps import outcome_heatmap, pareto_figure
from sparsefinder.predictors import REGISTRY

ss = st.session_state
FRONT_COLUMNS = ["method", "params", "sparsity", "recall", "mass_recall", "precision", "exact"]
THRESHOLDS = (0.5, 0.7, 0.9)
MEASURES = {"gold edges": "recall", "gold probability mass": "mass_recall"}
_LAST_CLICK = "_pareto_last_click"


def config_label(config: str) -> str:
    method, params = config.split("|", 1)
    return f"{method} {params}"


def clicked_config(event, fig) -> str | None:
    """``method|params`` of the first point selected in the chart, or None."""
    try:
        points = event.selection.points  # type: ignore[union-attr]
    except AttributeError:
        try:
            points = event["selection"]["points"]
        except (KeyError, TypeError):
            return None
    for p in points or []:
        curve = p.get("curve_number")
        index = p.get("point_index", p.get("point_number"))
        if curve is None or index is None or curve >= len(fig.data):
            continue
        trace = fig.data[curve]
        if trace.customdata is None or trace.legendgroup is None:
            continue
        return f"{trace.legendgroup}|{trace.customdata[index][0]}"
    return None


def head_selectors(layers: list[int] | None, heads: list[int] | None) -> tuple[int | None, int | None]:
    """Layer and/or head selects (bound to the URL's layer and head); None for the one not drawn."""
    cols = st.columns(2)
    layer = head = None
    if layers is not None:
        with cols[0]:
            layer = state.persistent_widget(st.selectbox, state.LAYER, "Layer", options=layers)
    if heads is not None:
        with cols[1]:
            head = state.persistent_widget(st.selectbox, state.HEAD, "Head", options=heads)
    return layer, head


def show_prediction(name: str, config: str, layer: int, head: int, frame: pd.DataFrame) -> None:
    method, params = config.split("|", 1)
    result = state.active_result(name)
    reason = cache.artifacts(name, result).unsupported(method)
    if reason is not None:
        st.info(f"Cannot draw **{method}** on a new sentence: {reason}.")
        return
    text = state.graph_text_input()
    if not text:
        st.warning("Enter a sentence.")
        return
    spec = state.registry()[name]
    outcome = cache.get_model(name)
    if outcome.model is None:
        st.error(f"Could not load model **{name}**: {outcome.error}")
        return
    try:
        with st.spinner(f"Predicting {method} on layer {layer}, head {head}…"):
            hp = cache.head_prediction(
                name, cache.model_version(spec), cache.alpha_key(spec.alpha), text_hash([text]),
                layer, head, method, params, text, result.key, result,
            )
    except Exception as e:  # shown in the page; the app keeps serving
        st.error(f"Prediction failed: {type(e).__name__}: {e}")
        return
    if hp.truncated:
        st.warning(f"The sentence was truncated to the model's first {len(hp.tokens)} tokens.")
    with st.container(key="pareto_metrics"):
        state.head_metrics({m: hp.metrics[m] for m in HEAD_METRICS})
    corpus = frame[(frame["method"] == method) & (frame["params"] == params)
                   & (frame["layer"] == layer) & (frame["head"] == head)]
    if len(corpus):
        row = corpus.iloc[0]
        st.caption(
            f"Over the sweep corpus, layer {layer} head {head}: recall {row['recall']:.4f}, "
            f"mass recall {row.get('mass_recall', float('nan')):.4f}, precision {row['precision']:.4f}, "
            f"sparsity {row['sparsity']:.4f}, exact {row['exact']:.4f}."
        )
    title = f"{method} {params}, layer {layer}, head {head}: predicted vs gold"
    heat = outcome_heatmap(hp.gold, hp.pred, hp.tokens, title, allowed=hp.allowed)
    st.plotly_chart(heat, key="pareto_heatmap")
    state.download_figure(heat, f"pareto-{name}-L{layer}H{head}-{method}", key="pareto_heatmap_html")


CURVE_METRICS = ("cos_mean", "cos_min", "retrieval", "mlm_loss", "mlm_accuracy", "recall", "exact")
CURVE_X = ("sparsity", "model_sparsity")


def show_curves(name: str) -> None:
    """Sparsity–accuracy at test time: the end task of the model run on predicted graphs (docs/method.md §5)."""
    from sparsefinder.plots.curves import METRIC_LABELS, sparsity_accuracy_figure

    st.subheader("Sparsity–accuracy at test time")
    st.caption(
        "The model run with every attention's entmax restricted to a method's predicted graph, in all layers "
        "or only the later half, the approximated activations flowing on; the end task against the sparsity. "
        "Made by `sparsefinder curves`."
    )
    try:
        curves = cache.curves_table(state.active_result(name))
    except Exception as e:  # a corrupt table is reported, the rest of the page stays
        st.error(f"Could not read the curves table: {type(e).__name__}: {e}")
        return
    if curves is None or curves.empty:
        st.info(f"The active results ({state.active_result(name).label}) have no sparsity–accuracy curves: "
                "run `sparsefinder curves` for them.")
        return
    metrics = [m for m in CURVE_METRICS if m in curves and curves[m].notna().any()]
    subsets = [s for s in dict.fromkeys(curves["layers"]) if s != "none"]
    c1, c2, c3 = st.columns(3)
    metric = c1.selectbox("End task", metrics, format_func=lambda m: METRIC_LABELS.get(m, m), key="curves_metric")
    x = c2.selectbox("Sparsity of", CURVE_X, format_func=lambda m: METRIC_LABELS.get(m, m), key="curves_x")
    layers = c3.multiselect("Layers restricted", subsets, default=subsets, key="curves_layers")
    # The shipped table has over a dozen methods (paper, fixed masks, windows, learned predictors):
    # narrowing them lets two be compared without hunting through the legend.
    methods = [m for m in dict.fromkeys(curves["method"]) if m not in ("exact", "gold")]
    chosen = st.multiselect("Methods", methods, default=methods, key="curves_methods")
    if not layers or not chosen:
        st.info("Choose at least one layer subset and one method.")
        return
    fig = sparsity_accuracy_figure(curves, metric=metric, x=x, layers=layers, methods=chosen)
    fig.update_layout(width=None)
    st.plotly_chart(fig, key="curves_chart")
    table = curves[curves["layers"].isin([*layers, "none"]) & curves["method"].isin([*chosen, "exact", "gold"])]
    st.dataframe(table, hide_index=True, key="curves_table",
                 column_config={c: st.column_config.NumberColumn(c, format="%.4f")
                                for c in ("sparsity", "model_sparsity", *CURVE_METRICS) if c in table})
    c1, c2 = st.columns(2)
    with c1:
        st.download_button("Download the curves (CSV)", table.to_csv(index=False).encode("utf-8"),
                           file_name=f"curves-{name}.csv", mime="text/csv", icon=":material/download:",
                           key="curves_csv", on_click="ignore")
    with c2:
        state.download_figure(fig, f"curves-{name}-{metric}", key="curves_html")


def report_bytes(name: str) -> bytes:
    """The active result's study report, or a one-paragraph HTML page saying why it could not be made.

    Called by the download button when clicked (outside the page's run, so outside its error boundary):
    the error goes to the server log and the visitor gets a short file, never a traceback.
    """
    import html

    try:
        return cache.study_report(name, state.active_result(name))
    except Exception as e:
        state.LOG.exception("the study report failed")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Study report</title></head><body>"
                f"<p>The study report could not be made: {html.escape(state.error_message(e))}.</p></body></html>"
                ).encode()


def report_button(name: str) -> None:
    """One standalone offline HTML report of the active result (sparsefinder report), made only when clicked."""
    st.download_button(
        "Download study report", lambda: report_bytes(name), file_name=f"study-{name}.html", mime="text/html",
        icon=":material/summarize:", key="study_report", on_click="ignore",
        help="Provenance, gold sparsity, the Pareto fronts, the head ranking, clusters × POS and the "
             "sparsity–accuracy curves in one HTML file that opens offline, each with the command that "
             "reproduces it (as `sparsefinder report`).",
    )


def main() -> None:
    name = ss[state.MODEL]
    st.title("Pareto fronts")
    st.caption(
        "Recall against sparsity for every configuration in the active sweep (means over heads "
        "and sentences); large joined points are each method's Pareto front."
    )
    frame = cache.sweep_table(state.active_result(name))
    if frame is None or frame.empty:
        st.info(f"The active results ({state.active_result(name).label}) have no sweep table: run the sweep on "
                "the Corpus page or with `sparsefinder sweep`, or choose other results in the sidebar.")
        return

    resolution = state.persistent_widget(
        st.radio, state.RESOLUTION, "Resolution", options=state.RESOLUTIONS, horizontal=True
    )
    layers = sorted(int(v) for v in frame["layer"].unique())
    heads = sorted(int(v) for v in frame["head"].unique())
    selected_layer = selected_head = None
    if resolution == "overall":
        data, by, where = frame, ("method",), "all layers and heads"
    elif resolution == "per layer":
        selected_layer, _ = head_selectors(layers, None)
        data, by, where = frame[frame["layer"] == selected_layer], ("method", "layer"), f"layer {selected_layer}"
    else:
        selected_layer, selected_head = head_selectors(layers, heads)
        data = frame[(frame["layer"] == selected_layer) & (frame["head"] == selected_head)]
        by, where = ("method", "layer", "head"), f"layer {selected_layer}, head {selected_head}"

    measure = "recall"
    if "mass_recall" in data and data["mass_recall"].notna().any():  # tables from before mass recall have none
        label = st.radio("Recall of", options=list(MEASURES), horizontal=True, key="pareto_measure",
                         help="Gold edges found (recall), or the share of the gold attention probability on the "
                              "predicted pairs (mass recall, docs/method.md §2.2).")
        measure = MEASURES[label]
    front = pareto_front(data, by=by, y=measure)
    title = "Recall" if measure == "recall" else "Mass recall"
    fig = pareto_figure(front, y=measure, title=f"{title} against sparsity ({where})")
    fig.update_layout(width=None)
    event = st.plotly_chart(fig, key="pareto_chart", on_select="rerun", selection_mode="points")
    state.download_figure(fig, f"pareto-{name}-{resolution.replace(' ', '-')}", key="pareto_chart_html")
    with state.error_boundary("study report"):
        report_button(name)

    order = {m: i for i, m in enumerate(REGISTRY)}
    table = front[front["on_front"]][FRONT_COLUMNS]
    table = table.sort_values(["method", "sparsity"], key=lambda c: c.map(order) if c.name == "method" else c,
                              kind="stable").reset_index(drop=True)
    st.subheader("Frontier configurations")
    st.dataframe(
        table, hide_index=True, key="front_table",
        column_config={c: st.column_config.NumberColumn(c, format="%.4f") for c in FRONT_COLUMNS[2:]},
    )
    st.download_button(
        "Download the frontier (CSV)", table.to_csv(index=False).encode("utf-8"),
        file_name=f"pareto-{name}-{resolution.replace(' ', '-')}.csv", mime="text/csv", icon=":material/download:",
    )
    st.subheader(f"Best {title.lower()} at a minimum sparsity")
    best = best_recall_table(data, thresholds=THRESHOLDS, y=measure)
    st.dataframe(best, key="best_table",
                 column_config={c: st.column_config.NumberColumn(c, format="%.4f") for c in best.columns})

    st.subheader("One configuration on a sentence")
    options = [f"{m}|{p}" for m, p in zip(table["method"], table["params"], strict=True)]
    clicked = clicked_config(event, fig)
    if clicked is not None and clicked != ss.get(_LAST_CLICK):
        ss[_LAST_CLICK] = clicked
        if clicked not in options:
            options.append(clicked)
        ss[state.CONFIG] = clicked
        ss[f"_w_{state.CONFIG}"] = clicked
    elif ss.get(state.CONFIG) and ss[state.CONFIG] not in options and ss[state.CONFIG] == ss.get(_LAST_CLICK):
        options.append(ss[state.CONFIG])
    if not ss.get(state.CONFIG) and len(table):  # start at the best drawable recall at sparsity >= 0.5
        result = state.active_result(name)
        ok = {m: cache.artifacts(name, result).unsupported(m) is None for m in set(table["method"])}
        drawable = table[[ok[m] for m in table["method"]]]
        pool = drawable if len(drawable) else table
        dense = pool[pool["sparsity"] >= THRESHOLDS[0]]
        top = (dense if len(dense) else pool).sort_values("recall", ascending=False, kind="stable").iloc[0]
        ss[state.CONFIG] = f"{top['method']}|{top['params']}"
    st.caption("Click a point in the chart, or choose a frontier configuration here.")
    config = state.persistent_widget(
        st.selectbox, state.CONFIG, "Configuration", options=options, format_func=config_label
    )
    layer, head = head_selectors(None if selected_layer is not None else layers,
                                 None if selected_head is not None else heads)
    layer = selected_layer if selected_layer is not None else layer
    head = selected_head if selected_head is not None else head
    show_prediction(name, config, layer, head, frame)
    show_curves(name)


main()
