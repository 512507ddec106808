"""Figures as files: standalone HTML, or PNG, SVG and PDF for papers, in the default or the paper style.

One place for the CLI's ``--figure``, the dashboard's download button and a notebook::

    from sparsefinder.plots.export import save_figure
    save_figure(fig, "pareto.pdf", style="paper")

Static images are drawn by `Kaleido <https://github.com/plotly/Kaleido>`_ 1.x, which drives
Debian's ``/usr/bin/chromium`` (found by itself; nothing is downloaded). Each image takes a headless
Chromium start (~2 s) unless it is made inside :func:`export_session`, which keeps one browser for all.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from sparsefinder.plots.heatmaps import OKABE_ITO

#: File suffix → export format.
FORMATS = {".html": "html", ".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: Format → MIME type of a download.
MIME = {"html": "text/html", "png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}
#: ``default``: the figure as the dashboard draws it; ``paper``: :data:`PAPER_TEMPLATE`.
STYLES = ("default", "paper")
#: Name of the paper template in :data:`plotly.io.templates`.
PAPER_TEMPLATE = "sparsefinder-paper"
#: Discrete colours of the paper style: Okabe–Ito, distinguishable with the common colour-vision deficiencies.
PAPER_COLORWAY = OKABE_ITO
#: Fonts of the paper style: Arial or its metric twin Liberation Sans (Debian's chromium has it).
PAPER_FONT = "Arial, Liberation Sans, Helvetica, sans-serif"
#: Pixel ratio of PNGs: 2 gives ~190 dpi at a figure's layout size, enough for print.
DEFAULT_SCALE = 2.0


def register_paper_template() -> str:
    """Register :data:`PAPER_TEMPLATE` in ``plotly.io.templates`` (once) and return its name.

    White background, black axis lines with outside ticks, a light grid, Arial-like fonts at print
    sizes, Okabe–Ito colours for traces and the colour-blind-safe ``cividis`` scale for heatmaps
    whose figure sets none.
    """
    if PAPER_TEMPLATE in pio.templates:
        return PAPER_TEMPLATE
    # automargin: figures set small margins (l=10) and rely on it to fit their tick labels.
    axis = dict(automargin=True, showline=True, linecolor="black", linewidth=1, mirror=True, ticks="outside",
                tickcolor="black",
                showgrid=True, gridcolor="#e5e5e5", zeroline=False, title=dict(font=dict(size=13)),
                tickfont=dict(size=11))
    template = go.layout.Template(layout=go.Layout(
        font=dict(family=PAPER_FONT, size=12, color="black"),
        # At the top edge: the heatmaps put their key axis (ticks and title) in the top margin, under it.
        title=dict(font=dict(size=14), x=0.0, xanchor="left", yref="container", y=1.0, yanchor="top",
                   pad=dict(t=12, l=8)),
        colorway=list(PAPER_COLORWAY),
        colorscale=dict(sequential="cividis", sequentialminus="cividis"),
        paper_bgcolor="white", plot_bgcolor="white",
        xaxis=axis, yaxis=axis,
        legend=dict(font=dict(size=11), bgcolor="rgba(255,255,255,0)", borderwidth=0),
        coloraxis=dict(colorbar=dict(outlinewidth=0, ticks="outside", tickfont=dict(size=11))),
    ))
    pio.templates[PAPER_TEMPLATE] = template
    return PAPER_TEMPLATE


def styled(fig: go.Figure, style: str = "default") -> go.Figure:
    """``fig`` in ``style`` (one of :data:`STYLES`): itself for ``default``, a restyled copy for ``paper``.

    The paper style replaces the figure's template; what a figure sets itself (its trace colours, already
    Okabe–Ito, and its heatmaps' colour scales) is kept, so a figure means the same in both styles.
    """
    if style not in STYLES:
        raise ValueError(f"unknown figure style {style!r}: use {' or '.join(STYLES)}")
    if style == "default":
        return fig
    out = go.Figure(fig)  # a deep copy: the caller's figure (e.g. shown on a page) keeps its style
    out.update_layout(template=register_paper_template())
    _fit_legend(out)
    return out


#: Legend entries a figure's right-hand legend holds in the paper style; more go below the plot.
SIDE_LEGEND_ROWS = 14
#: Height of one legend row (layout pixels) and entries per row of a legend below the plot. A row is as wide
#: as the plot area and an entry (symbol included) a little more than its ``entrywidth`` fraction of it.
_LEGEND_ROW, _LEGEND_COLUMNS = 24, 4


def _fit_legend(fig: go.Figure) -> None:
    """Move a long legend under the plot, in rows, and grow the figure to hold it.

    On a page a long legend scrolls; in a PNG or PDF it is cut off (the Pareto figure has ~20 methods).
    """
    entries = sum(1 for t in fig.data if t.showlegend is not False and t.name)
    if entries <= SIDE_LEGEND_ROWS:
        return
    rows = -(-entries // _LEGEND_COLUMNS)
    extra = rows * _LEGEND_ROW + 40
    height = (fig.layout.height or 500) + extra
    fig.update_layout(
        # In container coordinates (0 = the figure's bottom edge): under the x-axis title, whatever the plot's size.
        height=height, legend=dict(orientation="h", x=0.0, xanchor="left", yref="container", y=extra / height,
                                   yanchor="top",
                                   entrywidth=1 / _LEGEND_COLUMNS - 0.02, entrywidthmode="fraction", title=None),
        margin=dict(b=extra + 60),
    )


def figure_format(path: str | Path) -> str:
    """The export format of ``path`` from its suffix (``.html``, ``.png``, ``.svg``, ``.pdf``); ValueError else."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        what = f"{suffix} is not a figure format" if suffix else "no suffix to tell the figure format"
        raise ValueError(f"{Path(path).name}: {what}; use {', '.join(FORMATS)}")
    return FORMATS[suffix]


def figure_bytes(fig: go.Figure, fmt: str, style: str = "default", width: int | None = None,
                 height: int | None = None, scale: float | None = None) -> bytes:
    """``fig`` as the bytes of an ``fmt`` file (``html``, ``png``, ``svg`` or ``pdf``) in ``style``.

    HTML is standalone with plotly.js inlined (opens offline). Images are ``width`` × ``height`` layout
    pixels (default: the figure's own size, else Plotly's 700 × 500); a PNG has ``scale`` (default
    :data:`DEFAULT_SCALE`) device pixels per layout pixel. Raises ``RuntimeError`` when no image can be
    drawn (Kaleido or Chromium missing).
    """
    if fmt not in MIME:
        raise ValueError(f"unknown figure format {fmt!r}: use {', '.join(MIME)}")
    fig = styled(fig, style)
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    if scale is None:
        scale = DEFAULT_SCALE if fmt == "png" else 1.0
    # plotly raises RuntimeError itself when Kaleido or Chrome is missing: the CLI's "work failed" kind.
    from kaleido.errors import JavascriptError

    for attempt in range(2):
        try:
            with warnings.catch_warnings():
                # Inside export_session plotly's per-call browser options do not apply; we pass none.
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                return pio.to_image(fig, format=fmt, width=width, height=height, scale=scale)
        except JavascriptError:
            # On a loaded machine Kaleido 1.5 sometimes runs its script before its page has defined it
            # ("kaleido_scopes is not defined"); a second try in a fresh tab draws the figure.
            if attempt:
                raise
    raise AssertionError("unreachable")


@functools.cache
def image_export_problem() -> str | None:
    """Why PNG, SVG and PDF cannot be drawn here (Kaleido or a Chromium missing), or None when they can.

    Looked up once per process: Kaleido searches the usual places (Debian's ``/usr/bin/chromium``, the PATH).
    """
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return "image export needs Kaleido (pip install kaleido)"
    if Chromium.find_browser(skip_local=False) is None:
        return "image export needs Chromium (apt-get install chromium)"
    return None


def save_figure(fig: go.Figure, path: str | Path, style: str = "default", width: int | None = None,
                height: int | None = None, scale: float | None = None) -> Path:
    """Write ``fig`` to ``path`` in the format of its suffix (see :func:`figure_format`) and ``style``.

    ``width``/``height``/``scale`` as for :func:`figure_bytes`. Returns the path. The format is checked
    before anything is drawn, so a wrong suffix fails at once.
    """
    path = Path(path)
    data = figure_bytes(fig, figure_format(path), style=style, width=width, height=height, scale=scale)
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def export_session() -> Iterator[None]:
    """Draw every image made inside this block in one headless Chromium (Kaleido's sync server).

    Without it each PNG/SVG/PDF starts a browser (~2 s); inside, the first starts it and the rest take
    ~0.1 s each. A session inside another reuses the outer one. For one process's sequential work (the
    CLI, a test module, a notebook): Kaleido's server is a process-wide singleton whose queue does not
    keep concurrent callers' results apart, so the dashboard's sessions export one by one without it.
    """
    import kaleido

    if kaleido._global_server.is_running():  # noqa: SLF001 -- the singleton has no public accessor
        yield
        return
    kaleido.start_sync_server(silence_warnings=True)
    try:
        yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)
