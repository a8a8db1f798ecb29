"""``contraseg predict``: layouts, outputs, skipping, probabilities, failures and exit status."""

from __future__ import annotations

import bundle_kit
import nibabel as nib
import numpy as np

from contraseg.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_of_scans(tmp_path, capsys):
    model = bundle_kit.make_bundle(tmp_path / "model")
    for name, shape in (("a.nii.gz", (30, 20, 3)), ("b.nii", (25, 31, 2))):
        bundle_kit.save(
            tmp_path / "in" / name,
            bundle_kit.phantom_like(shape),
            bundle_kit.oblique_affine((1, 1, 3)),
        )
    code, out, err = _run(
        capsys, "predict", "-m", model, "-i", tmp_path / "in", "-o", tmp_path / "out"
    )
    assert (code, err) == (0, "")
    assert "2 label maps written" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii"]
    assert nib.load(tmp_path / "out" / "b.nii").shape == (25, 31, 2)

    stamp = (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns
    code, out, _ = _run(
        capsys, "predict", "-m", model, "-i", tmp_path / "in", "-o", tmp_path / "out"
    )
    assert code == 0 and "0 label maps written" in out and "2 existing kept" in out
    assert (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns == stamp
    code, out, _ = _run(
        capsys, "predict", "--model", model, "--input", tmp_path / "in" / "a.nii.gz",
        "--output", tmp_path / "out", "--overwrite",
    )  # fmt: skip
    assert code == 0 and "1 label maps written" in out


def test_nnunet_folder_with_two_channels_and_probabilities(tmp_path, capsys):
    model = bundle_kit.make_bundle(tmp_path / "model", in_channels=2)
    affine = bundle_kit.oblique_affine((0.8, 0.8, 4.0))
    for case in ("case_001", "case_002"):
        for c in range(2):
            image = bundle_kit.phantom_like((28, 26, 3), seed=c)
            bundle_kit.save(tmp_path / "imagesTs" / f"{case}_{c:04d}.nii.gz", image, affine)
    code, _, err = _run(
        capsys, "predict", "-m", model, "-i", tmp_path / "imagesTs", "-o", tmp_path / "out",
        "--save-probabilities", "--tta", "--batch-size", "2", "--device", "cpu",
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "case_001.nii.gz",
        "case_001.npz",
        "case_002.nii.gz",
        "case_002.npz",
    ]
    with np.load(tmp_path / "out" / "case_001.npz", allow_pickle=False) as saved:
        probs = saved["probabilities"]
        assert probs.dtype == np.float16 and probs.shape == (4, 28, 26, 3)
        labels = np.asarray(nib.load(tmp_path / "out" / "case_001.nii.gz").dataobj)
        # float16 rounding may swap near-ties; the argmax agrees almost everywhere
        assert np.mean(probs.astype(np.float32).argmax(0) == labels) > 0.99
        assert list(saved["class_names"]) == ["background", "class1", "class2", "class3"]
        np.testing.assert_allclose(saved["affine"], affine, atol=1e-5)


def test_ensemble_of_models_on_the_command_line(tmp_path, capsys):
    models = [bundle_kit.make_bundle(tmp_path / f"m{i}", seed=i) for i in range(2)]
    bundle_kit.save(tmp_path / "a.nii.gz", bundle_kit.phantom_like((30, 30, 2)), np.eye(4))
    code, _, err = _run(
        capsys, "predict", "-m", models[0], "-m", models[1], "-i", tmp_path / "a.nii.gz",
        "-o", tmp_path / "out",
    )  # fmt: skip
    assert (code, err) == (0, "")
    from contraseg.inference import Segmenter

    expected = Segmenter.from_pretrained(models, "auto").predict_file(  # the CLI's default
        tmp_path / "a.nii.gz", tmp_path / "api.nii.gz"
    )
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "out" / "a.nii.gz").dataobj),
        np.asarray(nib.load(expected).dataobj),
    )


def test_bad_inputs_are_reported_and_the_others_predicted(tmp_path, capsys):
    model = bundle_kit.make_bundle(tmp_path / "model")
    bundle_kit.save(
        tmp_path / "in" / "good.nii.gz", bundle_kit.phantom_like((30, 20, 3)), np.eye(4)
    )
    bundle_kit.save(tmp_path / "in" / "four.nii.gz", np.ones((30, 20, 3, 2), np.float32), np.eye(4))
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti at all")
    code, out, err = _run(
        capsys, "predict", "-m", model, "-i", tmp_path / "in", "-o", tmp_path / "out"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert "broken.nii.gz" in lines[0] and "four.nii.gz: has 2 channel(s)" in lines[1]
    assert "1 label maps written" in out and "2 inputs failed" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


def test_an_output_over_an_input_is_refused(tmp_path, capsys):
    model = bundle_kit.make_bundle(tmp_path / "model")
    bundle_kit.save(tmp_path / "in" / "a.nii.gz", bundle_kit.phantom_like((30, 20, 3)), np.eye(4))
    before = (tmp_path / "in" / "a.nii.gz").read_bytes()
    code, _, err = _run(
        capsys, "predict", "-m", model, "-i", tmp_path / "in", "-o", tmp_path / "in", "--overwrite"
    )
    assert code == 2 and "would overwrite an input scan" in err
    assert (tmp_path / "in" / "a.nii.gz").read_bytes() == before
