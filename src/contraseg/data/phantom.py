"""The embedded cardiac MRI phantom (docs/data.md, shared design note ``phantom.md``).

No real dataset can be downloaded where this project runs, so the demo, tests and benchmarks
use a procedural stand-in written in ACDC's own layout: the real ACDC reader, preprocessing and
cache then run unchanged on it. What the method needs from it:

* anatomy that depends on the relative slice position (LV base z = 0 to apex z ~ 1), so that
  the partition-matched positives of G^D make sense: a truncated prolate-ellipsoid LV with a
  closed apical cap, an RV crescent that ends before the apex, papillary muscles in mid slices,
  liver in apical slices, atria above a tilted valve plane;
* variation between subjects of the kind that makes one labelled volume of real cine MRI
  insufficient: disease groups (ACDC's NOR, DCM, HCM, MINF, RV) that change LV size, wall
  thickness and RV size, heart pose, contour shape, slice coverage (base or apex slices missing
  or extra), through-plane partial volume at the base, contrasts and bias fields;
* SynthSeg-like image formation from the tissue map: random per-subject tissue intensities with
  a minimum contrast, smooth texture, partial-volume blur, a multiplicative bias field, a gamma,
  Rician noise and a random gain; anisotropic spacing (1.3-1.6 mm in plane, 5-10 mm between
  slices).

How hard it is is set by a ``Difficulty``: preset ``"paper"`` (the default) is calibrated to
the paper's one-labelled-volume regime, ``"easy"`` is the phantom from before it; docs/data.md
lists the knobs and what random initialisation scores with each. Every volume is a
function of (dataset seed, subject id, difficulty) only, and files are written with a fixed gzip
mtime, so the same seed gives byte-identical files. The anatomy is in millimetres and
independent of ``size``: a larger ``size`` only widens the field of view.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from contraseg import fileio
from contraseg.errors import InputError

# tissue classes of the intensity model (labels are separate: 0 bg, 1 RV, 2 Myo, 3 LV)
AIR, BODY, FAT, LUNG, LV_BLOOD, RV_BLOOD, MYO, AORTA, LIVER = range(9)
N_TISSUES = 9

Range = tuple[float, float]
Preset = Literal["paper", "easy"]

# Basal slices whose slab reaches above this relative position are sampled through-plane (the
# valve plane, the RV outflow tract and the atria lie above it); the others are not, to keep
# generation cheap where the anatomy barely changes within a slab.
_BASE_ZONE = 0.2
# Hearts stay within this distance (mm) of the image centre: the phantom reader's 64 x 64 grid
# at 1.7 mm sees 54 mm either side.
_HEART_REACH = 48.0


@dataclass(frozen=True)
class Phenotype:
    """A disease group. ACDC's five groups differ mostly in LV size, wall and RV size."""

    name: str
    radius: Range  # LV cavity radius at the base, ED (mm)
    wall: Range  # wall thickness at the base (mm)
    regional_wall: Range  # relative wall change over one sector (< 0 thinning, > 0 thickening)
    rv_scale: Range  # RV size relative to a normal one
    es_factor: Range  # cavity scaling of the ES frame


@dataclass(frozen=True)
class Difficulty:
    """The knobs that set how hard the phantom is (docs/data.md gives both presets)."""

    phenotypes: tuple[Phenotype, ...]  # drawn uniformly per subject
    slices: tuple[int, int]  # number of slices, both ends included
    first_slice: Range  # position of the first slice: 0 LV base, < 0 atria above it
    last_slice: Range  # position of the last slice: ~1 just past the apex, < 0.9 apex missing
    shift: float  # heart bounding-box centre within +-shift mm of the image centre, per axis
    rotation: float  # in-plane rotation within +-rotation degrees
    ellipticity: Range
    ripple: float  # largest amplitude of the 3rd and 4th harmonics of the LV contours
    rv_end: Range  # where the RV ends
    rv_extension: Range  # how far above the LV base the RV (outflow tract) begins
    valve_tilt: float  # through-plane tilt of the valve plane: shift of z over one heart radius
    slab: float  # slice profile width / slice step in basal slices (0: no partial volume)
    blood: Range  # LV blood intensity
    myo: Range  # myocardium intensity
    min_blood_myo: float  # redraw the intensities until blood - myocardium exceeds this
    min_body_myo: float  # ... and |body - myocardium| this
    min_blood_body: float  # ... and blood - body this (cine SSFP: blood is the brightest)
    bias: float  # coefficients of the log bias polynomial within +-bias
    gamma: Range
    noise: Range  # Rician sigma relative to the blood intensity
    blur: Range  # in-plane partial-volume blur sigma (pixels)

    def __post_init__(self) -> None:
        if not 2 <= self.slices[0] <= self.slices[1]:
            raise ValueError(f"slices must be a range of at least 2, got {self.slices}")


PRESETS: dict[str, Difficulty] = {
    # the paper's regime: random init scores ~0.6 mean Dice from one labelled volume (ACDC:
    # 0.61-0.63), ~0.7 from two
    "paper": Difficulty(
        phenotypes=(
            Phenotype("NOR", (12.0, 16.0), (5.0, 7.5), (0.0, 0.15), (0.85, 1.15), (0.55, 0.72)),
            Phenotype("DCM", (16.5, 20.0), (3.5, 5.5), (0.0, 0.15), (0.9, 1.2), (0.82, 0.93)),
            Phenotype("HCM", (8.0, 12.0), (8.5, 12.0), (0.2, 0.5), (0.8, 1.05), (0.35, 0.55)),
            Phenotype("MINF", (13.0, 18.0), (4.5, 7.0), (-0.6, -0.3), (0.85, 1.1), (0.72, 0.88)),
            Phenotype("RV", (11.0, 15.0), (4.5, 7.0), (0.0, 0.15), (1.3, 1.6), (0.55, 0.75)),
        ),
        slices=(7, 14),
        first_slice=(-0.15, 0.1),
        last_slice=(0.82, 1.15),
        shift=12.0,
        rotation=40.0,
        ellipticity=(0.8, 1.25),
        ripple=0.08,
        rv_end=(0.45, 0.9),
        rv_extension=(0.0, 0.1),
        valve_tilt=0.12,
        slab=0.8,
        blood=(0.65, 1.0),
        myo=(0.1, 0.35),
        min_blood_myo=0.3,
        min_body_myo=0.08,
        min_blood_body=0.2,
        bias=0.3,
        gamma=(0.85, 1.2),
        noise=(0.02, 0.05),
        blur=(0.5, 1.0),
    ),
    # the ranges of the phantom before the paper preset: one labelled volume gives ~0.8
    "easy": Difficulty(
        phenotypes=(Phenotype("NOR", (11.0, 17.0), (4.5, 8.0), (0, 0), (1, 1), (0.6, 0.8)),),
        slices=(8, 12),
        first_slice=(0.0, 0.0),
        last_slice=(1.0, 1.0),
        shift=7.0,
        rotation=30.0,
        ellipticity=(0.85, 1.15),
        ripple=0.0,
        rv_end=(0.6, 0.8),
        rv_extension=(0.0, 0.0),
        valve_tilt=0.0,
        slab=0.0,
        blood=(0.65, 1.0),
        myo=(0.1, 0.35),
        min_blood_myo=0.3,
        min_body_myo=0.1,
        min_blood_body=0.1,
        bias=0.25,
        gamma=(1.0, 1.0),
        noise=(0.015, 0.04),
        blur=(0.5, 0.9),
    ),
}


@dataclass(frozen=True)
class _Subject:
    """Per-subject anatomy in millimetres and normalised slice position (drawn once)."""

    group: str
    n_slices: int
    first: float  # position of the first and last slice (0 = LV base)
    last: float
    spacing: tuple[float, float, float]
    centre: tuple[float, float]  # LV centre relative to the image centre
    angle: float  # in-plane rotation of the heart (radians)
    radius: float  # LV cavity radius at the base, ED
    wall: float  # myocardial wall thickness at the base
    regional_wall: tuple[float, float]  # relative change and direction (radians) of the sector
    ellipticity: float
    ripple: tuple[float, float, float, float]  # amplitude and phase of the 3rd, 4th harmonics
    z_apex: float  # where the cavity closes
    z_cap: float  # where the epicardium closes
    rv_end: float  # where the RV ends
    rv_start: float  # where the RV begins (<= 0: above the LV base)
    rv_offset: float  # RV ellipse centre distance, in LV epicardial radii
    rv_axes: tuple[float, float]  # RV ellipse semi-axes, in LV epicardial radii
    valve: tuple[float, float]  # valve-plane tilt and its direction (radians)
    atria: tuple[float, float, float, float]  # LA offset u, v and radius; RA radius (mm)
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
    slab: float  # slice profile width / slice step in basal slices


def _place_heart(
    shift: np.ndarray, angle: float, lv_reach: float, rv_min: float, rv_half: float
) -> tuple[float, float]:
    """LV centre that puts the heart's bounding-box centre at ``shift``, pulled in as needed.

    In heart coordinates the heart spans u in [rv_min, lv_reach] and |v| <= max(lv_reach,
    rv_half); the shift is shortened so that the heart stays within ``_HEART_REACH`` mm.
    """
    mid = (lv_reach + rv_min) / 2.0
    reach = max((lv_reach - rv_min) / 2.0, lv_reach, rv_half)
    room = max(_HEART_REACH - reach, 0.0)
    norm = float(np.hypot(*shift))
    if norm > room:
        shift = shift * (room / norm)
    return (
        float(shift[0] - mid * np.cos(angle)),
        float(shift[1] - mid * np.sin(angle)),
    )


def _draw_subject(rng: np.random.Generator, d: Difficulty) -> _Subject:
    u = rng.uniform
    pheno = d.phenotypes[int(rng.integers(len(d.phenotypes)))]
    radius, wall = float(u(*pheno.radius)), float(u(*pheno.wall))
    regional = float(u(*pheno.regional_wall))
    ellipticity = float(u(*d.ellipticity))
    ripple = tuple(float(u(0, top)) for top in (d.ripple, 2 * np.pi, d.ripple, 2 * np.pi))
    rv_scale = float(u(*pheno.rv_scale))
    rv_offset = float(u(0.5, 0.8))
    rv_axes = (float(u(0.75, 1.1)) * rv_scale, float(u(1.2, 1.7)) * rv_scale)
    angle = float(np.deg2rad(u(-d.rotation, d.rotation)))
    r_base = radius + wall
    lv_reach = (radius + wall * (1.0 + max(regional, 0.0))) * max(ellipticity, 1 / ellipticity)
    lv_reach *= 1.0 + ripple[0] + ripple[2]
    centre = _place_heart(
        u(-d.shift, d.shift, size=2),
        angle,
        lv_reach,
        -(rv_offset + rv_axes[0]) * r_base,
        rv_axes[1] * r_base,
    )
    return _Subject(
        group=pheno.name,
        n_slices=int(rng.integers(d.slices[0], d.slices[1] + 1)),
        first=float(u(*d.first_slice)),
        last=float(u(*d.last_slice)),
        spacing=(float(u(1.3, 1.6)),) * 2 + (float(u(5.0, 10.0)),),
        centre=centre,
        angle=angle,
        radius=radius,
        wall=wall,
        regional_wall=(regional, float(u(0, 2 * np.pi))),
        ellipticity=ellipticity,
        ripple=ripple,
        z_apex=float(u(0.72, 0.9)),
        z_cap=float(u(0.06, 0.1)),
        rv_end=float(u(*d.rv_end)),
        rv_start=-float(u(*d.rv_extension)),
        rv_offset=rv_offset,
        rv_axes=rv_axes,
        valve=(float(u(0, d.valve_tilt)), float(u(0, 2 * np.pi))),
        atria=(
            float(u(-3, 3)),
            float(u(-3, 3)),
            r_base * float(u(0.75, 1.0)),
            r_base * float(u(0.6, 0.9)) * rv_scale,
        ),
        es_factor=float(u(*pheno.es_factor)),
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
        slab=d.slab,
    )


def _ellipse(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inside the axis-aligned ellipse with semi-axes a, b (broadcast; zero axes: empty)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    return inside & (a > 0) & (b > 0)


def _inside(rho: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside a star-shaped contour of radius ``r`` (broadcast; zero radius: empty)."""
    return (rho <= r) & (r > 0)


def _profile(z: np.ndarray, end: float) -> np.ndarray:
    """Radius factor of an ellipsoid closing at ``end``: sqrt(1 - (z / end)^2), 0 beyond."""
    return np.sqrt(np.clip(1.0 - (z / end) ** 2, 0.0, None))


def _slab_positions(s: _Subject) -> tuple[np.ndarray, np.ndarray]:
    """Where to sample the anatomy, and how the samples mix into the (X, Y, n) image.

    Positions 0..n-1 are the slice centres (the labels come from them); a basal slice also gets
    two samples at +-1/3 of its slab, averaged with its centre: through-plane partial volume.
    """
    z = np.linspace(s.first, s.last, s.n_slices)
    width = s.slab * (s.last - s.first) / (s.n_slices - 1)
    thick = np.flatnonzero(z - width / 2 < _BASE_ZONE) if width > 0 else np.zeros(0, int)
    extra = (z[thick, None] + width / 3 * np.array([-1.0, 1.0])).ravel()
    mix = np.eye(s.n_slices + extra.size, s.n_slices)
    mix[thick, thick] = 1 / 3
    mix[s.n_slices + np.arange(extra.size), np.repeat(thick, 2)] = 1 / 3
    return np.concatenate([z, extra]), mix


def _anatomy(
    s: _Subject, size: int, cavity_scale: float, zpos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map and label map at slice positions ``zpos``, (X, Y, Z) uint8, back to front."""
    sx = s.spacing[0]
    coords = (np.arange(size) - (size - 1) / 2.0) * sx
    x = coords[:, None, None]
    y = coords[None, :, None]
    z = zpos[None, None, :]
    tissue = np.zeros((size, size, zpos.size), np.uint8)
    label = np.zeros_like(tissue)

    # heart-local coordinates: rotate about the LV centre
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

    # the ventricles lie below a tilted valve plane (the RV outflow tract reaches higher), the
    # atria above it
    r_base = s.radius + s.wall
    tilt, tilt_dir = s.valve
    valve = tilt * (hu * np.cos(tilt_dir) + hv * np.sin(tilt_dir)) / r_base
    lv_zone = z >= valve
    rv_zone = z >= valve + s.rv_start

    # LV: cavity and epicardium as ellipsoid profiles in polar coordinates of the ellipse, with
    # rippled contours and one sector of thinner or thicker wall; the wall thickens to the apex
    e = s.ellipticity
    p, q = hu / e, hv * e
    rho, theta = np.hypot(p, q), np.arctan2(q, p)
    a3, phi3, a4, phi4 = s.ripple
    shape = 1.0 + a3 * np.cos(3 * theta - phi3) + a4 * np.cos(4 * theta - phi4)
    change, direction = s.regional_wall
    sector = np.angle(np.exp(1j * (theta - direction)))
    regional = 1.0 + change * np.exp(-0.5 * (sector / 0.7) ** 2)
    radius = s.radius * cavity_scale
    wall = s.wall / np.sqrt(cavity_scale) * (1.0 + 0.3 * z)
    r_cav = radius * _profile(z, s.z_apex) * shape
    r_epi = np.maximum(
        np.where(r_cav > 0, r_cav + wall * regional, 0.0),
        (radius + wall) * _profile(z, s.z_apex + s.z_cap) * shape,
    )
    epi = _inside(rho, r_epi) & lv_zone
    cav = _inside(rho, r_cav) & lv_zone

    # RV crescent around the septum (-u side), tapering to nothing at rv_end
    r_rv = r_base * (cavity_scale**0.5)
    f_rv = _profile(z, s.rv_end)
    ru = hu + s.rv_offset * r_rv
    rv_a, rv_b = s.rv_axes[0] * r_rv * f_rv, s.rv_axes[1] * r_rv * f_rv
    rv_outer = _ellipse(ru, hv, rv_a, rv_b) & ~epi & rv_zone
    rv_cav = _ellipse(ru, hv, np.maximum(rv_a - 2.0, 0), np.maximum(rv_b - 2.0, 0)) & ~epi
    rv_cav &= rv_zone

    # atria above the valve plane: bright, thin-walled, unlabelled (as in ACDC)
    la_u, la_v, la_r, ra_r = (np.array(v) for v in s.atria)
    la = _ellipse(hu - la_u, hv - la_v, la_r, la_r) & ~lv_zone
    ra = _ellipse(ru, hv, ra_r, ra_r) & ~rv_zone
    paint(_ellipse(hu - la_u, hv - la_v, la_r + 2.0, la_r + 2.0) & ~lv_zone, MYO)
    paint(_ellipse(ru, hv, ra_r + 2.0, ra_r + 2.0) & ~rv_zone, MYO)
    paint(la, LV_BLOOD)
    paint(ra, RV_BLOOD)

    # epicardial fat around the heart, then the heart itself
    paint(_inside(rho, r_epi + 3.0) & lv_zone, FAT)
    paint(rv_outer, MYO)  # the thin RV free wall is myocardium but unlabelled, as in ACDC
    paint(rv_cav, RV_BLOOD)
    paint(rv_cav, 1, label)
    paint(epi, MYO)
    paint(epi, 2, label)
    paint(cav, LV_BLOOD)
    paint(cav, 3, label)

    # papillary muscles: dark discs in the cavity of mid slices, labelled LV as in ACDC
    r_mid = radius * _profile(z, s.z_apex)
    mid = (z > 0.2) & (z < 0.65) & (r_mid > 6.0)
    for ang in (np.pi / 4, -np.pi / 4):
        pu, pv = 0.6 * r_mid * np.cos(ang), 0.6 * r_mid * np.sin(ang)
        pm = _ellipse(p - pu, q - pv, np.array(2.0), np.array(2.0)) & mid & cav
        paint(pm, MYO)
    return tissue, label


def _tissue_means(rng: np.random.Generator, d: Difficulty) -> np.ndarray:
    """Per-subject tissue intensities; redrawn until blood/myocardium/body contrasts suffice."""
    while True:
        m = np.zeros(N_TISSUES)
        m[BODY] = rng.uniform(0.3, 0.55)
        m[FAT] = rng.uniform(0.55, 0.95)
        m[LUNG] = rng.uniform(0.02, 0.1)
        m[LV_BLOOD] = rng.uniform(*d.blood)
        m[RV_BLOOD] = m[LV_BLOOD] * rng.uniform(0.85, 1.05)
        m[MYO] = rng.uniform(*d.myo)
        m[AORTA] = m[LV_BLOOD] * rng.uniform(0.9, 1.1)
        m[LIVER] = rng.uniform(0.25, 0.5)
        if (
            min(m[LV_BLOOD], m[RV_BLOOD]) - m[MYO] > d.min_blood_myo
            and abs(m[BODY] - m[MYO]) > d.min_body_myo
            and m[LV_BLOOD] - m[BODY] > d.min_blood_body
            and m[FAT] - m[MYO] > 0.2
        ):
            return m


def _image(
    tissue: np.ndarray, mix: np.ndarray, rng: np.random.Generator, d: Difficulty
) -> np.ndarray:
    """Intensity image from the tissue samples (mixed into slices by ``mix``, see
    ``_slab_positions``): texture, blur, bias field, gamma, Rician noise, gain."""
    means = _tissue_means(rng, d)
    img = means[tissue] @ mix
    texture = gaussian_filter(rng.standard_normal(img.shape), sigma=(1.5, 1.5, 0))
    texture /= texture.std() + 1e-8
    img *= 1.0 + rng.uniform(0.03, 0.08) * texture
    img = gaussian_filter(img, sigma=(rng.uniform(*d.blur),) * 2 + (0,))
    nx, ny, nz = img.shape
    gx = np.linspace(-1, 1, nx)[:, None, None]
    gy = np.linspace(-1, 1, ny)[None, :, None]
    gz = np.linspace(-1, 1, nz)[None, None, :]
    c = rng.uniform(-d.bias, d.bias, size=6)
    img *= np.exp(c[0] * gx + c[1] * gy + c[2] * gx * gy + c[3] * gx**2 + c[4] * gy**2 + c[5] * gz)
    img **= rng.uniform(*d.gamma)
    sigma = rng.uniform(*d.noise) * means[LV_BLOOD]
    n1, n2 = rng.standard_normal((2, *img.shape))
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return np.rint(img * rng.uniform(150, 600)).astype(np.int16)


def _nifti_gz(data: np.ndarray, spacing: tuple[float, float, float], size: int) -> bytes:
    """NIfTI bytes gzipped with mtime 0, so that equal volumes give equal files."""
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:2, 3] = -(size - 1) / 2.0 * np.array(spacing[:2])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def difficulty(preset: Preset | Difficulty) -> Difficulty:
    """The named preset's knobs (a ``Difficulty`` is passed through)."""
    if isinstance(preset, Difficulty):
        return preset
    if preset not in PRESETS:
        raise InputError(None, f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def generate_subject(
    seed: int, subject: int, size: int, preset: Preset | Difficulty = "paper"
) -> tuple[tuple[float, float, float], dict[int, tuple[np.ndarray, np.ndarray]], str]:
    """Spacing, frames ({frame number: (image int16, label uint8)}) and group of one subject.

    Frame 1 is ED; the ES frame (number drawn per subject) has a smaller cavity.
    """
    d = difficulty(preset)
    s = _draw_subject(np.random.default_rng([seed, subject, 0]), d)
    zpos, mix = _slab_positions(s)
    frames = {}
    for stream, (frame, scale) in enumerate(((1, 1.0), (s.es_frame, s.es_factor)), start=1):
        tissue, label = _anatomy(s, size, scale, zpos)
        image = _image(tissue, mix, np.random.default_rng([seed, subject, stream]), d)
        frames[frame] = (image, label[..., : s.n_slices])
    return s.spacing, frames, s.group


def _write(target: Path, data: bytes) -> None:
    """Atomic (temp file + rename) but without fsync: the data can always be regenerated, and
    syncing hundreds of small files would dominate the generation time."""
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_phantom_dataset(
    out: Path, volumes: int, size: int, seed: int, preset: Preset | Difficulty = "paper"
) -> None:
    """Write ``volumes`` subjects as ``patientXXX/`` folders (ED = frame 01, ES frame, Info.cfg).

    ``preset`` sets the difficulty: ``"paper"`` (default) or ``"easy"`` (docs/data.md).
    """
    out = Path(out)
    if volumes < 1 or volumes > 999:
        raise InputError(None, f"--volumes must be between 1 and 999, got {volumes}")
    if size < 16:
        raise InputError(None, f"--size must be at least 16 pixels, got {size}")
    d = difficulty(preset)
    for subject in tqdm(
        range(1, volumes + 1), desc="phantom", unit="vol", leave=False, disable=None
    ):
        pid = f"patient{subject:03d}"
        folder = out / pid
        spacing, frames, group = generate_subject(seed, subject, size, d)
        for frame, (image, label) in frames.items():
            stem = folder / f"{pid}_frame{frame:02d}"
            _write(Path(f"{stem}.nii.gz"), _nifti_gz(image, spacing, size))
            _write(Path(f"{stem}_gt.nii.gz"), _nifti_gz(label, spacing, size))
        es_frame = max(frames)
        info = f"ED: 1\nES: {es_frame}\nGroup: {group}\nNbFrame: 20\nSeed: {seed}\n"
        _write(folder / "Info.cfg", info.encode())
