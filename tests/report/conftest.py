"""Fixed result rows and embeddings for the figure and report tests, and a Chromium finder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("RV", "Myo", "LV")
INITS = {"random": 0.0, "G^D": 0.08, "G^D + L^D": 0.1}
COUNTS = (1, 2, "all")


@pytest.fixture
def sample_rows() -> list[dict[str, object]]:
    """3 inits x (1, 2, all) labelled volumes x 3 combinations x 2 seeds, fixed numbers."""
    rng = np.random.default_rng(11)
    rows = []
    for init, gain in INITS.items():
        for level, count in enumerate(COUNTS):
            for combination in ("c1", "c2", "c3"):
                for seed in (0, 1):
                    per_class = {
                        c: round(
                            float(0.4 + 0.1 * level + 0.05 * k + gain + rng.normal(0, 0.02)), 4
                        )
                        for k, c in enumerate(CLASSES)
                    }
                    rows.append(
                        {
                            "init": init,
                            "labelled_volumes": count,
                            "combination": combination,
                            "seed": seed,
                            "test_dice": sum(per_class.values()) / len(per_class),
                            "per_class_dice": per_class,
                            "per_class_hd95_mm": {c: 5.0 - 2 * gain for c in CLASSES},
                            "best_val_dice": 0.6,
                            "best_iteration": 200,
                            "iterations": 300,
                            "wall_s": 10.0,
                            "run": f"ft-{init}-{count}-{combination}-s{seed}",
                        }
                    )
    return rows


@pytest.fixture
def sample_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """60 embeddings of 16 features in 3 partitions that lie apart."""
    rng = np.random.default_rng(5)
    partitions = np.repeat(np.arange(3), 20)
    centres = rng.normal(0, 3, size=(3, 16))
    return centres[partitions] + rng.normal(0, 1, size=(60, 16)), partitions


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and running as root; the test is
    skipped, with the reason, where that cannot be done."""
    if found := _find_chromium():
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and this is not root with apt-get to install it")
    command = "apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=120 chromium"
    try:
        done = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium with apt-get took more than 15 minutes")
    found = _find_chromium()
    if found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"apt-get could not install chromium (status {done.returncode}): {tail[0]}")
    return found


@pytest.fixture
def png(tmp_path: Path):
    """``png(name)``: the path of a small PNG drawn from fixed numbers."""
    from PIL import Image

    def make(name: str) -> Path:
        pixels = np.linspace(0, 255, 40 * 60, dtype=np.uint8).reshape(40, 60)
        path = tmp_path / name
        Image.fromarray(pixels).save(path)
        return path

    return make
