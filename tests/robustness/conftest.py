"""The hostile-user harness of the robustness suite (docs/reliability.md).

``sandbox`` is a folder with a precious file next to the folders a command may write to;
``watch(allowed)`` snapshots everything under the sandbox and, when called again, fails if any
file outside ``allowed`` was deleted, created or changed. ``run_cli`` calls the command line
in-process and fails on a traceback, on a message of more than one line, or on an exit status
other than the expected ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from contraseg.cli import main
from contraseg.config import PretrainGlobalRun, save_config

PRECIOUS = "precious.txt"


def _snapshot(root: Path, allowed: Sequence[Path]) -> dict[str, str]:
    """Relative path -> content hash (or link target) of every entry outside ``allowed``."""
    out: dict[str, str] = {}
    allowed = [a.absolute() for a in allowed]
    for path in sorted(root.rglob("*")):
        if any(path == a or a in path.parents for a in allowed):
            continue
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = f"link -> {path.readlink()}"
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


@dataclass
class Sandbox:
    root: Path

    def watch(self, allowed: Iterable[Path] = ()) -> Callable[[], None]:
        """Snapshot now; the returned check fails if anything outside ``allowed`` changed."""
        allowed = list(allowed)
        before = _snapshot(self.root, allowed)

        def check() -> None:
            after = _snapshot(self.root, allowed)
            lost = sorted(set(before) - set(after))
            added = sorted(set(after) - set(before))
            changed = sorted(k for k in before if k in after and before[k] != after[k])
            assert not (lost or added or changed), {
                "deleted": lost,
                "created": added,
                "changed": changed,
            }
            assert (self.root / PRECIOUS).read_text() == "do not touch\n"

        return check


@pytest.fixture
def config_file(tiny_config, tmp_path: Path) -> Path:
    """A tiny stage-1 config (2 iterations) as a file, outside the sandbox."""
    path = tmp_path / "tiny.yaml"
    config = tiny_config(PretrainGlobalRun, "optim.iterations=2", "loss.volumes_per_batch=2")
    save_config(config, path)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    root = tmp_path / "sandbox"
    root.mkdir()
    (root / PRECIOUS).write_text("do not touch\n")
    return Sandbox(root)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``run_cli(*argv, codes=(2,))``: the exit status must be one of ``codes``; when it is
    not 0, stderr must be exactly one line (no traceback can escape: ``main`` is called
    in-process, so any uncaught exception fails the test with its traceback)."""

    def run(*argv: str, codes: Sequence[int] = (2,)) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        result = CliResult(code, captured.out, captured.err)
        assert code in codes, result
        if code != 0:
            lines = [line for line in captured.err.splitlines() if line.strip()]
            assert len(lines) == 1, result
            assert "Traceback" not in captured.err, result
        return result

    return run
