"""nemu_lib.train: resume equals an uninterrupted run, DDP equals one process, safety on failures."""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

from nemu_lib import train as train_module
from nemu_lib.checkpoint import finished, load_checkpoint, save_checkpoint
from nemu_lib.encoders import SmallResNet
from nemu_lib.nem import NEMU
from nemu_lib.train import CHECKPOINT, TrainConfig, load_nemu, train, validation_loss


def _encoder(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet(widths=(8, 16, 32, 64)).eval()


def _model(encoder, uncertainty: bool = False, dtype: torch.dtype = torch.float32) -> NEMU:
    torch.manual_seed(1)  # the same decoder initialisation every time
    return NEMU(encoder, uncertainty=uncertainty, max_width=32).to(dtype)


def _data(n: int = 48, size: int = 32, seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _weights(model: NEMU) -> dict:
    return {k: v.clone() for k, v in model.decoder.state_dict().items()}


CFG = TrainConfig(steps=6, batch_size=16, lr=1e-2)


@pytest.mark.parametrize("objective", ["nem", "relax"])
def test_resume_equals_an_uninterrupted_run(tmp_path, objective):
    cfg = dataclasses.replace(CFG, objective=objective, relax_masks=3)
    encoder, x, v = _encoder(), _data(), _data(8, seed=3)
    full = _model(encoder, objective == "relax")
    h_full = train(full, x, v, cfg, tmp_path / "full", ckpt_every=2, val_every=3, progress=False)
    part = _model(encoder, objective == "relax")
    train(part, x, v, cfg, tmp_path / "part", ckpt_every=2, val_every=3, stop_at=3, progress=False)
    assert load_checkpoint(tmp_path / "part" / CHECKPOINT)["step"] == 3
    resumed = _model(encoder, objective == "relax")  # a fresh process: nothing but the checkpoint
    h_resumed = train(resumed, x, v, cfg, tmp_path / "part", ckpt_every=2, val_every=3, resume=True, progress=False)
    for k, w in _weights(full).items():
        assert torch.equal(w, resumed.decoder.state_dict()[k]), k
    assert h_resumed == h_full and len(h_full["loss"]) == 6 and h_full["val_step"] == [3, 6]


def test_a_finished_run_without_optimiser_state_loads_as_it_was_trained(tmp_path):
    """What a shipped reference decoder is (nemu_lib.reference): the finished checkpoint, optimiser state dropped."""
    encoder, x = _encoder(), _data()
    full = _model(encoder)
    h_full = train(full, x, None, CFG, tmp_path / "run", progress=False)
    path = tmp_path / "run" / CHECKPOINT
    save_checkpoint(finished(load_checkpoint(path)), path)
    assert "optimizer" not in load_checkpoint(path)
    loaded = _model(encoder)
    assert train(loaded, x, None, CFG, tmp_path / "run", resume=True, progress=False) == h_full
    for k, w in _weights(full).items():
        assert torch.equal(w, loaded.decoder.state_dict()[k]), k
    train(_model(encoder), x, None, CFG, tmp_path / "part", stop_at=3, progress=False)
    part = tmp_path / "part" / CHECKPOINT
    save_checkpoint({k: v for k, v in load_checkpoint(part).items() if k != "optimizer"}, part)
    with pytest.raises(ValueError, match="cannot go on from step 3 of 6"):  # going on needs the optimiser's moments
        train(_model(encoder), x, None, CFG, tmp_path / "part", resume=True, progress=False)


def test_relax_run_names_its_statistics_and_beats_the_images_mean(tmp_path):
    """On fixed masks the trained heads fit the z-scores better than e = 0, ℓ = 0 (each image's mean, unit variance)."""
    cfg = dataclasses.replace(CFG, objective="relax", relax_masks=8, steps=12, lr=1e-2)
    model, x = _model(_encoder(), True), _data(16)
    h = train(model, x, x, cfg, tmp_path, val_every=4, progress=False)
    assert set(h) == {"step", "loss", "spread", "masked_sim", "val_step", "val_loss"}
    nn.init.zeros_(model.decoder.head.weight)
    nn.init.zeros_(model.decoder.head.bias)
    constant = validation_loss(model, x, cfg)
    assert 1.6 < constant < 1.9  # Σ M t² / Σ M ≈ (K − 1) / K for each of the two heads
    assert h["val_loss"][-1] < h["val_loss"][0] < constant  # noise images: little to learn, but not nothing


def test_training_lowers_the_loss_and_leaves_the_encoder_untouched(tmp_path):
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}  # weights and BatchNorm statistics
    model = _model(encoder)
    history = train(model, _data(), None, dataclasses.replace(CFG, steps=20), tmp_path, progress=False)
    assert sum(history["loss"][-3:]) < sum(history["loss"][:3])
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training and not encoder.training


# Adam divides by the gradient's running RMS, so float noise in near-zero gradients becomes O(lr) weight
# differences; the equivalences of gradients are checked in float64 with SGD, whose updates are linear in them.
SGD = dataclasses.replace(CFG, optimizer="sgd", lr=0.05)
F64 = torch.float64


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    x = _data(dtype=F64)
    one, two = _model(_encoder(), dtype=F64), _model(_encoder(), dtype=F64)
    train(one, x, None, SGD, tmp_path / "a", progress=False)
    train(two, x, None, dataclasses.replace(SGD, grad_accum=4), tmp_path / "b", progress=False)
    for k, w in _weights(one).items():
        assert_close(two.decoder.state_dict()[k], w, atol=1e-10, rtol=1e-8)


def test_checkpoint_loads_into_the_same_encoder_only(tmp_path):
    encoder = _encoder()
    model = _model(encoder)
    train(model, _data(), None, dataclasses.replace(CFG, steps=2), tmp_path, progress=False)
    loaded = load_nemu(tmp_path / CHECKPOINT, encoder)
    x = _data(2)
    assert torch.equal(loaded(x)[1], model(x)[1])
    with pytest.raises(ValueError, match="encoder_fingerprint"):
        load_nemu(tmp_path / CHECKPOINT, _encoder(seed=5))  # same architecture, other weights
    with pytest.raises(ValueError, match="encoder"):
        load_nemu(tmp_path / CHECKPOINT, SmallResNet(widths=(8, 16, 32, 32)))


def test_resume_with_other_settings_is_refused(tmp_path):
    encoder = _encoder()
    train(_model(encoder), _data(), None, CFG, tmp_path, stop_at=2, progress=False)
    with pytest.raises(ValueError, match="train"):
        train(_model(encoder), _data(), None, dataclasses.replace(CFG, lr=1e-3), tmp_path, resume=True,
              progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_model(encoder), _data(), None, CFG, tmp_path / "empty", resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    encoder = _encoder()
    model = _model(encoder)
    train(model, _data(), None, CFG, tmp_path, ckpt_every=2, stop_at=4, progress=False)
    good = load_checkpoint(tmp_path / CHECKPOINT)
    original = train_module.build_objective

    def poisoned(name, **kwargs):
        objective = original(name, **kwargs)
        forward = objective.forward

        def nan_loss(m, x, g):
            loss, stats = forward(m, x, g)
            return loss * float("nan"), stats

        objective.forward = nan_loss
        return objective

    monkeypatch.setattr(train_module, "build_objective", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 4.*last good checkpoint"):
        train(_model(encoder), _data(), None, CFG, tmp_path, ckpt_every=1, resume=True, progress=False)
    after = load_checkpoint(tmp_path / CHECKPOINT)
    assert after["step"] == 4
    assert all(torch.equal(after["decoder"][k], v) for k, v in good["decoder"].items())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(objective="nope"), "unknown objective"),
        (dict(batch_size=15, grad_accum=2), "divisible"),
        (dict(batch_size=64), "cannot fill a batch"),
        (dict(steps=0), "must be >= 1"),
        (dict(optimizer="lbfgs"), "unknown optimizer"),
    ],
)
def test_bad_settings(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        train(_model(_encoder()), _data(), None, dataclasses.replace(CFG, **changes), tmp_path, progress=False)


def test_relax_objective_needs_the_uncertainty_head(tmp_path):
    with pytest.raises(ValueError, match="uncertainty=True"):
        train(_model(_encoder()), _data(), None, dataclasses.replace(CFG, objective="relax"), tmp_path,
              progress=False)


# ------------------------------------------------------------------------------------ distributed (gloo)

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(_model(_encoder(), dtype=F64), _data(dtype=F64), None, SGD, out_dir, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_reach_the_single_process_weights(tmp_path):
    single = _model(_encoder(), dtype=F64)
    train(single, _data(dtype=F64), None, SGD, tmp_path / "single", progress=False)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = load_checkpoint(tmp_path / "ddp" / CHECKPOINT)  # rank 0 wrote it
    assert ddp["step"] == CFG.steps
    for k, w in _weights(single).items():
        assert_close(ddp["decoder"][k], w, atol=1e-10, rtol=1e-8)
