"""What every dataset reader provides, so that preprocessing and training never care which."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from contraseg.data.volume import CaseFiles, Volume


class Reader(Protocol):
    """A dataset layout on disk.

    ``list_cases`` walks ``root`` and fails with :class:`contraseg.errors.InputError` naming the
    first missing or unexpected file; ``load`` reads one case and validates it (3-D, finite,
    image and label of one shape, label values within ``range(num_classes)`` after mapping).
    """

    name: str
    class_names: tuple[str, ...]  # index 0 is background
    default_spacing: tuple[float, float]  # in-plane target spacing in mm
    default_size: tuple[int, int]  # in-plane crop/pad size in pixels
    in_channels: int

    @property
    def num_classes(self) -> int: ...

    def list_cases(self, root: Path) -> list[CaseFiles]: ...

    def load(self, case: CaseFiles) -> Volume: ...
