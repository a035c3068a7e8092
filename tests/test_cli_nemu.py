"""``nemu train``, ``nemu explain`` and ``python -m nemu_lib.train``: end to end on the smoke profile.

One small run (SimCLR encoder of the smoke profile, 2 steps) is trained per module and explained by most
tests; every encoder lands in a temporary NEMU_OUTPUTS.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli_error
from PIL import Image

from nemu_lib import cli, launch, train
from nemu_lib.data import ShapesScenes, normalize
from nemu_lib.encoders import WeightsUnavailableError
from nemu_lib.real_data import DatasetUnavailableError

FAST = ["--profile", "smoke", "--batch-size", "16", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def _env(outputs, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(outputs))
    for name in ("WORLD_SIZE", "NEMU_DEBUG", "NEMU_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def run_dir(outputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMU_OUTPUTS", str(outputs))
        mp.delenv("WORLD_SIZE", raising=False)
        cli.main(["train", "--encoder", "simclr", "--steps", "2", "--out", str(out), *FAST])
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with two PNG scenes (48 px) and a non-square JPEG elsewhere with a clashing name."""
    root = tmp_path_factory.mktemp("images")
    scenes = ShapesScenes("test", size=3, image_size=48)
    arrays = [(scenes[i]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(3)]
    (root / "folder").mkdir()
    for i in range(2):
        Image.fromarray(arrays[i]).save(root / "folder" / f"scene{i}.png")
    (root / "folder" / "notes.txt").write_text("not an image: skipped in folders")
    Image.fromarray(arrays[2][:40]).save(root / "scene0.jpg", quality=95)  # 40 x 48 px
    return root


def _history(path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=True)["history"]


def test_train_writes_run_folder(run_dir, outputs):
    run = json.loads((run_dir / "run.json").read_text())
    assert {k: run[k] for k in ("encoder", "encoder_seed", "profile", "dataset", "image_size", "uncertainty")} == {
        "encoder": "simclr", "encoder_seed": 0, "profile": "smoke", "dataset": "shapes", "image_size": 32,
        "uncertainty": False}
    assert run["train"]["steps"] == 2 and run["train"]["batch_size"] == 16 and run["train"]["objective"] == "nem"
    assert len(run["mean"]) == len(run["std"]) == 3 and run["world_size"] == 1
    assert _history(run_dir)["step"] == [1, 2]
    assert (outputs / "encoders" / "simclr-smoke-seed0.pt").is_file()  # trained into NEMU_OUTPUTS
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_explain_end_to_end(run_dir, images, tmp_path, capsys):
    out = tmp_path / "explained"
    cli.main(["explain", "--run", str(run_dir), str(images / "folder"), str(images / "scene0.jpg"),
              "--out", str(out), "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert "explained 3 image(s)" in stdout
    for name in ("scene0", "scene1", "scene0-2"):  # the JPEG's name clashes with a PNG's
        mask = np.load(out / f"{name}_mask.npy")
        assert mask.shape == (32, 32) and mask.dtype == np.float32  # the run's image size
        assert np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1
        with Image.open(out / f"{name}_overlay.png") as overlay:
            assert overlay.format == "PNG" and min(overlay.size) >= 100
        assert not (out / f"{name}_uncertainty.npy").exists()  # the nem objective has no uncertainty head
    # the masks are the model's: the same as NEMU on the resized, normalised image
    model = train.load_nemu(run_dir / "checkpoint.pt", launch.resolve_encoder("simclr", "smoke", device="cpu"))
    x = cli.read_image(images / "folder" / "scene1.png", 32)
    with torch.no_grad():
        _, m = model(normalize(x[None], model.encoder.mean, model.encoder.std))
    np.testing.assert_allclose(np.load(out / "scene1_mask.npy"), m[0, 0].numpy(), atol=1e-5)


def test_explain_from_a_checkpoint(run_dir, images, tmp_path):
    png = str(images / "folder" / "scene0.png")
    # run.json beside the checkpoint gives the settings
    cli.main(["explain", "--checkpoint", str(run_dir / "checkpoint.pt"), png, "--out", str(tmp_path / "a")])
    # a bare checkpoint needs the encoder and profile
    shutil.copy(run_dir / "checkpoint.pt", tmp_path / "decoder.pt")
    cli.main(["explain", "--checkpoint", str(tmp_path / "decoder.pt"), "--encoder", "simclr", "--profile", "smoke",
              png, "--out", str(tmp_path / "b"), "--image-size", "40"])
    assert np.load(tmp_path / "a" / "scene0_mask.npy").shape == (32, 32)
    assert np.load(tmp_path / "b" / "scene0_mask.npy").shape == (40, 40)


def test_relax_objective_writes_uncertainty(images, tmp_path):
    run = tmp_path / "relax"
    cli.main(["train", "--encoder", "random", "--objective", "relax", "--relax-masks", "2", "--steps", "1",
              "--out", str(run), *FAST])
    assert json.loads((run / "run.json").read_text())["uncertainty"] is True
    cli.main(["explain", "--run", str(run), str(images / "folder" / "scene1.png"), "--out", str(tmp_path / "ex")])
    u = np.load(tmp_path / "ex" / "scene1_uncertainty.npy")
    assert u.shape == (32, 32) and u.dtype == np.float32 and (u > 0).all()


def test_resume_continues_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--encoder", "random", "--steps", "4", "--ckpt-every", "1", "--out", str(run), *FAST]
    cli.main([*args, "--stop-at", "2"])
    assert "--resume" in capsys.readouterr().out  # says how to continue
    assert _history(run)["step"] == [1, 2]
    cli.main([*args, "--resume"])
    history = _history(run)
    assert history["step"] == [1, 2, 3, 4] and len(history["loss"]) == 4
    assert history["val_step"] == [4]
    # starting over needs --overwrite; resuming needs the same settings and a checkpoint
    assert "--resume to continue it, --overwrite to start over" in cli_error(capsys, args)
    line = cli_error(capsys, [*args, "--resume", "--lr", "0.003"])
    assert "run.json" in line and "train" in line
    assert "no checkpoint" in cli_error(capsys, [*args[:-len(FAST) - 2], "--out", str(tmp_path / "empty"), *FAST,
                                              "--resume"])
    cli.main([*args, "--overwrite", "--steps", "1"])
    assert _history(run)["step"] == [1]


def test_explain_with_another_encoder_is_a_clean_error(run_dir, images, tmp_path, capsys, outputs):
    png = str(images / "folder" / "scene0.png")
    cli.main(["pretrain", "--kind", "random", "--profile", "smoke", "--seed", "1", "--device", "cpu"])
    capsys.readouterr()
    line = cli_error(capsys, ["explain", "--run", str(run_dir), "--encoder", "random", "--encoder-seed", "1", png,
                           "--out", str(tmp_path / "ex")])
    assert "encoder_fingerprint" in line and "another model" in line
    # explaining never trains an encoder: a missing one names the command that makes it
    line = cli_error(capsys, ["explain", "--run", str(run_dir), "--encoder", "supervised", png,
                           "--out", str(tmp_path / "ex")])
    assert "nemu pretrain --kind supervised --profile smoke" in line
    assert not (outputs / "encoders" / "supervised-smoke-seed0.pt").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing image", "does not exist"),
        ("folder without images", "holds no images"),
        ("corrupt image", "cannot read image"),
        ("missing checkpoint", "no checkpoint at"),
        ("run without checkpoint", "no checkpoint at"),
        ("folder without run.json", "has no run.json"),
        ("no model", "pass --run DIR"),
        ("bare checkpoint without encoder", "--encoder SPEC"),
        ("unknown encoder", "choose one of simclr, supervised, random, resnet18-supervised"),
    ],
)
def test_explain_errors(case, expected, run_dir, images, tmp_path, capsys):
    png = str(images / "folder" / "scene0.png")
    run = ["--run", str(run_dir)]
    if case == "missing image":
        argv = [*run, str(tmp_path / "nope.png")]
    elif case == "folder without images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("no images here")
        argv = [*run, png, str(tmp_path / "empty")]
    elif case == "corrupt image":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        argv = [*run, png, str(tmp_path / "bad.png")]
    elif case == "missing checkpoint":
        argv = ["--checkpoint", str(tmp_path / "missing.pt"), "--encoder", "simclr", png]
    elif case == "run without checkpoint":
        (tmp_path / "run").mkdir()
        shutil.copy(run_dir / "run.json", tmp_path / "run" / "run.json")
        argv = ["--run", str(tmp_path / "run"), png]
    elif case == "folder without run.json":
        argv = ["--run", str(tmp_path), png]
    elif case == "no model":
        argv = [png]
    elif case == "bare checkpoint without encoder":
        shutil.copy(run_dir / "checkpoint.pt", tmp_path / "decoder.pt")
        argv = ["--checkpoint", str(tmp_path / "decoder.pt"), png]
    else:
        argv = [*run, "--encoder", "byol", png]
    line = cli_error(capsys, ["explain", *argv, "--out", str(tmp_path / "out")])
    assert expected in line
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--encoder", "byol"], "choose one of simclr, supervised, random, resnet18-supervised, resnet50-supervised, "
                                "resnet50-dino, resnet50-swav"),
        (["--encoder", "random", "--steps", "0"], "must be >= 1"),
        (["--encoder", "random", "--batch-size", "1000"], "cannot fill a batch of 1000"),
    ],
)
def test_train_errors(argv, expected, tmp_path, capsys):
    line = cli_error(capsys, ["train", "--profile", "smoke", "--device", "cpu", "--no-progress", *argv,
                           "--out", str(tmp_path / "run")])
    assert expected in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unknown_encoder_spec_lists_the_choices():
    with pytest.raises(ValueError, match="unknown encoder 'byol': choose one of simclr, supervised, random, "
                                         "resnet18-supervised, resnet50-supervised, resnet50-dino, resnet50-swav"):
        launch.resolve_encoder("byol", "smoke")


def test_offline_real_data_and_weights_are_clean_errors(tmp_path, capsys, monkeypatch):
    def no_data(name, *args, **kwargs):
        raise DatasetUnavailableError(f"{name} (train) is not in {tmp_path} and this machine is offline.\nPlace it")

    def no_weights(name, progress=True):
        raise WeightsUnavailableError(f"{name} weights are not in {tmp_path} and the host cannot be reached")

    monkeypatch.setattr(launch, "load_real_dataset", no_data)
    monkeypatch.setattr(launch, "load_pretrained", no_weights)
    base = ["train", "--profile", "smoke", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    line = cli_error(capsys, [*base, "--encoder", "random", "--dataset", "imagenette"])
    assert "imagenette (train) is not in" in line and "offline. Place it" in line  # one line
    line = cli_error(capsys, [*base, "--encoder", "resnet50-dino", "--dataset", "imagenette"])
    assert "resnet50-dino weights are not in" in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_nemu_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        cli.main(["explain", "--checkpoint", str(tmp_path / "x.pt"), str(tmp_path / "nope.png"),
                  "--out", str(tmp_path / "o")])


def test_normalized_images_match_normalize():
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=gen)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    for stored in (u8, u8.float() / 255):
        imgs = launch.NormalizedImages(stored, mean, std)
        assert len(imgs) == 5 and imgs.shape == (5, 3, 8, 8)
        idx = torch.tensor([4, 1])
        torch.testing.assert_close(imgs[idx], normalize(u8[idx].float() / 255, mean, std))
        torch.testing.assert_close(imgs[1:3], normalize(u8[1:3].float() / 255, mean, std))


def test_python_m_nemu_lib_train_help():
    result = subprocess.run([sys.executable, "-m", "nemu_lib.train", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m nemu_lib.train")
    for option in ("--encoder", "--dataset", "--objective", "--steps", "--resume", "--stop-at", "--grad-accum"):
        assert option in result.stdout


def test_train_and_module_share_arguments():
    nemu = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    module = launch.add_train_arguments(__import__("argparse").ArgumentParser())
    assert {a.dest for a in nemu._actions} == {a.dest for a in module._actions}
