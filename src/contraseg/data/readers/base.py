"""What every dataset reader provides, and the input hygiene they share.

Readers keep the data layer's promise (docs/data.md, "What the data layer promises"): a file
named by a dataset's own metadata is read only from inside the dataset folder, and whatever a
library says while reading (nibabel's header fixes, numpy's or PIL's warnings) goes to the
debug log instead of stderr, so that the command line prints one line or nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

from contraseg.data.orientation import Orientation
from contraseg.data.volume import CaseFiles, Volume
from contraseg.errors import InputError
from contraseg.fileio import one_line

log = logging.getLogger("contraseg.data")

# Per-image Dice of a class absent from both prediction and reference: 1.0 ("count_as_one", the
# medical datasets' rule, docs/metrics.md) or left out of the image's mean ("leave_out", as the
# official Cityscapes evaluation ignores classes that appear in neither).
AbsentClasses = Literal["count_as_one", "leave_out"]
ABSENT_CLASSES: tuple[AbsentClasses, ...] = ("count_as_one", "leave_out")


class Reader(Protocol):
    """A dataset layout on disk.

    ``list_cases`` walks ``root`` and fails with :class:`contraseg.errors.InputError` naming the
    first missing or unexpected file; ``load`` reads one case and validates it (3-D, finite,
    image and label of one shape, label values within ``range(num_classes)`` after mapping). A
    case listed without a label (``CaseFiles.label`` None) loads as an image alone.

    The last four attributes are what a model bundle records so that prediction reads a new
    scan as training read the dataset (docs/inference.md): which channel of a 4-D image is
    kept, the voxel-order rule, the value each class index is written as in a label map (the
    dataset's own values, so that predictions compare with its references), and how per-image
    Dice treats a class absent from both prediction and reference (docs/metrics.md).
    """

    name: str
    class_names: tuple[str, ...]  # index 0 is background
    default_spacing: tuple[float, float]  # in-plane target spacing in mm
    default_size: tuple[int, int]  # in-plane crop/pad size in pixels
    in_channels: int
    channel: int | None  # a 4-D image keeps this channel; None: its channels are the inputs
    orientation: Orientation  # contraseg.data.orientation
    label_values: tuple[int, ...]  # value of each class index in the dataset's label maps
    absent_classes: AbsentClasses  # "count_as_one" (medical) or "leave_out" (Cityscapes)

    @property
    def num_classes(self) -> int: ...

    def list_cases(self, root: Path) -> list[CaseFiles]: ...

    def load(self, case: CaseFiles) -> Volume: ...


def dataset_path(root: Path, entry: object, source: Path) -> Path:
    """``root / entry`` for a path written in a dataset's metadata (``source``, a dataset.json).

    The entry must be relative and stay inside ``root`` once ``.`` and ``..`` are folded away;
    an absolute path or one that climbs out is an error naming ``source``. Symbolic links in the
    dataset folder are followed: they were put there by whoever owns the folder (datasets are
    often assembled from links into shared storage), whereas the metadata is downloaded text.
    """
    if not isinstance(entry, str) or not entry.strip() or "\x00" in entry:
        raise InputError(source, f"expected a relative file path, got {entry!r}")
    normal = os.path.normpath(entry)
    if os.path.isabs(entry) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise InputError(source, f"path {entry!r} leads outside the dataset folder {root}")
    return Path(root) / normal


class _ToDebug(logging.Handler):
    def __init__(self, source: Path) -> None:
        super().__init__()
        self.source = source

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("%s: %s", self.source, one_line(record.getMessage()))


@contextlib.contextmanager
def quiet(source: Path) -> Iterator[None]:
    """Send nibabel's log and Python warnings raised inside to the debug log, naming ``source``.

    nibabel logs header fixes (``pixdim[1,2,3] should be non-zero; setting 0 dims to 1``) to
    stderr through its own handler; numpy and PIL warn through :mod:`warnings`.
    """
    nib_log = logging.getLogger("nibabel.global")
    handlers, propagate = nib_log.handlers[:], nib_log.propagate
    for handler in handlers:
        nib_log.removeHandler(handler)
    nib_log.addHandler(_ToDebug(source))
    nib_log.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for warning in caught:
                    log.debug("%s: %s", source, one_line(warning.message))
    finally:
        nib_log.handlers[:] = handlers
        nib_log.propagate = propagate
