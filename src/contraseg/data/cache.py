"""The on-disk cache of preprocessed volumes (docs/data.md) and its loader.

Layout under the cache folder (``data.cache``, default ``<root>/.contraseg-cache``)::

    CACHEDIR.TAG                  marks the folder as a contraseg cache (written when claimed)
    manifest.json                 written last; the only thing a run trusts
    .pending.json                 only during a run: the files it is about to write
    <case_id>/image-<key>.npy     (Z, C, H, W) float32, uncompressed so it can be memory-mapped
    <case_id>/label-<key>.npy     (Z, H, W) uint8, preprocessed grid
    <case_id>/native-<key>.npy    (X, Y, Z) int16, label on the native grid (for evaluation)

``key`` is a hash of everything that decides a case's arrays: the reader and its options, the
preprocessing parameters, and the size and modification time of each input file. A case whose
key is in the manifest and whose files are intact is reused; any other case is prepared again
(only the cases that changed, so touching one file re-prepares one case).

What the cache may delete, and where it writes, is the point of most of this module. It writes
only into a folder it created (or found empty) and marked with ``CACHEDIR.TAG``; it refuses
the dataset folder, a folder holding the dataset, and any other non-empty folder. It deletes
only files it wrote itself: names that its manifest (or the journal ``.pending.json`` of an
interrupted run) records, in the fixed form ``<case_id>/<kind>-<key>.npy``, checked with
``os.lstat`` so that no link is ever followed; a case folder that is a link is refused.

Each array's manifest record holds its shape, dtype, byte size, modification time and SHA-256.
On reuse, size and ``.npy`` header are checked every time (one small read per file); the
SHA-256 when the file's modification time is not the recorded one, or always with
``verify=True``. Files are never rewritten in place: new arrays get a new key, the manifest is
replaced atomically, and only then are the files it no longer names deleted. A run that is
interrupted or hits bad input removes what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contraseg import fileio
from contraseg.config import DataConfig
from contraseg.data.preprocess import (
    GridInfo,
    IntensityProfile,
    PreprocessParams,
    params_for,
    preprocess_volume,
    unusual_intensity,
)
from contraseg.data.readers import get_reader
from contraseg.data.readers.base import Reader
from contraseg.data.volume import CaseFiles, check_case_id
from contraseg.errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX: caches are not locked
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
MARKER = "CACHEDIR.TAG"
PENDING = ".pending.json"
FORMAT_VERSION = 3  # 3: per-case intensity profiles
logger = logging.getLogger(__name__)
# The Cache Directory Tagging Specification (https://bford.info/cachedir/): backup tools skip
# the folder. The second line tells our marker from another tool's.
MARKER_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This folder is a contraseg data cache (docs/data.md); contraseg deletes in it only\n"
    "# the files its manifest.json names. It can be deleted: it is rebuilt from the dataset.\n"
)
KINDS = {"image": "image", "label": "label", "native_label": "native"}  # record -> file prefix
_FILE = re.compile(r"(image|label|native)-[0-9a-f]{16}\.npy")
_HASH_CHUNK = 2**22


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
    intensity: dict[str, IntensityProfile] = field(default_factory=dict, repr=False)

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


# -- where the cache may live ------------------------------------------------------------------


def _cache_dir(config: DataConfig, root: Path) -> Path:
    """The cache folder of ``config``, refused when using it could touch the dataset."""
    raw = config.cache or root / ".contraseg-cache"
    cache_dir = fileio.check_out_dir(raw, "data.cache")
    real_cache, real_root = Path(os.path.realpath(cache_dir)), Path(os.path.realpath(root))
    if real_cache == real_root or real_cache in real_root.parents:
        raise InputError(
            cache_dir, f"data.cache must not be the dataset folder {root} nor a folder holding it"
        )
    return cache_dir


def _is_real(path: Path, kind: int) -> bool:
    """Whether ``path`` itself (never a link's target) exists and is of ``kind`` (S_IFDIR...)."""
    try:
        return stat.S_IFMT(os.lstat(path).st_mode) == kind
    except OSError:
        return False


def _is_marked(cache_dir: Path) -> bool:
    marker = cache_dir / MARKER
    if not _is_real(marker, stat.S_IFREG):
        return False
    with contextlib.suppress(OSError, UnicodeDecodeError), open(marker, encoding="utf-8") as f:
        return f.read(len(MARKER_TEXT) + 1) == MARKER_TEXT
    return False


def _check_owner(cache_dir: Path) -> bool:
    """True when ``cache_dir`` is marked ours, False when it is absent or empty (to claim);
    :class:`InputError` for any other folder, which the cache never writes into."""
    if _is_marked(cache_dir):
        return True
    with _writing(cache_dir):
        foreign = cache_dir.is_dir() and any(cache_dir.iterdir())
    if foreign:
        raise InputError(
            cache_dir,
            f"data.cache is a folder that is not empty and has no contraseg {MARKER}; "
            "name a new or empty folder (a cache made by an older contraseg has none: delete it)",
        )
    return False


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write or listing (permission, full disk) into a one-line error."""
    try:
        yield
    except OSError as err:
        raise InputError(path, f"cannot use the cache: {err.strerror or err}") from None


def _claim(cache_dir: Path) -> list[Path]:
    """Create (or take, if empty) and mark the cache folder; returns the folders it created,
    deepest first, so that a failed run can remove them again."""
    created = [p for p in (cache_dir, *cache_dir.parents) if not p.exists()]
    with _writing(cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_text(cache_dir / MARKER, MARKER_TEXT)
    return created


def _release(cache_dir: Path, created: list[Path]) -> None:
    """Undo :func:`_claim` after a failed run: the marker, then the folders if left empty."""
    with contextlib.suppress(OSError):
        (cache_dir / MARKER).unlink(missing_ok=True)
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


# -- what the cache wrote: manifest, journal, file records ------------------------------------


def _file_name(case_id: str, kind: str, key: str) -> str:
    return f"{case_id}/{KINDS[kind]}-{key}.npy"


def _own_name(name: object) -> str:
    """``name`` if it has the form of a file the cache writes (``<case_id>/<kind>-<key>.npy``),
    else ValueError: names read back from disk decide deletions, so they are checked."""
    if not isinstance(name, str) or name.count("/") != 1:
        raise ValueError(name)
    folder, file_name = name.split("/")
    check_case_id(folder, MANIFEST)
    if not _FILE.fullmatch(file_name):
        raise ValueError(name)
    return name


def _check_entry(case_id: str, entry: Any) -> None:
    """Raise (LookupError, TypeError, ValueError, InputError) unless ``entry`` is well-formed."""
    check_case_id(case_id, MANIFEST)
    GridInfo.from_json(entry["grid"])
    if set(entry["files"]) != set(KINDS) or entry["files"]["image"] is None:
        raise ValueError(entry["files"])
    for kind, record in entry["files"].items():
        if record is None:
            continue
        if _own_name(record["name"]) != _file_name(case_id, kind, entry["key"]):
            raise ValueError(record["name"])
        np.dtype(record["dtype"])
        shape, size, mtime, digest = (record[k] for k in ("shape", "size", "mtime_ns", "sha256"))
        if not all(isinstance(n, int) and n >= 0 for n in [*shape, size, mtime]):
            raise ValueError(record)
        if not isinstance(digest, str):
            raise TypeError(digest)
    if entry["files"]["image"]["shape"][0] != entry["num_slices"]:
        raise ValueError(entry["num_slices"])


def _read_manifest(path: Path) -> dict[str, Any]:
    """The previous manifest, or an empty one when absent, unreadable, of another version or
    malformed (then none of its names is trusted, to read or to delete)."""
    empty: dict[str, Any] = {"cases": {}}
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("version") != FORMAT_VERSION:
            return empty
        for case_id, entry in manifest["cases"].items():
            _check_entry(case_id, entry)
    except (OSError, ValueError, LookupError, TypeError, AttributeError, InputError):
        return empty  # InputError: a case id that is not a plain name
    return manifest


def _read_pending(path: Path) -> set[str]:
    """Names an interrupted run was about to write (to delete unless now in the manifest)."""
    try:
        return {_own_name(name) for name in json.loads(path.read_text())}
    except (OSError, ValueError, TypeError, InputError):
        return set()


def _names(manifest: dict[str, Any]) -> set[str]:
    return {
        record["name"]
        for entry in manifest["cases"].values()
        for record in entry["files"].values()
        if record
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record(cache_dir: Path, name: str, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` as ``name`` and return its manifest record."""
    path = cache_dir / name
    with _writing(path):
        fileio.save_npy(path, array)
        st = os.lstat(path)
        digest = _file_digest(path)  # read back from the page cache: what is on disk
    return {
        "name": name,
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest,
    }


def _intact(cache_dir: Path, record: dict[str, Any], verify: bool) -> bool:
    """Whether a cached file still is what ``record`` says: a regular file of the recorded size
    whose ``.npy`` header gives the recorded shape and dtype; its SHA-256 too when ``verify``
    or when its modification time changed (then the record takes the new time)."""
    path = cache_dir / record["name"]
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != record["size"]:
            return False
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            data_bytes = math.prod(shape) * dtype.itemsize
            if (
                list(shape) != record["shape"]
                or dtype.str != record["dtype"]
                or fortran
                or handle.tell() + data_bytes != st.st_size
            ):
                return False
        if verify or st.st_mtime_ns != record["mtime_ns"]:
            if _file_digest(path) != record["sha256"]:
                return False
            record["mtime_ns"] = st.st_mtime_ns
    except (OSError, ValueError):
        return False
    return True


def _remove_own(cache_dir: Path, names: Iterable[str]) -> None:
    """Delete the cache's own files by their (checked) names, with the temporary files that an
    interrupted write of them left, then their case folders if left empty. Nothing is reached
    through a link: a case folder must be a real folder and a file a regular file (lstat)."""
    folders = set()
    for name in names:
        folder_name, file_name = name.split("/")
        folder = cache_dir / folder_name
        if not _is_real(folder, stat.S_IFDIR):
            continue
        folders.add(folder)
        for path in (folder / file_name, *folder.glob(f".{file_name}.*.tmp")):
            if _is_real(path, stat.S_IFREG):
                with contextlib.suppress(OSError):
                    path.unlink()
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty: something else lives there
            folder.rmdir()


# -- preparing ---------------------------------------------------------------------------------


def _stamp(path: Path, root: Path) -> dict[str, Any]:
    stat_result = path.stat()
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return {"path": name, "size": stat_result.st_size, "mtime_ns": stat_result.st_mtime_ns}


def _case_key(case: CaseFiles, root: Path, settings: dict[str, Any]) -> tuple[str, list]:
    """Hash of the settings, the case's reader extras and its input files' sizes and mtimes.

    Extras that name a file (ACDC's Info.cfg) are stamped like the image and label.
    """
    paths = [case.image, case.label] + [Path(v) for v in case.extra.values() if Path(v).is_file()]
    inputs = [_stamp(p, root) for p in paths if p is not None]
    blob = json.dumps({"settings": settings, "extra": case.extra, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], inputs


def _reusable(cache_dir: Path, entry: dict[str, Any], verify: bool) -> dict[str, Any] | None:
    """A copy of ``entry`` (with updated times) if all its files are intact, else None."""
    entry = json.loads(json.dumps(entry))
    records = [r for r in entry["files"].values() if r]
    return entry if all(_intact(cache_dir, r, verify) for r in records) else None


def _prepare_case(
    reader: Reader,
    case: CaseFiles,
    params: PreprocessParams,
    cache_dir: Path,
    key: str,
    written: list[str],
) -> dict[str, Any]:
    """Load, validate and preprocess one case, then write its arrays, adding each name to
    ``written`` before its file is written (so that a failure can remove it); returns the entry."""
    volume = reader.load(case)  # validates; raises InputError before anything is written
    image, label, grid = preprocess_volume(volume, params)
    arrays: dict[str, np.ndarray] = {"image": image}
    counts = None
    if label is not None and volume.label is not None:
        arrays["label"] = label
        arrays["native_label"] = volume.label.astype(np.int16)
        counts = np.bincount(label.ravel(), minlength=reader.num_classes).tolist()
    files: dict[str, dict[str, Any] | None] = dict.fromkeys(KINDS)
    for kind, array in arrays.items():
        name = _file_name(case.case_id, kind, key)
        written.append(name)
        files[kind] = _record(cache_dir, name, array)
    return {
        "key": key,
        "files": files,
        "num_slices": int(image.shape[0]),
        "grid": grid.to_json(),
        "label_counts": counts,
        "intensity": IntensityProfile.of(volume.image).to_json(),
    }


def _check_case_folders(cache_dir: Path, cases: list[CaseFiles]) -> None:
    """A case folder in the cache must be a real folder: writing through a link would put
    files (and a later clean-up would look for them) wherever the link points."""
    for case in cases:
        if case.case_id in (MANIFEST, MARKER):
            raise InputError(case.image, f"case id {case.case_id!r} is a name the cache uses")
        folder = cache_dir / case.case_id
        if os.path.lexists(folder) and not _is_real(folder, stat.S_IFDIR):
            raise InputError(
                folder, "is a link or a file, not a folder the cache made; remove it by hand"
            )


def prepare_dataset(
    config: DataConfig, progress: bool = True, verify: bool = False
) -> PreparedDataset:
    """Preprocess every case of ``config.root`` into the cache, reusing what is intact.

    ``verify`` checks the SHA-256 of every reused file, not only of those whose modification
    time changed (a full read of the cache).
    """
    reader = get_reader(config)
    root = Path(config.root)
    cases = reader.list_cases(root)  # a missing folder or file fails here, before any write
    if not cases:
        raise InputError(root, "no cases found")
    cache_dir = _cache_dir(config, root)
    with _one_at_a_time(cache_dir):
        return _prepare(config, reader, root, cases, cache_dir, progress, verify)


@contextlib.contextmanager
def _one_at_a_time(cache_dir: Path) -> Iterator[None]:
    """One process at a time prepares into ``cache_dir``; another waits, then reuses its work.

    Two at once could each take the other's journalled files for an interrupted run's and
    delete them. The lock is an advisory ``flock`` on the nearest existing folder above the
    cache, which writes nothing and ends with the process, however it ends.
    """
    if fcntl is None:  # not POSIX: no lock
        yield
        return
    folder = next(p for p in cache_dir.parents if p.is_dir())
    with _writing(folder):
        fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("%s: another process is preparing this cache; waiting", cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare(
    config: DataConfig,
    reader: Reader,
    root: Path,
    cases: list[CaseFiles],
    cache_dir: Path,
    progress: bool,
    verify: bool,
) -> PreparedDataset:
    """:func:`prepare_dataset` once the cache is this process's alone."""
    params = params_for(config, reader)
    ours = _check_owner(cache_dir)
    _check_case_folders(cache_dir, cases)
    settings = {
        "version": FORMAT_VERSION,
        "reader": reader.name,
        "frames": list(config.frames),
        "channel": config.channel,
        "params": params.to_json(),
    }
    old = _read_manifest(cache_dir / MANIFEST) if ours else {"cases": {}}
    leftovers = _read_pending(cache_dir / PENDING) if ours else set()
    entries: dict[str, Any] = {}
    todo = []
    for case in cases:
        key, inputs = _case_key(case, root, settings)
        previous = old["cases"].get(case.case_id)
        reused = None
        if previous and previous["key"] == key:
            reused = _reusable(cache_dir, previous, verify)
        if reused:
            entries[case.case_id] = reused
        else:
            todo.append((case, key, inputs))
    created = [] if ours else _claim(cache_dir)
    written: list[str] = []
    bar = tqdm(
        total=len(todo),
        desc="prepare",
        unit="case",
        leave=False,
        disable=None if progress else True,
    )
    try:
        with bar:  # closed (and cleared) before an error message is printed
            if todo:
                names = {_file_name(c.case_id, kind, key) for c, key, _ in todo for kind in KINDS}
                with _writing(cache_dir / PENDING):
                    fileio.write_json(cache_dir / PENDING, sorted(leftovers | names))
            for case, key, inputs in todo:
                entry = _prepare_case(reader, case, params, cache_dir, key, written)
                entries[case.case_id] = {**entry, "inputs": inputs}
                bar.update()
    except BaseException:
        _remove_own(cache_dir, written)
        if todo:  # the journal as it was: an earlier interrupted run's, or none
            with contextlib.suppress(OSError):
                if leftovers:
                    fileio.write_json(cache_dir / PENDING, sorted(leftovers))
                else:
                    (cache_dir / PENDING).unlink(missing_ok=True)
        if not ours:
            _release(cache_dir, created)
        raise
    manifest = {
        **settings,
        "class_names": list(reader.class_names),
        "in_channels": reader.in_channels,
        "root": str(root.resolve()),
        "cases": {case.case_id: entries[case.case_id] for case in cases},
    }
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, to compare with the old one
    if manifest != old or leftovers or todo:
        with _writing(cache_dir / MANIFEST):
            fileio.write_json(cache_dir / MANIFEST, manifest)
        _remove_own(cache_dir, (_names(old) | leftovers | set(written)) - _names(manifest))
        (cache_dir / PENDING).unlink(missing_ok=True)
    prepared = _load(manifest, root, cache_dir, params)
    if todo:  # said once, when cases are (re)prepared, not at every start of a run
        _warn_unusual(prepared, {case.case_id: case.image for case in cases})
    return prepared


def _warn_unusual(prepared: PreparedDataset, sources: dict[str, Path]) -> None:
    """One warning line per case whose intensities lie far outside the labelled cases'."""
    labelled = [c for c in prepared.cases.values() if c.label_path is not None]
    for case_id, profile in prepared.intensity.items():
        references = [prepared.intensity[c.case_id] for c in labelled if c.case_id != case_id]
        message = unusual_intensity(profile, references)
        if message:
            logger.warning("%s: %s", sources[case_id], message)


def _path(cache_dir: Path, record: dict[str, Any] | None) -> Path | None:
    return cache_dir / record["name"] if record else None


def _load(
    manifest: dict[str, Any], root: Path, cache_dir: Path, params: PreprocessParams
) -> PreparedDataset:
    cases = {}
    counts = {}
    intensity = {}
    for case_id, entry in manifest["cases"].items():
        intensity[case_id] = IntensityProfile(**entry["intensity"])
        files = entry["files"]
        cases[case_id] = PreparedCase(
            case_id=case_id,
            grid=GridInfo.from_json(entry["grid"]),
            num_slices=int(entry["num_slices"]),
            image_path=cache_dir / files["image"]["name"],
            label_path=_path(cache_dir, files["label"]),
            native_label_path=_path(cache_dir, files["native_label"]),
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
        intensity=intensity,
    )
