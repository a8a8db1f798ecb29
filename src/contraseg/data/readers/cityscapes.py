"""Cityscapes for the supplement's section 4: colour street scenes through the same UNet.

Layout (``root`` holds the two official downloads unpacked)::

    leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png    RGB, 1024 x 2048
    gtFine/{train,val}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png     label ids 0..33

The pool is train + val (the test split has no public labels); case ids are
``{city}_{seq}_{frame}``. Every other file in a ``leftImg8bit`` city folder is an error; the
other gtFine files (``_color``, ``_instanceIds``, ``_polygons.json``) are ignored.

What is done (supplement section 4):

- Down-scaling by 4 (1024 x 2048 -> 256 x 512): the image by area averaging (PIL ``BOX``), the
  label by nearest neighbour.
- 12 foreground classes from the label ids: road 7, sidewalk 8, building 11, wall 12,
  vegetation 21, terrain 22, sky 23, person 24 + rider 25, car 26, motorcycle 32 + bicycle 33,
  truck 27, bus 28 -> 1..12 in that order; every other id (0..33) -> 0 background; an id above
  33 is an error.
- Each image is a :class:`Volume` of shape (H, W, 1, 3): one slice, three colour channels,
  spacing (1, 1, 1) and an identity affine. The defaults (256 x 512 at spacing 1) make the
  preprocessing's resampling and cropping a no-op on real Cityscapes.
- Split (:meth:`CityscapesReader.split`): the pool is shuffled with the seed; X_ts is its first
  round(N * 705 / 3475) images (705 of the 3475 train + val images, the supplement's
  X_ts / X_pre = 705 / 2770) and X_pre the rest. The supplement's labelled sets
  (X_tr, X_val) = (100, 100), (200, 200), (400, 200), drawn from X_pre, are selected by
  ``finetune.labelled_volumes`` 1, 2 and 8 (combinations c1..c3, each its own seeded draw);
  with fewer than 3475 images every size is scaled by N / 3475 (at least 1). The benchmark
  trains on X_pre except the validation images of tr8/c1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from contraseg.config import DataConfig
from contraseg.data.orientation import Orientation
from contraseg.data.readers.base import AbsentClasses, quiet
from contraseg.data.splits import LabelledSet, Split
from contraseg.data.volume import CaseFiles, Volume
from contraseg.errors import InputError
from contraseg.fileio import one_line

SPLITS = ("train", "val")
DOWNSCALE = 4
X_PRE, X_TS = 2770, 705
# finetune.labelled_volumes -> the supplement's (X_tr, X_val) sizes
LABELLED_SIZES = {1: (100, 100), 2: (200, 200), 8: (400, 200)}
COMBINATIONS = 3
# Cityscapes label id -> class, in the supplement's order (``labelIds`` go up to 33)
_GROUPS = ((7,), (8,), (11,), (12,), (21,), (22,), (23,), (24, 25), (26,), (32, 33), (27,), (28,))
MAX_LABEL_ID = 33
LOOKUP = np.zeros(MAX_LABEL_ID + 1, dtype=np.int16)
LOOKUP[[i for ids in _GROUPS for i in ids]] = [c for c, ids in enumerate(_GROUPS, 1) for _ in ids]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def holdout_size(num_images: int) -> int:
    """Size of X_ts for ``num_images`` in the pool: the supplement's fraction 705 / 3475."""
    return round(num_images * X_TS / (X_PRE + X_TS))


def _open(path: Path) -> Image.Image:
    # PIL reports a bad chunk as SyntaxError and a huge header as DecompressionBombError
    try:
        with quiet(path):
            image = Image.open(path)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        problem = f"cannot read PNG (truncated or corrupt?): {one_line(err)}"
        raise InputError(path, problem) from None
    return image


def _scaled_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return max(1, round(width / DOWNSCALE)), max(1, round(height / DOWNSCALE))


def map_label_ids(path: Path, ids: np.ndarray) -> np.ndarray:
    """Cityscapes ``labelIds`` -> 0..12 (int16); an id above 33 raises naming the file."""
    unknown = sorted(set(np.unique(ids).tolist()) - set(range(MAX_LABEL_ID + 1)))
    if unknown:
        raise InputError(path, f"label ids {unknown} are not Cityscapes labelIds (0..33)")
    return LOOKUP[ids.astype(np.int64)]


class CityscapesReader:
    """Reads Cityscapes train + val with the supplement's 12 classes at a quarter resolution."""

    name = "cityscapes"
    class_names = (
        "background", "road", "sidewalk", "building", "wall", "vegetation", "terrain", "sky",
        "person+rider", "car", "motorbike+bicycle", "truck", "bus",
    )  # fmt: skip
    default_spacing = (1.0, 1.0)
    default_size = (256, 512)
    in_channels = 3
    channel = None
    orientation: Orientation = "as_stored"
    label_values = tuple(range(len(_GROUPS) + 1))  # class indices: the label ids are grouped
    absent_classes: AbsentClasses = "leave_out"  # as the official evaluation

    def __init__(self, config: DataConfig) -> None:
        self.root = Path(config.root)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def list_cases(self, root: Path) -> list[CaseFiles]:
        root = Path(root)
        for folder in (root / "leftImg8bit", root / "gtFine"):
            if not folder.is_dir():
                raise InputError(folder, "folder not found")
        splits = [s for s in SPLITS if (root / "leftImg8bit" / s).is_dir()]
        if not splits:
            raise InputError(root / "leftImg8bit" / "train", "folder not found")
        cases = []
        for split in splits:
            for city in sorted(p for p in (root / "leftImg8bit" / split).iterdir() if p.is_dir()):
                for image in sorted(city.iterdir()):
                    if image.name.startswith("."):
                        continue
                    if not image.name.endswith(IMAGE_SUFFIX):
                        raise InputError(image, f"unexpected file: expected *{IMAGE_SUFFIX}")
                    case_id = image.name[: -len(IMAGE_SUFFIX)]
                    label = root / "gtFine" / split / city.name / f"{case_id}{LABEL_SUFFIX}"
                    if not label.is_file():
                        raise InputError(label, "file not found")
                    cases.append(CaseFiles(case_id, image, label, {"split": split}))
        if not cases:
            raise InputError(root / "leftImg8bit", f"no *{IMAGE_SUFFIX} files")
        return cases

    def load(self, case: CaseFiles) -> Volume:
        image = _open(case.image)
        if image.mode != "RGB":
            raise InputError(case.image, f"expected an RGB image, got mode {image.mode}")
        size = _scaled_size(image)
        classes = None
        if case.label is not None:
            label = _open(case.label)
            if len(label.getbands()) != 1:
                problem = f"expected one band of label ids, got mode {label.mode}"
                raise InputError(case.label, problem)
            if label.size != image.size:
                raise InputError(
                    case.label, f"size {label.size} differs from {image.size} of {case.image}"
                )
            ids = np.asarray(label.resize(size, Image.Resampling.NEAREST))
            classes = map_label_ids(case.label, ids)[:, :, None]
        # area average in float, channel by channel (PIL's "F" mode), not rounded to uint8
        pixels = np.stack(
            [
                np.asarray(Image.fromarray(band).resize(size, Image.Resampling.BOX))
                for band in np.moveaxis(np.asarray(image, dtype=np.float32), -1, 0)
            ],
            axis=-1,
        )
        return Volume(
            case_id=case.case_id,
            image=pixels[:, :, None, :],
            label=classes,
            spacing=(1.0, 1.0, 1.0),
            affine=np.eye(4),
            source=case.image,
        )

    def split(self, seed: int) -> Split:
        """X_pre / X_ts and the labelled sets of the module docstring, deterministic in seed."""
        ids = sorted(c.case_id for c in self.list_cases(self.root))
        order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        n_test = holdout_size(len(ids))
        test, pool = tuple(order[:n_test]), order[n_test:]
        scale = min(1.0, len(ids) / (X_PRE + X_TS))
        labelled = {}
        for key, sizes in LABELLED_SIZES.items():
            n_train, n_val = (max(1, round(n * scale)) for n in sizes)
            if n_train + n_val > len(pool):
                continue
            for j in range(COMBINATIONS):
                draw = [
                    pool[i] for i in np.random.default_rng([seed, key, j]).permutation(len(pool))
                ]
                labelled[f"tr{key}/c{j + 1}"] = LabelledSet(
                    tuple(draw[:n_train]), tuple(draw[n_train : n_train + n_val])
                )
        benchmark = None
        if "tr8/c1" in labelled:
            val = labelled["tr8/c1"].val
            benchmark = LabelledSet(tuple(c for c in pool if c not in val), val)
        return Split(
            pretrain=tuple(pool),
            pretrain_val=benchmark.val if benchmark else (),
            test=test,
            labelled=labelled,
            benchmark=benchmark,
            source=f"cityscapes split (seed {seed}, {len(ids)} images)",
        )
