"""``nemu relax`` and ``nemu evaluate``: RELAX maps of image files, and notebook 04's table, from the shell.

The encoder is the smoke profile's random one (``nemu pretrain --kind random``: initialisation only, nothing
trained), saved once per module into a temporary NEMU_OUTPUTS; the images are scikit-image's photographs.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import skimage.data
import torch
from conftest import cli_error
from PIL import Image
from torch.testing import assert_close

from nemu_lib import cli, launch, report
from nemu_lib import evaluation as ev
from nemu_lib.data import normalize
from nemu_lib.encoders import build_encoder
from nemu_lib.relax import relax

N = 50  # masks: enough for maps that differ from image to image, cheap at 32 px
PHOTOS = {"astronaut.png": skimage.data.astronaut, "chelsea.png": skimage.data.chelsea,
          "coffee.jpg": skimage.data.coffee}
NAMES = ("astronaut", "chelsea", "coffee")


@pytest.fixture(autouse=True)
def _env(outputs, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(outputs))
    for name in ("NEMU_DEBUG", "NEMU_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def encoder(outputs):
    """The smoke profile's random encoder, saved as `nemu pretrain` saves it, then loaded without training."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMU_OUTPUTS", str(outputs))
        cli.main(["pretrain", "--kind", "random", "--profile", "smoke", "--device", "cpu"])
        return launch.resolve_encoder("random", "smoke", device="cpu", allow_training=False, progress=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of three photographs (PNG and JPEG) and a corrupt PNG."""
    folder = tmp_path_factory.mktemp("photos")
    for name, load in PHOTOS.items():
        Image.fromarray(load()).save(folder / name, quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return folder


def _run(outputs, argv: list[str]) -> tuple[int, str, str]:
    """Run ``nemu argv`` with NEMU_OUTPUTS set, expecting it to exit: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setenv("NEMU_OUTPUTS", str(outputs))
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
    return exc.value.code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def relaxed(encoder, photos, outputs, tmp_path_factory):
    """``nemu relax FOLDER --encoder random --profile smoke --n-masks 50``: (out, exit status, stdout, stderr)."""
    out = tmp_path_factory.mktemp("relax")
    return out, *_run(outputs, ["relax", str(photos), "--encoder", "random", "--profile", "smoke", "--n-masks", str(N),
                                "--out", str(out), "--device", "cpu"])


def _direct(encoder, path, size=32, **kwargs):
    """RELAX run in Python on the image file as the command reads it (resized, normalised)."""
    x = normalize(cli.read_image(path, size)[None], encoder.mean, encoder.std)
    return relax(encoder, x, n_masks=N, seed=0, **kwargs)


def _maps(out, name) -> dict[str, np.ndarray]:
    return {k: np.load(out / f"{name}_{k}.npy") for k in ("importance", "uncertainty", "u_relax")}


def test_relax_writes_maps_figures_and_settings(relaxed, photos):
    out, code, stdout, _ = relaxed
    assert code == 1  # one file could not be read
    for name in NAMES:
        maps = _maps(out, name)
        for key, a in maps.items():
            assert a.shape == (32, 32) and a.dtype == np.float32 and np.isfinite(a).all(), (name, key)
        assert (maps["uncertainty"] >= 0).all() and maps["importance"].std() > 0
        kept = maps["u_relax"] != 0  # U-RELAX: the importance where it is certain, about half the pixels
        assert_close(maps["u_relax"][kept], maps["importance"][kept])
        assert 0.3 < kept.mean() < 0.7
        with Image.open(out / f"{name}_relax.png") as figure:
            assert figure.format == "PNG" and figure.size[0] > 2 * figure.size[1]  # three panels side by side
        assert f"{name}_importance.npy" in stdout
    assert not (out / "astronaut_importance.npy").read_bytes() == (out / "chelsea_importance.npy").read_bytes()
    record = json.loads((out / "relax.json").read_text())
    assert {k: record[k] for k in ("encoder", "encoder_seed", "profile", "size", "n_masks", "batch_size", "seed",
                                   "reference")} == {
        "encoder": "random", "encoder_seed": 0, "profile": "smoke", "size": 32, "n_masks": N, "batch_size": 100,
        "seed": 0, "reference": None}
    assert [r["name"] for r in record["images"]] == list(NAMES)
    assert all(r["seconds"] > 0 for r in record["images"])
    assert [f["file"] for f in record["failed"]] == [str(photos / "broken.png")]
    assert "explained 3 of 4 image(s)" in stdout


def test_relax_maps_equal_the_library_call(relaxed, encoder, photos):
    out = relaxed[0]
    for name, file in zip(NAMES, PHOTOS, strict=True):
        direct = _direct(encoder, photos / file)
        maps = _maps(out, name)
        assert_close(torch.from_numpy(maps["importance"]), direct.importance[0].float())
        assert_close(torch.from_numpy(maps["uncertainty"]), direct.uncertainty[0].float(), rtol=1e-4, atol=1e-7)


def test_an_unreadable_file_is_named_once_and_skipped(relaxed):
    out, code, _, stderr = relaxed
    assert code == 1
    lines = [line for line in stderr.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and "cannot read image" in lines[0] and "Traceback" not in stderr
    assert not list(out.glob("broken*"))


def test_reference_explains_why_an_image_is_like_another(encoder, photos, tmp_path, relaxed):
    cli.main(["relax", str(photos / "astronaut.png"), "--reference", str(photos / "chelsea.png"), "--encoder",
              "random", "--profile", "smoke", "--n-masks", str(N), "--out", str(tmp_path), "--device", "cpu",
              "--no-progress"])  # every file read: exit status 0, no SystemExit
    maps = _maps(tmp_path, "astronaut")
    plain = _maps(relaxed[0], "astronaut")
    assert not np.allclose(maps["importance"], plain["importance"], atol=1e-3)
    x_ref = normalize(cli.read_image(photos / "chelsea.png", 32)[None], encoder.mean, encoder.std)
    with torch.inference_mode():
        r = encoder(x_ref)[0]  # (D,)
    direct = _direct(encoder, photos / "astronaut.png", reference=r)
    assert_close(torch.from_numpy(maps["importance"]), direct.importance[0].float())
    assert json.loads((tmp_path / "relax.json").read_text())["reference"] == str(photos / "chelsea.png")


def test_size_seed_and_batch_size_options(encoder, photos, tmp_path):
    png = str(photos / "chelsea.png")
    common = ["--encoder", "random", "--profile", "smoke", "--n-masks", str(N), "--device", "cpu", "--no-progress"]
    cli.main(["relax", png, *common, "--size", "40", "--seed", "3", "--batch-size", "20", "--out", str(tmp_path)])
    importance = np.load(tmp_path / "chelsea_importance.npy")
    assert importance.shape == (40, 40)
    x = normalize(cli.read_image(png, 40)[None], encoder.mean, encoder.std)
    direct = relax(encoder, x, n_masks=N, seed=3, batch_size=20)
    assert_close(torch.from_numpy(importance), direct.importance[0].float())
    assert json.loads((tmp_path / "relax.json").read_text())["batch_size"] == 20


def test_pretrained_specs_default_to_224_px(photos, tmp_path, monkeypatch):
    """A pretrained ResNet (here a stand-in, offline) reads images at 224 px and needs no profile."""
    tiny = build_encoder("small_resnet", widths=(8, 16, 32, 64))
    monkeypatch.setattr(launch, "load_pretrained", lambda spec, progress=True: tiny)
    cli.main(["relax", str(photos / "coffee.jpg"), "--encoder", "resnet18-supervised", "--n-masks", "10",
              "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert np.load(tmp_path / "coffee_importance.npy").shape == (224, 224)
    record = json.loads((tmp_path / "relax.json").read_text())
    assert record["size"] == 224 and record["profile"] is None and record["encoder_seed"] is None


def test_a_missing_shapes_encoder_is_not_trained(photos, tmp_path, outputs, capsys):
    line = cli_error(capsys, ["relax", str(photos), "--encoder", "supervised", "--profile", "smoke",
                           "--out", str(tmp_path / "out")])
    assert "nemu pretrain --kind supervised --profile smoke" in line
    assert not (outputs / "encoders" / "supervised-smoke-seed0.pt").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no masks", "--n-masks must be >= 1"),
        ("unknown encoder", "choose one of simclr, supervised, random, resnet18-supervised"),
        ("missing image", "does not exist"),
        ("missing reference", "--reference"),
        ("corrupt reference", "cannot read image"),
    ],
)
def test_relax_usage_errors(case, expected, encoder, photos, tmp_path, capsys):
    argv = ["relax", str(photos / "chelsea.png"), "--encoder", "random", "--profile", "smoke", "--n-masks", str(N),
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    if case == "no masks":
        argv[argv.index("--n-masks") + 1] = "0"
    elif case == "unknown encoder":
        argv[argv.index("--encoder") + 1] = "byol"
    elif case == "missing image":
        argv[1] = str(tmp_path / "nope.png")
    elif case == "missing reference":
        argv += ["--reference", str(tmp_path / "nope.png")]
    else:
        argv += ["--reference", str(photos / "broken.png")]
    assert expected in cli_error(capsys, argv)
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


# ---------------------------------------------------------------------------------------------- evaluate

def test_evaluate_writes_notebook_04s_table(encoder, outputs, capsys):
    argv = ["evaluate", "--encoder", "random", "--profile", "smoke", "--device", "cpu", "--no-progress"]
    cli.main(argv)  # trains the three smoke decoders (seconds), then evaluates
    stdout = capsys.readouterr().out
    assert "trained first: NEM-U decoder (nem)" in stdout
    md, js = outputs / "evaluation" / "random-smoke-seed0.md", outputs / "evaluation" / "random-smoke-seed0.json"
    text = md.read_text()
    assert text.startswith("**random encoder**, profile smoke, seed 0 (8 held-out scenes, RELAX N = 300)")
    assert text in stdout and "| NEM-U |" in text and "- nemu_worth_n_masks: NEM-U " in text
    record = json.loads(js.read_text())
    assert {k: record[k] for k in ("encoder", "profile", "seed", "eval_images", "relax_masks")} == {
        "encoder": "random", "profile": "smoke", "seed": 0, "eval_images": 8, "relax_masks": 300}
    assert [row["method"] for row in record["table"]] == list(ev.METHODS)
    # the numbers are the library's (the saved maps are reused; only the timings differ)
    result = report.evaluate_encoder("random", "smoke", device="cpu", progress=False)
    for row, expected in zip(record["table"], result.rows, strict=True):
        assert row["relevance_mass"] == pytest.approx(expected["relevance_mass"], rel=1e-6)
        assert row["deletion_auc"] == pytest.approx(expected["deletion_auc"], rel=1e-6)
    # a second run finds everything on disk
    cli.main(argv)
    assert "trained first" not in capsys.readouterr().out


def test_evaluate_a_pretrained_resnet_is_a_clean_error(tmp_path, capsys, outputs):
    line = cli_error(capsys, ["evaluate", "--encoder", "resnet50-dino", "--profile", "smoke"])
    assert "Shapes scenes' object masks" in line and "simclr, supervised, random" in line and "nemu relax" in line
    assert not (outputs / "evaluation" / "resnet50-dino-smoke-seed0.md").exists()


def test_a_pretrained_vit_offline_is_one_line_naming_the_weights(photos, tmp_path, monkeypatch, capsys):
    import nemu_lib.encoders

    monkeypatch.setenv("NEMU_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: False)
    line = cli_error(capsys, ["relax", str(photos), "--encoder", "vit-s16-dino", "--out", str(tmp_path / "out")])
    assert "vit-s16-dino" in line and str(tmp_path / "data" / "weights") in line and "internet" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------ evaluate on images

STEPS = 4  # deletion / insertion steps: cheap at 32 px


@pytest.fixture(scope="module")
def evaluated(encoder, photos, outputs, tmp_path_factory):
    """``nemu evaluate FOLDER --encoder random --profile smoke --n-masks 50 --deletion-steps 4``: (out, exit
    status, stdout, stderr)."""
    out = tmp_path_factory.mktemp("evaluate")
    return out, *_run(outputs, ["evaluate", str(photos), "--encoder", "random", "--profile", "smoke", "--n-masks",
                                str(N), "--deletion-steps", str(STEPS), "--out", str(out), "--device", "cpu",
                                "--no-progress"])


def test_evaluate_images_writes_the_table_and_the_record(evaluated, photos):
    out, code, stdout, _ = evaluated
    assert code == 1  # broken.png
    text = (out / "evaluation.md").read_text()
    assert text in stdout and f"written: {out / 'evaluation.md'}, {out / 'evaluation.json'}" in stdout
    assert text.startswith("**random encoder**, profile smoke, seed 0: 3 image(s) at 32 px, RELAX N = 50")
    methods = ("RELAX", "U-RELAX", "label-free gradient", "label-free IG", "random")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(methods)
    for label in ("complexity (entropy)", "sparseness (Gini)", "deletion AUC", "insertion AUC",
                  "fidelity to RELAX (Pearson)", "fidelity to RELAX (Spearman)", "s / image"):
        assert label in text
    assert "Relevance Mass" not in text and "Pointing Game" not in text  # no object masks, no locality
    assert " ± " in rows[0]

    record = json.loads((out / "evaluation.json").read_text())  # strict JSON: no NaN
    assert {k: record[k] for k in ("encoder", "encoder_seed", "profile", "size", "n_masks", "deletion_steps",
                                   "seed", "methods")} == {
        "encoder": "random", "encoder_seed": 0, "profile": "smoke", "size": 32, "n_masks": N, "deletion_steps": STEPS,
        "seed": 0, "methods": list(methods)}
    table = {row["method"]: row for row in record["table"]}
    assert list(table) == list(methods)
    assert "fidelity_pearson" not in table["RELAX"] and -1 <= table["label-free IG"]["fidelity_pearson"] <= 1
    assert all(row["seconds_per_image"] > 0 and row["complexity_n"] == 3 for row in table.values())
    assert [image["name"] for image in record["images"]] == list(NAMES)
    for image in record["images"]:
        assert set(image["values"]) == set(methods)
        assert set(image["values"]["random"]) == set(ev.MASK_FREE_METRICS)
    for key in ("complexity", "deletion_auc"):  # the table's means are the per-image values' means
        values = [image["values"]["label-free gradient"][key] for image in record["images"]]
        assert table["label-free gradient"][key] == pytest.approx(np.mean(values))
    assert [f["file"] for f in record["failed"]] == [str(photos / "broken.png")]


def test_evaluate_images_scores_equal_the_library_calls(evaluated, encoder, photos):
    """RELAX's row per image: complexity of the min-max normalised map, deletion AUC, from RELAX run directly."""
    from nemu_lib import metrics

    record = json.loads((evaluated[0] / "evaluation.json").read_text())
    for image, file in zip(record["images"], PHOTOS, strict=True):
        x = normalize(cli.read_image(photos / file, 32)[None], encoder.mean, encoder.std)
        a = relax(encoder, x, n_masks=N, seed=0).importance.float()  # (1, 32, 32)
        lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
        values = image["values"]["RELAX"]
        # float32 forward passes of 3 images and of 1 differ in the last bits (~1e-7 in the map); min-max
        # normalising a map that spans ~3e-2 (0.94 to 0.97) magnifies that to ~2e-7 of the complexity
        assert_close(torch.tensor(values["complexity"], dtype=torch.float64),
                     metrics.complexity((a - lo) / (hi - lo))[0], rtol=1e-5, atol=0)
        curves = metrics.deletion_insertion(encoder, x, a, steps=STEPS)
        assert_close(torch.tensor(values["deletion_auc"], dtype=torch.float64), curves.deletion_auc[0], rtol=1e-5,
                     atol=0)


def test_evaluate_images_names_the_corrupt_file_once(evaluated):
    out, code, stdout, stderr = evaluated
    assert code == 1 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and "cannot read image" in lines[0]
    assert "1 of 4 image(s) could not be read" in stdout
    assert "could not be read: " in (out / "evaluation.md").read_text()


def test_evaluate_a_pretrained_spec_without_images_points_to_them(capsys, outputs):
    line = cli_error(capsys, ["evaluate", "--encoder", "vit-s16-dino"])
    assert "pass image files" in line and "nemu evaluate --encoder vit-s16-dino IMAGES" in line
    assert "without ground truth" in line


def test_evaluate_images_on_a_pretrained_spec_reads_224_px(photos, tmp_path, monkeypatch):
    """A pretrained ResNet (a stand-in, offline) evaluated on one photo at 224 px, the default out folder."""
    tiny = build_encoder("small_resnet", widths=(8, 16, 32, 64))
    monkeypatch.setattr(launch, "load_pretrained", lambda spec, progress=True: tiny)
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    cli.main(["evaluate", str(photos / "coffee.jpg"), "--encoder", "resnet18-supervised", "--n-masks", "10",
              "--deletion-steps", "2", "--device", "cpu", "--no-progress"])  # every file read: no SystemExit
    out = tmp_path / "evaluation" / "resnet18-supervised-images"
    record = json.loads((out / "evaluation.json").read_text())
    assert record["size"] == 224 and record["profile"] is None and record["encoder_seed"] is None
    assert record["failed"] == [] and (out / "evaluation.md").is_file()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--n-masks", "10"], "--n-masks apply to image files"),
        (["--out", "x", "--size", "40"], "--size, --out apply to image files"),
        (["PHOTO", "--n-masks", "0"], "--n-masks must be >= 1"),
        (["PHOTO", "--recompute"], "--recompute applies to the Shapes evaluation"),
        (["MISSING"], "does not exist"),
    ],
)
def test_evaluate_images_usage_errors(argv, expected, encoder, photos, tmp_path, capsys, outputs):
    argv = [str(photos / "chelsea.png") if a == "PHOTO" else str(tmp_path / "nope.png") if a == "MISSING" else a
            for a in argv]
    line = cli_error(capsys, ["evaluate", "--encoder", "random", "--profile", "smoke", *argv])
    assert expected in line
    assert not (outputs / "evaluation" / "random-images").exists()
