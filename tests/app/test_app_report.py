"""The Pareto page's "Download study report" button and the cached report behind it (sparsefinder.report)."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")

from tests.app.test_app import (  # noqa: E402
    default_load_error,  # noqa: F401 (fixture)
    lib,  # noqa: F401 (fixture)
    pareto_app,
)


def test_pareto_page_offers_the_study_report(lib):  # noqa: F811
    at = pareto_app(lib)
    buttons = [b for b in at.get("download_button") if b.label == "Download study report"]
    assert len(buttons) == 1
    assert not at.error, [e.value for e in at.error]


def test_the_cached_report_is_the_library_s(lib, monkeypatch):  # noqa: F811
    import sparsefinder.report
    from app import cache
    from sparsefinder import results as rs
    from sparsefinder.report import SECTION_IDS
    from tests.test_report import parse

    data = cache.study_report(lib.name, rs.shipped_result(lib.name))
    p = parse(data.decode("utf-8"))
    assert p.sections == list(SECTION_IDS)

    def again(**_kw):
        raise AssertionError("the report was made again for the same files")

    monkeypatch.setattr(sparsefinder.report, "study_report", again)
    assert cache.study_report(lib.name, rs.shipped_result(lib.name)) == data  # made once per file version
