"""model.json + weights.safetensors: round trip, versions, and every way a bundle is refused."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bundle_kit
import pytest
import torch
from safetensors.torch import load_file, save_file

from contraseg.errors import InputError
from contraseg.inference import load_bundle, read_bundle
from contraseg.inference.bundle import FORMAT_VERSION, MODEL_JSON, WEIGHTS


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads((folder / MODEL_JSON).read_text())
    change(obj)
    (folder / MODEL_JSON).write_text(json.dumps(obj))


def _refused(folder: Path, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        load_bundle(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_round_trip(tmp_path):
    folder = bundle_kit.make_bundle(tmp_path / "m", label_values=(0, 205, 420, 850), seed=4)
    bundle, network = load_bundle(folder)
    assert bundle == bundle_kit.bundle_description(label_values=(0, 205, 420, 850))
    assert bundle.format_version == FORMAT_VERSION
    assert not network.training
    stored = load_file(str(folder / WEIGHTS))
    for key, value in network.state_dict().items():
        assert torch.equal(value, stored[key])
    assert read_bundle(folder / MODEL_JSON) == bundle  # the file itself is accepted too
    obj = json.loads((folder / MODEL_JSON).read_text())
    assert obj["format"] == "contraseg-model"
    assert set(obj) >= {"architecture", "class_names", "label_values", "preprocessing"}
    assert set(obj["provenance"]) >= {"dataset", "init", "best_val_dice", "config_sha256"}


def test_version_1_reads_with_the_medical_dice_rule(tmp_path):
    folder = bundle_kit.make_bundle(tmp_path / "m", absent_classes="leave_out")

    def to_v1(obj):
        obj["format_version"] = 1
        del obj["absent_classes"]

    _edit(folder, to_v1)
    assert read_bundle(folder).absent_classes == "count_as_one"


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        (FORMAT_VERSION + 1, "newer contraseg"),
        ("2", "not supported"),
        (None, "not supported"),
        (True, "not"),
    ],
)
def test_unsupported_format_version(tmp_path, version, fragment):
    folder = bundle_kit.make_bundle(tmp_path / "m")
    _edit(folder, lambda obj: obj.update(format_version=version))
    _refused(folder, MODEL_JSON, fragment)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        for parent in parents:
            obj = obj[parent]
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value

    return change


_DELETE = object()
BAD_FIELDS = [
    ("format", "onnx", "not a contraseg model"),
    ("architecture", [1, 2], "'architecture' must be a JSON object"),
    ("architecture.widths", [4, 8, 8, 8, 8], "architecture.widths"),
    ("architecture.widths", [4, 8, 8, 8, 8, 0], "architecture.widths"),
    ("architecture.widths", [4, 8, 8, 8, 8, 10**9], "architecture.widths"),
    ("architecture.in_channels", "1", "architecture.in_channels"),
    ("architecture.in_channels", True, "architecture.in_channels"),
    ("architecture.num_classes", 1, "architecture.num_classes"),
    ("architecture.num_classes", _DELETE, "'architecture.num_classes' is missing"),
    ("class_names", ["background", "a"], "class_names"),
    ("class_names", ["background", "a", "a", "b"], "distinct"),
    ("label_values", [0, 1, 1, 2], "label_values"),
    ("label_values", [1, 0, 2, 3], "background"),
    ("label_values", [0, 1, 2, 70000], "label_values"),
    ("label_values", [0, 1, 2, 3.5], "label_values"),
    ("preprocessing.size", [33, 32], "multiples of 32"),
    ("preprocessing.size", [0, 32], "preprocessing.size"),
    ("preprocessing.size", "32", "preprocessing.size"),
    ("preprocessing.target_spacing", [0.0, 1.0], "preprocessing.target_spacing"),
    ("preprocessing.target_spacing", [1.0], "preprocessing.target_spacing"),
    ("preprocessing.percentiles", [99.0, 1.0], "low < high"),
    ("preprocessing.percentiles", [1.0, 101.0], "preprocessing.percentiles"),
    ("preprocessing.n4", "yes", "preprocessing.n4"),
    ("preprocessing.channel", -1, "preprocessing.channel"),
    ("preprocessing.channel", 1.0, "preprocessing.channel"),
    ("preprocessing.orientation", "LPS", "preprocessing.orientation"),
    ("preprocessing.slice_axis", 0, "preprocessing.slice_axis"),
    ("preprocessing", _DELETE, "'preprocessing' is missing"),
    ("provenance.iterations", -1, "provenance.iterations"),
    ("provenance.best_val_dice", 2.0, "provenance.best_val_dice"),
    ("provenance.train_cases", "a", "provenance.train_cases"),
    ("provenance.dataset", _DELETE, "'provenance.dataset' is missing"),
    ("absent_classes", "sometimes", "absent_classes"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD_FIELDS)
def test_bad_field_is_refused_in_one_line(tmp_path, key, value, fragment):
    folder = bundle_kit.make_bundle(tmp_path / "m")
    _edit(folder, _set(key, value))
    _refused(folder, str(folder / MODEL_JSON), fragment)


def test_nan_in_model_json_is_refused(tmp_path):
    folder = bundle_kit.make_bundle(tmp_path / "m")
    text = (
        (folder / MODEL_JSON)
        .read_text()
        .replace('"target_spacing": [\n      3.0', '"target_spacing": [\n      NaN')
    )
    assert "NaN" in text
    (folder / MODEL_JSON).write_text(text)
    _refused(folder, "target_spacing", "finite")


def test_channel_needs_a_single_input_network(tmp_path):
    folder = bundle_kit.make_bundle(tmp_path / "m", in_channels=2)
    _edit(folder, _set("preprocessing.channel", 0))
    _refused(folder, "preprocessing.channel", "null")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: (f / MODEL_JSON).unlink(), "model description not found"),
        (lambda f: (f / MODEL_JSON).write_text("{not json"), "not valid JSON"),
        (lambda f: (f / MODEL_JSON).write_bytes(b"\xff\xfe\x00binary"), "not valid JSON"),
        (lambda f: (f / MODEL_JSON).write_text("[" * 100000), "not valid JSON"),
        (lambda f: (f / WEIGHTS).unlink(), "weights not found"),
        (lambda f: (f / WEIGHTS).write_bytes(b""), "not a readable safetensors"),
        (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]), "safetensors"),
    ],
)
def test_damaged_files_are_refused(tmp_path, damage, fragment):
    folder = bundle_kit.make_bundle(tmp_path / "m")
    damage(folder)
    _refused(folder, fragment)


def _rewrite_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    weights = load_file(str(folder / WEIGHTS))
    change(weights)
    save_file(weights, str(folder / WEIGHTS))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda w: w.pop("head.2.weight"), "tensors missing, e.g. 'head.2.weight'"),
        (lambda w: w.update(extra=torch.zeros(2)), "no place for: 'extra'"),
        (lambda w: w.update({"head.2.weight": torch.zeros(5, 4, 3, 3)}), "has shape (5, 4, 3, 3)"),
        (lambda w: w.update({"head.2.weight": w["head.2.weight"].double()}), "torch.float64"),
        (lambda w: w["head.2.weight"].fill_(float("nan")), "NaN"),
    ],
)
def test_weights_that_do_not_match_are_refused(tmp_path, change, fragment):
    folder = bundle_kit.make_bundle(tmp_path / "m")
    _rewrite_weights(folder, change)
    _refused(folder, str(folder / WEIGHTS), fragment)


def test_architecture_edited_to_another_size_is_refused_without_building_it(tmp_path):
    """Widths of 60000 would be a network of tens of GB: the check runs on the meta device."""
    folder = bundle_kit.make_bundle(tmp_path / "m")
    _edit(folder, _set("architecture.widths", [4, 8, 8, 8, 8, 60000]))
    _refused(folder, WEIGHTS, "the architecture in model.json needs")


class _Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", [WEIGHTS, MODEL_JSON])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, where, kind):
    marker = tmp_path / "marker"
    payload = tmp_path / "payload"
    if kind == "pickle":
        payload.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"head.2.weight": _Payload(marker)}, payload)
    # the payload is live: loading it the unsafe way creates the marker
    torch.load(payload, weights_only=False) if kind == "torch.save" else pickle.loads(
        payload.read_bytes()
    )
    assert marker.exists()
    marker.unlink()

    folder = bundle_kit.make_bundle(tmp_path / "m")
    (folder / where).write_bytes(payload.read_bytes())
    _refused(folder, where)
    assert not marker.exists()
