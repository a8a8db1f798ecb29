"""MSD Task05 Prostate as downloaded from the Medical Segmentation Decathlon.

Layout (``root`` is the ``Task05_Prostate`` folder)::

    dataset.json          modality {"0": "T2", "1": "ADC"}, labels {"0": "background",
                          "1": "PZ", "2": "TZ"}, numTraining, training [{image, label}]
    imagesTr/prostate_XX.nii.gz     4-D (X, Y, Z, 2): T2 and ADC
    labelsTr/prostate_XX.nii.gz     3-D, 0 background, 1 peripheral zone, 2 transition zone

The cases are those of ``training`` (the test images have no labels and are not in the paper's
splits); case ids are the file stems (``prostate_16``). One channel is kept,
``config.channel`` (0 = T2, the method's choice); with ``channel`` null a 4-D image is an
error. The volume is used as stored (axis 2 is the slice axis), as the official code does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contraseg.config import DataConfig
from contraseg.data.orientation import Orientation
from contraseg.data.readers.base import AbsentClasses, dataset_path
from contraseg.data.readers.nifti import check_finite, check_ndim, load_nifti
from contraseg.data.readers.nnunet import check_same_grid, declared_labels, read_json, strip_ending
from contraseg.data.volume import CaseFiles, Volume
from contraseg.errors import InputError

_LABELS = {"0": "background", "1": "PZ", "2": "TZ"}


class ProstateReader:
    """Reads MSD Task05 Prostate; paper settings 192 x 192 at 0.625 mm (docs/datasets.md)."""

    name = "prostate"
    class_names = ("background", "PZ", "TZ")
    default_spacing = (0.625, 0.625)
    default_size = (192, 192)
    in_channels = 1
    orientation: Orientation = "as_stored"
    label_values = (0, 1, 2)
    absent_classes: AbsentClasses = "count_as_one"

    def __init__(self, config: DataConfig) -> None:
        self.channel: int | None = config.channel

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def list_cases(self, root: Path) -> list[CaseFiles]:
        root = Path(root)
        meta_path = root / "dataset.json"
        meta = read_json(meta_path, ("modality", "labels", "training"))
        labels = meta["labels"]
        if not isinstance(labels, dict) or sorted(labels) != sorted(_LABELS):
            raise InputError(meta_path, f"'labels' must declare 0, 1, 2 ({_LABELS}), got {labels}")
        modality = meta["modality"]
        if not isinstance(modality, dict) or not modality:
            raise InputError(meta_path, "'modality' must be a non-empty mapping")
        if self.channel is not None and not 0 <= self.channel < len(modality):
            raise InputError(
                meta_path,
                f"channel {self.channel} chosen but the dataset has {len(modality)} "
                f"({', '.join(modality.values())})",
            )
        training = meta["training"]
        if not isinstance(training, list) or not training:
            raise InputError(meta_path, "'training' must be a non-empty list")
        if "numTraining" in meta and meta["numTraining"] != len(training):
            raise InputError(
                meta_path,
                f"numTraining is {meta['numTraining']} but 'training' lists {len(training)}",
            )
        cases = []
        for entry in training:
            if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
                raise InputError(meta_path, f"a 'training' entry lacks image or label: {entry}")
            image = dataset_path(root, entry["image"], meta_path)
            label = dataset_path(root, entry["label"], meta_path)
            for path in (image, label):
                if not path.is_file():
                    raise InputError(path, "file not found (listed in dataset.json)")
            case_id = strip_ending(image.name)
            if case_id is None:
                raise InputError(image, "unexpected file: not .nii.gz or .nii")
            # dataset.json in extra: the cache stamps it, so editing it re-prepares
            cases.append(CaseFiles(case_id, image, label, {"dataset_json": str(meta_path)}))
        return sorted(cases, key=lambda c: c.case_id)

    def load(self, case: CaseFiles) -> Volume:
        data, affine, zooms = load_nifti(case.image)
        if data.ndim == 4:
            if self.channel is None:
                raise InputError(
                    case.image, f"4-D image {data.shape}, choose a channel (data.channel=0 for T2)"
                )
            if self.channel >= data.shape[3]:
                raise InputError(
                    case.image, f"channel {self.channel} chosen but the image has {data.shape[3]}"
                )
            data = data[..., self.channel]
        elif self.channel not in (None, 0):
            raise InputError(case.image, f"channel {self.channel} chosen but the image is 3-D")
        check_ndim(case.image, data)
        check_finite(case.image, data)
        label = None
        if case.label is not None:
            raw, label_affine, _ = load_nifti(case.label)
            check_ndim(case.label, raw)
            check_finite(case.label, raw)
            check_same_grid(case.label, raw.shape, label_affine, data.shape, affine, case.image)
            label = declared_labels(case.label, raw, {v: int(k) for k, v in _LABELS.items()})
        return Volume(
            case_id=case.case_id,
            image=np.ascontiguousarray(data[..., None], dtype=np.float32),
            label=label,
            spacing=(zooms[0], zooms[1], zooms[2]),
            affine=affine,
            source=case.image,
        )
