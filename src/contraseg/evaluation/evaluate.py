"""Scores of segmentations, computed as the paper does (docs/metrics.md), from two sources.

- :func:`evaluate_run`: a finished fine-tuning run on its dataset's test split, predicted by
  :class:`contraseg.inference.Segmenter` from the prepared cache.
- :func:`evaluate_folders`: label maps made by anything (this tool, nnU-Net, a human) against
  reference label maps, matched by case name, as ``nnUNetv2_evaluate_folder`` does.

Per volume: 3-D Dice per foreground class on the native grid, averaged over classes; the score
of a set is the mean of that over volumes. HD95 in millimetres per class (the empty-mask policy
is in :mod:`contraseg.evaluation.metrics`; a class absent from both prediction and reference is
left out of a volume's mean under the Cityscapes rule, which travels with the model bundle).
Both sources go through :func:`score_case` and write ``per_case.csv``, ``summary.csv`` and
``summary.json`` (docs/metrics.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from contraseg import fileio
from contraseg.config import FinetuneRun, load_config
from contraseg.data.cache import PreparedCase
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.data.readers.base import AbsentClasses
from contraseg.data.readers.nifti import load_nifti, read_nifti_header
from contraseg.data.readers.nnunet import check_same_grid
from contraseg.errors import InputError
from contraseg.evaluation.metrics import (
    HD95Summary,
    dice_per_class,
    hd95_per_class,
    nanmean,
    summarise_hd95,
)
from contraseg.inference.bundle import MODEL_JSON, WEIGHTS, read_bundle
from contraseg.inference.io import ENDINGS, nifti_stem
from contraseg.inference.predictor import Segmenter

# suffixes that mark a reference label map beside its image (ACDC's _gt, MM-WHS's _label)
REFERENCE_SUFFIXES = ("_gt", "_label", "_seg")
# suffix of an image whose prediction was named after it (MM-WHS's mr_train_1001_image)
IMAGE_SUFFIX = "_image"


@dataclass(frozen=True)
class CaseScore:
    case_id: str
    dice: tuple[float, ...]  # per foreground class; NaN where left out ("leave_out" rule)
    hd95: tuple[float, ...]  # per foreground class, mm; NaN where undefined or left out

    @property
    def mean_dice(self) -> float:
        """Mean over the scored classes; NaN if none was scored (leave_out, no foreground)."""
        return float(nanmean(np.asarray(self.dice, dtype=np.float64), axis=0))


def score_case(
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    num_classes: int,
    absent: AbsentClasses = "count_as_one",
) -> CaseScore:
    """Dice and HD95 of every foreground class of one volume (class indices 0..K-1)."""
    return CaseScore(
        case_id,
        tuple(map(float, dice_per_class(pred, ref, num_classes, absent))),
        tuple(map(float, hd95_per_class(pred, ref, spacing, num_classes, absent))),
    )


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined mean is written as null."""
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class EvaluationSummary:
    class_names: tuple[str, ...]  # foreground classes
    cases: tuple[CaseScore, ...]

    @property
    def _dice(self) -> np.ndarray:
        return np.array([case.dice for case in self.cases], dtype=np.float64)

    @property
    def mean_dice(self) -> float:
        """Mean over volumes of the per-volume mean foreground Dice: the paper's number
        (volumes with no scored class, possible only under the leave_out rule, left out)."""
        return float(nanmean(np.array([case.mean_dice for case in self.cases]), axis=0))

    @property
    def per_class_dice(self) -> dict[str, float]:
        values = nanmean(self._dice, axis=0)
        return dict(zip(self.class_names, map(float, values), strict=True))

    @property
    def hd95(self) -> HD95Summary:
        hd95 = np.array([case.hd95 for case in self.cases], dtype=float)
        return summarise_hd95(hd95, scored=~np.isnan(self._dice))

    @property
    def per_class_hd95(self) -> dict[str, float]:
        return dict(zip(self.class_names, map(float, self.hd95.per_class), strict=True))

    def format_table(self) -> str:
        width = max(len(name) for name in (*self.class_names, "mean")) + 2
        lines = [f"{'class':<{width}}{'Dice':>8}{'HD95 mm':>10}"]
        dice, hd95 = self.per_class_dice, self.per_class_hd95
        for name in self.class_names:
            lines.append(f"{name:<{width}}{dice[name]:>8.3f}{hd95[name]:>10.2f}")
        lines.append(f"{'mean':<{width}}{self.mean_dice:>8.3f}")
        lines.append(
            f"{len(self.cases)} volumes; HD95 undefined (one mask empty) "
            f"for {self.hd95.undefined} volume-class pairs, left out of its mean"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        """``summary.json``; an undefined value (NaN) is null."""
        dice, hd95 = self.per_class_dice, self.per_class_hd95
        return {
            "cases": len(self.cases),
            "mean_dice": _finite(self.mean_dice),
            "classes": {
                n: {"dice": _finite(dice[n]), "hd95": _finite(hd95[n])} for n in self.class_names
            },
            "per_case": [
                {
                    "case": c.case_id,
                    "mean_dice": _finite(c.mean_dice),
                    "dice": {n: _finite(v) for n, v in zip(self.class_names, c.dice, strict=True)},
                    "hd95": {n: _finite(v) for n, v in zip(self.class_names, c.hd95, strict=True)},
                }
                for c in self.cases
            ],
        }


def _csv(rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_evaluation(out_dir: Path, summary: EvaluationSummary) -> None:
    """``per_case.csv``, ``summary.csv`` and ``summary.json`` into ``out_dir``."""
    names = list(summary.class_names)
    per_case = [["case", "mean_dice", *(f"dice_{n}" for n in names), *(f"hd95_{n}" for n in names)]]
    per_case += [[s.case_id, s.mean_dice, *s.dice, *s.hd95] for s in summary.cases]
    fileio.write_text(out_dir / "per_case.csv", _csv(per_case))
    dice, hd95 = summary.per_class_dice, summary.per_class_hd95
    rows = [["class", "dice", "hd95_mm"], *([n, dice[n], hd95[n]] for n in names)]
    rows.append(["mean", summary.mean_dice, ""])
    fileio.write_text(out_dir / "summary.csv", _csv(rows))
    fileio.write_json(out_dir / "summary.json", summary.to_json())


# ---------------------------------------------------------------------------------------------
# A run on its test split


def mean_case_dice(segmenter: Segmenter, cases: Sequence[PreparedCase], num_classes: int) -> float:
    """The paper's selection score: mean over cases of the mean foreground 3-D Dice, with the
    model's rule for classes absent from both (its bundle's ``absent_classes``)."""
    rule = segmenter.bundle.absent_classes
    per_case = [
        nanmean(dice_per_class(segmenter.predict_case(c), c.native_label, num_classes, rule), 0)
        for c in cases
    ]
    return float(nanmean(np.asarray(per_case, dtype=np.float64), axis=0))


def load_run_config(run_dir: str | Path) -> FinetuneRun:
    """The resolved config of a finished finetune run, as saved in its directory."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise InputError(path, "not found: is this a run directory?")
    if not (run_dir / MODEL_JSON).is_file() or not (run_dir / WEIGHTS).is_file():
        raise InputError(run_dir, "not a finished `contraseg finetune` run directory")
    return load_config(FinetuneRun, path)


def evaluate_run(
    run_dir: str | Path, device: str = "auto", out_dir: Path | None = None
) -> EvaluationSummary:
    """Score the run's model on its dataset's test volumes; write into ``run/evaluation``."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    segmenter = Segmenter.from_pretrained(run_dir, device=device)
    prepared, split = load_dataset(config.data)
    if not split.test:
        raise InputError(
            run_dir,
            "this dataset's split has no test cases; score predictions with "
            "`contraseg predict` and `contraseg evaluate --pred DIR --ref DIR`",
        )
    cases = require_cases(prepared, split, split.test)
    bundle = segmenter.bundle
    scores = []
    for case in tqdm(cases, desc="evaluate", unit="vol", disable=None):
        if case.native_label is None:
            raise InputError(case.image_path, "test case has no label")
        scores.append(
            score_case(
                case.case_id,
                segmenter.predict_case(case),
                case.native_label,
                case.grid.native_spacing,
                bundle.architecture.num_classes,
                bundle.absent_classes,
            )
        )
    summary = EvaluationSummary(tuple(bundle.class_names[1:]), tuple(scores))
    write_evaluation(out_dir or run_dir / "evaluation", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Folder against folder


@dataclass(frozen=True)
class LabelSet:
    """Class names, the label value of each class index (index 0 is background), and the rule
    for classes absent from both prediction and reference."""

    names: tuple[str, ...]
    values: tuple[int, ...]
    absent: AbsentClasses = "count_as_one"


def read_labels(path: Path) -> LabelSet:
    """Classes from a model bundle (folder or model.json; its rule too) or a dataset.json
    (nnU-Net's ``{"labels": {"name": value}}`` or MSD's ``{"labels": {"value": "name"}}``)."""
    path = Path(path)
    if path.is_dir() or path.name == MODEL_JSON:
        bundle = read_bundle(path)
        return LabelSet(bundle.class_names, bundle.label_values, bundle.absent_classes)
    try:
        labels = json.loads(path.read_bytes().decode("utf-8"))["labels"]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
            pairs = sorted((int(v), str(k)) for k, v in labels.items())
        else:
            pairs = sorted((int(k), str(v)) for k, v in labels.items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(path, f"cannot read class labels: {fileio.one_line(err)}") from None
    if not pairs or pairs[0][0] != 0:
        raise InputError(path, "labels must include the background value 0")
    if len({v for v, _ in pairs}) != len(pairs) or len({n for _, n in pairs}) != len(pairs):
        raise InputError(path, "labels must have distinct names and values")
    return LabelSet(tuple(n for _, n in pairs), tuple(v for v, _ in pairs))


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    """Stem -> file of every NIfTI file under ``folder`` (sub-folders included)."""
    if not folder.is_dir():
        raise InputError(folder, f"{what} folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        stem = nifti_stem(path)
        if stem is None or not path.is_file() or path.name.startswith("."):
            continue
        if stem in found:
            raise InputError(path, f"case name '{stem}' is also used by {found[stem]}")
        found[stem] = path
    if not found:
        raise InputError(folder, f"holds no label maps ({', '.join(ENDINGS)})")
    return found


def _references(folder: Path) -> dict[str, Path]:
    """Case -> reference file. A folder holding ``{case}_gt`` (``_label``, ``_seg``) files keeps
    its images beside them (ACDC, MM-WHS): then only those are references, named without the
    suffix; otherwise every file is a reference named by its stem (nnU-Net's labelsTr)."""
    files = _nifti_files(folder, "reference")
    marked = {stem: p for stem, p in files.items() if stem.endswith(REFERENCE_SUFFIXES)}
    if not marked:
        return files
    refs: dict[str, Path] = {}
    for stem, path in marked.items():
        case = stem.rsplit("_", 1)[0]
        if case in refs:
            raise InputError(path, f"a second reference for case '{case}', besides {refs[case]}")
        refs[case] = path
    return refs


def match_cases(pred_dir: Path, ref_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for every case; a case on one side only is an error
    naming the file and the one that was looked for."""
    preds = _nifti_files(pred_dir, "prediction")
    refs = _references(ref_dir)
    pairs = []
    for stem, pred in preds.items():
        case = stem
        if case not in refs and stem.endswith(IMAGE_SUFFIX):
            case = stem[: -len(IMAGE_SUFFIX)]
        if case not in refs:
            raise InputError(
                pred, f"has no reference: no {stem}.nii.gz or {stem}_gt.nii.gz in {ref_dir}"
            )
        pairs.append((case, pred, refs[case]))
    matched = {case for case, _, _ in pairs}
    for case, ref in refs.items():
        if case not in matched:
            raise InputError(ref, f"has no prediction: no {case}.nii.gz in {pred_dir}")
    return sorted(pairs)


def _read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Integer labels (X, Y, Z) (a 2-D map is one slice) and the voxel spacing."""
    data, _, spacing = load_nifti(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data, spacing = data[..., None], (*spacing[:2], 1.0)
    if data.ndim != 3:
        raise InputError(path, f"expected a 2-D or 3-D label map, got shape {tuple(data.shape)}")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise InputError(path, "label map has non-integer values")
    return rounded.astype(np.int64), (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _check_grids(pairs: list[tuple[str, Path, Path]]) -> None:
    """Every prediction on its reference's grid (shape and affine), from the headers alone,
    before any voxel is read."""
    for _, pred_path, ref_path in pairs:
        pred, ref = read_nifti_header(pred_path), read_nifti_header(ref_path)
        pred_shape, ref_shape = pred.get_data_shape(), ref.get_data_shape()
        check_same_grid(
            pred_path,
            tuple(pred_shape[:3]),
            pred.get_best_affine(),
            tuple(ref_shape[:3]),
            ref.get_best_affine(),
            ref_path,
        )


def _to_classes(path: Path, values: np.ndarray, labels: LabelSet) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(labels.values)}
    present = np.unique(values)
    unknown = [int(v) for v in present if int(v) not in lookup]
    if unknown:
        raise InputError(path, f"label values {unknown} are not among {list(labels.values)}")
    table = np.zeros(int(present.max()) + 1, np.int16)
    for v in present:
        table[int(v)] = lookup[int(v)]
    return table[values]


def _label_maps(
    pairs: list[tuple[str, Path, Path]], desc: str
) -> Iterator[tuple[str, Path, np.ndarray, Path, np.ndarray, tuple[float, float, float]]]:
    for case, pred_path, ref_path in tqdm(pairs, desc=desc, unit="vol", disable=None):
        pred, _ = _read_label_map(pred_path)
        ref, spacing = _read_label_map(ref_path)
        yield case, pred_path, pred, ref_path, ref, spacing


def _found_labels(pairs: list[tuple[str, Path, Path]]) -> LabelSet:
    """Every value found in the files is a class, named by its value (0 is background)."""
    values: set[int] = {0}
    for _, pred_path, pred, ref_path, ref, _ in _label_maps(pairs, "read labels"):
        for path, volume in ((pred_path, pred), (ref_path, ref)):
            found = [int(v) for v in np.unique(volume)]
            if found[0] < 0:
                raise InputError(path, f"label map has a negative value {found[0]}")
            values.update(found)
    ordered = tuple(sorted(values))
    return LabelSet(tuple(str(v) for v in ordered), ordered)


def evaluate_folders(
    pred_dir: Path, ref_dir: Path, labels: Path | None = None, out_dir: Path | None = None
) -> EvaluationSummary:
    """Score every prediction against the reference of the same case; write the tables into
    ``out_dir`` (default ``pred_dir/evaluation``).

    Classes come from ``labels`` (a dataset.json or a model bundle); without it, every value
    found in the files is a class, named by its value. A case present on one side only, or a
    prediction on another grid than its reference, is an error naming both files; both are
    checked before anything is scored or written.
    """
    pairs = match_cases(Path(pred_dir), Path(ref_dir))
    _check_grids(pairs)
    label_set = _found_labels(pairs) if labels is None else read_labels(labels)
    if len(label_set.values) < 2:
        raise InputError(labels or pred_dir, "no foreground class to score (only background 0)")
    scores = [
        score_case(
            case,
            _to_classes(pred_path, pred, label_set),
            _to_classes(ref_path, ref, label_set),
            spacing,
            len(label_set.values),
            label_set.absent,
        )
        for case, pred_path, pred, ref_path, ref, spacing in _label_maps(pairs, "evaluate")
    ]
    summary = EvaluationSummary(label_set.names[1:], tuple(scores))
    write_evaluation(out_dir or Path(pred_dir) / "evaluation", summary)
    return summary
