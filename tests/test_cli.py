"""nemu_lib.cli: the ``nemu`` command."""

import json
import sys
from importlib import metadata

import pytest
import torch

from nemu_lib import cli, ssl
from nemu_lib.config import PROFILES


def _as_json(value):
    return json.loads(json.dumps(value))  # tuples become lists, as in the printed JSON


def test_profiles_prints_every_profile(capsys):
    cli.main(["profiles"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(PROFILES) == 4
    printed = {}
    for line in lines:
        name, payload = line.split(" ", 1)
        printed[name] = json.loads(payload)
    assert set(printed) == {"smoke", "cpu", "gpu", "full"}
    for name, profile in PROFILES.items():
        assert printed[name] == _as_json(profile.as_dict())
    assert printed["smoke"]["image_size"] == 32
    assert printed["full"]["encoder_widths"] == [64, 128, 256, 512]


def test_main_reads_sys_argv(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nemu", "profiles"])
    cli.main()
    assert capsys.readouterr().out.count("\n") == len(PROFILES)


def test_pretrain_random_writes_checkpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    cli.main(["pretrain", "--kind", "random", "--profile", "smoke", "--device", "cpu"])
    path = tmp_path / "encoders" / "random-smoke-seed0.pt"
    assert path.is_file()
    assert capsys.readouterr().out.strip() == f"random: {path}"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["kind"] == "random" and ckpt["config"]["profile"] == "smoke"
    assert ckpt["config"]["encoder"]["widths"] == list(PROFILES["smoke"].encoder_widths)
    # the checkpoint holds exactly what pretrained_encoder returns for the same arguments
    enc = ssl.pretrained_encoder("random", "smoke", device="cpu", progress=False)
    state = enc.state_dict()
    assert state.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(state[k], ckpt["state_dict"][k]) for k in state)
    # --seed goes into the file name
    cli.main(["pretrain", "--kind", "random", "--profile", "smoke", "--device", "cpu", "--seed", "2"])
    assert (tmp_path / "encoders" / "random-smoke-seed2.pt").is_file()


def test_pretrain_all_passes_arguments(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    calls = []
    monkeypatch.setattr(ssl, "pretrained_encoder", lambda kind, profile, **kw: calls.append((kind, profile, kw)))
    cli.main(["pretrain", "--kind", "all", "--profile", "cpu", "--seed", "3", "--retrain"])
    assert [c[0] for c in calls] == ["simclr", "supervised", "random"]
    for _, profile, kw in calls:
        assert profile is PROFILES["cpu"]
        assert kw == {"seed": 3, "device": None, "retrain": True}
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{k}: {tmp_path / 'encoders' / f'{k}-cpu-seed3.pt'}" for k in ("simclr", "supervised", "random")]


def test_pretrain_default_kind_and_profile(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("NEMU_PROFILE", "smoke")
    calls = []
    monkeypatch.setattr(ssl, "pretrained_encoder", lambda kind, profile, **kw: calls.append((kind, profile, kw)))
    cli.main(["pretrain"])
    assert calls == [("simclr", PROFILES["smoke"], {"seed": 0, "device": None, "retrain": False})]


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--kind", "byol"],
        ["pretrain", "--profile", "huge"],
        ["pretrain", "--seed", "one"],
        ["explode"],
        [],
    ],
)
def test_bad_arguments_exit(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2  # argparse's usage error
    assert "usage: nemu" in capsys.readouterr().err
    assert not (tmp_path / "encoders").exists()


def test_console_script_entry_point():
    try:
        scripts = metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover - very old importlib.metadata
        pytest.skip("entry points unavailable")
    nemu = [ep for ep in scripts if ep.name == "nemu"]
    if not nemu:
        pytest.skip("the nemu package is not installed in this environment")
    assert nemu[0].value == "nemu_lib.cli:main"
