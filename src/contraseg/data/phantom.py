"""The embedded cardiac MRI phantom (docs/data.md, shared design note ``phantom.md``).

No real dataset can be downloaded where this project runs, so the demo, tests and benchmarks
use a procedural stand-in written in ACDC's own layout: the real ACDC reader, preprocessing and
cache then run unchanged on it. What the method needs from it:

* anatomy that depends on the relative slice position (base z = 0 to apex z = 1), so that the
  partition-matched positives of G^D make sense: a truncated prolate-ellipsoid LV with a closed
  apical cap, an RV crescent that ends at z ~ 0.6-0.8, papillary muscles in mid slices, liver in
  apical slices;
* enough variation between subjects that one labelled volume does not cover it (centre, in-plane
  rotation within +-30 degrees, sizes, wall thickness, ellipticity, apex, contrasts, ...);
* SynthSeg-like image formation from the tissue map: random per-subject tissue intensities with
  guaranteed contrasts, smooth texture, partial-volume blur, a multiplicative bias field, Rician
  noise and a random gain; anisotropic spacing (1.3-1.6 mm in plane, 5-10 mm between slices).

Every volume is a function of (dataset seed, subject id) only, and files are written with a
fixed gzip mtime, so the same seed gives byte-identical files. The anatomy is in millimetres and
independent of ``size``: a larger ``size`` only widens the field of view.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from contraseg import fileio
from contraseg.errors import InputError

# tissue classes of the intensity model (labels are separate: 0 bg, 1 RV, 2 Myo, 3 LV)
AIR, BODY, FAT, LUNG, LV_BLOOD, RV_BLOOD, MYO, AORTA, LIVER = range(9)
N_TISSUES = 9


@dataclass(frozen=True)
class _Subject:
    """Per-subject anatomy in millimetres and normalised slice position (drawn once)."""

    n_slices: int
    spacing: tuple[float, float, float]
    centre: tuple[float, float]  # heart centre relative to the image centre
    angle: float  # in-plane rotation of the heart (radians)
    radius: float  # LV cavity radius at the base, ED
    wall: float  # myocardial wall thickness at the base
    ellipticity: float
    z_apex: float  # where the cavity closes
    z_cap: float  # where the epicardium closes
    rv_end: float  # where the RV ends
    rv_offset: float  # RV ellipse centre distance, in LV epicardial radii
    rv_axes: tuple[float, float]  # RV ellipse semi-axes, in LV epicardial radii
    es_factor: float  # cavity scaling of the ES frame
    es_frame: int
    body_offset: tuple[float, float]
    body_axes: tuple[float, float]
    fat_thickness: float
    lung_offsets: tuple[float, float, float]  # lateral distances (2) and vertical shift
    lung_axes: tuple[float, float]
    aorta: tuple[float, float, float]  # offset x, y and radius
    liver_start: float
    liver_offset: tuple[float, float]
    liver_radius: float


def _draw_subject(rng: np.random.Generator) -> _Subject:
    u = rng.uniform
    return _Subject(
        n_slices=int(rng.integers(8, 13)),
        spacing=(float(u(1.3, 1.6)),) * 2 + (float(u(5.0, 10.0)),),
        centre=(float(u(-7, 7)), float(u(-7, 7))),
        angle=float(np.deg2rad(u(-30, 30))),
        radius=float(u(11.0, 17.0)),
        wall=float(u(4.5, 8.0)),
        ellipticity=float(u(0.85, 1.15)),
        z_apex=float(u(0.72, 0.9)),
        z_cap=float(u(0.06, 0.1)),
        rv_end=float(u(0.6, 0.8)),
        rv_offset=float(u(0.5, 0.8)),
        rv_axes=(float(u(0.75, 1.1)), float(u(1.2, 1.7))),
        es_factor=float(u(0.6, 0.8)),
        es_frame=int(rng.integers(8, 16)),
        body_offset=(float(u(10, 30)), float(u(10, 30))),
        body_axes=(float(u(115, 150)), float(u(80, 105))),
        fat_thickness=float(u(5, 14)),
        lung_offsets=(float(u(55, 75)), float(u(45, 60)), float(u(-15, 5))),
        lung_axes=(float(u(28, 42)), float(u(45, 65))),
        aorta=(float(u(-12, 12)), float(u(42, 55)), float(u(9, 13))),
        liver_start=float(u(0.5, 0.75)),
        liver_offset=(float(u(-55, -35)), float(u(-15, 10))),
        liver_radius=float(u(45, 65)),
    )


def _ellipse(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inside the axis-aligned ellipse with semi-axes a, b (broadcast; zero axes: empty)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    return inside & (a > 0) & (b > 0)


def _profile(z: np.ndarray, end: float) -> np.ndarray:
    """Radius factor of an ellipsoid closing at ``end``: sqrt(1 - (z / end)^2), 0 beyond."""
    return np.sqrt(np.clip(1.0 - (z / end) ** 2, 0.0, None))


def _anatomy(s: _Subject, size: int, cavity_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map and label map, both (X, Y, Z) uint8, painted back to front."""
    sx = s.spacing[0]
    coords = (np.arange(size) - (size - 1) / 2.0) * sx
    x = coords[:, None, None]
    y = coords[None, :, None]
    z = np.linspace(0.0, 1.0, s.n_slices)[None, None, :]
    tissue = np.zeros((size, size, s.n_slices), np.uint8)
    label = np.zeros_like(tissue)

    # heart-local coordinates: rotate about the heart centre
    cos, sin = np.cos(s.angle), np.sin(s.angle)
    dx, dy = x - s.centre[0], y - s.centre[1]
    hu, hv = cos * dx + sin * dy, -sin * dx + cos * dy

    # body, subcutaneous fat, lungs, liver (apical slices), descending aorta
    bx, by = x - s.centre[0] - s.body_offset[0], y - s.centre[1] - s.body_offset[1]
    body = _ellipse(bx, by, np.array(s.body_axes[0]), np.array(s.body_axes[1]))
    inner = _ellipse(
        bx,
        by,
        np.array(s.body_axes[0] - s.fat_thickness),
        np.array(s.body_axes[1] - s.fat_thickness),
    )
    full = tissue.shape

    def paint(mask: np.ndarray, value: int, target: np.ndarray = tissue) -> None:
        target[np.broadcast_to(mask, full)] = value

    paint(body, FAT)
    paint(inner, BODY)
    la, lb = np.array(s.lung_axes[0]), np.array(s.lung_axes[1])
    for side, dist in ((-1.0, s.lung_offsets[0]), (1.0, s.lung_offsets[1])):
        lung = _ellipse(dx - side * dist, dy - s.lung_offsets[2], la, lb) & inner
        paint(lung, LUNG)
    liver_r = s.liver_radius * np.sqrt(np.clip((z - s.liver_start) / (1 - s.liver_start), 0, 1))
    liver = _ellipse(dx - s.liver_offset[0], dy - s.liver_offset[1], liver_r, 0.8 * liver_r)
    paint(liver & inner, LIVER)
    aorta = _ellipse(dx - s.aorta[0], dy - s.aorta[1], np.array(s.aorta[2]), np.array(s.aorta[2]))
    paint(aorta, AORTA)

    # LV: cavity and epicardium as ellipsoid profiles; the wall thickens toward the apex
    radius = s.radius * cavity_scale
    wall = s.wall / np.sqrt(cavity_scale) * (1.0 + 0.3 * z)
    r_cav = radius * _profile(z, s.z_apex)
    r_epi = np.maximum(
        np.where(r_cav > 0, r_cav + wall, 0.0),
        (radius + wall) * _profile(z, s.z_apex + s.z_cap),
    )
    e = s.ellipticity
    epi = _ellipse(hu, hv, r_epi * e, r_epi / e)
    cav = _ellipse(hu, hv, r_cav * e, r_cav / e)

    # RV crescent around the septum (-u side), tapering to nothing at rv_end
    r_base = (s.radius + s.wall) * (cavity_scale**0.5)
    f_rv = _profile(z, s.rv_end)
    ru = hu + s.rv_offset * r_base
    rv_a, rv_b = s.rv_axes[0] * r_base * f_rv, s.rv_axes[1] * r_base * f_rv
    rv_outer = _ellipse(ru, hv, rv_a, rv_b) & ~epi
    rv_cav = _ellipse(ru, hv, np.maximum(rv_a - 2.0, 0), np.maximum(rv_b - 2.0, 0)) & ~epi

    # epicardial fat around the heart, then the heart itself
    heart_fat = _ellipse(hu, hv, r_epi * e + 3.0, r_epi / e + 3.0) & (r_epi > 0)
    paint(heart_fat, FAT)
    paint(rv_outer, MYO)  # the thin RV free wall is myocardium but unlabelled, as in ACDC
    paint(rv_cav, RV_BLOOD)
    paint(rv_cav, 1, label)
    paint(epi, MYO)
    paint(epi, 2, label)
    paint(cav, LV_BLOOD)
    paint(cav, 3, label)

    # papillary muscles: dark discs in the cavity of mid slices, labelled LV as in ACDC
    mid = (z > 0.2) & (z < 0.65) & (r_cav > 6.0)
    for ang in (np.pi / 4, -np.pi / 4):
        pu, pv = 0.6 * r_cav * np.cos(ang), 0.6 * r_cav * np.sin(ang)
        pm = _ellipse(hu - pu, hv - pv, np.array(2.0), np.array(2.0)) & mid & cav
        paint(pm, MYO)
    return tissue, label


def _tissue_means(rng: np.random.Generator) -> np.ndarray:
    """Per-subject tissue intensities; redrawn until blood/myocardium/body contrasts suffice."""
    while True:
        m = np.zeros(N_TISSUES)
        m[BODY] = rng.uniform(0.3, 0.55)
        m[FAT] = rng.uniform(0.55, 0.95)
        m[LUNG] = rng.uniform(0.02, 0.1)
        m[LV_BLOOD] = rng.uniform(0.65, 1.0)
        m[RV_BLOOD] = m[LV_BLOOD] * rng.uniform(0.85, 1.05)
        m[MYO] = rng.uniform(0.1, 0.35)
        m[AORTA] = m[LV_BLOOD] * rng.uniform(0.9, 1.1)
        m[LIVER] = rng.uniform(0.25, 0.5)
        if (
            min(m[LV_BLOOD], m[RV_BLOOD]) - m[MYO] > 0.3
            and abs(m[BODY] - m[MYO]) > 0.1
            and m[FAT] - m[MYO] > 0.25
        ):
            return m


def _image(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity image from the tissue map: texture, blur, bias field, Rician noise, gain."""
    means = _tissue_means(rng)
    img = means[tissue]
    texture = gaussian_filter(rng.standard_normal(tissue.shape), sigma=(1.5, 1.5, 0))
    texture /= texture.std() + 1e-8
    img *= 1.0 + rng.uniform(0.03, 0.08) * texture
    img = gaussian_filter(img, sigma=(rng.uniform(0.5, 0.9),) * 2 + (0,))
    nx, ny, nz = tissue.shape
    gx = np.linspace(-1, 1, nx)[:, None, None]
    gy = np.linspace(-1, 1, ny)[None, :, None]
    gz = np.linspace(-1, 1, nz)[None, None, :]
    c = rng.uniform(-0.25, 0.25, size=6)
    img *= np.exp(c[0] * gx + c[1] * gy + c[2] * gx * gy + c[3] * gx**2 + c[4] * gy**2 + c[5] * gz)
    sigma = rng.uniform(0.015, 0.04) * means[LV_BLOOD]
    n1, n2 = rng.standard_normal((2, *tissue.shape))
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return np.rint(img * rng.uniform(150, 600)).astype(np.int16)


def _nifti_gz(data: np.ndarray, spacing: tuple[float, float, float], size: int) -> bytes:
    """NIfTI bytes gzipped with mtime 0, so that equal volumes give equal files."""
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:2, 3] = -(size - 1) / 2.0 * np.array(spacing[:2])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def generate_subject(
    seed: int, subject: int, size: int
) -> tuple[tuple[float, float, float], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Spacing and frames of one subject: {frame number: (image int16, label uint8)}.

    Frame 1 is ED; the ES frame (number drawn per subject) has a smaller cavity.
    """
    s = _draw_subject(np.random.default_rng([seed, subject, 0]))
    frames = {}
    for stream, (frame, scale) in enumerate(((1, 1.0), (s.es_frame, s.es_factor)), start=1):
        tissue, label = _anatomy(s, size, scale)
        frames[frame] = (_image(tissue, np.random.default_rng([seed, subject, stream])), label)
    return s.spacing, frames


def _write(target: Path, data: bytes) -> None:
    """Atomic (temp file + rename) but without fsync: the data can always be regenerated, and
    syncing hundreds of small files would dominate the generation time."""
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_phantom_dataset(out: Path, volumes: int, size: int, seed: int) -> None:
    """Write ``volumes`` subjects as ``patientXXX/`` folders (ED = frame 01, ES frame, Info.cfg)."""
    out = Path(out)
    if volumes < 1 or volumes > 999:
        raise InputError(None, f"--volumes must be between 1 and 999, got {volumes}")
    if size < 16:
        raise InputError(None, f"--size must be at least 16 pixels, got {size}")
    for subject in tqdm(
        range(1, volumes + 1), desc="phantom", unit="vol", leave=False, disable=None
    ):
        pid = f"patient{subject:03d}"
        folder = out / pid
        spacing, frames = generate_subject(seed, subject, size)
        for frame, (image, label) in frames.items():
            stem = folder / f"{pid}_frame{frame:02d}"
            _write(Path(f"{stem}.nii.gz"), _nifti_gz(image, spacing, size))
            _write(Path(f"{stem}_gt.nii.gz"), _nifti_gz(label, spacing, size))
        es_frame = max(frames)
        info = f"ED: 1\nES: {es_frame}\nGroup: PHANTOM\nNbFrame: 20\nSeed: {seed}\n"
        _write(folder / "Info.cfg", info.encode())
