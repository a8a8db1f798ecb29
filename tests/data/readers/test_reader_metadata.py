"""What every reader tells a model bundle, and loading a case that has no label."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import reader_kit

from contraseg.config import DataConfig
from contraseg.data.orientation import ORIENTATIONS
from contraseg.data.readers import _READERS, get_reader
from contraseg.data.readers.base import ABSENT_CLASSES


def _reader(dataset: str, root, **kwargs):
    return get_reader(DataConfig(dataset=dataset, root=str(root), **kwargs))


def _roots(tmp_path) -> dict[str, object]:
    from contraseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "phantom", volumes=2, size=16, seed=0)
    return {
        "acdc": tmp_path / "phantom",
        "phantom": tmp_path / "phantom",
        "prostate": reader_kit.write_prostate(tmp_path / "prostate"),
        "mmwhs": reader_kit.write_mmwhs(tmp_path / "mmwhs"),
        "nnunet": reader_kit.write_nnunet(tmp_path / "nnunet"),
        "cityscapes": reader_kit.write_cityscapes(tmp_path / "cityscapes"),
    }


def test_every_reader_describes_what_prediction_needs(tmp_path):
    roots = _roots(tmp_path)
    assert set(roots) == set(_READERS)
    expected = {
        "acdc": ("as_stored", (0, 1, 2, 3), "count_as_one", None),
        "phantom": ("as_stored", (0, 1, 2, 3), "count_as_one", None),
        "prostate": ("as_stored", (0, 1, 2), "count_as_one", 0),
        "mmwhs": (
            "closest_canonical",
            (0, 205, 420, 500, 550, 600, 820, 850),
            "count_as_one",
            None,
        ),
        "nnunet": ("as_stored", (0, 1, 2), "count_as_one", None),
        "cityscapes": ("as_stored", tuple(range(13)), "leave_out", None),
    }
    for name, root in roots.items():
        reader = _reader(name, root)
        orientation, values, absent, channel = expected[name]
        assert (reader.orientation, reader.label_values) == (orientation, values), name
        assert (reader.absent_classes, reader.channel) == (absent, channel), name
        assert reader.orientation in ORIENTATIONS and reader.absent_classes in ABSENT_CLASSES
        assert len(reader.label_values) == reader.num_classes


@pytest.mark.parametrize("dataset", ["prostate", "mmwhs", "cityscapes", "nnunet", "acdc"])
def test_a_case_loads_without_its_label(tmp_path, dataset):
    root = _roots(tmp_path)[dataset]
    reader = _reader(dataset, root)
    case = reader.list_cases(root)[0]
    labelled = reader.load(case)
    alone = reader.load(dataclasses.replace(case, label=None))
    assert labelled.label is not None and alone.label is None
    np.testing.assert_array_equal(alone.image, labelled.image)
    np.testing.assert_array_equal(alone.affine, labelled.affine)
    assert alone.spacing == labelled.spacing
