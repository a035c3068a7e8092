"""nemu_lib.nem: the U-net decoder over every encoder, z unchanged, frozen encoder, objectives by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nemu_lib.encoders import SmallResNet, build_encoder
from nemu_lib.nem import (
    NEMU,
    amortised_relax_loss,
    build_objective,
    cos_distance,
    encoder_fingerprint,
    nem_contrastive_loss,
    nem_loss,
)


def _small(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet(widths=(8, 16, 32, 64)).eval()


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 40), (17, 16)])
def test_small_resnet_any_size_gives_mask_at_input_resolution(size):
    encoder = _small()
    model = NEMU(encoder)
    x = torch.randn(2, 3, *size)
    z, m = model(x)
    assert m.shape == (2, 1, *size) and z.shape == (2, 64)
    assert torch.equal(z, encoder(x))  # the representation is the encoder's, exactly
    assert ((m >= 0) & (m <= 1)).all()


@pytest.mark.parametrize(("arch", "size"), [("resnet18", (64, 64)), ("resnet18", (65, 97)), ("resnet50", (33, 40))])
def test_torchvision_encoders(arch, size):
    torch.manual_seed(0)
    encoder = build_encoder(arch).eval()
    model = NEMU(encoder, uncertainty=True, max_width=64)
    x = torch.randn(1, 3, *size)
    z, m, u = model.explain(x)
    assert m.shape == u.shape == (1, 1, *size)
    assert torch.equal(z, encoder(x)) and (u > 0).all()


@pytest.mark.parametrize(("min_stride", "first_stride"), [(1, 1), (2, 2), (3, 4), (4, 4), (16, 16), (64, 16)])
def test_min_stride_picks_the_finest_tap_and_the_mask_is_its_upsampled_logits(min_stride, first_stride):
    encoder = _small()  # taps at strides 1, 2, 4, 8, 16
    model = NEMU(encoder, min_stride=min_stride)
    assert encoder.feature_strides[model.decoder.first] == first_stride
    assert len(model.decoder.blocks) == len(encoder.feature_strides) - 1 - model.decoder.first
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = encoder.features(x)
        logits = model.decoder(maps, (32 // first_stride,) * 2)  # the head's own resolution: no upsampling
        expected = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).sigmoid()
        assert_close(model(x)[1], expected)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 16x16"):
        NEMU(_small())(torch.randn(1, 3, 8, 8))


def test_encoder_is_frozen_and_stays_in_eval_mode():
    model = NEMU(_small())
    model.train()
    assert model.decoder.training and not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


@pytest.mark.parametrize("objective", ["nem", "nem-contrastive", "relax"])
def test_gradients_reach_only_the_decoder(objective):
    model = NEMU(_small(), uncertainty=objective == "relax")
    obj = build_objective(objective)
    loss, stats = obj(model.train(), torch.randn(2, 3, 32, 32), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.decoder.parameters())
    assert math.isfinite(loss.item()) and 0 <= stats[obj.stat_names[0]] <= 1  # mask area or mean importance


def test_fingerprint_tells_weights_apart():
    a, b = _small(0), _small(1)
    assert encoder_fingerprint(a) == encoder_fingerprint(_small(0))
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
    assert NEMU(a).config["encoder_fingerprint"] == encoder_fingerprint(a)


# --------------------------------------------------------------------------------- objectives by hand

def test_cos_distance_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert_close(cos_distance(a, b), torch.tensor([0.0, 0.5, 1.0]))


def test_nem_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_keep = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # d = 0.5 and 0
    m = torch.tensor([0.25, 0.75, 0.5, 0.5]).view(1, 1, 2, 2).expand(2, 1, 2, 2)  # mean 0.5
    # alpha 4, beta 0.5: image 1: 4 * 0.5 + 0.25 = 2.25; image 2: 0 + 0.25; mean 1.25
    assert_close(nem_loss(z, z_keep, m), torch.tensor(1.25))
    assert_close(nem_loss(z, z_keep, m, alpha=1.0, beta=0.0), torch.tensor(0.25))


def test_nem_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    z_keep = torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt2: d_keep = (1 - 0.7071) / 2
    z_drop = torch.tensor([[-1.0, -1.0]])  # opposite of z_keep: d = 1
    m = torch.full((1, 1, 2, 2), 0.2)
    d_keep = (1 - 1 / math.sqrt(2)) / 2
    expected = 0.5 * 0.2 + 4 * d_keep - 1.0 * (d_keep + 0.01)
    assert_close(nem_contrastive_loss(z, z_keep, z_drop, m), torch.tensor(expected))


def test_amortised_relax_loss_by_hand_and_its_minimiser():
    masks = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])  # (B=1, K=2, H=1, W=2)
    s = torch.tensor([[0.2, 0.6]])
    e = torch.tensor([[[[0.5, 0.5]]]])
    log_var = torch.zeros(1, 1, 1, 2)
    loss_e, loss_v = amortised_relax_loss(e, log_var, masks, s)
    # pixel 0: masks 1, 1: ((0.5-0.2)^2 + (0.5-0.6)^2) / 2 = 0.05; pixel 1: mask 0, 1: (0.5-0.6)^2 / 1 = 0.01
    assert_close(loss_e, torch.tensor((0.05 + 0.01) / 2))
    # with log_var 0: Σ M (s - e)² / Σ M + 0: the same numbers
    assert_close(loss_v, torch.tensor((0.05 + 0.01) / 2))
    # the minimisers are RELAX's importance Σ M s / Σ M and uncertainty Σ M (s - R)² / Σ M
    e_star = torch.tensor([[[[0.4, 0.6]]]])
    var_star = torch.tensor([[[[0.04, 0.0]]]])  # pixel 0: ((0.2-0.4)² + (0.6-0.4)²) / 2
    e_opt = e_star.clone().requires_grad_(True)
    g_e, = torch.autograd.grad(amortised_relax_loss(e_opt, None, masks, s)[0], e_opt)
    assert_close(g_e, torch.zeros_like(g_e), atol=1e-7, rtol=0)
    lv = torch.log(var_star[..., :1]).requires_grad_(True)  # pixel 0 only (pixel 1 has zero variance)
    g_v, = torch.autograd.grad(amortised_relax_loss(e_star[..., :1], lv, masks[..., :1], s)[1], lv)
    assert_close(g_v, torch.zeros_like(g_v), atol=1e-6, rtol=0)


def test_relax_objective_uses_the_relax_similarities():
    """The targets are cos(f(x), f(x ⊙ M)) for random masks: below the unmasked similarity 1."""
    model = NEMU(_small(), uncertainty=True)
    x = torch.randn(2, 3, 32, 32)
    obj = build_objective("relax", n_masks=4)
    _, stats = obj(model, x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.encoder(x)
    assert -1 <= stats["masked_sim"] < F.cosine_similarity(z, z).mean() - 1e-4
    assert set(stats) == set(obj.stat_names) == {"importance", "masked_sim"}


def test_relax_prepare_starts_the_heads_at_the_similarity_level():
    """prepare(): bias = (logit(mean s_k), log(mean within-image var s_k)) over the K random masked copies."""
    model = NEMU(_small(), uncertainty=True)
    x = torch.randn(3, 3, 32, 32)
    obj = build_objective("relax", n_masks=5)
    obj.prepare(model, x, torch.Generator().manual_seed(7))
    masks, s = obj.similarities(model, x, model.encoder(x), torch.Generator().manual_seed(7))  # the same draw
    assert masks.shape == (3, 5, 32, 32) and s.shape == (3, 5)
    within = sum(((row - row.mean()) ** 2).sum() / (len(row) - 1) for row in s) / len(s)  # by hand, per image
    expected = torch.stack([torch.logit(s.mean()), torch.log(within)])
    assert within < s.var()  # the pooled variance adds the spread of the images' means
    assert_close(model.decoder.head.bias.detach(), expected)
    # one head (no uncertainty): only the importance bias
    plain = NEMU(_small())
    obj.prepare(plain, x, torch.Generator().manual_seed(7))
    assert_close(plain.decoder.head.bias.detach(), expected[:1])


def test_nem_prepare_changes_nothing():
    model = NEMU(_small())
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    build_objective("nem").prepare(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.decoder.state_dict().items())


def test_unknown_objective():
    with pytest.raises(ValueError, match="choose one of"):
        build_objective("nemx")
