"""Files that carry code are never executed: pickle payloads in checkpoints and cached arrays,
YAML tags that construct objects (docs/reliability.md). Each is refused in one line and the
payload's marker file is never created."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch


class _Payload:
    """Unpickling this object would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_pickle_payload_is_refused(sandbox, run_cli, config_file) -> None:
    run_dir = sandbox.root / "run"
    run_cli("pretrain-global", "--config", config_file, "--out", run_dir, codes=(0,))
    marker = sandbox.root / "executed"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["extra"] = {"x": _Payload(marker)}
    torch.save(state, checkpoint)
    err = run_cli(
        "pretrain-global", "--config", config_file, "--out", run_dir, "optim.iterations=3"
    ).err
    assert str(checkpoint) in err
    assert not marker.exists()


def test_a_cached_array_with_a_pickle_payload_is_refused(
    sandbox, run_cli, phantom_root, tmp_path
) -> None:
    cache = tmp_path / "cache"
    args = ["prepare", "--dataset", "phantom", "--root", phantom_root, "--cache", cache]
    run_cli(*args, "data.size=32", codes=(0,))
    marker = sandbox.root / "executed"
    victim = next(cache.rglob("image-*.npy"))
    with open(victim, "wb") as handle:
        np.save(handle, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    run_cli(*args, "data.size=32", codes=(0, 2))  # refused, or noticed and re-made
    assert not marker.exists()
    if victim.exists():
        assert np.load(victim, allow_pickle=False).dtype == np.float32


def test_yaml_tags_that_construct_objects_are_refused(sandbox, run_cli) -> None:
    marker = sandbox.root / "executed"
    path = sandbox.root / "evil.yaml"
    path.write_text(f'optim: !!python/object/apply:os.system ["touch {marker}"]\n')
    err = run_cli("pretrain-global", "--config", path, "--out", sandbox.root / "run").err
    assert str(path) in err and "not valid YAML" in err
    assert not marker.exists()


def test_the_payload_really_executes_when_unpickled(tmp_path) -> None:
    """The control: the payload above is live, so the tests' absent marker means something."""
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
