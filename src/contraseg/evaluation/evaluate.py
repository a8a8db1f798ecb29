"""Test-set scores of a fine-tuned run, computed as the paper does (method_spec 6.3).

Per test volume: 3-D Dice per foreground class on the native grid, averaged over classes; the
run's score is the mean of that over volumes. HD95 in millimetres per class (the empty-mask
policy is in :mod:`contraseg.evaluation.metrics`). Writes ``evaluation/per_case.csv`` and
``evaluation/summary.csv`` into the run directory.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from contraseg import fileio
from contraseg.evaluation.inference import predict_native
from contraseg.evaluation.metrics import HD95Summary, dice_per_class, hd95_per_class, summarise_hd95
from contraseg.training.checkpoint import load_weights
from contraseg.training.stages import build_unet, load_data, load_run_config, require_cases
from contraseg.training.trainer import resolve_device


@dataclass(frozen=True)
class CaseScore:
    case_id: str
    dice: tuple[float, ...]  # per foreground class
    hd95: tuple[float, ...]  # per foreground class, mm; NaN where undefined

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dice))


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
            f"{len(self.cases)} test volumes; HD95 undefined (one mask empty) "
            f"for {self.hd95.undefined} volume-class pairs, left out of its mean"
        )
        return "\n".join(lines)


def _csv(rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def evaluate_run(run_dir: str | Path, device: str = "auto") -> EvaluationSummary:
    """Score the run's ``weights.safetensors`` on its dataset's test volumes."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    torch_device = resolve_device(device)
    prepared, split = load_data(config.data)
    cases = require_cases(prepared, split, split.test)
    model = build_unet(config.model, prepared)
    model.load_state_dict(load_weights(run_dir / "weights.safetensors"))
    model.to(torch_device)
    num_classes = config.model.num_classes or prepared.num_classes
    scores = []
    for case in tqdm(cases, desc="evaluate", unit="vol"):
        prediction = predict_native(model, case, torch_device)
        spacing = tuple(case.grid.native_spacing)
        scores.append(
            CaseScore(
                case.case_id,
                tuple(map(float, dice_per_class(prediction, case.native_label, num_classes))),
                tuple(
                    map(float, hd95_per_class(prediction, case.native_label, spacing, num_classes))
                ),
            )
        )
    summary = EvaluationSummary(tuple(prepared.class_names[1:]), tuple(scores))
    names = list(summary.class_names)
    per_case = [["case", "mean_dice", *(f"dice_{n}" for n in names), *(f"hd95_{n}" for n in names)]]
    per_case += [[s.case_id, s.mean_dice, *s.dice, *s.hd95] for s in scores]
    fileio.write_text(run_dir / "evaluation" / "per_case.csv", _csv(per_case))
    dice, hd95 = summary.per_class_dice, summary.per_class_hd95
    rows = [["class", "dice", "hd95_mm"], *([n, dice[n], hd95[n]] for n in names)]
    rows.append(["mean", summary.mean_dice, ""])
    fileio.write_text(run_dir / "evaluation" / "summary.csv", _csv(rows))
    return summary
