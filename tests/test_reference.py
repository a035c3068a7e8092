"""nemu_lib.reference: shipped reference models are found, verified, adopted when they match, and kept current."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemu_lib import reference
from nemu_lib.checkpoint import save_checkpoint
from nemu_lib.config import REPO_ROOT, get_profile
from nemu_lib.ssl import encoder_path, pretrained_encoder


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty outputs folder and a reference folder of our own; references enabled, as in a new kernel."""
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setenv("NEMU_REFERENCE", str(tmp_path / "ref"))
    monkeypatch.delenv("NEMU_RETRAIN", raising=False)
    monkeypatch.setattr(reference, "_enabled", None)
    return tmp_path


def _fake_run(run: Path, profile: str = "cpu") -> Path:
    """A finished run's outputs folder with one encoder checkpoint, its results record and run summary."""
    path = run / "encoders" / f"simclr-{profile}-seed0.pt"
    save_checkpoint({"config": {"kind": "simclr", "epochs": 20}, "state_dict": {"w": torch.arange(4.0)}}, path)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    save_checkpoint({"config": {"train": {"steps": 5}}, "decoder": {"w": torch.ones(3)}, "optimizer": opt.state_dict(),
                     "step": 5, "history": {"loss": [1.0]}}, run / "nemu" / f"simclr-nem-{profile}" / "checkpoint.pt")
    (run / "results" / profile).mkdir(parents=True)
    (run / "results" / profile / "01_encoders.json").write_text(
        json.dumps({"values": {"simclr_linear_probe": 0.325, "simclr_knn": 0.3, "random_knn": 0.2}}))
    (run / "run-summary.json").write_text(json.dumps(
        {"notebooks": [{"name": "01_self_supervised_encoders", "measured_seconds": 300.0}]}))
    return path


def test_collect_writes_hashes_sizes_fingerprints_figures_and_times(fresh):
    trained = _fake_run(fresh / "run")
    m = reference.collect(fresh / "run", fresh / "ref")
    e = m["files"]["encoders/simclr-cpu-seed0.pt"]
    assert e["file"] == "encoders/simclr-cpu-seed0.pt.xz" and e["sha256"] == reference.sha256(fresh / "ref" / e["file"])
    assert e["unpacked_sha256"] == reference.sha256(trained)  # no optimiser to drop: the file as trained
    assert e["bytes"] == (fresh / "ref" / e["file"]).stat().st_size
    assert e["fingerprint"] == reference.fingerprint({"kind": "simclr", "epochs": 20})
    assert e["fingerprint"] != reference.fingerprint({"kind": "simclr", "epochs": 20}, generator_version=999)
    assert e["figures"] == {"simclr_linear_probe": 0.325, "simclr_knn": 0.3}  # its own figures, not random's
    assert e["notebook_seconds"] == 300.0 and e["what"] == "simclr encoder"
    assert (m["profile"], m["seed"]) == ("cpu", 0)
    assert json.loads((fresh / "ref" / reference.MANIFEST).read_text())["files"].keys() == m["files"].keys()
    decoder = reference.load("nemu/simclr-nem-cpu/checkpoint.pt", fresh / "ref")
    assert "optimizer" not in decoder and decoder["step"] == 5  # a finished run ships without optimiser state
    assert m["files"]["nemu/simclr-nem-cpu/checkpoint.pt"]["what"] == "NEM-U decoder simclr-nem-cpu"


def test_adopt_copies_a_matching_reference_once_and_says_so(fresh, capsys):
    _fake_run(fresh / "run")
    reference.collect(fresh / "run", fresh / "ref")
    target = fresh / "out" / "encoders" / "simclr-cpu-seed0.pt"
    assert reference.adopt(target, expect={"epochs": 20})
    assert reference.is_reference_copy(target)
    assert "using the reference simclr encoder" in capsys.readouterr().out
    assert not reference.adopt(target)  # already there: the loader takes it
    assert not reference.adopt(fresh / "out" / "encoders" / "other.pt")  # nothing ships for it
    assert reference.status("cpu", 0)[0] and not reference.status("gpu", 0)[0]
    assert not reference.status("cpu", 0, retrain=True)[0]


def test_adopt_refuses_other_settings_and_damaged_files(fresh, capsys):
    _fake_run(fresh / "run")
    reference.collect(fresh / "run", fresh / "ref")
    target = fresh / "out" / "encoders" / "simclr-cpu-seed0.pt"
    assert not reference.adopt(target, expect={"epochs": 12})
    assert "trained with other settings (epochs: 20 -> 12)" in capsys.readouterr().out and not target.exists()
    shipped = fresh / "ref" / "encoders" / "simclr-cpu-seed0.pt.xz"
    shipped.write_bytes(shipped.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        reference.adopt(target)
    assert reference.main(["verify"]) == 1


def test_retrain_removes_reference_copies_and_keeps_models_trained_here(fresh):
    _fake_run(fresh / "run")
    reference.collect(fresh / "run", fresh / "ref")
    target = fresh / "out" / "encoders" / "simclr-cpu-seed0.pt"
    assert reference.adopt(target)
    reference.set_enabled(False)
    assert not reference.adopt(target) and not target.exists()  # the copy goes: the loader trains it here
    save_checkpoint({"config": {"kind": "simclr", "epochs": 20}, "state_dict": {"w": torch.ones(4)}}, target)
    assert not reference.adopt(target) and target.exists()  # trained here: kept
    reference.set_enabled(True)
    assert not reference.adopt(target) and not reference.is_reference_copy(target)


def test_nemu_retrain_environment_variable_turns_references_off(fresh, monkeypatch):
    assert reference.enabled()
    monkeypatch.setenv("NEMU_RETRAIN", "1")
    assert not reference.enabled()
    reference.set_enabled(True)  # a notebook's retrain=False wins over the environment
    assert reference.enabled()


@pytest.mark.slow
def test_pretrained_encoder_loads_the_reference_instead_of_training(fresh, monkeypatch, capsys):
    smoke = get_profile("smoke")
    monkeypatch.setenv("NEMU_OUTPUTS", str(fresh / "run"))
    trained = pretrained_encoder("supervised", smoke, device="cpu", progress=False)
    reference.collect(fresh / "run", fresh / "ref", profile="smoke")
    monkeypatch.setenv("NEMU_OUTPUTS", str(fresh / "out"))
    steps = []
    loaded = pretrained_encoder("supervised", smoke, device="cpu", progress=False,
                                callback=lambda step, loss: steps.append(step))
    assert steps == [] and "using the reference supervised encoder" in capsys.readouterr().out
    for a, b in zip(trained.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.history == trained.history  # the reference run's curve, for the notebook to draw
    # other settings under the same profile name: the reference is refused and the encoder trained here
    os.remove(encoder_path("supervised", smoke))
    other = dataclasses.replace(smoke, lr=smoke.lr / 2)
    pretrained_encoder("supervised", other, device="cpu", progress=False,
                       callback=lambda step, loss: steps.append(step))
    assert steps and "training.lr: 0.002 -> 0.001" in capsys.readouterr().out


# ------------------------------------------------------------------ the files that ship with the repository


def shipped() -> dict:
    m = reference.manifest(REPO_ROOT / "data" / "reference")
    assert m["files"], "data/reference/manifest.json is missing: `make reference` builds it"
    return m


def test_shipped_files_match_their_manifest_and_fit_the_budget():
    m = shipped()
    folder = REPO_ROOT / "data" / "reference"
    for rel, e in m["files"].items():
        assert reference.sha256(folder / e["file"]) == e["sha256"], f"{rel} changed: run `make reference`"
        assert (folder / e["file"]).stat().st_size == e["bytes"]
    assert sum(e["bytes"] for e in m["files"].values()) == m["bytes"] <= reference.MAX_BYTES
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {reference.MANIFEST}
    assert on_disk == {e["file"] for e in m["files"].values()}, "files in data/reference the manifest does not name"
    families = {e["family"] for e in m["files"].values()}
    assert families == set(reference.FAMILIES), f"every kind of model ships: {set(reference.FAMILIES) - families}"


def test_shipped_fingerprints_match_what_the_code_would_train():
    """Fails when the architecture, a profile size, a training setting or the Shapes generator changes: the shipped
    models would then not be the ones the code trains, so `make reference` must rebuild them."""
    from reference_configs import expected_configs

    m = shipped()
    expected = expected_configs(REPO_ROOT / "data" / "reference", m)
    assert set(expected) == set(m["files"])
    stale = [rel for rel, config in expected.items() if reference.fingerprint(config) != m["files"][rel]["fingerprint"]]
    assert not stale, f"reference models the code would now train differently: {stale}; run `make reference`"


@pytest.mark.slow
def test_a_non_editable_install_finds_the_reference_models(tmp_path):
    """`pip install .` (as on Colab from NEMU_SOURCE) carries data/reference as nemu_lib/_reference."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO_ROOT)], check=True)
    code = ("import nemu_lib, nemu_lib.reference as r; m = r.manifest(); "
            "print(nemu_lib.__file__); print(r.reference_dir()); print(len(m['files']))")
    env = {k: v for k, v in os.environ.items() if k not in ("NEMU_REFERENCE", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == str(target / "nemu_lib" / "_reference")
    assert int(out[2]) == len(shipped()["files"])
