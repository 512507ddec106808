"""The study report (sparsefinder.report, ``sparsefinder report``): sections, numbers, offline HTML, escaping,
reproducing commands, and the CLI's errors."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime
from html.parser import HTMLParser

import numpy as np
import pytest

from sparsefinder.cli import build_parser, main
from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.report import SECTION_IDS, store_gold_sparsity, study_report, write_report

HOSTILE = '<script>alert("x")</script>&corpus'
TEXTS = ["One sentence here.", "Another, longer sentence follows it and goes on.", "Third.",
         "The quick brown fox jumps over the lazy dog."]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class ReportParser(HTMLParser):
    """Section ids, the text of each ``<pre><code>`` command, script tags and the cells of tables by id."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.commands: list[str] = []
        self.scripts: list[dict] = []
        self.links: list[dict] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.absent: list[str] = []
        self.urls: list[str] = []  # every src/href of the markup (script bodies are not markup)
        self._code = self._table = self._cell = self._absent = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "code":
            self._code = []
        elif tag == "script":
            self.scripts.append(a)
        elif tag == "link":
            self.links.append(a)
        elif tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "p" and a.get("class") == "absent":
            self._absent = []

    def handle_endtag(self, tag):
        if tag == "code" and self._code is not None:
            self.commands.append("".join(self._code))
            self._code = None
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p" and self._absent is not None:
            self.absent.append("".join(self._absent))
            self._absent = None

    def handle_data(self, data):
        for part in (self._code, self._cell, self._absent):
            if part is not None:
                part.append(data)


def parse(document: str) -> ReportParser:
    p = ReportParser()
    p.feed(document)
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bert):
    """A tiny store whose corpus name is hostile HTML, and a sweep table of two methods on it."""
    from sparsefinder.evaluation.sweep import run_sweep, save_sweep

    root = tmp_path_factory.mktemp("report")
    extract_corpus(bert, TEXTS, root / "store", batch_size=2, progress=False, corpus_name=HOSTILE, split="all")
    store = ExtractionStore.open(root / "store")
    frame = run_sweep(store, None, methods=["window", "random"], progress=False)
    save_sweep(frame, root / "sweep.parquet")
    return root


def independent_gold_sparsity(store: ExtractionStore) -> np.ndarray:
    """Per head the mean over sentences of 1 − edges / n², from each sentence's gold support (a full-attention
    encoder: every pair of real tokens is valid)."""
    grid = np.zeros((store.num_layers, store.num_heads))
    for layer in range(store.num_layers):
        rows = []
        for i in range(len(store)):
            g = store.sentence(i).gold(layer).numpy()  # (H, n, n)
            n = g.shape[-1]
            rows.append(1.0 - g.sum((1, 2)) / (n * n))
        grid[layer] = np.mean(rows, axis=0)
    return grid


def test_report_sections_numbers_and_offline_html(tiny):
    store = ExtractionStore.open(tiny / "store")
    doc = study_report(store=tiny / "store", sweep=tiny / "sweep.parquet", now=NOW)
    p = parse(doc)
    assert p.sections == list(SECTION_IDS)
    # Gold sparsity: the table equals an independent count over the store's gold graphs.
    want = independent_gold_sparsity(store)
    assert 0.0 < want.mean() < 1.0 and want.std() > 0  # a grid that can tell a wrong cell apart
    np.testing.assert_allclose(store_gold_sparsity(store), want, rtol=0, atol=1e-12)
    rows = p.tables["gold-sparsity-table"]
    assert rows[0] == ["layer"] + [f"h{h}" for h in range(store.num_heads)]
    shown = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(shown, want, rtol=0, atol=5e-5)
    # The sweep's sections have content; the store's model is unregistered, so clusters and curves are absent.
    assert "pareto-front-table" in p.tables and "head-ranking-top" in p.tables
    # Mass recall beside recall (the tiny sweep scored it: its store recorded how the attention scored).
    assert "mass_recall" in p.tables["pareto-front-table"][0]
    assert any(c.startswith("mass_recall @ sparsity") for c in p.tables["best-recall-table"][0])
    assert len(p.absent) == 2 and all(a.startswith("No ") for a in p.absent)
    # plotly.js once, inline; no script or stylesheet fetched from anywhere.
    assert doc.count("window.PlotlyConfig") == 1 and doc.count("* plotly.js v") == 1
    assert doc.count("Plotly.newPlot(") == 3  # gold sparsity, Pareto, head ranking
    assert all("src" not in s for s in p.scripts) and not p.links
    assert p.urls and all(u.startswith("#") for u in p.urls), p.urls  # the table of contents' anchors only
    assert "@import" not in doc and not re.search(r"url\(\s*['\"]?https?:", doc)


def test_hostile_text_is_escaped(tiny):
    doc = study_report(store=tiny / "store", sweep=tiny / "sweep.parquet", now=NOW)
    assert HOSTILE not in doc and '<script>alert("x")' not in doc
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;corpus" in doc
    # Parsed back, the provenance table holds the name as text.
    cells = [c for row in parse(doc).tables["provenance-model"] for c in row]
    assert not any(HOSTILE in c for c in cells)  # the store's corpus is in the sources table, below
    assert any(HOSTILE in c for row in _tables_after(doc) for c in row)


def _tables_after(doc: str) -> list[list[str]]:
    """Every table row's cells of the provenance section (anonymous tables included)."""
    section = doc[doc.index('<section id="provenance"'):doc.index('<section id="gold-sparsity"')]
    p = parse(section.replace('<table class="data">', '<table class="data" id="any">'))
    return p.tables.get("any", [])


def test_every_section_has_commands_that_parse(tiny):
    doc = study_report(store=tiny / "store", sweep=tiny / "sweep.parquet", now=NOW)
    for sid in ("provenance", "gold-sparsity", "pareto", "head-ranking"):
        assert f'id="{sid}-commands"' in doc, sid
    p = parse(doc)
    cli = [c for c in p.commands if c.startswith("sparsefinder ")]
    assert {c.split()[1] for c in cli} >= {"extract", "sweep", "pareto", "gold"}
    parser = build_parser()
    for command in cli:
        parser.parse_args(shlex.split(command)[1:])  # argparse exits on a command it cannot parse
    sweep = next(c for c in cli if c.split()[1] == "sweep")
    assert f"--out {tiny / 'sweep.parquet'}" in sweep and "--methods window,random" in sweep
    extract = next(c for c in cli if c.split()[1] == "extract")
    assert "--split all" in extract and "--batch-size 2" in extract


def test_shipped_result_has_every_section():
    from sparsefinder.evaluation.approximate import load_curves
    from sparsefinder.model.catalogue import get_spec

    doc = study_report("minilm-entmax15", now=NOW)
    p = parse(doc)
    assert p.sections == list(SECTION_IDS) and not p.absent
    assert doc.count("window.PlotlyConfig") == 1
    assert {"clusters-top-heads", "curves-table", "best-recall-table"} <= set(p.tables)
    # The curves' command is their recorded arguments: parsed back, it asks for the same run.
    recorded = load_curves(get_spec("minilm-entmax15").artifact("curves")).attrs["curves"]["arguments"]
    line = next(c for c in p.commands if c.startswith("sparsefinder curves"))
    args = vars(build_parser().parse_args(shlex.split(line)[1:]))
    assert all(args[k] == v for k, v in recorded.items() if k not in ("command", "func")), line


def test_missing_sections_say_so_in_one_line(tiny):
    doc = study_report(store=tiny / "store", now=NOW)
    p = parse(doc)
    assert p.sections == list(SECTION_IDS)
    assert "gold-sparsity-table" in p.tables
    assert len(p.absent) == 4 and all("\n" not in a for a in p.absent)
    assert any("sweep" in a for a in p.absent) and any("interpret" in a for a in p.absent)


def test_write_report_is_atomic_and_checks_the_name(tmp_path):
    out = tmp_path / "study.html"
    out.write_text("old", encoding="utf-8")
    assert write_report(out, "<!DOCTYPE html>new") == out
    assert out.read_text(encoding="utf-8") == "<!DOCTYPE html>new"
    assert [f.name for f in tmp_path.iterdir()] == ["study.html"]  # no temporary left behind
    with pytest.raises(ValueError, match="HTML"):
        write_report(tmp_path / "study.txt", "x")


def test_cli_report_writes_the_file(tiny, tmp_path, capsys):
    out = tmp_path / "study.html"
    assert main(["report", "--store", str(tiny / "store"), "--sweep", str(tiny / "sweep.parquet"),
                 "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert parse(out.read_text(encoding="utf-8")).sections == list(SECTION_IDS)


@pytest.mark.parametrize(("argv", "message"), [
    (["--store", "{tmp}/no-store"], "store directory not found"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "minilm-entmax15", "--sweep", "{tmp}/none.parquet"], "sweep table not found"),
    (["--store", "{tmp}"], "not"),  # a directory that is no store
])
def test_cli_report_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["report", *argv, "--out", str(tmp_path / "s.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "s.html").exists()
