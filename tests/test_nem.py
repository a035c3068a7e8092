"""nemu_lib.nem: the U-net decoder over every encoder, z unchanged, frozen encoder, objectives by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import stray_tensor_guard
from torch import Tensor, nn
from torch.testing import assert_close

from nemu_lib.encoders import SmallResNet, build_encoder
from nemu_lib.metrics import pearson
from nemu_lib.nem import (
    NEMU,
    UNetDecoder,
    amortised_relax_loss,
    build_objective,
    complement_similarity,
    cos_distance,
    encoder_fingerprint,
    mask_quality,
    multiply_adds,
    nem_contrastive_loss,
    nem_loss,
    standardize,
    summarize_quality,
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
    assert set(stats) == set(obj.stat_names) == {"spread", "masked_sim"}


def test_relax_targets_are_per_image_z_scores_and_their_minimiser_is_relax_in_those_units():
    """The importance head's optimum is (R − mean s) / std s per image: RELAX's map up to an affine map."""
    model = NEMU(_small(), uncertainty=True)
    x = torch.randn(2, 3, 32, 32)
    obj = build_objective("relax", n_masks=6)
    masks, s = obj.similarities(model, x, model.encoder(x), torch.Generator().manual_seed(3))
    t = standardize(s)
    assert_close(t.mean(1), torch.zeros(2), atol=1e-4, rtol=0)
    assert_close(t.std(1), torch.ones(2), atol=1e-3, rtol=0)
    w = masks.sum(1)  # (B, H, W)
    relax_map = (masks * s[:, :, None, None]).sum(1) / w  # RELAX's importance from these K masks
    e_star = ((masks * t[:, :, None, None]).sum(1) / w)[:, None].requires_grad_(True)  # ... from the z-scores
    g, = torch.autograd.grad(amortised_relax_loss(e_star, None, masks, t)[0], e_star)
    assert_close(g, torch.zeros_like(g), atol=1e-6, rtol=0)
    affine = (relax_map - s.mean(1)[:, None, None]) / (s.std(1)[:, None, None] + 1e-6)
    assert_close(e_star.detach()[:, 0], affine, atol=1e-3, rtol=1e-4)
    assert (pearson(e_star.detach()[:, 0], relax_map) > 1 - 1e-5).all()


def test_relax_objective_trains_from_the_default_heads():
    """No sigmoid while training: the loss at e = 0, ℓ = 0 is Σ M t² / Σ M (about 1) plus 0."""
    model = NEMU(_small(), uncertainty=True)
    torch.nn.init.zeros_(model.decoder.head.weight)
    torch.nn.init.zeros_(model.decoder.head.bias)
    x = torch.randn(3, 3, 32, 32)
    obj = build_objective("relax", n_masks=8)
    loss, stats = obj(model, x, torch.Generator().manual_seed(0))
    masks, s = obj.similarities(model, x, model.encoder(x), torch.Generator().manual_seed(0))
    expected = 2 * ((masks * standardize(s)[:, :, None, None] ** 2).sum(1) / masks.sum(1)).mean()
    assert_close(loss, expected)
    assert stats["spread"] == 0


def test_relax_objective_needs_two_masks():
    with pytest.raises(ValueError, match="n_masks must be >= 2"):
        build_objective("relax", n_masks=1)


def test_unknown_objective():
    with pytest.raises(ValueError, match="choose one of"):
        build_objective("nemx")


# ------------------------------------------------------------------------------- cost and mask quality

def test_multiply_adds_of_the_decoder_by_hand():
    """Smoke-sized small ResNet at 32 px: the decoder's convolutions, layer by layer (C_in C_out k² H W)."""
    model = NEMU(_small())
    enc, dec = multiply_adds(model, torch.randn(2, 3, 32, 32))
    by_hand = (64 * 16 * 1 * 2 * 2  # bottleneck 1x1, 64 -> 16 at stride 16 (2 x 2)
               + 48 * 8 * 9 * 4 * 4 + 8 * 8 * 9 * 4 * 4  # block 1 at stride 8 (4 x 4): (16 up + 32 skip) -> 8, 8 -> 8
               + 24 * 8 * 9 * 8 * 8 + 8 * 8 * 9 * 8 * 8  # block 0 at stride 4 (8 x 8): (8 up + 16 skip) -> 8, 8 -> 8
               + 8 * 1 * 1 * 8 * 8)  # head 1x1, 8 -> 1 at stride 4
    assert dec == by_hand == 216_576


def test_multiply_adds_of_the_encoder_equal_its_layers():
    """Every Conv2d and Linear of the encoder, counted from its output's size with forward hooks."""
    encoder = _small()
    total = []

    def hook(module: nn.Module, _, out: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total.append(module.in_channels // module.groups * k * out[0].numel())
        elif isinstance(module, nn.Linear):
            total.append(module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        encoder(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    enc, _ = multiply_adds(NEMU(encoder), torch.randn(3, 3, 32, 32))
    assert enc == sum(total) > 0


class _ColumnSums(nn.Module):
    """f(x) = (Σ of channel 1 over the left column, Σ over the right column), for 2 x 2 images."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 1].sum(1)  # (B, 2): one sum per column


class _MaskInChannel0(nn.Module):
    """A stand-in for NEMU: the mask of an image is its channel 0."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _ColumnSums()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x), x[:, :1]


def _two_scenes() -> tuple[Tensor, Tensor]:
    """Image 0 keeps its left column, image 1 everything; objects: image 0's left column, image 1's top left."""
    x = torch.ones(2, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    obj = torch.tensor([[[True, False], [True, False]], [[True, False], [False, False]]])
    return x, obj


@pytest.mark.parametrize("batch_size", [1, 64])
def test_mask_quality_by_hand(batch_size):
    x, obj = _two_scenes()
    q = mask_quality(_MaskInChannel0(), x, obj, batch_size=batch_size)
    r = 1 / math.sqrt(2)  # cos((2, 2), (2, 0))
    expected = {"sim": [r, 1.0],  # image 0 keeps (2, 0) of (2, 2); image 1 keeps all
                "sim_control": [1.0, r],  # image 0 gets image 1's full mask, image 1 gets image 0's
                "area": [0.5, 1.0],
                "inside": [1.0, 1.0], "outside": [0.0, 1.0],
                "mass_share": [1.0, 0.25], "object_share": [0.5, 0.25]}
    assert set(q) == set(expected)
    for k, v in expected.items():
        assert_close(q[k], torch.tensor(v, dtype=torch.float64), msg=k)
    s = summarize_quality(q)
    assert s["inside_over_outside"] == pytest.approx(1.0 / 0.5)
    assert s["mass_share_over_chance"] == pytest.approx(0.625 / 0.375)
    assert s["control_gap"] == pytest.approx(0.0, abs=1e-7)  # (r - 1 + 1 - r) / 2
    assert s["control_wins"] == 0.5  # image 1 only
    assert s["sim"] == pytest.approx((r + 1) / 2)
    # (B, 1, H, W) float object masks give the same
    q1 = mask_quality(_MaskInChannel0(), x, obj[:, None].float(), batch_size=batch_size)
    assert all(torch.equal(q1[k], q[k]) for k in q)


def test_complement_similarity_by_hand():
    x, _ = _two_scenes()
    # image 0: 1 - m keeps the right column, (0, 2) against (2, 2); image 1: 1 - m = 0, f = (0, 0): cosine 0
    sims = complement_similarity(_MaskInChannel0(), x, batch_size=1)
    assert_close(sims, torch.tensor([1 / math.sqrt(2), 0.0], dtype=torch.float64))


def test_mask_quality_of_a_real_model_is_independent_of_the_batch_size():
    model = NEMU(_small())
    x, obj = torch.randn(5, 3, 32, 32), torch.rand(5, 32, 32) > 0.7
    a, b = mask_quality(model, x, obj, batch_size=2), mask_quality(model, x, obj, batch_size=5)
    for k in a:
        assert a[k].shape == (5,) and a[k].dtype == torch.float64
        assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert ((a["area"] > 0) & (a["area"] < 1)).all()


def test_mask_quality_complement_and_cost_keep_to_the_device_of_x(device):
    model = NEMU(_small()).to(device)
    x, obj = torch.randn(3, 3, 32, 32).to(device), (torch.rand(3, 32, 32) > 0.7).to(device)
    with stray_tensor_guard():
        q = mask_quality(model, x, obj, batch_size=2)
        comp = complement_similarity(model, x, batch_size=2)
        enc, dec = multiply_adds(model, x)
    for v in (*q.values(), comp):  # documented: float64 on the CPU
        assert v.device.type == "cpu" and v.dtype == torch.float64 and v.shape == (3,)
    assert enc > dec > 0


# ------------------------------------------------------------------------- levels from the given strides

# UNetDecoder(SmallResNet().feature_channels, .feature_strides) recorded before the decoder learned single-stride
# pyramids: checkpoints of CNN decoders must keep loading, so names, shapes and counts must not change.
_SMALL_RESNET_DECODER = [
    ("bottleneck.0.weight", (32, 256, 1, 1)), ("bottleneck.1.weight", (32,)), ("bottleneck.1.bias", (32,)),
    ("blocks.0.0.weight", (16, 96, 3, 3)), ("blocks.0.1.weight", (16,)), ("blocks.0.1.bias", (16,)),
    ("blocks.0.3.weight", (16, 16, 3, 3)), ("blocks.0.4.weight", (16,)), ("blocks.0.4.bias", (16,)),
    ("blocks.1.0.weight", (32, 160, 3, 3)), ("blocks.1.1.weight", (32,)), ("blocks.1.1.bias", (32,)),
    ("blocks.1.3.weight", (32, 32, 3, 3)), ("blocks.1.4.weight", (32,)), ("blocks.1.4.bias", (32,)),
    ("head.weight", (1, 16, 1, 1)), ("head.bias", (1,)),
]
_RECORDED_COUNTS = {  # (channels, strides, out_channels, min_stride): (parameters, state-dict entries)
    ((16, 32, 64, 128, 256), (1, 2, 4, 8, 16), 1, 4): (79889, 17),
    ((16, 32, 64, 128, 256), (1, 2, 4, 8, 16), 1, 3): (79889, 17),
    ((16, 32, 64, 128, 256), (1, 2, 4, 8, 16), 1, 1): (86281, 29),
    ((64, 64, 128, 256, 512), (2, 4, 8, 16, 32), 1, 4): (180369, 23),
    ((64, 64, 128, 256, 512), (2, 4, 8, 16, 32), 2, 4): (180386, 23),
    ((64, 64, 128, 256, 512), (2, 4, 8, 16, 32), 2, 2): (194274, 29),
}


def test_cnn_decoders_are_unchanged():
    enc = SmallResNet()
    decoder = UNetDecoder(enc.feature_channels, enc.feature_strides)
    assert [(k, tuple(v.shape)) for k, v in decoder.state_dict().items()] == _SMALL_RESNET_DECODER
    for (channels, strides, out, min_stride), (n_params, n_entries) in _RECORDED_COUNTS.items():
        decoder = UNetDecoder(channels, strides, out, min_stride=min_stride)
        assert len(decoder.up) == 0
        assert sum(p.numel() for p in decoder.parameters()) == n_params
        assert len(decoder.state_dict()) == n_entries


@pytest.mark.parametrize(("stride", "min_stride", "n_up"), [(8, 4, 1), (16, 4, 2), (16, 16, 0), (8, 3, 1), (14, 4, 1)])
def test_decoder_of_a_single_stride_pyramid_upsamples_to_min_stride(stride, min_stride, n_up):
    """A ViT's taps all have stride p: ×2 levels without skips take the head down to about ``min_stride``."""
    torch.manual_seed(0)
    decoder = UNetDecoder((64, 64, 64), (stride,) * 3, min_stride=min_stride)
    assert decoder.first == 0 and len(decoder.blocks) == 2 and len(decoder.up) == n_up
    maps = [torch.randn(2, 64, 4, 6) for _ in range(3)]
    size = (4 * stride, 6 * stride)
    own = (4 * 2**n_up, 6 * 2**n_up)  # the head's resolution, stride / 2^n_up
    with torch.no_grad():
        logits = decoder(maps, own)
        assert logits.shape == (2, 1, *own)
        expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        assert_close(decoder(maps, size), expected)
