"""Clusters & POS: which part-of-speech tags each k-means cluster of a head gathers, and what its gold edges span."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import streamlit as st

from app import cache, state
from sparsefinder.evaluation import interpret as itp
from sparsefinder.evaluation.analysis import split_texts, text_hash
from sparsefinder.plots.clusters import cluster_pos_heatmap, distance_figure, head_grid_heatmap, pca_scatter
from sparsefinder.results import Result

ss = st.session_state
SCOPE = "clusters_scope"
N_CLUSTERS = "clusters_n"
VALUES = "clusters_values"
COLOUR = "clusters_colour"
BUDGET = "clusters_budget"
SCOPES = ("corpus", "current text")
VALUE_MODES = ("counts", "proportions")
COLOURS = ("cluster", "pos")
BUDGETS = (0.5, 0.7, 0.8, 0.9)
#: Sentences of the active corpus drawn in the 2-D view (each needs a model run or a store read).
SCATTER_SENTENCES = 8
DEFAULT_CLUSTERS = 8


def _fingerprint(path: Path) -> str:
    """Names, sizes and mtimes of a directory's files: the cache key of what was computed from it."""
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else "missing"


@st.cache_data(show_spinner=False, max_entries=8)
def load_tables(path: str, version: str) -> itp.InterpretTables:
    return itp.InterpretTables.load(path)


@st.cache_data(show_spinner=False, max_entries=4)
def compute_store_tables(model_name: str, store: str, version: str, artifacts: str, out: str,
                         _result: Result) -> itp.InterpretTables:
    """Tables of a saved result's corpus (spaCy tags), written beside it so later sessions just read them."""
    from sparsefinder.corpora.store import ExtractionStore

    found = cache.artifacts(model_name, _result)
    tables = itp.interpret_store(ExtractionStore.open(store), found.projections, found.fitted)
    tables.save(out)
    return tables


@st.cache_data(show_spinner=False, max_entries=32)
def text_tables(model_name: str, version: str, alpha: str, texts_hash: str, artifacts: str,
                _texts: tuple[str, ...], _result: Result) -> itp.InterpretTables:
    """Tables of the current text alone (every fitted cluster count)."""
    sentences, tags = text_sentences(model_name, version, alpha, texts_hash, _texts)
    found = cache.artifacts(model_name, _result)
    return itp.interpret(sentences, tags, found.projections, itp.kmeans_centroids(found.fitted))


def text_sentences(model_name: str, version: str, alpha: str, texts_hash: str, texts: tuple[str, ...]):
    ex = cache.extraction(model_name, version, alpha, texts_hash, texts)
    sentences = itp.extraction_sentences(ex)
    return sentences, text_tags(texts_hash, texts, ex)


@st.cache_data(show_spinner=False, max_entries=64)
def _annotate(texts_hash: str, _texts: tuple[str, ...]):
    from sparsefinder.corpora.annotate import annotate

    return annotate(list(_texts))


def text_tags(texts_hash: str, texts: tuple[str, ...], ex) -> list[list[str]]:
    return itp.token_tags(itp.extraction_sentences(ex), _annotate(texts_hash, texts))


def corpus_sample(name: str, result: Result) -> tuple[list, list[list[str]]]:
    """The first :data:`SCATTER_SENTENCES` sentences of the active corpus, with their tags."""
    if result.store is not None:
        from sparsefinder.corpora.store import ExtractionStore

        store = ExtractionStore.open(result.store)
        sentences = [store.sentence(i) for i in range(min(SCATTER_SENTENCES, len(store)))]
        texts = tuple(s.text for s in sentences)
        return sentences, itp.token_tags(sentences, _annotate(text_hash(texts), texts))
    texts = tuple(_default_sample())
    spec = state.registry()[name]
    sentences, tags = text_sentences(name, cache.model_version(spec), cache.alpha_key(spec.alpha),
                                     text_hash(texts), texts)
    return sentences, tags


@st.cache_data(show_spinner=False, max_entries=1)
def _default_sample() -> list[str]:
    from sparsefinder.corpora.readers import default_corpus

    return default_corpus(split="validation").texts()[:SCATTER_SENTENCES]


def view_select(label: str, view_key: str, options: list) -> object:
    """A select bound to the shared view value ``ss[view_key]`` (layer, head: mirrored in the URL).

    The page's own widget key: a widget of another page under the shared key
    has another identity, and Streamlit would reset it to its first option.
    """
    wkey = f"_clusters_{view_key}"
    if ss.get(view_key) not in options:
        ss[view_key] = options[0]
    ss[wkey] = ss[view_key]  # callbacks run before the script, so a user's choice is already in the view

    def sync() -> None:
        ss[view_key] = ss[wkey]

    return st.selectbox(label, options, key=wkey, on_change=sync)


def download(frame: pd.DataFrame, label: str, file_name: str, index: bool = False) -> None:
    st.download_button(f"Download {label} (CSV)", frame.to_csv(index=index).encode("utf-8"), file_name=file_name,
                       mime="text/csv", icon=":material/download:", key=f"dl_{file_name}")


def corpus_tables(name: str, result: Result) -> itp.InterpretTables | None:
    """The active corpus's tables: the shipped artifact, or a saved result's (computed on request)."""
    if result.is_default:
        path = state.registry()[name].artifact("interpret")
        if path is None or not path.is_dir():
            st.info(f"Model **{name}** ships no interpretation tables. Make them with `sparsefinder interpret "
                    "--store DIR --projections DIR --fitted DIR --out DIR` and register them in data/models.json "
                    "as the `interpret` artifact.")
            return None
        return load_tables(str(path), _fingerprint(path))
    out = Path(result.store).parent / "interpret"
    if (out / itp.MANIFEST_FILE).is_file():
        return load_tables(str(out), _fingerprint(out))
    st.info(f"The corpus of **{result.name}** has no interpretation tables yet. Computing them tags every "
            "sentence with spaCy and assigns every token of every head to its clusters (about a minute for "
            "500 sentences).")
    if not st.button("Compute the tables for this corpus", icon=":material/calculate:", key="clusters_compute"):
        return None
    with st.spinner("Tagging and clustering the corpus…", show_time=True):
        return compute_store_tables(name, str(result.store), _fingerprint(Path(result.store)), result.key,
                                    str(out), result)


def head_views(tables: itp.InterpretTables, layer: int, head: int, n_clusters: int, where: str, tag: str) -> None:
    """Heatmaps, cluster table and distance histogram of one head."""
    values = state.persistent_widget(st.radio, VALUES, "Heatmap values", options=VALUE_MODES, horizontal=True)
    normalise = values == "proportions"
    for side in itp.SIDES:
        m = itp.cluster_pos_matrix(tables, layer, head, n_clusters, side, normalise=normalise)
        with st.container(key=f"clusters_heatmap_{side}"):
            title = f"{side.capitalize()} clusters × POS ({values}), layer {layer} head {head}, {where}"
            st.plotly_chart(cluster_pos_heatmap(m, title, proportions=normalise), key=f"heatmap_{side}")
            download(m, f"{side} cluster × POS {values}", f"clusters-{tag}-L{layer}H{head}-C{n_clusters}-{side}-"
                     f"{values}.csv", index=True)
    recall = itp.head_cluster_recall(tables, layer, head, n_clusters)
    st.subheader("Clusters")
    st.caption(f"Cluster recall of the head: **{recall:.4f}** of its gold edges join a query and a key of the "
               "same cluster. Purity: share of the most frequent tag; entropy in bits.")
    table = itp.cluster_table(tables, layer, head, n_clusters)
    fmt = {c: st.column_config.NumberColumn(c, format="%.3f") for c in table.columns
           if c.endswith(("purity", "entropy", "recall"))}
    with st.container(key="clusters_table"):
        st.dataframe(table, hide_index=True, column_config=fmt, key="cluster_table_df")
    download(table, "the cluster table", f"clusters-{tag}-L{layer}H{head}-C{n_clusters}-table.csv")
    hist = itp.distance_histogram(tables, layer, head)
    st.plotly_chart(distance_figure(hist, f"Relative distance of gold edges, layer {layer} head {head}, {where}"),
                    key="distance_chart")
    download(hist, "the distance histogram", f"clusters-{tag}-L{layer}H{head}-distances.csv")
    pairs = itp.top_pos_pairs(tables, layer, head, k=10)
    st.markdown("**POS pairs carrying most gold edges** (query tag → key tag)")
    st.dataframe(pairs, hide_index=True, key="pos_pairs_df",
                 column_config={"share": st.column_config.NumberColumn("share", format="%.3f")})
    download(pairs, "the POS pairs", f"clusters-{tag}-L{layer}H{head}-pos-pairs.csv")


def scatter(name: str, result: Result, scope: str, texts: tuple[str, ...], layer: int, head: int,
            n_clusters: int, centroids: dict) -> None:
    st.subheader("Projected queries and keys (PCA)")
    colour = state.persistent_widget(st.radio, COLOUR, "Colour by", options=COLOURS, horizontal=True)
    spec = state.registry()[name]
    if scope == "corpus":
        sentences, tags = corpus_sample(name, result)
        where = f"first {len(sentences)} sentences of the corpus"
    else:
        sentences, tags = text_sentences(name, cache.model_version(spec), cache.alpha_key(spec.alpha),
                                         text_hash(texts), texts)
        where = "current text"
    projections = cache.artifacts(name, result).projections
    pts, centres = itp.head_points(sentences, tags, projections, layer, head, centroids[n_clusters][layer])
    st.caption(f"PCA of the r = {projections.rank} projections of the {where}: queries ○, keys ×, centroids ◆.")
    st.plotly_chart(pca_scatter(pts, centres, colour, f"Layer {layer}, head {head}, {n_clusters} clusters"),
                    key="pca_chart")
    download(pts, "the 2-D points", f"clusters-L{layer}H{head}-C{n_clusters}-points.csv")


def summary_views(name: str, tables: itp.InterpretTables, n_clusters: int, where: str, tag: str) -> None:
    st.subheader("All heads")
    if BUDGET not in ss:
        ss[BUDGET] = 0.9
    budget = state.persistent_widget(st.select_slider, BUDGET, "Sparsity budget of the predictability ranking",
                                     options=BUDGETS)
    sweep = cache.sweep_table(state.active_result(name))
    summary = itp.head_summary(tables, n_clusters, sweep=sweep, min_sparsity=budget)
    cols = st.columns(2)
    with cols[0]:
        st.plotly_chart(head_grid_heatmap(itp.head_grid(summary, "share_within_1"),
                                          f"Share of gold edges with |j − i| ≤ 1 ({where})", "share"),
                        key="grid_near")
    with cols[1]:
        st.plotly_chart(head_grid_heatmap(itp.head_grid(summary, "query_pos_info"),
                                          f"POS information of the query clusters, C = {n_clusters}",
                                          "I(C;POS)/H(POS)", zmax=max(0.05, float(summary["query_pos_info"].max()))),
                        key="grid_pos")
    if "best_recall" in summary.columns:
        summary = summary.sort_values(["best_recall", "layer", "head"], ascending=[False, True, True],
                                      na_position="last")
        st.caption(f"Heads ranked by predictability: the best recall of any swept configuration with sparsity "
                   f"≥ {budget:g} on that head.")
    else:
        st.caption("The active result has no sweep table, so heads are not ranked by predictability.")
    with st.container(key="clusters_summary"):
        st.dataframe(summary, hide_index=True, key="summary_df",
                     column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in summary.columns
                                    if summary[c].dtype.kind == "f"})
    download(summary, "the head summary", f"clusters-{tag}-C{n_clusters}-heads.csv")
    pairs = itp.top_pos_pairs(tables, k=15)
    st.markdown(f"**POS pairs carrying most gold edges over all heads** ({where})")
    st.dataframe(pairs, hide_index=True, key="all_pairs_df",
                 column_config={"share": st.column_config.NumberColumn("share", format="%.3f")})
    download(pairs, "the POS pairs of all heads", f"clusters-{tag}-pos-pairs.csv")


def main() -> None:
    name = ss[state.MODEL]
    st.title("Clusters & POS")
    st.caption("For a head's fitted k-means centroids (in the learned projected space): the part-of-speech tags "
               "(spaCy, aligned to subword tokens; special tokens are SPECIAL) of the queries and keys each "
               "cluster gathers, and where the head's gold edges go.")
    result = state.active_result(name)
    fitted = cache.artifacts(name, result).fitted
    centroids = itp.kmeans_centroids(fitted) if fitted is not None else {}
    if not centroids or result.projections is None:
        st.info(f"The active results ({result.label}) have no fitted k-means centroids or projections: run "
                "`sparsefinder sweep --projections DIR --fit-store DIR --save-fitted DIR` first.")
        return
    outcome = cache.get_model(name)
    if outcome.model is None:
        st.error(f"Could not load model **{name}**: {outcome.error}")
        return
    scope = state.persistent_widget(st.radio, SCOPE, "Statistics over", options=SCOPES, horizontal=True,
                                    help="The active corpus (computed once and cached) or the current text alone.")
    cs = sorted(centroids)
    if ss.get(N_CLUSTERS) not in cs:
        ss[N_CLUSTERS] = DEFAULT_CLUSTERS if DEFAULT_CLUSTERS in cs else cs[0]
    cols = st.columns(3)
    with cols[0]:
        n_clusters = state.persistent_widget(st.selectbox, N_CLUSTERS, "Clusters (k-means C)", options=cs)
    layers = sorted(next(iter(centroids.values())))
    heads = list(range(outcome.model.num_heads))
    with cols[1]:
        layer = view_select("Layer", state.LAYER, layers)
    with cols[2]:
        head = view_select("Head", state.HEAD, heads)

    texts: tuple[str, ...] = ()
    if scope == "corpus":
        tables = corpus_tables(name, result)
        if tables is None:
            return
        where, tag = ("default validation split" if result.is_default else f"corpus {result.name}"), "corpus"
        st.caption(f"{tables.info.get('sentences', '?')} sentences, {tables.info.get('tokens', '?')} tokens "
                   f"({result.label}).")
    else:
        text = state.graph_text_input("Text (one or several sentences)")
        texts = tuple(split_texts(text))[: state.MAX_TEXTS]
        if not texts:
            st.warning("Enter a sentence.")
            return
        spec = state.registry()[name]
        with st.spinner("Tagging and clustering the text…"):
            tables = text_tables(name, cache.model_version(spec), cache.alpha_key(spec.alpha),
                                 text_hash(texts), result.key, texts, result)
        where, tag = "current text", "text"
    if n_clusters not in tables.n_clusters:
        st.warning(f"These tables have no {n_clusters}-cluster results (available: {tables.n_clusters}).")
        return
    head_views(tables, layer, head, n_clusters, where, tag)
    scatter(name, result, scope, texts, layer, head, n_clusters, centroids)
    summary_views(name, tables, n_clusters, where, tag)


try:
    main()
except Exception as e:  # shown in the page; the app keeps serving
    st.error(f"The Clusters & POS page failed: {type(e).__name__}: {e}")
