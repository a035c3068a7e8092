"""Shared decoders (``nemu_lib.runs``): the profile's settings, train once and reuse, resume, retrain."""

import dataclasses

import pytest
import torch

from nemu_lib import runs
from nemu_lib.config import PROFILES, get_profile
from nemu_lib.encoders import SmallResNet
from nemu_lib.nem import NEMU
from nemu_lib.train import CHECKPOINT, train


def _model(seed: int = 1) -> NEMU:
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(8, 16, 32, 64)).eval()
    torch.manual_seed(seed)
    return NEMU(encoder)


def _data(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _weights(model: NEMU) -> dict:
    return {k: v.clone() for k, v in model.decoder.state_dict().items()}


@pytest.mark.parametrize(
    ("objective", "steps", "lr"),
    [("nem", 600, 1e-2), ("nem-contrastive", 600, 1e-2), ("relax", 600, 3e-3)],  # all as many as nem
)
def test_profile_config_of_the_cpu_profile(objective, steps, lr):
    cfg = runs.profile_config(objective, "cpu", seed=4)
    assert (cfg.objective, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed) == (objective, steps, lr, 32, 4)
    assert cfg.eps == (0.3 if objective == "nem-contrastive" else 0.01)  # the others keep TrainConfig's default


def test_every_profile_has_the_decoder_settings():
    for name in PROFILES:
        for objective in ("nem", "nem-contrastive", "relax"):
            assert runs.profile_config(objective, name).steps >= 1
    with pytest.raises(ValueError, match="unknown objective"):
        runs.profile_config("nemx", "cpu")


def test_run_dir_names(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    assert runs.run_dir("simclr", "nem-contrastive", get_profile("cpu")) == tmp_path / "nemu" / "simclr-contrastive-cpu"


def test_train_once_then_reuse_resume_and_retrain(tmp_path):
    cfg = dataclasses.replace(runs.profile_config("nem", "smoke"), steps=4, batch_size=8)
    x = _data()
    first = _model()
    history, trained, _ = runs.train_or_load(first, x, None, cfg, tmp_path / "a", progress=False)
    assert trained == 4 and len(history["loss"]) == 4

    again = _model(seed=9)  # another initialisation: the checkpoint replaces it
    history2, trained2, _ = runs.train_or_load(again, x, None, cfg, tmp_path / "a", progress=False)
    assert trained2 == 0 and history2 == history
    assert all(torch.equal(v, _weights(first)[k]) for k, v in _weights(again).items())

    longer = dataclasses.replace(cfg, steps=6)  # other settings: trained again from scratch
    _, trained3, _ = runs.train_or_load(_model(), x, None, longer, tmp_path / "a", progress=False)
    assert trained3 == 6

    # an interrupted run of the same settings resumes: 2 saved steps + 4 more == 6 uninterrupted
    part = _model()
    train(part, x, None, longer, tmp_path / "b", stop_at=2, progress=False)
    _, trained4, _ = runs.train_or_load(part, x, None, longer, tmp_path / "b", progress=False)
    full = _model()
    runs.train_or_load(full, x, None, longer, tmp_path / "c", progress=False)
    assert trained4 == 4
    assert all(torch.equal(v, _weights(full)[k]) for k, v in _weights(part).items())

    _, trained5, _ = runs.train_or_load(_model(), x, None, longer, tmp_path / "c", retrain=True, progress=False)
    assert trained5 == 6


def test_pretrained_nemu_trains_once_on_the_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    torch.manual_seed(0)
    encoder = SmallResNet(widths=get_profile("smoke").encoder_widths).eval()
    model = runs.pretrained_nemu("random", "relax", "smoke", encoder=encoder, device="cpu", progress=False)
    path = runs.run_dir("random", "relax", "smoke") / CHECKPOINT
    assert path.is_file() and model.uncertainty and not model.training
    assert len(model.history["loss"]) == runs.profile_config("relax", "smoke").steps
    stamp = path.stat().st_mtime_ns
    reloaded = runs.pretrained_nemu("random", "relax", "smoke", encoder=encoder, device="cpu", progress=False)
    assert path.stat().st_mtime_ns == stamp  # loaded, not trained again
    assert all(torch.equal(v, _weights(model)[k]) for k, v in _weights(reloaded).items())
