"""A sample report rendered by headless Chromium: the page is not blank and every figure loads.

Chromium is driven from the command line only (``--screenshot`` and ``--dump-dom``), so the test
needs no Python package beyond the standard library and PIL.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from contraseg.report import figures
from contraseg.report.html import BulletList, Figure, Paragraph, Section, Table, write_html_report
from contraseg.report.stats import aggregate, compare_to_baseline, summary_grid

FLAGS = [
    "--headless",
    "--no-sandbox",  # the test may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
]

# Appended to a copy of the page: after the load event, the body records how many images
# decoded (naturalWidth > 0) out of how many there are.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});
</script>"""
# A broken image in the probed copy shows that the probe does see a failure.
BROKEN = '<img src="data:image/png;base64,iVBORw0KGgoAAAAN" alt="broken on purpose">'


def sample_report(rows, embeddings, folder: Path) -> Path:
    figures.dice_vs_labelled(rows, folder / "dice.png")
    figures.dice_per_structure(rows, folder / "structures.png")
    note = figures.embedding_projection(*embeddings, folder / "embeddings.png", title="G^D")
    header, body = summary_grid(aggregate(rows))
    sections = [
        Section(
            "Test Dice",
            [
                Paragraph("Mean ± sample std over labelled sets and seeds."),
                Table(header, body, "Test Dice per initialisation"),
                BulletList([c.verdict for c in compare_to_baseline(rows)]),
            ],
        ),
        Section(
            "Figures",
            [
                Figure(folder / "dice.png", "Test Dice against labelled volumes"),
                Figure(folder / "structures.png", "Dice per structure"),
                Figure(folder / "embeddings.png", note or "Embeddings"),
            ],
        ),
    ]
    page = folder / "report.html"
    write_html_report(page, "Sample grid <report>", sections, subtitle="fixed numbers")
    return page


def run_chromium(chromium: str, folder: Path, *args: str) -> str:
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={folder / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_renders_in_chromium(chromium, sample_rows, sample_embeddings, tmp_path):
    page = sample_report(sample_rows, sample_embeddings, tmp_path)

    shot = tmp_path / "shot.png"
    run_chromium(
        chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 20, "the screenshot is (nearly) one colour"
    hsv = np.asarray(image.convert("HSV"))
    coloured = (hsv[..., 1] > 120) & (hsv[..., 2] > 80)  # the figures' lines and bars
    assert coloured.sum() > 2000, "no figure colours in the screenshot"

    probed = tmp_path / "probed.html"
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", BROKEN + PROBE + "</body>"),
        encoding="utf-8",
    )
    dom = run_chromium(
        chromium, tmp_path, "--dump-dom", "--virtual-time-budget=10000", probed.as_uri()
    )
    counted = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert counted, "the probe did not run: " + dom[:500]
    assert counted.groups() == ("3", "4")  # all three figures; only the broken image failed
    assert "Sample grid &lt;report&gt;" in dom
