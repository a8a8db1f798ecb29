"""nnU-Net raw (v2) datasets: the format users already keep their own data in.

Layout (``root`` is the ``DatasetXXX_Name`` folder)::

    dataset.json          channel_names {"0": "T2", ...}, labels {"background": 0, ...},
                          numTraining, file_ending (".nii.gz" or ".nii")
    imagesTr/{case}_{0000..C-1}{file_ending}
    labelsTr/{case}{file_ending}
    imagesUnlabelled/{case}_{0000..C-1}{file_ending}   optional: unlabelled, pre-training only
    imagesTs/{case}_{0000..C-1}{file_ending}     optional: what ``contraseg predict`` segments
    splits_final.json                            optional: [{"train": [...], "val": [...]}, ...]

What is done:

- The C channels of a case (C = number of ``channel_names``) are stacked in channel order into
  (X, Y, Z, C). Axis 2 as stored is the slice axis: nothing is reoriented, as in nnU-Net.
- Labels must be declared in ``dataset.json`` as consecutive integers 0..K-1 with 0 the
  background; a value in a label file that is not declared is an error. Region-based labels
  (lists of values) and the ``ignore`` label are not supported.
- All channels and the label of a case must share shape and affine (within 1e-3 relative).
- Target spacing: ``config.target_spacing``, else per in-plane axis (0 and 1) the median voxel
  spacing of the labelled training cases. Crop size: ``config.size``, else per in-plane axis
  the median extent in mm (shape x spacing) of the labelled cases divided by the target
  spacing, rounded up to a multiple of 32 (the UNet halves the size five times).
- Unlabelled pre-training images: ``imagesUnlabelled/`` and the folders or globs listed in
  ``data.unlabelled`` (named like ``imagesTr``). ``imagesTs`` keeps nnU-Net's meaning, the set
  to be segmented; list it in ``data.unlabelled`` to pre-train on it too (docs/datasets.md).
- Splits (:meth:`NnunetReader.split`): with a ``splits_final.json`` next to ``dataset.json``
  (nnU-Net writes it to ``nnUNet_preprocessed/DatasetXXX_Name/``; copy it over), fold
  ``data.fold`` is read as nnU-Net reads it (:func:`contraseg.data.splits.fold_split`): its
  ``train`` cases are the training pool, its ``val`` cases validate, there is no test set.
  Without it the labelled cases are split by :func:`contraseg.data.splits.generated_split`,
  which works from one labelled case up.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from contraseg.config import DataConfig
from contraseg.data.orientation import Orientation
from contraseg.data.readers.base import AbsentClasses
from contraseg.data.readers.nifti import (
    check_finite,
    check_ndim,
    labels_to_int,
    load_nifti,
    read_nifti_header,
)
from contraseg.data.splits import Split, fold_split, generated_split
from contraseg.data.volume import CaseFiles, Volume
from contraseg.errors import InputError
from contraseg.fileio import one_line

AFFINE_RTOL = 1e-3
SUPPORTED_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_STEM = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def load_json(path: Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises naming it."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {one_line(err)}") from None
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON: {one_line(err)}") from None


def read_json(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Parse a JSON object and check that it has the ``required`` keys, naming the file if not."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "must hold a JSON object")
    missing = [key for key in required if key not in data]
    if missing:
        raise InputError(path, f"missing required key '{missing[0]}'")
    return data


def check_same_grid(
    path: Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    ref_path: Path,
) -> None:
    """An image and its label (or two channels) must lie on one voxel grid: same shape, same
    affine up to ``AFFINE_RTOL`` of the affine's largest entry (rounding in NIfTI headers)."""
    if tuple(shape) != tuple(ref_shape):
        raise InputError(
            path, f"shape {tuple(shape)} differs from {tuple(ref_shape)} of {ref_path}"
        )
    scale = max(1.0, float(np.abs(ref_affine).max()))
    diff = float(np.abs(affine - ref_affine).max())
    if diff > AFFINE_RTOL * scale:
        raise InputError(
            path,
            f"affine differs from that of {ref_path} by {diff:.4g} (tolerance "
            f"{AFFINE_RTOL * scale:.4g})",
        )


def strip_ending(name: str, endings: tuple[str, ...] = SUPPORTED_ENDINGS) -> str | None:
    """The file name without its NIfTI ending, or None when it has none of ``endings``."""
    for ending in endings:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _visible_files(folder: Path) -> list[Path]:
    """Sorted files of ``folder``, skipping hidden ones (``.DS_Store``, macOS ``._`` forks)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


class NnunetReader:
    """Reads an nnU-Net v2 raw dataset; metadata comes from its ``dataset.json``."""

    name = "nnunet"
    channel = None  # every channel is an input
    orientation: Orientation = "as_stored"
    absent_classes: AbsentClasses = "count_as_one"

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.root = Path(config.root)

    # -- dataset.json -----------------------------------------------------------------------

    @cached_property
    def _meta(self) -> dict[str, Any]:
        path = self.root / "dataset.json"
        meta = read_json(path, ("channel_names", "labels", "numTraining", "file_ending"))
        channels = meta["channel_names"]
        if not isinstance(channels, dict) or not channels:
            raise InputError(path, "'channel_names' must be a non-empty mapping")
        if sorted(channels) != [str(i) for i in range(len(channels))]:
            raise InputError(
                path, f"'channel_names' keys must be 0..{len(channels) - 1}, got {sorted(channels)}"
            )
        labels = meta["labels"]
        if not isinstance(labels, dict) or not labels:
            raise InputError(path, "'labels' must be a non-empty mapping of name -> value")
        if "ignore" in labels:
            raise InputError(path, "the 'ignore' label (sparse annotation) is not supported")
        for label_name, value in labels.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(
                    path,
                    f"label '{label_name}' must be one integer (region-based labels are "
                    f"not supported), got {value!r}",
                )
        values = sorted(labels.values())
        if values != list(range(len(values))):
            raise InputError(path, f"'labels' values must be consecutive 0..K-1, got {values}")
        if meta["file_ending"] not in SUPPORTED_ENDINGS:
            raise InputError(
                path, f"file_ending {meta['file_ending']!r} is not supported (use .nii.gz or .nii)"
            )
        number = meta["numTraining"]
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise InputError(path, f"'numTraining' must be a positive integer, got {number!r}")
        return meta

    @property
    def class_names(self) -> tuple[str, ...]:
        labels = self._meta["labels"]
        return tuple(sorted(labels, key=labels.get))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_values(self) -> tuple[int, ...]:
        """dataset.json's values in class order (consecutive 0..K-1, checked in ``_meta``)."""
        return tuple(sorted(self._meta["labels"].values()))

    @property
    def in_channels(self) -> int:
        return len(self._meta["channel_names"])

    @property
    def _ending(self) -> str:
        return self._meta["file_ending"]

    # -- listing ----------------------------------------------------------------------------

    def _channel_path(self, folder: Path, case_id: str, channel: int) -> Path:
        return folder / f"{case_id}_{channel:04d}{self._ending}"

    def _case(self, folder: Path, case_id: str, label: Path | None) -> CaseFiles:
        """``image`` is channel 0; the other channels and dataset.json go in ``extra``, whose
        file paths the cache stamps too, so that editing any of them re-prepares the case."""
        extra = {
            f"channel_{c:04d}": str(self._channel_path(folder, case_id, c))
            for c in range(1, self.in_channels)
        }
        extra["dataset_json"] = str(self.root / "dataset.json")
        return CaseFiles(case_id, self._channel_path(folder, case_id, 0), label, extra)

    def _list_images(self, folder: Path) -> list[str]:
        """Case ids of an images folder; every case must have each channel, nothing else."""
        cases: set[str] = set()
        for path in _visible_files(folder):
            stem = strip_ending(path.name, (self._ending,))
            match = _CHANNEL_STEM.match(stem) if stem is not None else None
            if match is None or int(match["channel"]) >= self.in_channels:
                raise InputError(
                    path,
                    f"unexpected file: expected {{case}}_{{0000..{self.in_channels - 1:04d}}}"
                    f"{self._ending}",
                )
            cases.add(match["case"])
        for case_id in sorted(cases):
            for channel in range(self.in_channels):
                if not self._channel_path(folder, case_id, channel).is_file():
                    raise InputError(self._channel_path(folder, case_id, channel), "file not found")
        return sorted(cases)

    def list_cases(self, root: Path) -> list[CaseFiles]:
        if Path(root) != self.root:  # another root than the config's: forget what was read
            self.root = Path(root)
            for cached in ("_meta", "_cases", "_headers"):
                self.__dict__.pop(cached, None)
        return list(self._cases)

    @cached_property
    def _cases(self) -> list[CaseFiles]:
        images, labels = self.root / "imagesTr", self.root / "labelsTr"
        meta = self._meta  # dataset.json first: its errors come before any layout error
        for folder in (images, labels):
            if not folder.is_dir():
                raise InputError(folder, "folder not found")
        train_ids = self._list_images(images)
        if not train_ids:
            raise InputError(images, f"no {{case}}_0000{self._ending} files")
        for path in _visible_files(labels):
            stem = strip_ending(path.name, (self._ending,))
            if stem not in train_ids:
                raise InputError(path, "unexpected file: no matching image in imagesTr")
        cases = []
        for case_id in train_ids:
            label = labels / f"{case_id}{self._ending}"
            if not label.is_file():
                raise InputError(label, "file not found")
            cases.append(self._case(images, case_id, label))
        if meta["numTraining"] != len(cases):
            raise InputError(
                self.root / "dataset.json",
                f"numTraining is {meta['numTraining']} but imagesTr holds {len(cases)} cases",
            )
        seen = {case_id: self._channel_path(images, case_id, 0) for case_id in train_ids}
        for folder, case_id in self._unlabelled():
            path = self._channel_path(folder, case_id, 0)
            if case_id in seen:
                raise InputError(path, f"case id '{case_id}' is also used by {seen[case_id]}")
            seen[case_id] = path
            cases.append(self._case(folder, case_id, None))
        return cases

    def _unlabelled(self) -> list[tuple[Path, str]]:
        """(folder, case id) of the unlabelled pre-training images: ``imagesUnlabelled/`` and
        the folders or globs of ``data.unlabelled`` (relative to the root). ``imagesTs`` is
        what ``contraseg predict`` segments and only joins when listed there."""
        found: list[tuple[Path, str]] = []
        default = self.root / "imagesUnlabelled"
        if default.is_dir():
            found += [(default, case_id) for case_id in self._list_images(default)]
        for entry in self.config.unlabelled:
            pattern = Path(entry) if Path(entry).is_absolute() else self.root / entry
            if pattern.is_dir():
                found += [(pattern, case_id) for case_id in self._list_images(pattern)]
                continue
            matches = sorted(Path(p) for p in glob.glob(str(pattern)))
            if not matches:
                raise InputError(pattern, "data.unlabelled: no folder or file matches")
            cases: dict[Path, set[str]] = {}
            for path in matches:
                stem = strip_ending(path.name, (self._ending,))
                match = _CHANNEL_STEM.match(stem) if stem is not None else None
                if match is None or not path.is_file():
                    raise InputError(
                        path,
                        f"data.unlabelled: expected {{case}}_{{0000..}}{self._ending} files "
                        "or folders of them",
                    )
                cases.setdefault(path.parent, set()).add(match["case"])
            for folder, ids in cases.items():
                for case_id in sorted(ids):
                    for channel in range(self.in_channels):
                        if not self._channel_path(folder, case_id, channel).is_file():
                            raise InputError(
                                self._channel_path(folder, case_id, channel), "file not found"
                            )
                    found.append((folder, case_id))
        return found

    # -- split ------------------------------------------------------------------------------

    def split(self, seed: int) -> Split:
        """Fold ``data.fold`` of ``splits_final.json`` when there is one (train/val as nnU-Net
        reads it, no test set), else a generated split; unlabelled cases only ever join the
        pre-training pool."""
        labelled = [c.case_id for c in self._cases if c.label is not None]
        unlabelled = tuple(c.case_id for c in self._cases if c.label is None)
        folds_path = self.root / "splits_final.json"
        if folds_path.is_file():
            train, val = self._fold(folds_path, set(labelled), self.config.fold)
            split = fold_split(train, val, seed, f"{folds_path} fold {self.config.fold}")
        else:
            split = generated_split(labelled, seed)
        return dataclasses.replace(split, pretrain=split.pretrain + unlabelled)

    @staticmethod
    def _fold(path: Path, labelled: set[str], fold: int) -> tuple[list[str], list[str]]:
        """The train and val case lists of one fold, each case labelled, none in both."""
        folds = load_json(path)
        if not isinstance(folds, list) or not folds:
            raise InputError(path, 'expected a list of folds {"train": [...], "val": [...]}')
        if fold >= len(folds):
            raise InputError(path, f"data.fold={fold}, but the file has folds 0..{len(folds) - 1}")
        entry = folds[fold]
        lists = []
        for key in ("train", "val"):
            ids = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
                raise InputError(path, f"fold {fold}: '{key}' must be a list of case ids")
            unknown = sorted(c for c in ids if c not in labelled)
            if unknown:
                raise InputError(
                    path, f"fold {fold} '{key}' names cases not in imagesTr/labelsTr: {unknown}"
                )
            lists.append(list(dict.fromkeys(ids)))
        train, val = lists
        if not train:
            raise InputError(path, f"fold {fold}: 'train' is empty")
        both = sorted(set(train) & set(val))
        if both:
            raise InputError(path, f"fold {fold}: cases in both train and val: {both}")
        return train, val

    # -- derived spacing and size -----------------------------------------------------------

    @cached_property
    def _headers(self) -> tuple[np.ndarray, np.ndarray]:
        """In-plane spacing and shape of every labelled case, from the headers only."""
        spacings, shapes = [], []
        for case in self._cases:
            if case.label is None:
                continue
            header = read_nifti_header(case.image)
            spacings.append([float(z) for z in header.get_zooms()[:2]])
            shapes.append([int(s) for s in header.get_data_shape()[:2]])
        return np.asarray(spacings), np.asarray(shapes)

    @property
    def default_spacing(self) -> tuple[float, float]:
        spacings, _ = self._headers
        median = np.median(spacings, axis=0)
        return float(median[0]), float(median[1])

    @property
    def default_size(self) -> tuple[int, int]:
        spacings, shapes = self._headers
        target = self.config.target_spacing or self.default_spacing
        extent = np.median(spacings * shapes, axis=0)
        # 1e-3 px of slack: header spacings are float32 (40 x 0.8 mm is 32.0000005 mm)
        size = [32 * math.ceil(extent[i] / target[i] / 32 - 1e-3 / 32) for i in range(2)]
        return size[0], size[1]

    # -- loading ----------------------------------------------------------------------------

    def load(self, case: CaseFiles) -> Volume:
        channels = []
        affine0, spacing = np.eye(4), (1.0, 1.0, 1.0)
        paths = [
            case.image,
            *(Path(case.extra[f"channel_{c:04d}"]) for c in range(1, self.in_channels)),
        ]
        for channel, path in enumerate(paths):
            data, affine, zooms = load_nifti(path)
            check_ndim(path, data)
            check_finite(path, data)
            if channel == 0:
                affine0, spacing = affine, (zooms[0], zooms[1], zooms[2])
            else:
                check_same_grid(path, data.shape, affine, channels[0].shape, affine0, case.image)
            channels.append(data)
        label = None
        if case.label is not None:
            data, affine, _ = load_nifti(case.label)
            check_ndim(case.label, data)
            check_finite(case.label, data)
            check_same_grid(case.label, data.shape, affine, channels[0].shape, affine0, case.image)
            label = declared_labels(case.label, data, self._meta["labels"])
        return Volume(
            case_id=case.case_id,
            image=np.stack(channels, axis=-1).astype(np.float32),
            label=label,
            spacing=spacing,
            affine=affine0,
            source=case.image,
        )


def declared_labels(path: Path, data: np.ndarray, labels: dict[str, int]) -> np.ndarray:
    """Label map as int16, every value declared in dataset.json's ``labels``."""
    declared = set(labels.values())
    undeclared = sorted({int(v) for v in np.rint(np.unique(data))} - declared)
    if undeclared:
        raise InputError(
            path,
            f"label values {undeclared} are not declared in dataset.json labels {sorted(declared)}",
        )
    return labels_to_int(path, data, declared)
