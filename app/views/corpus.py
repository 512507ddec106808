"""Corpus: upload sentences or use the default corpus; extract, train projections and sweep, saved under a name."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import cache, state
from sparsefinder import results as rs
from sparsefinder.corpora.readers import MAX_BYTES, MAX_UPLOAD_MIB, CorpusError, corpus_stats, default_corpus
from sparsefinder.corpora.upload import read_upload

ss = st.session_state
SOURCES = ("default corpus (validation split)", "upload a file")
PREVIEW = 10


@st.cache_data(show_spinner=False, max_entries=2)
def _default_corpus():
    corpus = default_corpus("validation")
    return corpus, corpus_stats(corpus)


def load_source():
    """The chosen corpus and its stats, or (None, None) after showing why there is none."""
    source = st.radio("Corpus", SOURCES, horizontal=True, key="corpus_source")
    if source == SOURCES[0]:
        try:
            with st.spinner("Loading the default corpus…"):
                return _default_corpus()
        except (CorpusError, OSError, ValueError) as e:
            st.error(f"Could not load the default corpus: {type(e).__name__}: {e}")
            return None, None
    st.caption(
        f"Plain text (one sentence per line), CSV/TSV with a header row, CoNLL-U, or Parquet with a text "
        f"column; UTF-8; at most "
        f"{MAX_UPLOAD_MIB} MiB. Extraction uses the first {state.MAX_EXTRACT_SENTENCES:,} sentences."
    )
    upload = st.file_uploader("Corpus file", type=["txt", "csv", "tsv", "conllu", "parquet"], key="corpus_upload",
                              max_upload_size=MAX_UPLOAD_MIB,
                              help=f"At most {MAX_UPLOAD_MIB} MiB ({MAX_BYTES:,} bytes), UTF-8.")
    column = "text"
    if upload is not None and upload.name.lower().endswith((".csv", ".tsv", ".parquet")):
        column = st.text_input("Text column", value="text", key="corpus_column").strip() or "text"
    if upload is None:
        st.info("Upload a file to see its sentences.")
        return None, None
    if upload.size > MAX_BYTES:
        st.error(f"{upload.name} is {upload.size:,} bytes, more than the limit of {MAX_BYTES:,} bytes.")
        return None, None
    parsed = read_upload(upload.getvalue(), upload.name, column)
    if parsed.error is not None:
        st.error(f"Could not read {parsed.error}")  # the error starts with the file's name
        return None, None
    return parsed.corpus, parsed.stats


def show_stats(corpus, stats) -> None:
    with st.container(key="corpus_stats"):
        cols = st.columns(4)
        cols[0].metric("Sentences", f"{stats['sentences']:,}")
        cols[1].metric("Words", f"{stats['words']:,}")
        cols[2].metric("Mean words", f"{stats['mean_words']:.1f}")
        cols[3].metric("Max words", f"{stats['max_words']:,}")
    if getattr(corpus, "source", None):
        st.caption(str(corpus.source))
    preview = pd.DataFrame({"sentence": [s.text for s in corpus.sentences[:PREVIEW]]})
    st.dataframe(preview, hide_index=True, key="corpus_preview")


def run_extract(name: str, corpus, out) -> None:
    outcome = cache.get_model(name)
    if outcome.model is None:
        st.error(f"Could not load model **{name}**: {outcome.error}")
        return
    texts = corpus.texts()[: state.MAX_EXTRACT_SENTENCES]
    engine = rs.ray_engine()
    where = "" if engine is None else f" on the Ray cluster at {engine[0]} ({engine[1]} workers)"
    bar = st.progress(0.0, text=f"Extracting {len(texts):,} sentences{where}…")

    def report(done: int, total: int | None) -> None:
        total = total or len(texts)
        bar.progress(min(1.0, done / total), text=f"Extracted {done:,} of {total:,} sentences")

    store = rs.extract_result(outcome.model, texts, out, corpus_name=str(corpus.name), callback=report)
    bar.progress(1.0, text=f"Extracted {len(texts):,} sentences{where}")
    st.success(f"Saved the store to `{store}`.")


def run_projections(out) -> None:
    with st.status("Training projections…", expanded=True) as status:
        path = rs.train_result_projections(out, log=st.write)
        status.update(label=f"Projections saved to {path}", state="complete")


def run_sweep_ui(out) -> None:
    with st.status("Sweeping…", expanded=True) as status:
        frame = rs.sweep_result(out, log=st.write)
        status.update(label=f"Sweep of {len(frame):,} rows saved to {out / 'sweep.parquet'}", state="complete")


def show_saved(name: str) -> None:
    st.subheader("Saved results")
    st.caption(f"Under `{rs.default_runs_dir() / name}`.")
    results = rs.saved_results(name)
    if not results:
        st.info("No saved results for this model yet.")
        return
    st.dataframe(pd.DataFrame(results), hide_index=True, key="corpus_saved")
    st.caption("Choose a saved result in the sidebar's **Results** select to use its corpus, projections, "
               "fitted predictors and sweep on the other pages (the link keeps it: `?result=<name>`).")


def main() -> None:
    name = ss[state.MODEL]
    st.title("Corpus")
    st.caption("Read a corpus, then extract its attention graphs with the selected model, train projections "
               "and run the sweep; results are saved on disk under a name.")
    corpus, stats = load_source()
    if corpus is not None:
        show_stats(corpus, stats)
        if stats["sentences"] > state.MAX_EXTRACT_SENTENCES:
            st.warning(f"Only the first {state.MAX_EXTRACT_SENTENCES:,} of {stats['sentences']:,} sentences "
                       "are extracted.")

    st.subheader("Run")
    result = st.text_input("Result name", value="my-corpus", max_chars=64, key="corpus_result",
                           help="Letters, digits, '-' and '_' only.").strip()
    err = rs.result_name_error(result)
    if err is not None:
        st.error(err)
    cols = st.columns(3)
    extract = cols[0].button("Extract", key="corpus_extract", disabled=err is not None or corpus is None)
    train = cols[1].button("Train projections", key="corpus_train", disabled=err is not None)
    sweep = cols[2].button("Sweep", key="corpus_sweep", disabled=err is not None)
    if err is None and (extract or train or sweep):
        out = rs.result_dir(name, result)
        try:
            if extract:
                run_extract(name, corpus, out)
            elif not (out / "store" / "manifest.json").is_file():
                st.error(f"No store named **{result}** for {name}: run Extract first.")
            elif train:
                run_projections(out)
            else:
                run_sweep_ui(out)
        except Exception as e:  # shown in the page; the app keeps serving
            st.error(f"Failed: {type(e).__name__}: {e}")
    show_saved(name)


main()
