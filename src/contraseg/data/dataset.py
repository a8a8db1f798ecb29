"""A prepared dataset together with its split: what training and evaluation start from."""

from __future__ import annotations

from collections.abc import Sequence

from contraseg.config import DataConfig
from contraseg.data.cache import PreparedCase, PreparedDataset, prepare_dataset
from contraseg.data.readers import get_reader
from contraseg.data.splits import Split, get_split


def load_dataset(config: DataConfig) -> tuple[PreparedDataset, Split]:
    """Prepare (or reuse) the cache and form the dataset's split.

    A reader that knows its dataset's split (nnU-Net's ``splits_final.json`` and unlabelled
    images, Cityscapes' image counts) provides ``split(seed)``; the others use the packaged
    paper splits or a generated one.
    """
    prepared = prepare_dataset(config)
    reader = get_reader(config)
    if hasattr(reader, "split"):
        return prepared, reader.split(config.split_seed)
    return prepared, get_split(config.dataset, list(prepared.cases), seed=config.split_seed)


def require_cases(
    prepared: PreparedDataset, split: Split, case_ids: Sequence[str]
) -> list[PreparedCase]:
    """The prepared cases named by the split; missing ones are an error naming the split."""
    split.check_available(list(prepared.cases), list(case_ids))
    return [prepared.cases[case_id] for case_id in case_ids]
