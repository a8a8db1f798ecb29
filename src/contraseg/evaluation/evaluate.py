"""Scores of segmentations, computed as the paper does (method_spec 6.3), from two sources.

- :func:`evaluate_run`: a finished fine-tuning run on its dataset's test split, predicted by
  :class:`contraseg.inference.Segmenter` from the prepared cache.
- :func:`evaluate_folders`: label maps made by anything (this tool, nnU-Net, a human) against
  reference label maps, matched by case name, as ``nnUNetv2_evaluate_folder`` does.

Per volume: 3-D Dice per foreground class on the native grid, averaged over classes; the score
of a set is the mean of that over volumes. HD95 in millimetres per class (the empty-mask policy
is in :mod:`contraseg.evaluation.metrics`). Both write ``per_case.csv``, ``summary.csv`` and
``summary.json`` (docs/metrics.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from contraseg import fileio
from contraseg.config import FinetuneRun, load_config
from contraseg.data.cache import PreparedCase
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.data.readers.nifti import load_nifti
from contraseg.errors import InputError
from contraseg.evaluation.metrics import HD95Summary, dice_per_class, hd95_per_class, summarise_hd95
from contraseg.inference.bundle import MODEL_JSON, WEIGHTS, read_bundle
from contraseg.inference.io import ENDINGS, nifti_stem
from contraseg.inference.predictor import Segmenter

# suffixes a reference file may carry after the case name (ACDC's _gt, MM-WHS's _label)
REFERENCE_SUFFIXES = ("", "_gt", "_label", "_seg")


@dataclass(frozen=True)
class CaseScore:
    case_id: str
    dice: tuple[float, ...]  # per foreground class
    hd95: tuple[float, ...]  # per foreground class, mm; NaN where undefined

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dice))


def score_case(
    case_id: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], num_classes: int
) -> CaseScore:
    """Dice and HD95 of every foreground class of one volume (class indices 0..K-1)."""
    return CaseScore(
        case_id,
        tuple(map(float, dice_per_class(pred, ref, num_classes))),
        tuple(map(float, hd95_per_class(pred, ref, spacing, num_classes))),
    )


@dataclass(frozen=True)
class EvaluationSummary:
    class_names: tuple[str, ...]  # foreground classes
    cases: tuple[CaseScore, ...]

    @property
    def mean_dice(self) -> float:
        """Mean over volumes of the per-volume mean foreground Dice: the paper's number."""
        return float(np.mean([case.mean_dice for case in self.cases]))

    @property
    def per_class_dice(self) -> dict[str, float]:
        values = np.mean([case.dice for case in self.cases], axis=0)
        return dict(zip(self.class_names, map(float, values), strict=True))

    @property
    def hd95(self) -> HD95Summary:
        return summarise_hd95(np.array([case.hd95 for case in self.cases], dtype=float))

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
        """``summary.json``: JSON has no NaN, so an undefined HD95 mean is null."""

        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        dice, hd95 = self.per_class_dice, self.per_class_hd95
        return {
            "cases": len(self.cases),
            "mean_dice": self.mean_dice,
            "classes": {n: {"dice": dice[n], "hd95": finite(hd95[n])} for n in self.class_names},
            "per_case": [
                {
                    "case": c.case_id,
                    "mean_dice": c.mean_dice,
                    "dice": dict(zip(self.class_names, c.dice, strict=True)),
                    "hd95": {n: finite(v) for n, v in zip(self.class_names, c.hd95, strict=True)},
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
    """The paper's selection score: mean over cases of the mean foreground 3-D Dice."""
    return float(
        np.mean(
            [
                np.mean(dice_per_class(segmenter.predict_case(c), c.native_label, num_classes))
                for c in cases
            ]
        )
    )


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
    num_classes = segmenter.bundle.architecture.num_classes
    scores = []
    for case in tqdm(cases, desc="evaluate", unit="vol", disable=None):
        if case.native_label is None:
            raise InputError(case.image_path, "test case has no label")
        prediction = segmenter.predict_case(case)
        scores.append(
            score_case(
                case.case_id, prediction, case.native_label, case.grid.native_spacing, num_classes
            )
        )
    summary = EvaluationSummary(tuple(segmenter.bundle.class_names[1:]), tuple(scores))
    write_evaluation(out_dir or run_dir / "evaluation", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Folder against folder


@dataclass(frozen=True)
class LabelSet:
    """Class names and the label value of each class index (index 0 is background)."""

    names: tuple[str, ...]
    values: tuple[int, ...]


def read_labels(path: Path) -> LabelSet:
    """Classes from a model bundle (folder or model.json) or a dataset.json (nnU-Net's
    ``{"labels": {"name": value}}`` or MSD's ``{"labels": {"value": "name"}}``)."""
    path = Path(path)
    if path.is_dir() or path.name == MODEL_JSON:
        bundle = read_bundle(path)
        return LabelSet(bundle.class_names, bundle.label_values)
    try:
        labels = json.loads(path.read_text())["labels"]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
            pairs = sorted((int(v), str(k)) for k, v in labels.items())
        else:
            pairs = sorted((int(k), str(v)) for k, v in labels.items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(path, f"cannot read class labels: {err}") from None
    if not pairs or pairs[0][0] != 0:
        raise InputError(path, "labels must include the background value 0")
    return LabelSet(tuple(n for _, n in pairs), tuple(v for v, _ in pairs))


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        stem = nifti_stem(path)
        if stem is None or not path.is_file() or path.name.startswith("."):
            continue
        if stem in found:
            raise InputError(path, f"case name '{stem}' also used by {found[stem]}")
        found[stem] = path
    if not found:
        raise InputError(folder, f"holds no label maps ({', '.join(ENDINGS)})")
    return found


def _match(preds: dict[str, Path], refs: dict[str, Path]) -> list[tuple[str, Path, Path]]:
    pairs = []
    for case, pred in preds.items():
        candidates = [refs[case + s] for s in REFERENCE_SUFFIXES if case + s in refs]
        if not candidates:
            raise InputError(pred, "no reference with this case name in the reference folder")
        pairs.append((case, pred, candidates[0]))
    matched = {ref for _, _, ref in pairs}
    for ref in refs.values():
        if ref not in matched:
            raise InputError(ref, "no prediction with this case name in the prediction folder")
    return pairs


def _read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    data, affine, spacing = load_nifti(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D label map, got shape {tuple(data.shape)}")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise InputError(path, "label map has non-integer values")
    return rounded.astype(np.int64), affine, spacing


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


def evaluate_folders(
    pred_dir: Path, ref_dir: Path, labels: Path | None = None, out_dir: Path | None = None
) -> EvaluationSummary:
    """Score every prediction against the reference of the same case; write the tables into
    ``out_dir`` (default ``pred_dir/evaluation``).

    Classes come from ``labels`` (a dataset.json or a model bundle); without it, every value
    found in the files is a class, named by its value. A case present on one side only, or a
    prediction on another grid than its reference, is an error naming both files.
    """
    pairs = _match(_label_files(Path(pred_dir)), _label_files(Path(ref_dir)))
    loaded = []
    for case, pred_path, ref_path in pairs:
        pred, pred_affine, _ = _read_label_map(pred_path)
        ref, ref_affine, spacing = _read_label_map(ref_path)
        scale = max(1.0, float(np.abs(ref_affine).max()))
        if pred.shape != ref.shape or not np.allclose(
            pred_affine, ref_affine, rtol=0, atol=1e-3 * scale
        ):
            raise InputError(
                pred_path,
                f"grid (shape {pred.shape}, affine) differs from its reference {ref_path} "
                f"(shape {ref.shape})",
            )
        loaded.append((case, pred_path, pred, ref_path, ref, spacing))
    if labels is not None:
        label_set = read_labels(labels)
    else:
        values = sorted(
            {0, *(int(v) for item in loaded for v in np.unique(item[2]))}
            | {int(v) for item in loaded for v in np.unique(item[4])}
        )
        label_set = LabelSet(tuple(f"label_{v}" for v in values), tuple(values))
    scores = [
        score_case(
            case,
            _to_classes(pred_path, pred, label_set),
            _to_classes(ref_path, ref, label_set),
            spacing,
            len(label_set.values),
        )
        for case, pred_path, pred, ref_path, ref, spacing in tqdm(
            loaded, desc="evaluate", unit="vol", disable=None
        )
    ]
    summary = EvaluationSummary(label_set.names[1:], tuple(scores))
    write_evaluation(out_dir or Path(pred_dir) / "evaluation", summary)
    return summary
