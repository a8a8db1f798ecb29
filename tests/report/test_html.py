"""The HTML report: one self-contained page, every text escaped, written atomically."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import pytest

from contraseg.errors import InputError
from contraseg.report.html import (
    BulletList,
    Figure,
    Paragraph,
    Section,
    Table,
    render_html,
    write_html_report,
)


class Collect(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Collect:
    parser = Collect()
    parser.feed(page)
    return parser


HOSTILE = '<script>alert("x")</script> & <img src="http://example.com/x.png">'


def sections(png):
    return [
        Section(
            "Results " + HOSTILE,
            [
                Paragraph("G^D beats random: " + HOSTILE),
                Table(["init", "1 labelled volume"], [["random", 0.5], [HOSTILE, None]], HOSTILE),
                BulletList(["a < b", HOSTILE]),
            ],
        ),
        Section(
            "Figures",
            [Figure(png("one.png"), "Dice " + HOSTILE), Figure(png("two.png").read_bytes())],
        ),
    ]


def test_page_is_self_contained_and_escaped(png):
    page = render_html("Grid " + HOSTILE, sections(png), subtitle=HOSTILE)
    parsed = parse(page)
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags
    assert tags.count("img") == 2
    for tag, attrs in parsed.tags:
        if "src" in attrs:
            assert tag == "img" and attrs["src"].startswith("data:image/png;base64,")
        if "href" in attrs:
            assert attrs["href"].startswith("#")  # the contents list only
    assert "url(" not in page and "@import" not in page  # nor does the style sheet load anything
    # the hostile text comes back as text: title, h1, subtitle, contents, h2, paragraph, table
    # caption and cell, list item, figure caption
    assert "".join(parsed.text).count(HOSTILE) == 10
    cells = [t for t, _ in parsed.tags if t == "td"]
    assert len(cells) == 4


def test_figures_are_the_png_bytes(png):
    page = render_html("t", sections(png))
    sources = [a["src"] for t, a in parse(page).tags if t == "img"]
    decoded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert decoded == [png("one.png").read_bytes(), png("two.png").read_bytes()]
    alts = [a["alt"] for t, a in parse(page).tags if t == "img"]
    assert alts == ["Dice " + HOSTILE, ""]


def test_write_is_atomic_and_refuses_bad_figures(png, tmp_path):
    out = tmp_path / "report" / "index.html"
    write_html_report(out, "Grid ±", sections(png))
    assert out.read_bytes() == render_html("Grid ±", sections(png)).encode("utf-8")
    before = out.read_bytes()
    (tmp_path / "fake.png").write_text("not a png")
    for bad, problem in [
        (tmp_path / "missing.png", "cannot read the figure"),
        (tmp_path / "fake.png", "a figure must be a PNG image"),
        (b"GIF89a", "a figure must be a PNG image"),
    ]:
        with pytest.raises(InputError, match=problem):
            write_html_report(out, "Grid", [Section("s", [Figure(bad)])])
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]


def test_one_section_has_no_contents_list():
    page = render_html("t", [Section("only", [Paragraph("p")])])
    assert "<nav>" not in page and '<section id="s1"><h2>only</h2>' in page
