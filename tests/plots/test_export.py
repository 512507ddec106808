"""Figures as files (sparsefinder.plots.export) and the CLI's --figure, through a real Kaleido + Chromium.

Each image starts headless Chromium; the exports are made once per module inside one export_session.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from sparsefinder.cli import main
from sparsefinder.plots import export
from sparsefinder.plots.heatmaps import OKABE_ITO, pareto_figure, sparsity_heatmap

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/usr/bin/chromium").is_file(), reason="no Chromium at /usr/bin/chromium")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the first, right after the 8-byte signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def small_figure() -> go.Figure:
    return sparsity_heatmap(np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]]), title="two layers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One PNG at a given size, one SVG and one PDF, plus the CLI's ``pareto --figure`` in every format."""
    out = tmp_path_factory.mktemp("figures")
    fig = small_figure()
    with export.export_session():
        images = {
            "png": export.figure_bytes(fig, "png", style="paper", width=400, height=300, scale=2),
            "svg": export.figure_bytes(fig, "svg", style="paper"),
            "pdf": export.figure_bytes(fig, "pdf"),
        }
        cli = {fmt: main(["pareto", "--figure", str(out / f"pareto.{fmt}"), "--style", "paper"])
               for fmt in ("html", "png", "svg", "pdf")}
    return images, cli, out


def test_images_start_with_their_magic(exported):
    images, _, _ = exported
    assert images["png"].startswith(b"\x89PNG\r\n\x1a\n")
    assert images["svg"].lstrip().startswith((b"<svg", b"<?xml")) and b"</svg>" in images["svg"][-20:]
    assert images["pdf"].startswith(b"%PDF-") and b"%%EOF" in images["pdf"][-32:]


def test_png_has_the_requested_size(exported):
    images, _, _ = exported
    assert png_size(images["png"]) == (800, 600)  # 400 × 300 layout pixels at scale 2


def test_cli_figure_round_trip_in_every_format(exported, capsys):
    _, codes, out = exported
    assert codes == {"html": 0, "png": 0, "svg": 0, "pdf": 0}
    magic = {"html": b"<html", "png": b"\x89PNG", "svg": b"<svg", "pdf": b"%PDF"}
    for fmt, start in magic.items():
        data = (out / f"pareto.{fmt}").read_bytes()
        assert start in data[:64], fmt
    assert b"Recall against sparsity" in (out / "pareto.svg").read_bytes()
    # the paper style's long legend is moved under the plot and the figure grows to hold it
    from sparsefinder.figures import result_sweep

    methods = result_sweep("minilm-entmax15", "shipped")["method"].nunique()  # one legend entry each
    assert methods > export.SIDE_LEGEND_ROWS
    rows = -(-methods // 4)
    w, h = png_size((out / "pareto.png").read_bytes())
    assert (w, h) == (1800, 2 * (600 + rows * 24 + 40))


def test_paper_template_colours_are_the_declared_palette():
    name = export.register_paper_template()
    assert name == export.PAPER_TEMPLATE == "sparsefinder-paper" and name in pio.templates
    template = pio.templates[name]
    assert list(template.layout.colorway) == list(export.PAPER_COLORWAY) == list(OKABE_ITO)
    assert template.layout.font.family.startswith("Arial")
    assert export.register_paper_template() == name  # registered once, the same object kept
    assert pio.templates[name] is template


def test_paper_style_restyles_a_copy():
    fig = small_figure()
    before = fig.to_json()
    paper = export.styled(fig, "paper")
    assert paper is not fig and fig.to_json() == before
    assert paper.layout.template.layout.colorway == tuple(OKABE_ITO)
    assert export.styled(fig, "default") is fig
    with pytest.raises(ValueError, match="unknown figure style 'poster'"):
        export.styled(fig, "poster")


def test_short_legends_stay_beside_the_plot():
    import pandas as pd

    summary = pd.DataFrame({"method": ["a", "b"], "params": ["{}", "{}"], "sparsity": [0.5, 0.6],
                            "recall": [0.7, 0.8], "on_front": [True, True]})
    paper = export.styled(pareto_figure(summary), "paper")
    assert paper.layout.legend.orientation is None and paper.layout.height == 600


@pytest.mark.parametrize("name", ["figure.jpg", "figure", "figure.PDF.bak"])
def test_bad_suffix_is_a_value_error(name, tmp_path):
    with pytest.raises(ValueError, match="use .html, .png, .svg, .pdf"):
        export.save_figure(small_figure(), tmp_path / name)
    assert not (tmp_path / name).exists()
    assert export.figure_format("X.PDF") == "pdf"


def test_cli_bad_suffix_is_one_line_exit_2(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "sparsefinder.cli", "pareto", "--figure", str(tmp_path / "p.jpg")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "error: p.jpg: .jpg is not a figure format; use .html, .png, .svg, .pdf\n"
    assert not (tmp_path / "p.jpg").exists()


def test_cli_gold_draws_one_head(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "head.html"  # HTML: no browser start, the figure's content is what is checked
    rc = main(["gold", "The quick brown fox.", "--model", str(tiny_model_dir("bert")), "--device", "cpu",
               "--layer", "1", "--head", "0", "--figure", str(path)])
    assert rc == 0 and f"wrote {path}" in capsys.readouterr().out
    html = path.read_text(encoding="utf-8")
    assert "Layer 1, head 0: entmax probabilities" in html and "[CLS]" in html
    # --json keeps stdout a JSON document; the figure's note goes to stderr
    assert main(["gold", "Hello.", "--model", str(tiny_model_dir("bert")), "--device", "cpu", "--json",
                 "--figure", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gold_sparsity"] and f"wrote {path}" in captured.err
    assert "Gold sparsity per layer and head" in path.read_text(encoding="utf-8")
    assert main(["gold", "Hello.", "--model", str(tiny_model_dir("bert")), "--device", "cpu", "--layer", "9",
                 "--figure", str(path)]) == 2
    assert "layer 9, head 0: the model has" in capsys.readouterr().err
