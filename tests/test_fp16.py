"""fp16 mixed precision with loss scaling, the path a pre-Ampere GPU (Colab's T4) takes, run on the CPU.

``nemu_lib.config.amp_dtype`` is patched to answer fp16 for the CPU: ``autocast`` then runs the training
step under CPU fp16 autocast and ``grad_scaler`` returns an enabled ``GradScaler``, as on a T4.
"""

import pytest
import torch

from nemu_lib import config
from nemu_lib.checkpoint import load_checkpoint
from nemu_lib.encoders import SmallResNet
from nemu_lib.nem import NEMU
from nemu_lib.ssl import train_supervised
from nemu_lib.train import CHECKPOINT, TrainConfig, train


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    monkeypatch.setattr(config, "amp_dtype", lambda device: torch.float16)


def _model() -> NEMU:
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(8, 16, 32, 64)).eval()
    torch.manual_seed(1)
    return NEMU(encoder, max_width=32)


def _data(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_nemu_training_scales_its_loss_and_resumes_with_the_scale(fp16_on_cpu, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=16, lr=1e-2)
    seen = []
    full = _model()
    full.decoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    train(full, _data(), None, cfg, tmp_path / "full", ckpt_every=2, progress=False)
    assert torch.float16 in seen  # the decoder ran under fp16 autocast
    scaler = load_checkpoint(tmp_path / "full" / CHECKPOINT)["scaler"]
    assert scaler["scale"] > 1  # an enabled GradScaler's state was saved with the run

    part = _model()
    train(part, _data(), None, cfg, tmp_path / "part", ckpt_every=2, stop_at=2, progress=False)
    resumed = _model()
    train(resumed, _data(), None, cfg, tmp_path / "part", ckpt_every=2, resume=True, progress=False)
    for k, w in full.decoder.state_dict().items():
        assert torch.equal(w, resumed.decoder.state_dict()[k]), k
    assert all(torch.isfinite(w).all() for w in full.decoder.state_dict().values())


def test_a_bf16_run_resumes_under_fp16_settings_and_back(tmp_path, monkeypatch):
    """Checkpoints of bf16 / fp32 runs hold an empty scaler state; resuming one with fp16 starts a fresh scale."""
    cfg = TrainConfig(steps=4, batch_size=16, lr=1e-2)
    train(_model(), _data(), None, cfg, tmp_path, ckpt_every=2, stop_at=2, progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT)["scaler"] == {}
    monkeypatch.setattr(config, "amp_dtype", lambda device: torch.float16)
    h = train(_model(), _data(), None, cfg, tmp_path, ckpt_every=2, resume=True, progress=False)
    assert h["step"] == [1, 2, 3, 4]


def test_encoder_training_under_fp16_is_finite(fp16_on_cpu):
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(8, 16, 32, 64))
    images, labels = torch.rand(32, 3, 32, 32), torch.arange(32) % 3
    before = [p.detach().clone() for p in encoder.parameters()]
    history = train_supervised(encoder, images, labels, epochs=2, batch_size=16, progress=False)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(history)))
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters(), strict=True))
