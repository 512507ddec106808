"""HTML pieces of the study report (:mod:`sparsefinder.report`): text, tables, figures, commands, the page.

Everything inserted into the page goes through :func:`html.escape` (text, table cells, commands);
figures are Plotly's own JSON, which escapes ``<`` and ``>`` itself. plotly.js is inlined once, by the
first figure (:class:`FigureEmbedder`), so the file opens offline and stays one copy of the library large.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

#: The page's own style: system fonts only (no web fonts, nothing fetched).
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",Arial,sans-serif;margin:0 auto;
max-width:1100px;padding:1rem 1.5rem 3rem;color:#1a1a1a;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2.2rem}
nav ol{columns:2;padding-left:1.2rem}table.data{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
table.data th,table.data td{border:1px solid #ddd;padding:.2rem .45rem;text-align:right}
table.data th{background:#f3f3f3}table.data td:first-child,table.data th:first-child{text-align:left}
.command{background:#f6f8fa;border-left:3px solid #0072B2;padding:.4rem .8rem;margin:.8rem 0}
.command pre{margin:.2rem 0;white-space:pre-wrap;word-break:break-all;font-size:.85rem}
.absent{color:#8a4b00;font-style:italic}.note{color:#555;font-size:.9rem}.figure{margin:.6rem 0}
"""


def esc(value: Any) -> str:
    """``value`` as HTML text (quotes too: the same helper fills attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def para(text: str, cls: str | None = None) -> str:
    """One paragraph of escaped ``text``."""
    return f'<p class="{esc(cls)}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def absent(text: str) -> str:
    """The one line a section shows instead of its content when its data is missing."""
    return para(text, "absent")


def table(frame: pd.DataFrame, decimals: int = 4, table_id: str | None = None) -> str:
    """``frame`` as an HTML table (cells and headers escaped by pandas), floats to ``decimals``."""
    attrs = f' id="{esc(table_id)}"' if table_id else ""
    body = frame.to_html(index=False, escape=True, border=0, classes="data", na_rep="–",
                         float_format=lambda v: f"{v:.{decimals}f}")
    return body.replace('<table class="dataframe data">', f'<table class="data"{attrs}>', 1)


def key_values(rows: Iterable[tuple[str, Any]], table_id: str | None = None) -> str:
    """A two-column table of (what, value) rows; rows whose value is None are left out."""
    attrs = f' id="{esc(table_id)}"' if table_id else ""
    cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows if v is not None)
    return f'<table class="data"{attrs}><tbody>{cells}</tbody></table>'


def command_line(command: str, arguments: Mapping[str, Any], always: Sequence[str] = ()) -> str:
    """``sparsefinder COMMAND --flag value ...`` for ``arguments`` (dests as :mod:`sparsefinder.cli` parses them).

    Values equal to the subcommand's defaults are left out, so the line is what a person would type; the
    rest are quoted for a POSIX shell; the dests in ``always`` are written even at their defaults (a layer 0 the
    reader should see). Unknown keys are ignored: a sidecar may record more than its
    command takes (``command``, ``func``, a newer version's options).
    """
    import argparse

    from sparsefinder.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    sp = sub.choices[command]
    words = ["sparsefinder", command]
    for action in sp._actions:  # noqa: SLF001 -- argparse has no public list of a parser's options
        if not action.option_strings or action.dest in ("help",) or action.dest not in arguments:
            continue
        value = arguments[action.dest]
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if value:
                words.append(flag)
            continue
        if value is None or (value == action.default and not action.required and action.dest not in always):
            continue
        words += [flag, shlex.quote(str(value))]
    return " ".join(words)


@dataclass
class Section:
    """One section of the report: an anchor id, a title, its HTML body and the commands that reproduce it."""

    id: str
    title: str
    body: str
    commands: Sequence[tuple[str, str]] = field(default_factory=tuple)  # (what it makes, command line)

    def html(self) -> str:
        cmds = "".join(f'<div class="label">{esc(what)}</div><pre><code>{esc(cmd)}</code></pre>'
                       for what, cmd in self.commands)
        block = f'<div class="command" id="{esc(self.id)}-commands"><strong>Reproduce</strong>{cmds}</div>' \
            if cmds else ""
        return f'<section id="{esc(self.id)}"><h2>{esc(self.title)}</h2>{self.body}{block}</section>'


class FigureEmbedder:
    """Plotly figures as ``<div>``s: plotly.js inlined with the first one only, later ones reuse it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig, name: str) -> str:
        height = fig.layout.height or 500
        out = fig.to_html(full_html=False, include_plotlyjs=self.count == 0, div_id=f"fig-{name}",
                          default_height=f"{height}px", default_width="100%",
                          config={"displaylogo": False, "responsive": True})
        self.count += 1
        return f'<div class="figure">{out}</div>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: head with the inline style, a table of contents and the sections."""
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(s.html() for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{esc(title)}</h1>{para(subtitle, 'note')}<nav><ol>{toc}</ol></nav></header>"
            f"{body}</body></html>\n")
