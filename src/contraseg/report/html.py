"""One self-contained HTML page: a report that can be mailed or archived as a single file.

Figures are embedded as base64 PNG data URIs, the style sheet is inline, and the page loads
nothing else (no scripts, fonts or links to other files), so it looks the same offline and
years later. All text is escaped; a caller cannot inject markup by accident.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contraseg import fileio
from contraseg.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
p.subtitle { color: #666; margin-top: 0; }
nav ol { padding-left: 1.4em; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; }
"""


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class BulletList:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """A header row and body rows of cells (``str()`` of each; None shows as empty)."""

    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG image, given as its file or its bytes, embedded into the page."""

    image: Path | bytes
    caption: str = ""
    alt: str = ""


Block = Paragraph | BulletList | Table | Figure


@dataclass(frozen=True)
class Section:
    title: str
    blocks: Sequence[Block] = ()


def _text(value: object) -> str:
    return "" if value is None else html.escape(str(value))


def _png_data_uri(image: Path | bytes) -> str:
    if isinstance(image, bytes):
        data, name = image, "a figure"
    else:
        try:
            data, name = Path(image).read_bytes(), str(image)
        except OSError as error:
            raise InputError(image, f"cannot read the figure: {error.strerror}") from error
    if not data.startswith(PNG_SIGNATURE):
        raise InputError(name, "a figure must be a PNG image")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_text(block.text)}</p>"
    if isinstance(block, BulletList):
        return "<ul>" + "".join(f"<li>{_text(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        caption = f"<caption>{_text(block.caption)}</caption>" if block.caption else ""
        head = "".join(f"<th>{_text(h)}</th>" for h in block.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in block.rows
        )
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Figure):
        alt = _text(block.alt or block.caption)
        caption = f"<figcaption>{_text(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="{_png_data_uri(block.image)}" alt="{alt}">{caption}</figure>'
    raise TypeError(f"not a report block: {block!r}")


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The page as text: a title, an optional subtitle, a contents list and the sections."""
    contents = "".join(
        f'<li><a href="#s{i}">{_text(s.title)}</a></li>' for i, s in enumerate(sections, 1)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
        f'<p class="subtitle">{_text(subtitle)}</p>' if subtitle else "",
        f"<nav><ol>{contents}</ol></nav>" if len(sections) > 1 else "",
    ]
    for i, section in enumerate(sections, 1):
        parts.append(f'<section id="s{i}"><h2>{_text(section.title)}</h2>')
        parts.extend(_block(b) for b in section.blocks)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def write_html_report(
    path: str | Path, title: str, sections: Sequence[Section], subtitle: str = ""
) -> None:
    """Render the whole page first (a missing or non-PNG figure fails before anything is
    written), then write it atomically."""
    fileio.write_bytes(path, render_html(title, sections, subtitle).encode("utf-8"))
