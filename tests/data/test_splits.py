"""Splits: the paper's IDs, their documented fixes, and the generated split's rule."""

from __future__ import annotations

import pytest

from contraseg.data.splits import LabelledSet, Split, generated_split, get_split
from contraseg.errors import InputError


def _acdc(*numbers: int) -> tuple[str, ...]:
    return tuple(f"patient{n:03d}" for n in numbers)


def _check_disjoint(split: Split) -> None:
    test = set(split.test)
    assert not test & set(split.pretrain)
    for key, labelled in split.labelled.items():
        assert len(labelled.val) == 2, key
        assert not set(labelled.train) & test, key
        assert not set(labelled.val) & test, key
        assert not set(labelled.train) & set(labelled.val), key
    if split.benchmark is not None:
        assert not set(split.benchmark.train) & (test | set(split.benchmark.val))


@pytest.mark.parametrize("name", ["acdc", "prostate", "mmwhs"])
def test_packaged_splits_are_consistent(name: str) -> None:
    split = get_split(name, [])
    _check_disjoint(split)
    assert split.source.endswith(f"{name}.json")
    assert split.combinations(1) == ["c1", "c2", "c3", "c4", "c5"]
    assert split.combinations(8) == ["c1", "c2", "c3"]
    for key, labelled in split.labelled.items():
        assert len(labelled.train) == int(key.split("/")[0][2:]), key


def test_acdc_ids() -> None:
    split = get_split("acdc", [])
    assert len(split.pretrain) == 52 and len(split.test) == 20 and len(split.pretrain_val) == 10
    assert split.test[:4] == _acdc(7, 8, 9, 10) and split.test[-1] == "patient090"
    assert split.labelled_set(1, "c1") == LabelledSet(_acdc(2), _acdc(11, 71))
    assert split.labelled_set(2, "c1") == LabelledSet(_acdc(42, 62), _acdc(31, 72))
    assert split.labelled["tr8/c2"].train == _acdc(2, 22, 42, 62, 95, 63, 94, 43)
    assert split.benchmark is not None and len(split.benchmark.train) == 77
    assert "patient011" not in split.benchmark.train  # the official list's overlap, fixed
    assert split.benchmark.val == _acdc(11, 71)


def test_prostate_and_mmwhs_ids() -> None:
    prostate = get_split("prostate", [])
    assert len(prostate.pretrain) == 17 and len(prostate.test) == 15  # "tr22" holds 17
    assert prostate.labelled_set(1, "c1") == LabelledSet(
        ("prostate_01",), ("prostate_13", "prostate_14")
    )
    assert prostate.benchmark is not None and "prostate_00" in prostate.benchmark.train
    assert all(len(i) == len("prostate_00") for i in prostate.pretrain + prostate.test)
    mmwhs = get_split("mmwhs", [])
    assert mmwhs.combinations(2) == ["c1", "c2", "c3", "c4"]  # the official tr2 has no c5
    assert mmwhs.test == tuple(f"mr_train_{n}" for n in range(1011, 1021))
    assert mmwhs.benchmark == mmwhs.labelled["tr8/c1"]


def test_unknown_labelled_set_lists_valid_ones() -> None:
    with pytest.raises(InputError, match=r"tr2/c5.*valid: tr1/c1.*tr8/c3"):
        get_split("mmwhs", []).labelled_set(2, "c5")


def test_check_available_lists_missing_cases() -> None:
    split = get_split("acdc", [])
    present = [f"patient{n:03d}" for n in range(1, 101) if n not in (7, 95)]
    split.check_available(present, split.labelled_set(1, "c1").train)
    with pytest.raises(InputError, match=r"2 case.*patient007, patient095") as info:
        split.check_available(present, split.test + split.labelled_set(1, "c3").train)
    assert info.value.path is not None and info.value.path.endswith("acdc.json")


@pytest.mark.parametrize("n", [6, 16, 20, 60])
def test_generated_split_rule(n: int) -> None:
    ids = [f"patient{i:03d}" for i in range(1, n + 1)]
    split = generated_split(ids, seed=0)
    _check_disjoint(split)
    assert split == generated_split(list(reversed(ids)), seed=0)  # order of the input is irrelevant
    assert split != generated_split(ids, seed=1)
    everything = set(split.pretrain) | set(split.pretrain_val) | set(split.test)
    assert everything == set(ids) and len(split.pretrain) >= n // 2
    assert not set(split.pretrain_val) & (set(split.pretrain) | set(split.test))
    for labelled in split.labelled.values():
        assert set(labelled.train) <= set(split.pretrain)  # labelled volumes from the pool
    if n == 60:
        assert len(split.test) == 12 and len(split.pretrain) >= 30
        assert len(split.labelled) == 13
    if n == 16:
        assert split.combinations(8) == ["c1"] and len(split.combinations(1)) == 5
    if n == 6:
        assert split.combinations(8) == [] and split.combinations(1) == ["c1", "c2", "c3"]


def test_get_split_generates_for_other_datasets() -> None:
    ids = [f"patient{i:03d}" for i in range(1, 21)]
    assert get_split("phantom", ids, seed=3) == generated_split(ids, 3)
    with pytest.raises(InputError, match="no labelled cases"):
        get_split("phantom", [])


@pytest.mark.parametrize(
    ("n", "test", "val", "pool"), [(1, 0, 0, 1), (2, 0, 1, 1), (3, 0, 2, 1), (5, 0, 2, 3)]
)
def test_small_generated_splits_have_no_test_set_and_what_validation_fits(n, test, val, pool):
    ids = [f"case_{i}" for i in range(n)]
    split = generated_split(ids, seed=1)
    assert (len(split.test), len(split.pretrain_val), len(split.pretrain)) == (test, val, pool)
    assert sorted((*split.test, *split.pretrain_val, *split.pretrain)) == ids
    first = split.labelled_set(1, "c1")
    assert first.train == split.pretrain[:1] and len(first.val) == val
    assert split.benchmark == LabelledSet(split.pretrain, split.pretrain_val)
