"""Data splits: the paper's exact IDs for ACDC, MSD Prostate and MMWHS, generated otherwise.

The packaged JSON files in ``splits/`` hold the IDs of the official code's
``experiment_init/data_cfg_*.py`` as the readers name cases
(``patient002``, ``prostate_01``, ``mr_train_1001``). The official lists have quirks;
what we do about each (also in docs/splits.md and in each
JSON file's ``notes``):

* ACDC benchmark ("trall", 78 ids) contains 011, which is also one of its two validation ids:
  we drop 011 from the training list (77 train + 011, 071 validation).
* Prostate pre-training pool "tr22" holds 17 ids, not 22: we keep the 17 as published.
* Prostate "trall" has a missing comma (``"000" "001"`` -> ``"000001"``): we fix it; as the
  supplement's 20 + 2 cannot be formed from 32 labelled cases, the benchmark is all 17 labelled
  non-test cases except the validation pair 013, 014.
* MMWHS tr2 has no c5: we keep four tr2 combinations. The official comment names tr8 as the
  benchmark: we use tr8/c1.
* Kept as published: some labelled ACDC ids (003, 023, 043, 063, 094, 095) are outside the
  pre-training pool; prostate pre-training validation ids are also in its pre-training pool.

Other datasets (the phantom, nnU-Net raw data) get :func:`generated_split`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contraseg.data.volume import check_case_id
from contraseg.errors import InputError
from contraseg.fileio import one_line

PACKAGED = ("acdc", "prostate", "mmwhs")
_SPLIT_DIR = Path(__file__).with_name("splits")
# labelled-set sizes and how many combinations of each the paper uses
_COMBINATIONS = {1: 5, 2: 5, 8: 3}


@dataclass(frozen=True)
class LabelledSet:
    """Labelled training volumes and the 2 validation volumes used for model selection."""

    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    """Which cases each stage uses. ``labelled`` is keyed ``"tr1/c1"``, ``"tr2/c3"``, ..."""

    pretrain: tuple[str, ...]
    pretrain_val: tuple[str, ...]
    test: tuple[str, ...]
    labelled: dict[str, LabelledSet]
    benchmark: LabelledSet | None
    source: str = field(default="", compare=False)  # the JSON file, or how it was generated

    def combinations(self, n: int) -> list[str]:
        """Names of the labelled sets with ``n`` volumes, e.g. ``["c1", ..., "c5"]``."""
        return [key.split("/")[1] for key in self.labelled if key.split("/")[0] == f"tr{n}"]

    def labelled_set(self, n: int, combination: str) -> LabelledSet:
        key = f"tr{n}/{combination}"
        if key not in self.labelled:
            valid = ", ".join(self.labelled) or "none"
            raise InputError(
                self.source or None,
                f"no labelled set '{key}' in this split (valid: {valid}); or name the cases "
                "with finetune.train=[...] finetune.val=[...]",
            )
        return self.labelled[key]

    def choose(
        self,
        labelled_volumes: int | str,
        combination: str,
        train: Sequence[str] | None = None,
        val: Sequence[str] | None = None,
    ) -> tuple[str, LabelledSet]:
        """The fine-tuning set and its name: cases named by ``train``/``val`` ("custom"), the
        benchmark set (``labelled_volumes`` "all") or a labelled set ("tr1/c1"). Named cases
        may not be test cases: the test set must stay unseen."""
        if train is not None:
            chosen = LabelledSet(tuple(train), tuple(val or ()))
            leaked = sorted(set(chosen.train + chosen.val) & set(self.test))
            if leaked:
                raise InputError(
                    self.source or None,
                    f"finetune.train/val name test cases {leaked}: the test set must stay unseen",
                )
            return "custom", chosen
        if labelled_volumes == "all":
            if self.benchmark is None:
                raise InputError(
                    self.source or None,
                    "this split has no benchmark set; name the cases with "
                    "finetune.train=[...] finetune.val=[...]",
                )
            return "all", self.benchmark
        n = int(labelled_volumes)
        return f"tr{n}/{combination}", self.labelled_set(n, combination)

    def check_available(self, case_ids: Iterable[str], which: Iterable[str]) -> None:
        """Raise :class:`InputError` listing the ids in ``which`` that are not in ``case_ids``."""
        present = set(case_ids)
        missing = [c for c in dict.fromkeys(which) if c not in present]
        if missing:
            raise InputError(
                self.source or None,
                f"{len(missing)} case(s) named by the split are not in the dataset: "
                + ", ".join(missing),
            )


def _ids(values: Any, path: Path, what: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InputError(path, f"'{what}' must be a list of case ids")
    return tuple(check_case_id(v, path) for v in values)


def _labelled(obj: Any, path: Path, what: str) -> LabelledSet:
    if not isinstance(obj, dict):
        raise InputError(path, f"'{what}' must be a mapping with 'train' and 'val'")
    return LabelledSet(
        train=_ids(obj.get("train"), path, f"{what}.train"),
        val=_ids(obj.get("val"), path, f"{what}.val"),
    )


def load_split(path: Path) -> Split:
    """A split from a JSON file in the packaged format."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read split file: {one_line(err)}") from None
    if not isinstance(obj, dict):
        raise InputError(path, "a split file must hold a mapping")
    return Split(
        pretrain=_ids(obj.get("pretrain"), path, "pretrain"),
        pretrain_val=_ids(obj.get("pretrain_val"), path, "pretrain_val"),
        test=_ids(obj.get("test"), path, "test"),
        labelled={k: _labelled(v, path, k) for k, v in obj.get("labelled", {}).items()},
        benchmark=_labelled(obj["benchmark"], path, "benchmark") if obj.get("benchmark") else None,
        source=str(path),
    )


# below this many labelled cases a generated split holds no test set
MIN_CASES_FOR_TEST = 6


def _labelled_sets(
    pool: tuple[str, ...], val_sets: list[tuple[str, ...]]
) -> dict[str, LabelledSet]:
    """Combination j of size n takes the pool's volumes j*n .. j*n+n-1 (disjoint combinations
    of one size) and validation set j mod k; up to 5 combinations for 1 and 2 volumes and 3 for
    8, as many as the pool holds. With no validation set, the sets have none."""
    labelled = {}
    for n, most in _COMBINATIONS.items():
        for j in range(min(most, len(pool) // n)):
            val = val_sets[j % len(val_sets)] if val_sets else ()
            labelled[f"tr{n}/c{j + 1}"] = LabelledSet(pool[j * n : (j + 1) * n], val)
    return labelled


def generated_split(case_ids: Iterable[str], seed: int) -> Split:
    """A split of the paper's shape from any case list, deterministic in (sorted ids, seed).

    Rule: shuffle the sorted ids with ``seed``. From 6 cases on, the first ~20% (at least 1)
    are the test set and the next 2k are k validation pairs (k = 3 from 20 cases on, else 1);
    with 3 to 5 cases there is no test set and one validation pair; with 2 cases one validation
    case; with 1 case no validation (fine-tuning then keeps its last weights). The validation
    cases also serve as the pre-training validation set; all the rest is the pre-training pool.
    Labelled sets are drawn from the pool (pre-training uses no labels), so they are disjoint
    from test and validation (see :func:`_labelled_sets`). The benchmark trains on the whole
    pool and validates on the first validation set.
    """
    ids = sorted(set(case_ids))
    if not ids:
        raise InputError(None, "no labelled cases to split")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n = len(ids)
    n_test = max(1, round(0.2 * n)) if n >= MIN_CASES_FOR_TEST else 0
    if n >= 3:
        pairs = 3 if n >= 20 else 1
        val_sets = [tuple(order[n_test + 2 * k : n_test + 2 * k + 2]) for k in range(pairs)]
    else:
        val_sets = [tuple(order[:1])] if n == 2 else []
    n_val = sum(len(v) for v in val_sets)
    pool = tuple(order[n_test + n_val :])
    return Split(
        pretrain=pool,
        pretrain_val=tuple(c for v in val_sets for c in v),
        test=tuple(order[:n_test]),
        labelled=_labelled_sets(pool, val_sets),
        benchmark=LabelledSet(pool, val_sets[0] if val_sets else ()),
        source=f"generated split (seed {seed}, {n} cases)",
    )


def fold_split(train: Sequence[str], val: Sequence[str], seed: int, source: str) -> Split:
    """The split of one fold of nnU-Net's ``splits_final.json``, read as nnU-Net does: the
    fold's ``train`` cases are the training pool, its ``val`` cases validate (all of them, for
    every labelled set), and there is no test set (nnU-Net's ``imagesTs`` is what ``contraseg
    predict`` segments). Labelled sets are drawn from the shuffled pool as in
    :func:`generated_split`; the benchmark trains on the whole pool. Every labelled case is
    pre-training data (pre-training uses no labels)."""
    ordered = sorted(train)
    pool = tuple(ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered)))
    val_sets = [tuple(val)] if val else []
    return Split(
        pretrain=tuple(sorted({*train, *val})),
        pretrain_val=tuple(val),
        test=(),
        labelled=_labelled_sets(pool, val_sets),
        benchmark=LabelledSet(pool, tuple(val)),
        source=source,
    )


def get_split(dataset_name: str, case_ids: Iterable[str], seed: int = 0) -> Split:
    """The paper's split for acdc/prostate/mmwhs; a generated one for any other dataset."""
    if dataset_name in PACKAGED:
        return load_split(_SPLIT_DIR / f"{dataset_name}.json")
    return generated_split(case_ids, seed)
