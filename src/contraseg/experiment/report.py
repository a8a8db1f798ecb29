"""``report.html`` of a grid: one self-contained page with the table, the paired comparisons and
the figures (docs/experiments.md); the same figures are linked from ``report.md``.

Besides what the rows hold, the page looks into the runs: validation curves and pre-training
losses from their ``metrics.jsonl``, predictions of one test case by each initialisation's
model, and the global embeddings g1(e(x)) of the test slices from each stage-1 run, projected
to 2-D and coloured by partition, which shows whether G^D grouped slices by position.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from contraseg import __version__, fileio
from contraseg.data.cache import PreparedCase, PreparedDataset
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.data.sampling import partition_bounds
from contraseg.experiment.grid import STAGES, finetune_init
from contraseg.experiment.plan import Plan, Run, run_state
from contraseg.experiment.results import Row, class_names, comparison_table, table_markdown
from contraseg.inference import Segmenter, resolve_device, slice_probabilities
from contraseg.models.unet import load_partial
from contraseg.report import figures, stats
from contraseg.report.html import BulletList, Figure, Paragraph, Section, Table, write_html_report
from contraseg.training.checkpoint import load_weights
from contraseg.training.stages import build_global_head, build_unet

__all__ = ["global_embeddings", "partition_ids", "write_report"]

MAX_EMBEDDING_RUNS = 4
PHANTOM_NOTE = (
    "The data are the generated cardiac phantom, a stand-in for ACDC: these numbers show what "
    "the method does under the phantom's conditions; they are not ACDC results."
)


def partition_ids(n_slices: int, partitions: int) -> np.ndarray:
    """The partition of each slice by the sampler's rule (docs/training.md); the trailing
    ``n mod S`` slices, which pre-training never draws, are counted in the last partition."""
    bounds = partition_bounds(n_slices, partitions)
    ids = np.searchsorted(bounds, np.arange(n_slices), side="right") - 1
    return np.minimum(ids, partitions - 1).astype(np.int64)


@torch.no_grad()
def global_embeddings(
    run: Run, run_dir: Path, prepared: PreparedDataset, cases: Sequence[PreparedCase], device: str
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised g1(e(x)) of every slice of ``cases`` (the space the global loss compares
    in) from a stage-1 run's weights, and each slice's partition id."""
    config = run.config
    state = load_weights(run_dir / "weights.safetensors")
    unet = build_unet(config.model, prepared)
    load_partial(unet, {k: v for k, v in state.items() if k.startswith("encoder.")})
    height, width = cases[0].image.shape[-2:]
    head = build_global_head(config.model, unet, height, width)
    head.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("g1.")})
    where = resolve_device(device)
    unet.to(where).eval()
    head.to(where).eval()
    embeddings, partitions = [], []
    for case in cases:
        images = torch.from_numpy(np.array(case.image, dtype=np.float32)).to(where)
        z = head(unet.encode(images)[0])
        embeddings.append(torch.nn.functional.normalize(z.float(), dim=1).cpu().numpy())
        partitions.append(partition_ids(case.num_slices, config.loss.partitions))
    return np.concatenate(embeddings), np.concatenate(partitions)


def _first_runs(plan: Plan, rows: Sequence[Row]) -> dict[int | str, tuple[str, dict[str, Path]]]:
    """Per number of labelled volumes: the first labelled set and seed with a finished run
    (as "c1, seed 0") and its finished runs by initialisation, which the curves and overlays
    show."""
    done = {str(r["run"]) for r in rows}
    chosen: dict[int | str, tuple[str, int]] = {}
    panels: dict[int | str, tuple[str, dict[str, Path]]] = {}
    for run in plan.level("finetune"):
        if run.name not in done:
            continue
        key = chosen.setdefault(run.labelled_volumes, (run.combination, run.seed))
        if key == (run.combination, run.seed):
            title = f"{key[0]}, seed {key[1]}"
            panels.setdefault(run.labelled_volumes, (title, {}))[1][run.init] = plan.out / run.name
    return panels


def _curve_dir(run_dir: Path) -> Path:
    """Where a fine-tuning run's validation curve is logged: its folder, or the last round's
    of a self-training run (docs/extensions.md)."""
    rounds = sorted(run_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    return rounds[-1] if rounds else run_dir


def _overlay_figure(runs: dict[str, Path], case: PreparedCase, path: Path, device: str) -> None:
    slices = np.linspace(1, case.num_slices - 2, 3).round().astype(int)
    truth = case.label if case.label is not None else np.zeros((case.num_slices, 1, 1), int)
    predictions = {}
    for init, run_dir in runs.items():
        segmenter = Segmenter.from_pretrained(run_dir, device=device)
        probs = slice_probabilities(segmenter.networks[0], case.image[slices], segmenter.device)
        predictions[init] = list(probs.argmax(1))
    figures.overlays(
        [case.image[s, 0] for s in slices], [truth[s] for s in slices], predictions, path
    )


def _settings(plan: Plan) -> list[str]:
    grid = plan.grid
    items = [
        f"data: {grid.data.dataset} at {grid.data.root}",
        f"model widths: {grid.model.widths}",
        f"labelled volumes: {', '.join(map(str, grid.labelled_volumes))}; labelled sets: "
        f"{grid.combinations if grid.combinations == 'all' else ', '.join(grid.combinations)}"
        f"; seeds: {', '.join(map(str, grid.seeds))}",
    ]
    used = {s for init in grid.initialisations for s in STAGES if getattr(init, s) is not None}
    for section in STAGES:
        if section in used or section == "finetune" or getattr(grid, section):
            items.append(f"{section}: {getattr(grid, section) or 'defaults'}")
    for init in grid.initialisations:
        parts = [f"{s}: {getattr(init, s)}" for s in STAGES if getattr(init, s) is not None]
        parts = [p for p in parts if p != "finetune: {}"]
        if init.start():
            parts.append(f"fine-tuning loads: {finetune_init(grid, init)}")
        items.append(f"initialisation {init.name}: {'; '.join(parts) or 'random weights'}")
    return items


def write_report(plan: Plan, rows: Sequence[Row], device: str = "auto") -> Path:
    """Draw the figures into ``OUT/figures``, write ``report.md`` and ``report.html``; return
    the HTML page's path."""
    out, grid = plan.out, plan.grid
    folder = out / "figures"
    drawn: list[tuple[str, Path, str]] = []  # (section, figure, caption)

    figures.dice_vs_labelled(rows, folder / "dice_vs_labelled.png")
    drawn.append(
        (
            "Test Dice against labelled volumes",
            folder / "dice_vs_labelled.png",
            "Mean test Dice per initialisation; error bars: sample std over labelled sets and "
            "seeds.",
        )
    )
    figures.dice_per_structure(rows, folder / "dice_per_structure.png")
    drawn.append(
        (
            "Dice per structure",
            folder / "dice_per_structure.png",
            "Test Dice of each structure, mean ± sample std over labelled sets and seeds.",
        )
    )
    first = _first_runs(plan, rows)
    panels = {
        f"{stats.labelled_phrase(n)}, {title}": {i: _curve_dir(d) for i, d in runs.items()}
        for n, (title, runs) in first.items()
    }
    figures.validation_curves(panels, folder / "validation_dice.png", columns=min(4, len(panels)))
    drawn.append(
        (
            "Validation curves",
            folder / "validation_dice.png",
            "Validation Dice during fine-tuning (first labelled set and seed of each size), one "
            "line per initialisation on the same labelled volumes.",
        )
    )
    pretrained = [r for r in plan.runs if r.stage != "finetune" and run_state(r, out) == "finished"]
    if pretrained:
        figures.loss_curves(
            {r.name: out / r.name for r in pretrained}, folder / "pretraining_loss.png"
        )
        drawn.append(
            (
                "Pre-training losses",
                folder / "pretraining_loss.png",
                "Contrastive loss of each pre-training run against its chance level (the loss "
                "when every similarity is equal).",
            )
        )
    prepared, split = load_dataset(grid.data)
    test_cases = require_cases(prepared, split, split.test)
    smallest = min(first, key=stats.labelled_order)
    _overlay_figure(first[smallest][1], test_cases[0], folder / "test_overlays.png", device)
    drawn.append(
        (
            "Predictions",
            folder / "test_overlays.png",
            f"Test case {test_cases[0].case_id}: image, ground truth and each initialisation's "
            f"prediction ({stats.labelled_phrase(smallest)}, {first[smallest][0]}).",
        )
    )
    globals_ = [r for r in pretrained if r.stage == "pretrain-global"][:MAX_EMBEDDING_RUNS]
    for run in globals_:
        embeddings, partitions = global_embeddings(
            run, out / run.name, prepared, test_cases, device
        )
        path = folder / f"embeddings_{run.name.split('/')[-1]}.png"
        note = figures.embedding_projection(embeddings, partitions, path, title=run.name)
        drawn.append(
            (
                "Global embeddings",
                path,
                f"g1(e(x)) of the {len(embeddings)} test slices from {run.name}, coloured by "
                f"partition (S = {run.config.loss.partitions}); G^D pulls slices of one "
                "partition together." + (f" {note}." if note else ""),
            )
        )

    header, body = stats.summary_grid(stats.aggregate(rows))
    total = len(plan.level("finetune"))
    intro = [Paragraph(grid.description.strip())] if grid.description else []
    if grid.data.dataset == "phantom":
        intro.append(Paragraph(PHANTOM_NOTE))
    intro.append(
        Paragraph(
            f"{len(rows)} of {total} fine-tuning runs finished. Test score: per test volume the "
            "mean foreground 3-D Dice on the native grid, then the mean over the "
            f"{len(test_cases)} test volumes; each cell is the mean ± sample std over labelled "
            "sets and seeds (n runs)."
        )
    )
    results = [*intro, Table(header, body, "Test Dice")]
    if grid.baseline:
        comparisons = stats.compare_to_baseline(rows, grid.baseline)
        if comparisons:
            results += [
                Table(*comparison_table(comparisons), f"Against {grid.baseline}, paired"),
                BulletList([c.verdict for c in comparisons]),
                Paragraph(
                    "A win needs a 95% bootstrap interval above 0 and a Wilcoxon signed-rank "
                    "p below 0.05 (docs/statistics.md); with 5 pairs or fewer no p-value can "
                    "reach 0.05."
                ),
            ]
    structures = []
    for name in class_names(rows):
        h, b = stats.summary_grid(stats.aggregate(rows, stats.class_score("per_class_dice", name)))
        structures.append(Table(h, b, f"Test Dice of {name}"))
    sections = [Section("Results", results)]
    for title in dict.fromkeys(title for title, _, _ in drawn):
        blocks: list = [Figure(p, c) for t, p, c in drawn if t == title]
        if title == "Dice per structure":
            blocks += structures
        sections.append(Section(title, blocks))
    sections.append(Section("Runs", [_runs_table(rows)]))
    sections.append(Section("Settings", [BulletList(_settings(plan))]))
    environment = (
        f"contraseg {__version__}, torch {torch.__version__}, {resolve_device(device)}, "
        f"{platform.processor() or platform.machine()}"
    )
    page = out / "report.html"
    write_html_report(page, grid.title or "Experiment", sections, subtitle=environment)
    links = [(caption.split(";")[0], str(p.relative_to(out))) for _, p, caption in drawn]
    fileio.write_text(out / "report.md", table_markdown(plan, rows, links))
    return page


def _runs_table(rows: Sequence[Row]) -> Table:
    names = class_names(rows)
    header = [
        "run",
        "init",
        "labelled",
        "set",
        "seed",
        "test Dice",
        *names,
        "best val Dice",
        "at iteration",
        "wall s",
    ]
    body = []
    for r in rows:
        dice = r["per_class_dice"]
        wall = r["wall_s"]
        best = r["best_val_dice"]
        body.append(
            [
                r["run"],
                r["init"],
                r["labelled_volumes"],
                r["combination"],
                r["seed"],
                f"{float(r['test_dice']):.3f}",  # type: ignore[arg-type]
                *(f"{dice[n]:.3f}" if n in dice else "-" for n in names),  # type: ignore[operator, index]
                "-" if best is None else f"{float(best):.3f}",  # type: ignore[arg-type]
                r["best_iteration"],
                "-" if wall is None else f"{float(wall):.0f}",  # type: ignore[arg-type]
            ]
        )
    return Table(header, body, "Every finished fine-tuning run")
