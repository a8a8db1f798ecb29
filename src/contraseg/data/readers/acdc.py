"""ACDC's layout (``patientXXX/patientXXX_frameNN[_gt].nii.gz`` + ``Info.cfg``) and the phantom.

The frame to read is taken from ``Info.cfg`` (``ED: 1``, ``ES: 12``), never assumed to be
frame 01: in the real dataset some patients' ED is another frame (patient 090: frame 04). With
``frames: [ED]`` or ``[ES]`` the case id is the patient folder name (``patient001``), which is
what the packaged splits use; with both frames the ES case gets a suffix (``patient001_ES``).
The real dataset's ``training/`` and ``testing/`` sub-folders are searched when ``root`` itself
holds no patient folders.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from contraseg.config import DataConfig
from contraseg.data.orientation import Orientation
from contraseg.data.readers.base import AbsentClasses
from contraseg.data.readers.nifti import check_finite, check_ndim, labels_to_int, load_nifti
from contraseg.data.volume import CaseFiles, Volume
from contraseg.errors import InputError
from contraseg.fileio import one_line

_PATIENT = re.compile(r"patient\d{3}")
_FRAMES = ("ED", "ES")


def read_info(path: Path) -> dict[str, int]:
    """The ED and ES frame numbers of an ``Info.cfg`` file."""
    if not path.is_file():
        raise InputError(path, "Info.cfg not found (it names the ED and ES frames)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read Info.cfg: {one_line(err)}") from None
    frames: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in _FRAMES:
            try:
                frames[key.strip()] = int(value.strip())
            except ValueError:
                problem = f"'{key.strip()}:' is not a frame number: {value.strip()!r}"
                raise InputError(path, problem) from None
    for key in _FRAMES:
        if key not in frames:
            raise InputError(path, f"no '{key}:' line")
        if frames[key] < 0:
            raise InputError(path, f"'{key}:' must not be negative, got {frames[key]}")
    return frames


def _squeeze_trailing(data: np.ndarray) -> np.ndarray:
    """Drop singleton axes after the third (some tools write (X, Y, Z, 1))."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


class AcdcReader:
    """ACDC (MICCAI 2017): short-axis cine MRI, labels 0 bg, 1 RV, 2 Myo, 3 LV."""

    name = "acdc"
    class_names: tuple[str, ...] = ("background", "RV", "Myo", "LV")
    default_spacing: tuple[float, float] = (1.36719, 1.36719)
    default_size: tuple[int, int] = (192, 192)
    in_channels = 1
    channel = None
    orientation: Orientation = "as_stored"
    label_values: tuple[int, ...] = (0, 1, 2, 3)
    absent_classes: AbsentClasses = "count_as_one"

    def __init__(self, config: DataConfig) -> None:
        frames = list(config.frames)
        if not frames or any(f not in _FRAMES for f in frames) or len(set(frames)) != len(frames):
            raise InputError(None, f"data.frames must be [ED], [ES] or [ED, ES], got {frames}")
        self.frames = frames

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _patient_dirs(self, root: Path) -> list[Path]:
        if not root.is_dir():
            raise InputError(root, "dataset folder not found")
        for bases in ([root], [root / "training", root / "testing"]):
            found = [
                p
                for base in bases
                if base.is_dir()
                for p in base.iterdir()
                if p.is_dir() and _PATIENT.fullmatch(p.name)
            ]
            if found:
                return sorted(found, key=lambda p: p.name)
        raise InputError(root, "no patientXXX folders found (expected ACDC's layout)")

    def list_cases(self, root: Path) -> list[CaseFiles]:
        cases = []
        for folder in self._patient_dirs(Path(root)):
            info = read_info(folder / "Info.cfg")
            for frame in self.frames:
                stem = folder / f"{folder.name}_frame{info[frame]:02d}"
                image, label = self._nifti(stem), self._nifti(Path(f"{stem}_gt"))
                if not image.is_file():
                    raise InputError(image, f"{frame} image named by Info.cfg not found")
                if not label.is_file():
                    raise InputError(label, f"label file of the {frame} frame not found")
                suffix = f"_{frame}" if len(self.frames) > 1 and frame != "ED" else ""
                cases.append(
                    CaseFiles(
                        case_id=folder.name + suffix,
                        image=image,
                        label=label,
                        extra={"frame": frame, "info": str(folder / "Info.cfg")},
                    )
                )
        return cases

    @staticmethod
    def _nifti(stem: Path) -> Path:
        """``stem.nii.gz``, or ``stem.nii`` when only the uncompressed file exists."""
        gz = Path(f"{stem}.nii.gz")
        plain = Path(f"{stem}.nii")
        return plain if not gz.exists() and plain.exists() else gz

    def load(self, case: CaseFiles) -> Volume:
        image, affine, spacing = load_nifti(case.image)
        image = _squeeze_trailing(image)
        check_ndim(case.image, image)
        check_finite(case.image, image)
        label = None
        if case.label is not None:
            raw, _, _ = load_nifti(case.label)
            raw = _squeeze_trailing(raw)
            check_ndim(case.label, raw)
            if raw.shape != image.shape:
                raise InputError(
                    case.label,
                    f"label shape {raw.shape} differs from image shape {image.shape}",
                )
            check_finite(case.label, raw)
            label = labels_to_int(case.label, raw, range(self.num_classes))
        return Volume(
            case_id=case.case_id,
            image=image[..., None].astype(np.float32),
            label=label,
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            affine=affine,
            source=case.image,
        )


class PhantomReader(AcdcReader):
    """The embedded phantom, read by the ACDC code with smaller defaults.

    Every heart of the phantom (LV, myocardium and RV) lies within 48 mm of the image centre,
    whatever size it was generated at (docs/data.md). 64 x 64 pixels at 1.7 mm (a 109 mm field
    of view) keep it at least 3 pixels from the border while keeping CPU training cheap.
    """

    name = "phantom"
    default_spacing = (1.7, 1.7)
    default_size = (64, 64)
