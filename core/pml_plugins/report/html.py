"""A tiny HTML builder for self-contained reports: inline CSS, images as data URIs, no script.

The page's Content-Security-Policy forbids every fetch except ``data:`` images and the inline
style, so a report can never reach the network, even if a value it shows looks like a URL.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any, Optional

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 1em 3em;
color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #444;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
border-bottom:1px solid #bbb}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}table.kv td,table.kv th{text-align:left}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em;
max-height:28em}
.wide{overflow-x:auto}.note{color:#555;font-size:.9em}.fig{max-width:100%;height:auto}
.gallery{display:flex;flex-direction:column;gap:.4em}.grow{display:flex;align-items:flex-start;gap:.3em;flex-wrap:wrap}
.cell{display:flex;flex-direction:column;align-items:center;font-size:.75em;width:62px;text-align:center}
.cell img{width:48px;height:48px;image-rendering:pixelated;background:#fff}
.query img{border:3px double #1b1b1b}.ok img{border:3px solid #1a7f37}.bad img{border:3px dashed #c62828}
.qtext{border:3px double #1b1b1b}.oktext{border:3px solid #1a7f37}.badtext{border:3px dashed #c62828}
.box{padding:2px;width:56px;min-height:40px}
.mark{font-weight:bold;font-size:1.1em}.ok .mark,.oktext .mark{color:#1a7f37}.bad .mark,.badtext .mark{color:#c62828}
.rowhead{width:7em;font-size:.8em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, cls: str = "fig", title: Optional[str] = None) -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f'<img class="{cls}" src="{png_uri(data)}" alt="{esc(alt)}"{t}>'


def array_png(image: Any) -> bytes:
    """PNG bytes of a uint8 (h, w) or (h, w, 3) array."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """Markup that :func:`table` inserts as is (already escaped)."""


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def page(title: str, sections: Sequence[tuple[str, str, str]], intro: str = "") -> str:
    """A whole document: ``sections`` are ``(id, title, body html)``, linked from a contents bar."""
    nav = "".join(f'<a href="#{esc(s)}">{esc(t)}</a>' for s, t, _ in sections)
    body = "\n".join(section(*s) for s in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body><h1>{esc(title)}</h1>{intro}"
        f"<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )
