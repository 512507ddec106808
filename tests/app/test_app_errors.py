"""Bad input and unexpected errors in the dashboard: a short message on the page, the traceback in the
server log only, Streamlit's own control flow untouched; the hyperparameter menu and the upload limit."""

from __future__ import annotations

import json
import logging
import tomllib

import pytest

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app.test_app import (  # noqa: E402
    ROOT,
    analyse,
    corpus_page,
    default_load_error,  # noqa: F401 (fixture)
    lib,  # noqa: F401 (fixture)
    make_app,
    table,
    texts_of,
    upload,
)

LONG = ("word " * 220000).strip()  # one line of 1,099,999 characters


def no_traceback(at: AppTest) -> None:
    assert not at.exception, at.exception
    shown = texts_of(at.error) + texts_of(at.warning) + texts_of(at.markdown)
    assert "Traceback" not in shown and 'File "' not in shown and str(ROOT) not in shown


# -- 1. the error boundary and the longest text -------------------------------------------
def test_config_hides_streamlit_error_details_and_caps_uploads():
    from sparsefinder.corpora.readers import MAX_BYTES, MAX_UPLOAD_MIB

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["client"]["showErrorDetails"] == "none"
    assert config["server"]["maxUploadSize"] == MAX_UPLOAD_MIB == 20
    assert MAX_BYTES == 20 * 1024 * 1024


@pytest.mark.filterwarnings("ignore::sparsefinder.model.entmax_model.TruncationWarning")
def test_text_over_the_limit_is_cut_with_a_warning_not_a_traceback(lib):  # noqa: F811
    from sparsefinder.evaluation.analysis import MAX_TEXT_CHARS

    at = make_app(lib.name)
    area = at.text_area(key="_w_text")
    assert area.max_chars == MAX_TEXT_CHARS == 100_000
    area.input(LONG)  # typing or pasting it is refused, as the browser's maxlength refuses it
    assert area.value != LONG
    # A client that sends it anyway: Streamlit cuts a text area's value at max_chars on the server,
    # and the page says so. "lines" keeps spaCy out of this test (one line, one item).
    at.radio(key="_w_split").set_value("lines")
    area.set_value(LONG)
    next(b for b in at.button if b.label == "Analyse").click().run()
    no_traceback(at)
    assert not at.error, [e.value for e in at.error]
    warned = texts_of(at.warning)
    assert f"limit of {MAX_TEXT_CHARS:,} characters" in warned and "cut" in warned
    # the page keeps working afterwards, without the warning
    analyse(at, "Colorless green ideas sleep furiously.")
    assert not at.error and table(at).shape == (lib.num_layers, lib.num_heads)
    assert "characters" not in texts_of(at.warning)


def test_split_texts_refuses_only_beyond_the_limit():
    from sparsefinder.corpora.corpus import CorpusError
    from sparsefinder.evaluation.analysis import MAX_TEXT_CHARS, split_texts

    at_limit = ("ab\n" * (MAX_TEXT_CHARS // 3)).ljust(MAX_TEXT_CHARS, "c")
    assert len(at_limit) == MAX_TEXT_CHARS
    assert len(split_texts(at_limit, "lines")) == MAX_TEXT_CHARS // 3 + 1  # the last line is "c"
    with pytest.raises(CorpusError, match=r"100,001 characters, more than the limit of 100,000"):
        split_texts(at_limit + "d", "lines")
    with pytest.raises(CorpusError, match="1,099,999 characters"):
        split_texts(LONG)


def test_unexpected_page_error_is_a_short_message_and_logged(lib, monkeypatch, caplog):  # noqa: F811
    from sparsefinder.evaluation import analysis

    secret = str(ROOT / "sparsefinder" / "secret.py")

    def broken(text, mode="sentences"):
        raise RuntimeError(f"boom in {secret}\nsecond line of the message")

    at = make_app(lib.name)
    monkeypatch.setattr(analysis, "split_texts", broken)
    with caplog.at_level(logging.ERROR, logger="sparsefinder.app"):
        analyse(at, "Another sentence.")
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "RuntimeError: boom" in errors[0] and "server log" in errors[0]
    assert "second line" not in errors[0] and "Traceback" not in errors[0]
    logged = [r for r in caplog.records if r.name == "sparsefinder.app"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert logged[0].exc_info[0] is RuntimeError and "second line" in str(logged[0].exc_info[1])
    # the sidebar (outside the page's boundary) is still drawn and the next run works
    assert at.selectbox(key="_w_model").value == lib.name
    monkeypatch.undo()
    analyse(at, "Another sentence.")
    assert not at.error


def test_fragment_error_is_caught_inside_the_fragment(lib, monkeypatch, caplog):  # noqa: F811
    from sparsefinder.plots import heatmaps

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(heatmaps, "attention_heatmap", broken)
    with caplog.at_level(logging.ERROR, logger="sparsefinder.app"):
        at = make_app(lib.name)
        no_traceback(at)
        assert any("ValueError: cannot draw" in e.value for e in at.error)
        # the rest of the page, outside the fragment, is drawn
        assert table(at).shape == (lib.num_layers, lib.num_heads)
        at.selectbox(key="_w_head").select(3).run()  # a fragment rerun
        no_traceback(at)
        assert any("ValueError: cannot draw" in e.value for e in at.error)
    assert sum(r.name == "sparsefinder.app" for r in caplog.records) >= 2


def test_rerun_and_stop_pass_through_the_boundary():
    def script():
        import streamlit as st

        from app import state

        ss = st.session_state
        ss["runs"] = ss.get("runs", 0) + 1
        with state.error_boundary():
            if ss["runs"] == 1:
                st.rerun()
        st.write(f"runs: {ss['runs']}")
        with state.error_boundary():
            st.stop()
        st.write("after stop")

    at = AppTest.from_function(script, default_timeout=60).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = texts_of(at.markdown)
    assert "runs: 2" in shown and "after stop" not in shown


def test_boundary_reraises_control_flow_without_a_message(monkeypatch):
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

    from app import state

    shown = []
    monkeypatch.setattr(state.st, "error", lambda *a, **k: shown.append(a))
    for exc in (RerunException(None), StopException()):
        with pytest.raises(type(exc)), state.error_boundary():
            raise exc
    assert shown == []
    with state.error_boundary():
        raise KeyError("x")
    assert len(shown) == 1 and "KeyError" in shown[0][0]


def test_error_message_is_one_capped_line():
    from app import state

    assert state.error_message(ValueError("first\nsecond")) == "ValueError: first"
    assert state.error_message(KeyError()) == "KeyError"
    long = state.error_message(RuntimeError("x" * 1000))
    assert len(long) <= len("RuntimeError: ") + state.MAX_ERROR_CHARS and long.endswith("…")


# -- 2. the hyperparameters menu ------------------------------------------------------------
def _window(params: str) -> int:
    return json.loads(params)["window"]


def test_params_options_are_in_numeric_order():
    import pandas as pd

    from sparsefinder import results as rs
    from sparsefinder.predictors.base import REGISTRY

    grid = sorted(REGISTRY["window"].param_grid["window"])
    assert [_window(p) for p in rs.params_options("window")] == grid
    keys = [json.dumps({"window": w}, separators=(",", ":")) for w in grid]
    frame = pd.DataFrame({"method": "window", "params": sorted(keys)})  # text order: 0, 1, 11, 13, ..., 3
    assert [_window(p) for p in sorted(keys)] != grid
    assert [_window(p) for p in rs.params_options("window", frame)] == grid
    floats = [json.loads(p)["threshold"] for p in rs.params_options("threshold")] if "threshold" in REGISTRY else []
    assert floats == sorted(floats)


def test_default_params_are_the_constructors():
    from sparsefinder import results as rs
    from sparsefinder.predictors.base import REGISTRY

    options = rs.params_options("window")
    assert rs.default_params("window", options) == '{"window":3}' and REGISTRY["window"]().window == 3
    for method in REGISTRY:
        opts = rs.params_options(method)
        if opts:
            assert rs.default_params(method, opts) in opts


def test_bad_params_in_url_fall_back_to_the_default_with_a_warning(lib):  # noqa: F811
    at = make_app(lib.name, method="window", params='{"window":99}')
    assert not at.exception, at.exception
    select = at.selectbox(key="_w_params")
    assert [_window(o) for o in select.options] == sorted(_window(o) for o in select.options)
    assert select.value == '{"window":3}' and at.query_params["params"] == '{"window":3}'
    warned = texts_of(at.sidebar.warning)
    assert '{"window":99}' in warned and "default" in warned and '{"window":3}' in warned
    # a later run (the warning was about the link) does not repeat it
    at.selectbox(key="_w_head").select(1).run()
    assert not texts_of(at.sidebar.warning)


def test_switching_method_is_not_warned(lib):  # noqa: F811
    at = make_app(lib.name, method="window", params='{"window":5}')
    assert at.selectbox(key="_w_params").value == '{"window":5}'
    methods = at.selectbox(key="_w_method").options
    other = next(m for m in methods if m not in ("window", "(gold only)"))
    at.selectbox(key="_w_method").select(other).run()
    assert not at.exception and not texts_of(at.sidebar.warning)


def test_params_without_a_method_leave_the_url(lib):  # noqa: F811
    at = make_app(lib.name, params='{"window":3}')
    assert not at.exception, at.exception
    assert "params" not in at.query_params and "method" not in at.query_params
    assert at.selectbox(key="_w_method").value == "(gold only)"


# -- 3. the batch cap names the cap and the mode ---------------------------------------------
def test_cap_message_names_the_cap_and_the_mode(lib):  # noqa: F811
    from app import state

    at = make_app(lib.name)
    analyse(at, "\n".join(f"Line {i}." for i in range(200)), split="lines")
    warned = texts_of(at.warning)
    assert "200 lines given" in warned and f"first {state.MAX_TEXTS}" in warned
    assert f"at most {state.MAX_TEXTS} items" in warned and '"lines" mode' in warned
    assert len(at.selectbox(key="_w_sentence").options) == state.MAX_TEXTS


# -- 4. one upload limit ---------------------------------------------------------------------
def test_upload_limit_is_one_figure_everywhere(lib, monkeypatch, tmp_path):  # noqa: F811
    from sparsefinder.corpora.readers import MAX_UPLOAD_MIB

    at = corpus_page(lib, monkeypatch, tmp_path)
    at.radio(key="corpus_source").set_value("upload a file").run()
    uploader = at.get("file_uploader")[0]
    assert uploader.proto.max_upload_size_mb == MAX_UPLOAD_MIB
    assert f"{MAX_UPLOAD_MIB} MiB" in uploader.proto.help
    assert f"{MAX_UPLOAD_MIB} MiB" in texts_of(at.caption)
    for doc in ("README.md", "docs/dashboard.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert f"{MAX_UPLOAD_MIB} MiB" in text and f"{MAX_UPLOAD_MIB} MB" not in text, doc


# -- 5, 6, 8. bad files: refused, the file named once -----------------------------------------
CYCLE = ("1\tA\t_\tX\t_\t_\t2\tdep\t_\t_\n2\tB\t_\tX\t_\t_\t1\tdep\t_\t_\n3\tC\t_\tX\t_\t_\t0\troot\t_\t_\n\n")
NO_ROOT = "1\tA\t_\tX\t_\t_\t2\tdep\t_\t_\n2\tB\t_\tX\t_\t_\t1\tdep\t_\t_\n\n"


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("bad.txt", b"caf\xe9 au lait\n", "UTF-8"),
    ("utf16.txt", "Hello there.\nSecond line.\n".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    ("dup.csv", b"text,id,text\nhello there,1,other\n", "appears 2 times"),
    ("cycle.conllu", CYCLE.encode(), "cycle"),
    ("noroot.conllu", NO_ROOT.encode(), "no root"),
])
def test_upload_errors_name_the_file_once(lib, monkeypatch, tmp_path, name, data, needle):  # noqa: F811
    at = upload(corpus_page(lib, monkeypatch, tmp_path), name, data)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and needle in errors[0], errors
    assert errors[0].count(name) == 1, errors[0]
    assert at.button(key="corpus_extract").disabled
