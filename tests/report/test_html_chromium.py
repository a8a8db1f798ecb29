"""Reports rendered by headless Chromium (a sample and a real grid's): the page is not blank and
every figure loads.

Chromium is driven from the command line only (``--screenshot`` and ``--dump-dom``), so the test
needs no Python package beyond the standard library and PIL.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from contraseg.experiment import run_experiment
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


def assert_renders(chromium: str, page: Path, folder: Path) -> str:
    """The page is not blank, shows the figures' colours, and every image decodes (a broken
    image added to a copy shows that the probe sees failures); returns the rendered DOM."""
    shot = folder / "shot.png"
    run_chromium(chromium, folder, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 20, "the screenshot is (nearly) one colour"
    hsv = np.asarray(image.convert("HSV"))
    coloured = (hsv[..., 1] > 120) & (hsv[..., 2] > 80)  # the figures' lines and bars
    assert coloured.sum() > 2000, "no figure colours in the screenshot"

    images = page.read_text(encoding="utf-8").count("<img ")
    probed = folder / "probed.html"
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", BROKEN + PROBE + "</body>"),
        encoding="utf-8",
    )
    dom = run_chromium(
        chromium, folder, "--dump-dom", "--virtual-time-budget=10000", probed.as_uri()
    )
    counted = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert counted, "the probe did not run: " + dom[:500]
    assert counted.groups() == (str(images), str(images + 1))  # only the broken image failed
    return dom


def test_report_renders_in_chromium(chromium, sample_rows, sample_embeddings, tmp_path):
    page = sample_report(sample_rows, sample_embeddings, tmp_path)
    dom = assert_renders(chromium, page, tmp_path)
    assert page.read_text(encoding="utf-8").count("<img ") == 3
    assert "Sample grid &lt;report&gt;" in dom


@pytest.mark.slow
def test_a_grid_report_renders_in_chromium(chromium, phantom_root, tmp_path):
    """The report of a real (tiny) grid: every figure of every section loads."""
    grid = {
        "title": "tiny grid",
        "data": {
            "dataset": "phantom",
            "root": str(phantom_root),
            "cache": str(phantom_root / ".contraseg-cache"),
            "size": [32, 32],
            "target_spacing": [3.0, 3.0],
        },
        "model": {"widths": [4, 8, 8, 8, 8, 8], "g1_hidden": 32, "g1_out": 16, "g2_out": 16},
        "pretrain_global": {"loss": {"volumes_per_batch": 2}, "optim": {"iterations": 3}},
        "pretrain_local": {
            "loss": {"strategy": "LD", "volumes_per_batch": 2},
            "optim": {"iterations": 3},
        },
        "finetune": {"finetune": {"val_every": 2}, "optim": {"iterations": 4, "batch_size": 4}},
        "initialisations": [
            {"name": "random"},
            {"name": "G^D", "pretrain_global": {}},
            {"name": "G^D + L^D", "pretrain_global": {}, "pretrain_local": {}},
        ],
        "labelled_volumes": [1, 2],
        "combinations": ["c1"],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    result = run_experiment([path], tmp_path / "out", device="cpu")
    page = tmp_path / "out" / "report.html"
    dom = assert_renders(chromium, page, tmp_path)
    assert (
        page.read_text(encoding="utf-8").count("<img ") == 6
    )  # every figure of the report, one embedding
    assert "G^D + L^D vs random with 2 labelled volumes" in dom
    assert len(result.rows) == 6
