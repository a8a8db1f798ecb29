"""The on-disk cache of preprocessed volumes (docs/data.md) and its loader.

Layout under the cache folder (``data.cache``, default ``<root>/.contraseg-cache``)::

    manifest.json                 written last; the only thing a run trusts
    <case_id>/image-<key>.npy     (Z, C, H, W) float32, uncompressed so it can be memory-mapped
    <case_id>/label-<key>.npy     (Z, H, W) uint8, preprocessed grid
    <case_id>/native-<key>.npy    (X, Y, Z) int16, label on the native grid (for evaluation)

``key`` is a hash of everything that decides a case's arrays: the reader and its options, the
preprocessing parameters, and the size and modification time of each input file. A case whose
key is in the manifest and whose files exist is reused; any other case is prepared again (only
the cases that changed, so touching one file re-prepares one case). Files are never rewritten in
place: new files get a new key, the manifest is replaced atomically, and only then are files
that the manifest no longer names deleted. A run that is interrupted or hits bad input removes
what it wrote; anything it could not remove is unreferenced by the manifest, hence never trusted,
and is deleted by the next successful run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contraseg import fileio
from contraseg.config import DataConfig
from contraseg.data.preprocess import GridInfo, PreprocessParams, params_for, preprocess_volume
from contraseg.data.readers import get_reader
from contraseg.data.readers.base import Reader
from contraseg.data.volume import CaseFiles
from contraseg.errors import InputError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class PreparedCase:
    """One preprocessed case; arrays are memory-mapped on first access."""

    case_id: str
    grid: GridInfo
    num_slices: int
    image_path: Path
    label_path: Path | None
    native_label_path: Path | None

    @cached_property
    def image(self) -> np.ndarray:
        """(Z, C, H, W) float32, read-only memory map."""
        return np.load(self.image_path, mmap_mode="r")

    @cached_property
    def label(self) -> np.ndarray | None:
        """(Z, H, W) uint8 on the preprocessed grid, or None for an unlabelled case."""
        return None if self.label_path is None else np.load(self.label_path, mmap_mode="r")

    @cached_property
    def native_label(self) -> np.ndarray | None:
        """(X, Y, Z) int16 on the native grid, or None for an unlabelled case."""
        if self.native_label_path is None:
            return None
        return np.load(self.native_label_path, mmap_mode="r")


@dataclass
class PreparedDataset:
    """A prepared dataset: what training and evaluation read."""

    root: Path
    cache_dir: Path
    reader_name: str
    class_names: tuple[str, ...]
    in_channels: int
    params: PreprocessParams
    cases: dict[str, PreparedCase]
    label_counts: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> str:
        """A few lines for the command line: cases, slices, shape, spacing, label histogram."""
        cases = list(self.cases.values())
        if not cases:
            return f"{self.reader_name} at {self.root}: no cases"
        slices = [c.num_slices for c in cases]
        inplane = [s for c in cases for s in c.grid.native_spacing[:2]]
        through = [c.grid.native_spacing[2] for c in cases]
        labelled = [c for c in cases if c.label_path is not None]
        lines = [
            f"{self.reader_name} at {self.root} -> {self.cache_dir}",
            f"cases: {len(cases)} ({len(labelled)} labelled), slices: {sum(slices)} "
            f"({min(slices)}-{max(slices)} per case)",
            f"preprocessed slice: {self.in_channels} x {self.params.size[0]} x "
            f"{self.params.size[1]} at {self.params.target_spacing[0]:g} x "
            f"{self.params.target_spacing[1]:g} mm, N4 {'on' if self.params.n4 else 'off'}",
            f"native spacing: in-plane {min(inplane):.3g}-{max(inplane):.3g} mm, "
            f"between slices {min(through):.3g}-{max(through):.3g} mm",
        ]
        if labelled:
            total = np.sum([self.label_counts[c.case_id] for c in labelled], axis=0)
            share = total / max(1, total.sum())
            hist = ", ".join(
                f"{name} {100 * s:.1f}%" for name, s in zip(self.class_names, share, strict=True)
            )
            lines.append(f"labels (preprocessed voxels): {hist}")
        return "\n".join(lines)


def _stamp(path: Path, root: Path) -> dict[str, Any]:
    stat = path.stat()
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return {"path": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _case_key(case: CaseFiles, root: Path, settings: dict[str, Any]) -> tuple[str, list]:
    """Hash of the settings, the case's reader extras and its input files' sizes and mtimes.

    Extras that name a file (ACDC's Info.cfg) are stamped like the image and label.
    """
    paths = [case.image, case.label] + [Path(v) for v in case.extra.values() if Path(v).is_file()]
    inputs = [_stamp(p, root) for p in paths if p is not None]
    blob = json.dumps({"settings": settings, "extra": case.extra, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], inputs


def _read_manifest(path: Path) -> dict[str, Any]:
    """The previous manifest, or an empty one when absent, unreadable or of another version."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"cases": {}}
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
        return {"cases": {}}
    return manifest


def _files_exist(cache_dir: Path, entry: dict[str, Any]) -> bool:
    return all((cache_dir / name).is_file() for name in entry["files"].values() if name)


def _prepare_case(
    reader: Reader, case: CaseFiles, params: PreprocessParams, cache_dir: Path, key: str
) -> tuple[dict[str, Any], list[Path]]:
    """Load, validate and preprocess one case, then write its arrays; returns (entry, files)."""
    volume = reader.load(case)  # validates; raises InputError before anything is written
    image, label, grid = preprocess_volume(volume, params)
    folder = Path(case.case_id)
    files: dict[str, str | None] = {"image": str(folder / f"image-{key}.npy")}
    arrays: dict[str, np.ndarray] = {"image": image}
    counts = None
    if label is not None and volume.label is not None:
        files["label"] = str(folder / f"label-{key}.npy")
        files["native_label"] = str(folder / f"native-{key}.npy")
        arrays["label"] = label
        arrays["native_label"] = volume.label.astype(np.int16)
        counts = np.bincount(label.ravel(), minlength=reader.num_classes).tolist()
    else:
        files["label"] = files["native_label"] = None
    written = []
    for name, array in arrays.items():
        target = cache_dir / str(files[name])
        written.append(target)
        fileio.save_npy(target, array)
    entry = {
        "key": key,
        "files": files,
        "num_slices": int(image.shape[0]),
        "grid": grid.to_json(),
        "label_counts": counts,
    }
    return entry, written


def _remove_unreferenced(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Delete case files and folders that the manifest does not name (stale or orphaned)."""
    keep = {
        (cache_dir / name).resolve()
        for entry in manifest["cases"].values()
        for name in entry["files"].values()
        if name
    }
    for folder in cache_dir.iterdir():
        if not folder.is_dir():
            continue
        if folder.name not in manifest["cases"]:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for path in folder.iterdir():
            if path.resolve() not in keep:
                path.unlink(missing_ok=True)


def prepare_dataset(config: DataConfig, progress: bool = True) -> PreparedDataset:
    """Preprocess every case of ``config.root`` into the cache, reusing what is up to date."""
    reader = get_reader(config)
    root = Path(config.root)
    cases = reader.list_cases(root)  # a missing folder or file fails here, before any write
    if not cases:
        raise InputError(root, "no cases found")
    params = params_for(config, reader)
    cache_dir = Path(config.cache) if config.cache else root / ".contraseg-cache"
    settings = {
        "version": FORMAT_VERSION,
        "reader": reader.name,
        "frames": list(config.frames),
        "channel": config.channel,
        "params": params.to_json(),
    }
    manifest_path = cache_dir / MANIFEST
    old = _read_manifest(manifest_path)
    created_dir = not cache_dir.exists()
    entries: dict[str, Any] = {}
    written: list[Path] = []
    todo = []
    for case in cases:
        key, inputs = _case_key(case, root, settings)
        previous = old["cases"].get(case.case_id)
        if previous and previous["key"] == key and _files_exist(cache_dir, previous):
            entries[case.case_id] = previous
        else:
            todo.append((case, key, inputs))
    bar = tqdm(
        total=len(todo),
        desc="prepare",
        unit="case",
        leave=False,
        disable=None if progress else True,
    )
    try:
        with bar:  # closed (and cleared) before an error message is printed
            for case, key, inputs in todo:
                entry, files = _prepare_case(reader, case, params, cache_dir, key)
                written += files
                entries[case.case_id] = {**entry, "inputs": inputs}
                bar.update()
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
            if path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()
        if created_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    manifest = {
        **settings,
        "class_names": list(reader.class_names),
        "in_channels": reader.in_channels,
        "root": str(root.resolve()),
        "cases": {case.case_id: entries[case.case_id] for case in cases},
    }
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, to compare with the old one
    if manifest != old:
        fileio.write_json(manifest_path, manifest)
        _remove_unreferenced(cache_dir, manifest)
    return _load(manifest, root, cache_dir, params)


def _load(
    manifest: dict[str, Any], root: Path, cache_dir: Path, params: PreprocessParams
) -> PreparedDataset:
    cases = {}
    counts = {}
    for case_id, entry in manifest["cases"].items():
        files = entry["files"]
        cases[case_id] = PreparedCase(
            case_id=case_id,
            grid=GridInfo.from_json(entry["grid"]),
            num_slices=int(entry["num_slices"]),
            image_path=cache_dir / files["image"],
            label_path=cache_dir / files["label"] if files["label"] else None,
            native_label_path=cache_dir / files["native_label"] if files["native_label"] else None,
        )
        if entry["label_counts"] is not None:
            counts[case_id] = entry["label_counts"]
    return PreparedDataset(
        root=root,
        cache_dir=cache_dir,
        reader_name=manifest["reader"],
        class_names=tuple(manifest["class_names"]),
        in_channels=int(manifest["in_channels"]),
        params=params,
        cases=cases,
        label_counts=counts,
    )
