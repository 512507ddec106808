"""sparsefinder dashboard: ``streamlit run app/streamlit_app.py``.

The entrypoint runs on every rerun of every page: it sets up the view state
(from the URL on a session's first run), draws the model select in the sidebar,
runs the selected page, and mirrors the view back into the URL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch is first imported (by app.state below): torch's OpenMP threads then sleep at once when they
# wait, instead of spinning. A server on a few cores shares them with other sessions' runs, Chromium and
# other processes; a spinning thread keeps a core from the very thread it waits for, and a 40-token forward
# of the default model took 360-600 ms instead of 16-19 ms (bench/ui_latency.py, 2 busy cores). Only the
# waiting changes, not the work split between threads, so the numbers are the same. `sparsefinder serve`
# sets it too; a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `from app import state` in the pages
    sys.path.insert(0, str(ROOT))

from app import state  # noqa: E402

# A local file: a material-icon or emoji page_icon makes every page load fetch it from a font host.
FAVICON = Path(__file__).resolve().parent / "favicon.png"
st.set_page_config(page_title="sparsefinder", page_icon=str(FAVICON), layout="wide")

# Every run's work sits inside error boundaries (state.error_boundary): a visitor sees a short
# message, the traceback goes to the server log, and .streamlit/config.toml hides Streamlit's own.
with state.error_boundary("sidebar"):
    state.init_view_state()
    state.model_sidebar()
    try:
        state.method_sidebar(st.session_state[state.MODEL])
    except Exception as e:  # a broken artifact must not take every page down
        state.LOG.exception("could not read the results or methods")
        st.sidebar.error(f"Could not read the results or methods: {state.error_message(e)}")

# Sections and pages. The page scripts live in app/views/, not app/pages/: Streamlit
# treats a `pages/` folder beside the entrypoint as a legacy multipage app until
# st.navigation first runs, so on a fresh server a deep link such as /about ran
# the page file alone, without this entrypoint (no sidebar, no view state), and
# AppTest reruns did the same.
PAGES = {
    "Graphs": [
        st.Page("views/explore.py", title="Explore", icon=":material/grid_on:", url_path="explore", default=True),
        st.Page("views/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
        st.Page("views/models.py", title="Compare models", icon=":material/difference:", url_path="models"),
        st.Page("views/pareto.py", title="Pareto", icon=":material/scatter_plot:", url_path="pareto"),
        st.Page("views/clusters.py", title="Clusters & POS", icon=":material/bubble_chart:", url_path="clusters"),
    ],
    "Corpora": [
        st.Page("views/corpus.py", title="Corpus", icon=":material/upload_file:", url_path="corpus"),
    ],
    "Project": [
        st.Page("views/about.py", title="About", icon=":material/info:", url_path="about"),
    ],
}

page = st.navigation(PAGES)
with state.error_boundary("page"):
    page.run()
    state.sync_query_params()
