"""nemu_lib.ssl: NT-Xent, SimCLR augmentations, the training loop, probes and the trained-encoder cache."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from nemu_lib import augment, ssl
from nemu_lib.augment import SimCLRAugment, simclr_transforms
from nemu_lib.config import get_profile
from nemu_lib.data import SHAPES, ShapesScenes, normalize
from nemu_lib.encoders import SmallResNet
from nemu_lib.probes import embed, knn_accuracy, linear_probe
from nemu_lib.ssl import (
    ENCODER_KINDS,
    ProjectionHead,
    encoder_path,
    fit,
    load_encoder,
    nt_xent,
    pretrained_encoder,
    train_simclr,
    train_supervised,
)

LUMA = torch.tensor([0.299, 0.587, 0.114])
CPU = torch.device("cpu")


def _plain_augment(size=32, **kw):
    """An augmentation with every random colour/blur step off (only crop and flip remain random)."""
    args = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=(1.0, 1.0), jitter=0.0, hue=0.0,
                p_gray=0.0, p_blur=0.0)
    args.update(kw)
    return SimCLRAugment(size, **args)


def _full_boxes(b, h, w, dev):
    """Crop boxes (index, x1, y1, x2, y2) that cover every image: roi_align(aligned=True) copies it."""
    return torch.tensor([[i, 0.0, 0.0, w, h] for i in range(b)], device=dev)


def _same_or_mirrored(out, images, atol=1e-5):
    """Per image: the largest error against the image or its mirror, whichever fits better; and which."""
    err = (out - images).abs().amax(dim=(1, 2, 3))
    err_flip = (out - images.flip(-1)).abs().amax(dim=(1, 2, 3))
    return torch.minimum(err, err_flip), err_flip < err


# -------------------------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize(
    ("n", "d", "tau"),
    [(1, 4, 0.5), (2, 3, 0.1), (8, 16, 0.2), (33, 128, 0.07), (16, 64, 1.0), (5, 2, 2.0)],
)
def test_nt_xent_matches_lightly(n, d, tau):
    from lightly.loss import NTXentLoss

    g = torch.Generator().manual_seed(n * 1000 + d)
    p1 = torch.randn(n, d, generator=g).requires_grad_()
    p2 = torch.randn(n, d, generator=g).requires_grad_()
    q1, q2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
    ours = nt_xent(p1, p2, tau)
    ref = NTXentLoss(temperature=tau)(q1, q2)
    assert ours.ndim == 0
    assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours.backward()
    ref.backward()
    assert_close(p1.grad, q1.grad, rtol=1e-4, atol=1e-6)
    assert_close(p2.grad, q2.grad, rtol=1e-4, atol=1e-6)


def test_nt_xent_matches_lightly_on_correlated_views():
    """Views close to each other (a trained encoder's regime): small loss, still identical to lightly's."""
    from lightly.loss import NTXentLoss

    g = torch.Generator().manual_seed(7)
    p1 = torch.randn(32, 64, generator=g)
    p2 = p1 + 0.05 * torch.randn(32, 64, generator=g)
    ours = nt_xent(p1, p2, 0.2)
    assert_close(ours, NTXentLoss(temperature=0.2)(p1, p2), rtol=1e-5, atol=1e-5)
    assert ours < nt_xent(p1, torch.randn(32, 64, generator=g), 0.2)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_closed_forms(tau):
    """N = 2 images, orthogonal unit vectors e1, e2; every one of the 2N = 4 anchors sees the same terms.

    With l(i, j) = -log exp(sim_ij / tau) / sum_{k != i} exp(sim_ik / tau):
    - views identical (p2 = p1): positive sim 1, the two negatives sim 0: l = log(1 + 2 exp(-1/tau));
    - views swapped (p2 = [e2, e1]): positive sim 0, negatives 0 and 1: l = log(2 + exp(1/tau));
    - views opposite (p2 = -p1): positive sim -1, negatives 0 and 0: l = log(1 + 2 exp(1/tau)).
    """
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    p1 = torch.stack([e1, e2])
    cases = {
        "identical": (p1, math.log(1 + 2 * math.exp(-1 / tau))),
        "swapped": (torch.stack([e2, e1]), math.log(2 + math.exp(1 / tau))),
        "opposite": (-p1, math.log(1 + 2 * math.exp(1 / tau))),
    }
    for name, (p2, expected) in cases.items():
        got = nt_xent(p1, p2, tau)
        assert got.item() == pytest.approx(expected, rel=1e-9), name
        # only directions count: scaling any projection by a positive factor changes nothing
        scaled = nt_xent(p1 * torch.tensor([[3.0], [0.25]], dtype=torch.float64), p2 * 7.0, tau)
        assert scaled.item() == pytest.approx(expected, rel=1e-9), name


def test_nt_xent_single_pair_is_zero():
    """N = 1: the positive is the only other view, so the softmax is 1 and the loss 0, whatever the vectors."""
    p1, p2 = torch.randn(1, 5), torch.randn(1, 5)
    assert nt_xent(p1, p2, 0.3).item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_gradients():
    g = torch.Generator().manual_seed(0)
    p1 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p2 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(p1, p2, 0.5)
    loss.backward()
    for p in (p1, p2):
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 1e-3
        # the loss depends only on directions, so each gradient is orthogonal to its own vector
        assert_close((p.grad * p.detach()).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (p1, p2))


def test_nt_xent_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="shape"):
        nt_xent(torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    for tau in (0.0, -0.5):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent(torch.randn(4, 8), torch.randn(4, 8), tau)


def test_projection_head_shapes():
    head = ProjectionHead(16, hidden_dim=32, out_dim=8)
    assert head(torch.randn(5, 16)).shape == (5, 8)


# -------------------------------------------------------------------------------------- augmentations


def test_augment_shape_and_normalisation():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    aug = SimCLRAugment(24, mean, std)
    images = torch.rand(6, 3, 40, 48)  # not square, larger than the output
    torch.manual_seed(0)
    x = aug(images)
    assert x.shape == (6, 3, 24, 24)
    assert x.dtype == torch.float32
    raw = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # mean 0 / std 1: the views themselves, in [0, 1]
    torch.manual_seed(0)
    y = SimCLRAugment(24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(images)
    assert y.min() >= 0 and y.max() <= 1
    assert_close(y, raw, atol=1e-5, rtol=0)  # same random draws, only the normalisation differs


def test_augment_with_full_boxes_is_identity_up_to_flip(monkeypatch):
    """Every colour/blur step off and a crop box covering the image: each view is the image or its mirror."""
    aug = _plain_augment(32)
    monkeypatch.setattr(aug, "crop_boxes", _full_boxes)
    torch.manual_seed(1)
    images = torch.rand(64, 3, 32, 32)
    out = aug(images)
    err, flipped = _same_or_mirrored(out, images)
    assert err.max() < 1e-5
    assert 10 < int(flipped.sum()) < 54  # the flip is a fair coin per image


def test_full_scale_crop_is_identity():
    """scale=(1, 1) must crop the whole image, as torchvision's RandomResizedCrop does for a square image.

    BUG (nemu_lib/ssl.py, SimCLRAugment.crop_boxes): the log-aspect is drawn independently of the area and
    the sides are clamped to the image, so for scale=(1, 1) and aspect r != 1 one side is clamped and the
    other shrinks to sqrt(area / r): the "full-scale" crop loses up to 13 % of the image and is stretched.
    """
    aug = _plain_augment(32)
    torch.manual_seed(2)
    images = torch.rand(16, 3, 32, 32)
    boxes = aug.crop_boxes(16, 32, 32, CPU)
    widths, heights = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    area_share = widths * heights / (32 * 32)
    assert_close(area_share, torch.ones(16), atol=1e-5, rtol=0)
    err, _ = _same_or_mirrored(aug(images), images)
    assert err.max() < 1e-5


def test_crop_boxes_stay_inside_and_respect_scale_and_aspect():
    """Boxes inside the image, area share in ``scale``, aspect in [3/4, 4/3] (torchvision's ranges).

    BUG (same cause as in test_full_scale_crop_is_identity): on a non-square image, clamping one side of a
    large crop to the image pushes its aspect outside [3/4, 4/3] (up to 1.35 here).
    """
    aug = SimCLRAugment(32, (0.0,) * 3, (1.0,) * 3, scale=(0.2, 1.0))
    torch.manual_seed(3)
    h, w = 40, 56
    boxes = aug.crop_boxes(2000, h, w, CPU)
    assert boxes.shape == (2000, 5)
    assert torch.equal(boxes[:, 0], torch.arange(2000.0))
    x1, y1, x2, y2 = boxes[:, 1:].unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w + 1e-4).all() and (y2 <= h + 1e-4).all()
    share = (x2 - x1) * (y2 - y1) / (h * w)
    assert share.min() >= 0.2 - 1e-4 and share.max() <= 1 + 1e-4
    aspect = (x2 - x1) / (y2 - y1)
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4


def test_augment_float64_input():
    """BUG (crop_boxes): the boxes are always float32, and roi_align refuses float64 images."""
    aug = _plain_augment(16)
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = aug(images)
    assert out.dtype == torch.float64 and out.shape == (2, 3, 16, 16)


def test_colour_maps_identity_without_jitter():
    torch.manual_seed(0)
    img = torch.rand(8, 3, 16, 16)
    for aug in (_plain_augment(16), SimCLRAugment(16, (0.0,) * 3, (1.0,) * 3, p_jitter=0.0, p_gray=0.0)):
        m, t = aug.colour_maps(img)
        assert m.shape == (8, 3, 3) and t.shape == (8, 3)
        assert_close(m, torch.eye(3).expand(8, 3, 3), atol=1e-6, rtol=0)
        assert_close(t, torch.zeros(8, 3), atol=1e-7, rtol=0)


def test_grayscale_matches_torchvision(monkeypatch):
    aug = _plain_augment(16, p_gray=1.0)
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    m, t = aug.colour_maps(images)
    assert_close(m, torch.outer(torch.ones(3), LUMA).expand(8, 3, 3), atol=1e-6, rtol=0)
    assert_close(t, torch.zeros(8, 3), atol=1e-7, rtol=0)
    grey = torch.einsum("bij,bjhw->bihw", m, images) + t[:, :, None, None]
    # torchvision weighs red 0.2989, nemu ITU-R 601's 0.299 (weights that sum to exactly 1, which the
    # colour algebra needs): the two differ by at most 1e-4 * red
    assert_close(grey, TF.rgb_to_grayscale(images, num_output_channels=3), atol=1.01e-4, rtol=0)
    exact = (LUMA[None, :, None, None] * images).sum(1, keepdim=True).expand_as(images)
    assert_close(grey, exact, atol=1e-6, rtol=0)
    # end to end (crop covering the image, so that only the flip remains random)
    monkeypatch.setattr(aug, "crop_boxes", _full_boxes)
    err, _ = _same_or_mirrored(aug(images), exact)
    assert err.max() < 1e-5


def test_hue_rotation_preserves_luma_and_grey():
    angles = torch.tensor([0.0, 0.3, -1.1, math.pi, 2.5, 2 * math.pi])
    rot = augment._hue_rotation(angles)
    assert rot.shape == (6, 3, 3)
    colours = torch.rand(50, 3)
    for r in rot:
        assert_close(LUMA @ r, LUMA, atol=1e-5, rtol=0)  # w^T H = w^T: luma of any colour unchanged
        assert_close(colours @ r.T @ LUMA, colours @ LUMA, atol=1e-5, rtol=0)
        assert_close(r @ torch.ones(3), torch.ones(3), atol=1e-5, rtol=0)  # greys stay grey
        assert torch.linalg.det(r).item() == pytest.approx(1.0, abs=1e-4)
    assert_close(rot[0], torch.eye(3), atol=1e-5, rtol=0)
    assert_close(rot[-1], torch.eye(3), atol=1e-5, rtol=0)  # a full turn
    assert not torch.allclose(rot[1], torch.eye(3), atol=1e-2)  # a real rotation does change colours
    # rotations compose: H(a) H(b) = H(a + b)
    a, b = torch.tensor([0.3]), torch.tensor([0.9])
    assert_close(augment._hue_rotation(a) @ augment._hue_rotation(b), augment._hue_rotation(a + b), atol=1e-5, rtol=0)


def test_colour_jitter_factors():
    """M = H S c b and t = (1 - c) b g 1, so M 1 = c b 1 and t / g = b - c b: recover b and c, check ranges."""
    jitter = 0.4
    aug = SimCLRAugment(16, (0.0,) * 3, (1.0,) * 3, jitter=jitter, hue=0.1, p_jitter=1.0, p_gray=0.0)
    torch.manual_seed(4)
    img = torch.rand(200, 3, 8, 8) * 0.8 + 0.1
    m, t = aug.colour_maps(img)
    g = torch.einsum("c,bchw->b", LUMA, img) / 64  # mean luma
    cb = m @ torch.ones(3)  # (B, 3): every row sums to c * b
    assert_close(cb, cb[:, :1].expand(-1, 3), atol=1e-5, rtol=0)
    assert_close(t, t[:, :1].expand(-1, 3), atol=1e-6, rtol=0)
    b = t[:, 0] / g + cb[:, 0]
    c = cb[:, 0] / b
    for f in (b, c):
        assert f.min() >= 1 - jitter - 1e-4 and f.max() <= 1 + jitter + 1e-4
        assert f.std() > 0.1  # drawn per image
    # hue = 0 and a grey image: saturation and hue do nothing, the map is c b x + (1 - c) b g
    aug0 = SimCLRAugment(16, (0.0,) * 3, (1.0,) * 3, jitter=jitter, hue=0.0, p_jitter=1.0, p_gray=0.0)
    grey_level = torch.rand(100, 1, 1, 1) * 0.8 + 0.1
    grey = grey_level.expand(100, 3, 8, 8)  # constant grey images: contrast does nothing either
    m, t = aug0.colour_maps(grey)
    out = torch.einsum("bij,bjhw->bihw", m, grey) + t[:, :, None, None]
    factor = out / grey  # only brightness remains: out = b * x
    assert_close(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-5, rtol=0)
    assert factor.min() >= 1 - jitter - 1e-4 and factor.max() <= 1 + jitter + 1e-4


def test_brightness_only_scales_images():
    """With hue = 0 and the maps forced to brightness b only (c = s = 1), images are scaled by b."""
    aug = SimCLRAugment(16, (0.0,) * 3, (1.0,) * 3, jitter=0.3, hue=0.0, p_jitter=1.0, p_gray=0.0)
    torch.manual_seed(5)
    img = torch.rand(16, 3, 8, 8)
    fb = torch.rand(16) * 0.6 + 0.7
    draws = iter([torch.stack([(fb - 1) / 0.3, torch.zeros(16), torch.zeros(16)]) * 0.5 + 0.5])
    real_rand = torch.rand

    def rand(*shape, **kw):  # the (3, B) draw of brightness/contrast/saturation: force c = s = 1
        if shape == (3, 16):
            return next(draws).to(kw.get("dtype") or torch.float32)
        return real_rand(*shape, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", rand)
        m, t = aug.colour_maps(img)
    assert_close(m, fb[:, None, None] * torch.eye(3), atol=1e-5, rtol=0)
    assert_close(t, torch.zeros(16, 3), atol=1e-6, rtol=0)


def test_views_are_drawn_per_image():
    aug = SimCLRAugment(32, (0.0,) * 3, (1.0,) * 3)
    torch.manual_seed(6)
    image = torch.rand(1, 3, 32, 32)
    out = aug(image.expand(4, 3, 32, 32).contiguous())
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-2


def test_augment_seeded_reproducibility():
    aug = SimCLRAugment(32, (0.5,) * 3, (0.25,) * 3)
    images = torch.rand(8, 3, 32, 32)
    torch.manual_seed(11)
    a = aug(images)
    torch.manual_seed(11)
    b = aug(images)
    c = aug(images)
    assert torch.equal(a, b)
    assert not torch.allclose(b, c)


def test_blur_constant_image_and_tiny_sigma():
    aug = SimCLRAugment(32, (0.0,) * 3, (1.0,) * 3)
    const = torch.tensor([0.2, 0.5, 0.9])[None, :, None, None].expand(4, 3, 32, 32).contiguous()
    assert_close(aug.blur(const), const, atol=1e-6, rtol=0)
    sharp = SimCLRAugment(32, (0.0,) * 3, (1.0,) * 3, sigma=(0.1, 0.1))
    img = torch.rand(3, 3, 32, 32)
    assert_close(sharp.blur(img), img, atol=1e-6, rtol=0)  # exp(-1 / 0.02): the kernel is a delta


def test_blur_matches_torchvision():
    sigma = 1.3
    aug = SimCLRAugment(64, (0.0,) * 3, (1.0,) * 3, sigma=(sigma, sigma))
    k = max(3, int(0.1 * 64) // 2 * 2 + 1)
    assert k == 7
    img = torch.rand(2, 3, 20, 24)
    ref = TF.gaussian_blur(img, kernel_size=[k, k], sigma=[sigma, sigma])
    out = aug.blur(img)
    assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out, img, atol=1e-2)


def test_simclr_transforms_pipeline():
    pipe = simclr_transforms(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert isinstance(pipe, v2.Compose)
    crop = [t for t in pipe.transforms if isinstance(t, v2.RandomResizedCrop)][0]
    assert tuple(crop.size) == (32, 32) and tuple(crop.scale) == (0.2, 1.0)
    blur = [t.transforms[0] for t in pipe.transforms
            if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)][0]
    assert tuple(blur.kernel_size) == (3, 3)  # max(3, 10 % of 32, odd), as SimCLRAugment.blur
    defaults = SimCLRAugment(32, (0.5,) * 3, (0.25,) * 3)
    assert defaults.scale == tuple(crop.scale) and tuple(blur.sigma) == defaults.sigma
    torch.manual_seed(0)
    image = torch.rand(3, 48, 40)
    out = pipe(image)
    assert out.shape == (3, 32, 32)
    raw = out * 0.25 + 0.5
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


# ----------------------------------------------------------------------------------------------- fit


def _regression(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    return x, y


def _fit_linear(seed=0, epochs=10, n=64, batch_size=16, lr=0.05, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = _regression(n)
    calls = []

    def loss_fn(idx):
        calls.append((idx.clone(), model.training))
        return ((model(x[idx]) - y[idx]) ** 2).mean()

    history = fit(model, loss_fn, n, epochs, batch_size, lr, seed=seed, progress=False, **kw)
    return model, history, calls


def test_fit_decreases_loss():
    model, history, calls = _fit_linear(epochs=30, lr=0.1)
    assert len(history) == 30 * 4
    assert all(math.isfinite(v) for v in history)
    assert history[0] > 1.0 and history[-1] < 1e-3 * history[0]
    assert sum(history[-4:]) < sum(history[:4])
    assert_close(model.weight.detach(), torch.tensor([[1.5, -2.0, 0.5]]), atol=0.05, rtol=0)
    assert model.bias.item() == pytest.approx(0.3, abs=0.05)
    assert all(training for _, training in calls)  # train mode during the steps
    assert not model.training  # eval mode after


def test_fit_batches_and_callback():
    seen = []
    _, history, calls = _fit_linear(epochs=3, n=10, batch_size=4, callback=lambda s, v: seen.append((s, v)))
    assert len(history) == 3 * 2  # the last incomplete batch (10 = 2 * 4 + 2) is dropped
    assert seen == list(enumerate(history, start=1))
    for epoch in range(3):
        idx = torch.cat([c[0] for c in calls[2 * epoch:2 * epoch + 2]])
        assert len(idx) == 8 and len(set(idx.tolist())) == 8 and idx.max() < 10
    orders = [torch.cat([c[0] for c in calls[2 * e:2 * e + 2]]).tolist() for e in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]  # reshuffled every epoch
    # a batch larger than the data set shrinks to it: one step per epoch
    _, history, calls = _fit_linear(epochs=2, n=5, batch_size=100)
    assert len(history) == 2 and sorted(calls[0][0].tolist()) == list(range(5))


def test_fit_cosine_schedule(monkeypatch):
    optimisers = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            optimisers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = _regression(40)
    lrs = []

    def loss_fn(idx):
        lrs.append(optimisers[0].param_groups[0]["lr"])  # the lr of this step
        return ((model(x[idx]) - y[idx]) ** 2).mean()

    base = 0.01
    fit(model, loss_fn, 40, 4, 4, base, progress=False)  # 40 steps, warm-up 2
    total, warmup = 40, 2
    expected = [(s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                for s in range(total)]
    assert lrs == pytest.approx([base * e for e in expected], rel=1e-6, abs=1e-12)
    assert max(lrs) == pytest.approx(base)
    assert lrs[-1] < 0.002 * base
    assert optimisers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # reaches 0 after the last step
    assert optimisers[0].param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_non_finite_loss_raises(bad):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = _regression(16)

    def loss_fn(idx):
        return model(x[idx]).sum() * bad

    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        fit(model, loss_fn, 16, 1, 4, 0.01, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # no step was taken


def test_fit_is_deterministic():
    a, ha, _ = _fit_linear(seed=3, epochs=3)
    b, hb, _ = _fit_linear(seed=3, epochs=3)
    c, hc, _ = _fit_linear(seed=4, epochs=3)
    assert ha == hb
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert ha != hc  # another seed, another batch order
    assert not torch.equal(a.weight, c.weight)


def test_fit_stop_at_retraces_the_first_steps_of_the_whole_run():
    _, whole, _ = _fit_linear(seed=3, epochs=6)
    _, first, calls = _fit_linear(seed=3, epochs=6, stop_at=7)
    assert len(whole) == 24 and first == whole[:7] and len(calls) == 7  # same batches, same schedule
    _, beyond, _ = _fit_linear(seed=3, epochs=6, stop_at=100)
    assert beyond == whole


@pytest.mark.parametrize(("n", "epochs", "batch_size"), [(10, 0, 4), (0, 1, 4), (10, 1, 0)])
def test_fit_nothing_to_train(n, epochs, batch_size):
    """BUG for n=0 or batch_size=0: ``n // min(batch_size, n)`` divides by zero before the ValueError."""
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(model, lambda idx: model(torch.zeros(1, 3)).sum(), n, epochs, batch_size, 0.01, progress=False)


# ---------------------------------------------------------------------------------- encoder training


@pytest.fixture(scope="module")
def scenes():
    data = ShapesScenes("train", size=32, image_size=32, seed=0).stack(progress=False)
    return data["image"], data["label"]


def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return SmallResNet(widths=(4, 8, 8, 8))


@pytest.fixture(scope="module")
def simclr_runs(scenes):
    images, _ = scenes
    runs = []
    for _ in range(2):
        enc = _tiny_encoder()
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        history = train_simclr(enc, images, epochs=2, batch_size=16, progress=False)
        runs.append((enc, before, history))
    return runs


def _assert_trained(enc, before, history, steps):
    assert len(history) == steps
    assert all(math.isfinite(v) and v >= 0 for v in history)
    assert not enc.training
    changed = [k for k, v in enc.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    conv_weights = [k for k in before if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert set(conv_weights) <= set(changed)
    assert enc.stem[0].weight.requires_grad  # trained in place, not frozen


def test_train_simclr(simclr_runs):
    enc, before, history = simclr_runs[0]
    _assert_trained(enc, before, history, steps=2 * (32 // 16))
    # at initialisation the 2N = 32 views are hard to tell apart: the loss is near log(2N - 1)
    assert 1.5 < history[0] < math.log(31) + 1.0


def test_train_simclr_is_deterministic(simclr_runs):
    (a, _, ha), (b, _, hb) = simclr_runs
    assert ha == hb
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_train_supervised(scenes):
    images, labels = scenes
    runs = []
    for _ in range(2):
        enc = _tiny_encoder()
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        history = train_supervised(enc, images, labels, epochs=1, batch_size=8, lr=5e-3, progress=False)
        _assert_trained(enc, before, history, steps=32 // 8)
        runs.append((enc, history))
    # cross-entropy over up to 6 classes starts near log 6
    assert 0.5 < runs[0][1][0] < math.log(6) + 1.5
    assert runs[0][1] == runs[1][1]
    for k, v in runs[0][0].state_dict().items():
        assert torch.equal(v, runs[1][0].state_dict()[k]), k


# ---------------------------------------------------------------------------------------------- embed


def test_embed(scenes):
    images, _ = scenes
    enc = _tiny_encoder(1)
    x = normalize(images[:10])
    enc.train()
    z = embed(enc, x, batch_size=4)
    assert z.shape == (10, 8) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert enc.training  # train mode restored
    enc.eval()
    with torch.no_grad():
        expected = enc(x)
    assert_close(z, expected, atol=1e-5, rtol=1e-5)
    assert_close(embed(enc, x, batch_size=3), embed(enc, x, batch_size=256), atol=1e-5, rtol=1e-5)
    assert not enc.training  # eval stays eval
    # running statistics untouched (eval mode: BatchNorm does not update)
    enc.train()
    running = enc.stem[1].running_mean.clone()
    embed(enc, x)
    assert torch.equal(enc.stem[1].running_mean, running)


# --------------------------------------------------------------------------------------------- probes


def _clusters(n_per_class, centres, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([c + 0.1 * torch.randn(n_per_class, len(c), generator=g) for c in centres])
    y = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return z, y


def test_probes_on_separable_features():
    centres = [torch.tensor(c) for c in ([3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0])]
    z_tr, y_tr = _clusters(30, centres, 0)
    z_te, y_te = _clusters(20, centres, 1)
    assert linear_probe(z_tr, y_tr, z_te, y_te) == 1.0
    assert knn_accuracy(z_tr, y_tr, z_te, y_te, k=5) == 1.0


def test_probes_on_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(0)
    z_tr, z_te = torch.randn(400, 8, generator=g), torch.randn(2000, 8, generator=g)
    y_tr, y_te = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    for acc in (linear_probe(z_tr, y_tr, z_te, y_te), knn_accuracy(z_tr, y_tr, z_te, y_te, k=20)):
        assert 0.18 < acc < 0.32


def test_knn_hand_cases():
    z_tr = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y_tr = torch.tensor([0, 1])
    # cosine similarity: (2, 0.1) -> class 0; (0.1, 3) -> class 1; (-1, 0.2): cos -0.98 vs 0.20 -> class 1
    z_te = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.2]])
    assert knn_accuracy(z_tr, y_tr, z_te, torch.tensor([0, 1, 1]), k=1) == 1.0
    assert knn_accuracy(z_tr, y_tr, z_te, torch.tensor([0, 1, 0]), k=1) == pytest.approx(2 / 3)
    # weighted votes, k = 3 neighbours of (1, 0) at cosine 1 (class 0), 0.8 and 0.6 (class 1):
    # tau = 0.07: exp(1/.07) = 1.6e6 > exp(.8/.07) + exp(.6/.07) = 9.4e4 -> class 0;
    # tau = 10: exp(.1) = 1.105 < exp(.08) + exp(.06) = 2.145 -> class 1
    z_tr = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    y_tr = torch.tensor([0, 1, 1])
    z_te, y_te = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy(z_tr, y_tr, z_te, y_te, k=3, temperature=0.07) == 1.0
    assert knn_accuracy(z_tr, y_tr, z_te, y_te, k=3, temperature=10.0) == 0.0
    assert knn_accuracy(z_tr, y_tr, z_te, y_te, k=100, temperature=10.0) == 0.0  # k capped at N_train
    assert knn_accuracy(z_tr, y_tr, z_te, y_te, k=1, temperature=10.0) == 1.0


# ------------------------------------------------------------------------------------ trained encoders


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    return tmp_path


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_encoder_path(outputs):
    smoke = get_profile("smoke")
    assert encoder_path("simclr", smoke, 3) == outputs / "encoders" / "simclr-smoke-seed3.pt"
    assert ENCODER_KINDS == ("simclr", "supervised", "random")


def test_random_encoder_saved_and_loaded(outputs):
    smoke = get_profile("smoke")
    enc = pretrained_encoder("random", "smoke", device="cpu", progress=False)
    path = outputs / "encoders" / "random-smoke-seed0.pt"
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert isinstance(enc, SmallResNet) and not enc.training and enc.history == []
    assert enc.config["widths"] == list(smoke.encoder_widths)
    # the file is plain data: loads without unpickling code
    ckpt = torch.load(path, weights_only=True)
    training = ckpt["config"].pop("training")
    assert ckpt["config"] == {"kind": "random", "profile": "smoke", "image_size": 32, "seed": 0,
                              "encoder": enc.config}
    assert training["epochs"] == 0 and training["n_train"] == smoke.n_train
    assert training["mean"] == list(enc.mean) and training["version"] == ssl.TRAINING_VERSION
    assert ckpt["classes"] == list(SHAPES) and ckpt["history"] == []
    loaded = load_encoder(path)
    assert _state_equal(loaded, enc) and not loaded.training
    # a second call loads the file instead of rebuilding and saving
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssl, "save_checkpoint", lambda *a, **k: pytest.fail("saved again"))
        again = pretrained_encoder("random", smoke, device="cpu", progress=False)
    assert _state_equal(again, enc)
    # the seed is part of the name and of the weights
    other = pretrained_encoder("random", "smoke", seed=1, device="cpu", progress=False)
    assert (outputs / "encoders" / "random-smoke-seed1.pt").is_file()
    assert not _state_equal(other, enc)


def test_load_encoder_checks_config(outputs, capsys):
    pretrained_encoder("random", "smoke", device="cpu", progress=False)
    path = encoder_path("random", get_profile("smoke"))
    config = torch.load(path, weights_only=True)["config"]["encoder"]
    assert load_encoder(path, image_size=32, encoder_config=config).config == config
    with pytest.raises(ValueError, match="image_size"):
        load_encoder(path, image_size=64)
    with pytest.raises(ValueError, match="encoder"):
        load_encoder(path, encoder_config={**config, "widths": [4, 8, 8, 8]})
    # a profile that changed its widths or training settings under the same name finds the old file:
    # it says why and retrains instead of loading a stale encoder
    changed = dataclasses.replace(get_profile("smoke"), encoder_widths=(4, 8, 8, 8))
    rebuilt = pretrained_encoder("random", changed, device="cpu", progress=False)
    assert rebuilt.config["widths"] == [4, 8, 8, 8]
    assert torch.load(path, weights_only=True)["config"]["encoder"]["widths"] == [4, 8, 8, 8]
    capsys.readouterr()
    pretrained_encoder("random", dataclasses.replace(changed, lr=1.0), device="cpu", progress=False)
    assert torch.load(path, weights_only=True)["config"]["training"]["lr"] == 1.0
    # the message names only what changed
    lr = get_profile("smoke").lr
    assert capsys.readouterr().out == (f"retraining random: {path.name} was trained with other settings "
                                       f"(training.lr: {lr!r} -> 1.0)\n")
    with pytest.raises(FileNotFoundError):
        load_encoder(path.with_name("missing.pt"))


def test_unknown_kind(outputs):
    with pytest.raises(ValueError, match="unknown encoder kind"):
        pretrained_encoder("byol", "smoke", device="cpu")
    assert not (outputs / "encoders").exists() or not any((outputs / "encoders").iterdir())


def test_simclr_encoder_trained_once(outputs, monkeypatch):
    smoke = get_profile("smoke")
    steps = []
    enc = pretrained_encoder("simclr", "smoke", device="cpu", progress=False, callback=lambda s, v: steps.append(v))
    path = outputs / "encoders" / "simclr-smoke-seed0.pt"
    assert path.is_file() and not enc.training
    assert len(enc.history) == smoke.ssl_epochs * (smoke.n_train // smoke.batch_size)
    assert enc.history == steps and all(math.isfinite(v) for v in enc.history)
    assert not _state_equal(enc, pretrained_encoder("random", "smoke", device="cpu", progress=False))

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the checkpoint exists")

    monkeypatch.setattr(ssl, "train_simclr", no_training)
    again = pretrained_encoder("simclr", "smoke", device="cpu", progress=False)
    assert _state_equal(again, enc) and again.history == enc.history
    with pytest.raises(AssertionError, match="retrained"):
        pretrained_encoder("simclr", "smoke", device="cpu", progress=False, retrain=True)


def test_training_refuses_normalised_images(scenes):
    images, labels = scenes
    normalised = (images - 0.45) / 0.2
    with pytest.raises(ValueError, match=r"\[0, 1\].*before normalize"):
        train_supervised(_tiny_encoder(), normalised, labels, epochs=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\].*before normalize"):
        train_simclr(_tiny_encoder(), normalised, epochs=1, batch_size=8, progress=False)
