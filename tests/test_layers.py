"""The package's layering, read from the source files with ``ast`` (no module is imported).

cli -> demo/experiment -> training -> inference/evaluation -> models, losses, data -> config,
errors, fileio: a package imports only from layers below its own (and the few same-layer pairs
listed); nothing imports cli; report is used by demo/experiment only; inference and evaluation
import nothing from training, so that a model bundle is usable without the training code.
Imports inside functions and under ``TYPE_CHECKING`` count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "contraseg"

RANK = {
    "errors": 0, "fileio": 0, "config": 0, "devices": 0,
    "models": 1, "losses": 1, "data": 1,
    "inference": 2, "evaluation": 2, "report": 2,
    "training": 3,
    "demo": 4, "experiment": 4,
    "cli": 5,
}  # fmt: skip
# imports within one layer, one way only (so that no cycle can form)
SAME_LAYER = {
    ("demo", "experiment"),  # the demo is an experiment grid
    ("evaluation", "inference"),
    ("config", "errors"),
    ("config", "fileio"),
    ("fileio", "errors"),
}
REPORT_USERS = {"demo", "experiment"}
# what any module may take from the package root: the facade ``contraseg/__init__.py``
ROOT_NAMES = {"__version__"}


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> list[str]:
    """Absolute names imported by a module's source (``from a import b`` gives ``a.b``)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            names += [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "contraseg" or n.startswith("contraseg.")]


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """``module -> (source, is_package)`` checked against the rules of the module docstring."""
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        parts = module.split(".")
        if len(parts) == 1:
            continue  # the facade may import its public names lazily
        here = parts[1]
        if here not in RANK:
            found.append(f"{module}: package '{here}' has no place in RANK")
            continue
        for name in imports_of(source, module, is_package):
            target = name.split(".")
            if len(target) == 2 and target[1] in ROOT_NAMES:
                continue
            there = target[1] if len(target) > 1 else ""
            if there == here:
                continue
            if there == "cli":
                problem = "nothing imports cli"
            elif there == "report" and here not in REPORT_USERS:
                problem = "report is used by demo and experiment only"
            elif here in ("inference", "evaluation") and there == "training":
                problem = f"{here} imports nothing from training"
            elif len(target) == 2 and there not in RANK:
                problem = f"only {', '.join(sorted(ROOT_NAMES))} is taken from the package root"
            elif there not in RANK:
                problem = f"'{name}' is not a package of a known layer"
            elif RANK[there] < RANK[here] or (here, there) in SAME_LAYER:
                continue
            else:
                problem = f"{here} (layer {RANK[here]}) may not import {there} ({RANK[there]})"
            found.append(f"{module} imports {name}: {problem}")
    return found


def _library() -> dict[str, tuple[str, bool]]:
    return {
        _module_name(path, SRC): (path.read_text(), path.name == "__init__.py")
        for path in SRC.rglob("*.py")
    }


def test_the_library_keeps_its_layers():
    sources = _library()
    assert "contraseg.inference.predictor" in sources and "contraseg.cli" in sources
    assert violations(sources) == []


def test_inference_and_evaluation_import_nothing_from_training():
    for module, (source, is_package) in _library().items():
        if module.startswith(("contraseg.inference", "contraseg.evaluation")):
            assert not [
                n
                for n in imports_of(source, module, is_package)
                if n.startswith("contraseg.training")
            ], module


@pytest.mark.parametrize(
    ("module", "source", "fragment"),
    [
        ("contraseg.inference.x", "from contraseg.training import stages", "nothing from training"),
        ("contraseg.evaluation.x", "def f():\n    import contraseg.training.trainer", "training"),
        ("contraseg.data.x", "from contraseg.cli import main", "nothing imports cli"),
        ("contraseg.training.x", "from contraseg.report import figures", "demo and experiment"),
        ("contraseg.models.x", "from contraseg.data import volume", "may not import data"),
        ("contraseg.inference.x", "from contraseg.evaluation import metrics", "may not import"),
        ("contraseg.config", "from contraseg import Segmenter", "package root"),
        ("contraseg.inference.x", "from ..training import stages", "nothing from training"),
        ("contraseg.losses.x", "from contraseg.unknown import y", "not a package of a known"),
        ("contraseg.newthing", "import os", "has no place"),
    ],
)
def test_the_checker_finds_each_kind_of_violation(module, source, fragment):
    problems = violations({module: (source, False)})
    assert len(problems) == 1 and fragment in problems[0], problems


def test_allowed_imports_pass_the_checker():
    sources = {
        "contraseg.evaluation.x": ("from contraseg.inference import Segmenter", False),
        "contraseg.training.x": ("from contraseg import __version__", False),
        "contraseg.demo": ("from contraseg.report import figures", False),
        "contraseg.data.readers": ("from .base import Reader", True),
    }
    assert violations(sources) == []
