"""MM-WHS 2017 MR training volumes, as downloaded.

Layout: ``root`` holds (directly or in ``root/mr_train``) ``mr_train_10XX_image.nii.gz`` and
``mr_train_10XX_label.nii.gz`` (``.nii`` also accepted); case ids are ``mr_train_10XX``.
Every other file whose name starts with ``mr_train_`` is an error, other files are ignored.

Labels: the raw values 205 (myocardium), 420 (left atrium), 500 (left ventricle),
550 (right atrium), 600 (right ventricle), 820 (ascending aorta), 850 (pulmonary artery) map to
1..7 in that order, 0 stays 0; any other value is an error naming it.

Orientation: the MR volumes come in mixed voxel orders (axial, coronal or sagittal
acquisitions). Image and label are reoriented to the closest canonical RAS+ voxel order, as
``nibabel.as_closest_canonical`` does: ``io_orientation`` of the image affine gives, for each
voxel axis, the world axis nearest to it and its sign; ``apply_orientation`` permutes and flips
the arrays accordingly and the affine becomes ``affine @ inv_ornt_aff(ornt, shape)``, so that
world coordinates of every voxel are unchanged. Afterwards axis 0 runs toward patient right,
axis 1 toward anterior and axis 2 toward superior: slices along axis 2 are axial. Nothing is
resampled, so an oblique acquisition stays oblique (its slices are the voxel planes nearest to
axial), and the voxel spacing is permuted with the axes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from contraseg.config import DataConfig
from contraseg.data.orientation import Orientation, to_canonical
from contraseg.data.readers.base import AbsentClasses
from contraseg.data.readers.nifti import check_finite, check_ndim, load_nifti
from contraseg.data.readers.nnunet import check_same_grid
from contraseg.data.volume import CaseFiles, Volume
from contraseg.errors import InputError

RAW_LABELS = (205, 420, 500, 550, 600, 820, 850)
_NAME = re.compile(r"^mr_train_(?P<number>\d{4})_(?P<kind>image|label)(?P<ending>\.nii(\.gz)?)$")


def map_labels(path: Path, raw: np.ndarray) -> np.ndarray:
    """Raw MM-WHS values -> 0..7 (int16); an unknown value raises naming it and the file."""
    rounded = np.rint(raw).astype(np.int64)
    values = set(np.unique(rounded).tolist())
    unknown = sorted(values - {0, *RAW_LABELS})
    if unknown or not np.allclose(rounded, raw, atol=1e-3):
        raise InputError(
            path,
            f"label values {unknown or 'non-integer'} are not MM-WHS labels "
            f"(0, {', '.join(map(str, RAW_LABELS))})",
        )
    lookup = np.zeros(max(RAW_LABELS) + 1, dtype=np.int16)
    lookup[list(RAW_LABELS)] = np.arange(1, len(RAW_LABELS) + 1, dtype=np.int16)
    return lookup[rounded]


class MmwhsReader:
    """Reads MM-WHS MR; paper settings 160 x 160 at 1.5 mm (docs/datasets.md)."""

    name = "mmwhs"
    class_names = ("background", "Myo", "LA", "LV", "RA", "RV", "AA", "PA")
    default_spacing = (1.5, 1.5)
    default_size = (160, 160)
    in_channels = 1
    channel = None
    orientation: Orientation = "closest_canonical"
    # predictions are written with the raw values, so that they compare with the references
    label_values = (0, *RAW_LABELS)
    absent_classes: AbsentClasses = "count_as_one"

    def __init__(self, config: DataConfig) -> None:
        """Nothing in ``config`` changes how MM-WHS is read; the factory signature takes it."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def list_cases(self, root: Path) -> list[CaseFiles]:
        root = Path(root)
        folder = root / "mr_train" if (root / "mr_train").is_dir() else root
        if not folder.is_dir():
            raise InputError(folder, "folder not found")
        found: dict[str, dict[str, Path]] = {}
        for path in sorted(folder.iterdir()):
            if not path.name.startswith("mr_train_"):
                continue
            match = _NAME.match(path.name)
            if match is None:
                raise InputError(
                    path, "unexpected file: expected mr_train_10XX_image.nii.gz or _label.nii.gz"
                )
            case_id = f"mr_train_{match['number']}"
            if match["kind"] in found.setdefault(case_id, {}):
                raise InputError(path, f"a second {match['kind']} file for {case_id}")
            found[case_id][match["kind"]] = path
        if not found:
            raise InputError(folder / "mr_train_1001_image.nii.gz", "file not found")
        cases = []
        for case_id, files in sorted(found.items()):
            for kind in ("image", "label"):
                if kind not in files:
                    raise InputError(folder / f"{case_id}_{kind}.nii.gz", "file not found")
            cases.append(CaseFiles(case_id, files["image"], files["label"]))
        return cases

    def load(self, case: CaseFiles) -> Volume:
        image, affine, zooms = load_nifti(case.image)
        check_ndim(case.image, image)
        check_finite(case.image, image)
        label = None
        if case.label is not None:
            raw, label_affine, _ = load_nifti(case.label)
            check_ndim(case.label, raw)
            check_finite(case.label, raw)
            check_same_grid(case.label, raw.shape, label_affine, image.shape, affine, case.image)
            label, _, _ = to_canonical(map_labels(case.label, raw), affine, zooms)
        image, new_affine, spacing = to_canonical(image, affine, zooms)
        return Volume(
            case_id=case.case_id,
            image=image[..., None].astype(np.float32),
            label=label,
            spacing=spacing,
            affine=new_affine,
            source=case.image,
        )
