"""nemu_lib.explainer: the ICNN templates and filter loss against loops over the formulas, the template mask, the
explainer's shapes and frozen performer, training (lower loss, exact resume, checkpoints, errors), bf16 / fp16
autocast, devices, explain_parts and PartUnits for dissection."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import stray_tensor_guard
from torch import Tensor
from torch.testing import assert_close

from nemu_lib import config
from nemu_lib import explainer as explainer_module
from nemu_lib.checkpoint import load_checkpoint
from nemu_lib.data import concept_masks, load_split, normalize
from nemu_lib.dissection import dissect
from nemu_lib.encoders import SmallResNet, TorchvisionResNet
from nemu_lib.explainer import (
    Explainer,
    ExplainerConfig,
    PartUnits,
    explain_parts,
    explainer_loss,
    filter_loss,
    load_explainer,
    mask_at_peak,
    template_log_priors,
    templates,
    train_explainer,
)
from nemu_lib.train import CHECKPOINT

BETA = 4.0


# ------------------------------------------------------------------------------------------- references


def _templates_ref(h: int, w: int) -> np.ndarray:
    """The ICNN templates by a loop over the formula: ``(h w + 1, h, w)`` float64, row-major µ, negative last."""
    n, tau = max(h, w), 0.5 / (h * w)
    out = np.empty((h * w + 1, h, w))
    for mu, (mi, mj) in enumerate(itertools.product(range(h), range(w))):
        for i, j in itertools.product(range(h), range(w)):
            out[mu, i, j] = tau * max(1 - BETA * (abs(i - mi) + abs(j - mj)) / n, -1)
    out[-1] = -tau
    return out


def _filter_loss_ref(x: np.ndarray) -> np.ndarray:
    """``−MI(X; T)`` per filter of ``x (B, F, h, w)`` by loops, in float64."""
    b, f, h, w = x.shape
    t = _templates_ref(h, w)
    n_pos = h * w
    alpha = n_pos / (1 + n_pos)
    prior = np.array([alpha / n_pos] * n_pos + [1 - alpha])
    out = np.empty(f)
    for k in range(f):
        p_x_t = np.empty((b, len(t)))  # p(x | T), normalised over the batch
        for ti in range(len(t)):
            scores = np.array([(x[bi, k] * t[ti]).sum() for bi in range(b)])
            e = np.exp(scores - scores.max())
            p_x_t[:, ti] = e / e.sum()
        p_x = np.array([sum(prior[ti] * p_x_t[bi, ti] for ti in range(len(t))) for bi in range(b)])
        mi = 0.0
        for ti in range(len(t)):
            for bi in range(b):
                mi += prior[ti] * p_x_t[bi, ti] * math.log(p_x_t[bi, ti] / p_x[bi])
        out[k] = -mi
    return out


def _encoder(seed: int = 0) -> SmallResNet:
    """A random small ResNet whose BatchNorm statistics are those of random images: its maps are O(1), as a
    trained encoder's are (with the default statistics they shrink ~10x per stage, and fp16 steps overflow)."""
    torch.manual_seed(seed)
    encoder = SmallResNet(widths=(4, 8, 8, 8))
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # a cumulative average: one pass sets the statistics of the batch
    with torch.no_grad():
        encoder.train()(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed)))
    for m in bns:
        m.momentum = 0.1
    return encoder.eval()


def _explainer(encoder: SmallResNet, seed: int = 1, **kwargs) -> Explainer:
    torch.manual_seed(seed)
    return Explainer(encoder, **kwargs)


def _images(n: int = 4, size: int = 32, seed: int = 2) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _scenes(n: int = 64) -> dict[str, Tensor]:
    s = load_split("train", "smoke")  # 128 scenes of 32 px, cached: read only
    return {"x": normalize(s["image"][:n]), "labels": concept_masks(s["concepts"][:n])}


def _snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


CFG = ExplainerConfig(steps=6, batch_size=8, lr=1e-2)


# ------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(("h", "w"), [(3, 3), (4, 4), (5, 5), (3, 5), (6, 4)])
def test_templates_match_the_formula(h, w):
    t = templates(h, w)
    assert t.shape == (h * w + 1, h, w) and t.dtype == torch.float32
    assert_close(t.double(), torch.from_numpy(_templates_ref(h, w)), atol=1e-9, rtol=1e-6)
    tau = 0.5 / (h * w)
    for mu, (i, j) in enumerate(itertools.product(range(h), range(w))):  # the maximum τ sits at µ
        assert t[mu, i, j].item() == pytest.approx(tau) and t[mu].max().item() == pytest.approx(tau)
        assert (t[mu] >= -tau - 1e-9).all()
    assert torch.equal(t[-1], torch.full((h, w), -tau))


def test_templates_known_entries_of_a_4x4_map():
    """n = 4, τ = 1/32: one step away 1 − 4/4 = 0, two steps or more clamp at −1."""
    t = templates(4, 4)
    tau = 1 / 32
    mu = 1 * 4 + 2  # µ = (1, 2)
    assert t[mu, 1, 2].item() == tau
    assert t[mu, 0, 2].item() == 0 and t[mu, 1, 3].item() == 0
    assert t[mu, 3, 0].item() == -tau and t[mu, 0, 0].item() == -tau


@pytest.mark.parametrize(("h", "w"), [(2, 2), (2, 5), (5, 2), (1, 8)])
def test_templates_refuse_maps_smaller_than_3x3(h, w):
    with pytest.raises(ValueError, match="too small"):
        templates(h, w)


@pytest.mark.parametrize("n", [9, 16, 49])
def test_template_priors(n):
    log_p = template_log_priors(n)
    assert log_p.shape == (n + 1,) and log_p.dtype == torch.float32
    p = log_p.double().exp()
    assert p.sum().item() == pytest.approx(1, abs=1e-6)
    alpha = n / (1 + n)
    assert_close(p[:-1], torch.full((n,), alpha / n, dtype=torch.float64), atol=1e-7, rtol=1e-6)
    assert p[-1].item() == pytest.approx(1 - alpha, rel=1e-6)


# ------------------------------------------------------------------------------------------- filter loss


def test_filter_loss_equals_a_loop_over_the_formula():
    x = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 20  # scores of a few units
    loss = filter_loss(x)
    assert loss.shape == (2,) and loss.dtype == torch.float32
    ref = torch.from_numpy(_filter_loss_ref(x.double().numpy()))
    assert (ref.abs() > 1e-3).all()  # not the trivial 0
    assert_close(loss.double(), ref, atol=1e-6, rtol=1e-4)


def test_filter_loss_equals_the_loop_on_a_non_square_map():
    x = torch.rand(4, 1, 3, 5, generator=torch.Generator().manual_seed(1)) * 30
    assert_close(filter_loss(x).double(), torch.from_numpy(_filter_loss_ref(x.double().numpy())), atol=1e-6,
                 rtol=1e-4)


def _peaked_and_diffuse(b: int = 5, n: int = 5, peak: float = 200.0) -> tuple[Tensor, Tensor]:
    """Maps ``(b, 1, n, n)`` each with one peak at a different position, and uniform maps of the same mass."""
    peaked = torch.zeros(b, 1, n, n)
    for k, (i, j) in enumerate([(0, 0), (4, 4), (2, 2), (0, 4), (4, 0)][:b]):
        peaked[k, 0, i, j] = peak
    return peaked, torch.full((b, 1, n, n), peak / (n * n))


def test_filter_loss_rewards_one_sharp_peak_per_image():
    peaked, diffuse = _peaked_and_diffuse()
    lp, ld = filter_loss(peaked), filter_loss(diffuse)
    assert ld.abs().item() < 1e-6  # identical maps: p(x | T) = 1/B for every T, MI = 0
    assert lp.item() < -0.5  # distinct peaks: the templates tell the images apart
    assert_close(lp.double(), torch.from_numpy(_filter_loss_ref(peaked.double().numpy())), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_filter_loss_bounds_and_batch_permutation(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 6, 4
    x = torch.rand(b, 3, n, n, generator=g) ** 4 * 300  # a few strong units
    loss = filter_loss(x)
    bound = min(math.log(n * n + 1), math.log(b))  # H(T) of the uniform prior, log B
    assert (loss <= 1e-6).all() and (loss >= -bound - 1e-5).all()
    assert loss.min().item() < -0.1  # not all near 0: the bounds are not met trivially
    perm = torch.randperm(b, generator=g)
    assert_close(filter_loss(x[perm]), loss, atol=1e-6, rtol=1e-5)
    assert_close(filter_loss(x[:, [2, 0, 1]]), loss[[2, 0, 1]])  # per filter


def test_filter_loss_of_huge_peaks_is_its_hard_assignment_limit():
    """As the peaks grow, p(x | T) tends to the uniform share of the images that score highest under T (ties
    shared): −MI of that limit, computed from the templates' values at the peaks, is the known answer."""
    peaked, _ = _peaked_and_diffuse(peak=2000.0)  # nearest score gaps 2000 τ β / n = 32: e^-32 is 0 in float32
    t = _templates_ref(5, 5)
    scores = np.array([[(peaked[b, 0].double().numpy() * tt).sum() for b in range(5)] for tt in t])  # (T, B)
    p_x_t = (scores == scores.max(axis=1, keepdims=True)).astype(float)
    p_x_t /= p_x_t.sum(axis=1, keepdims=True)
    prior = np.full(len(t), 1 / len(t))  # α / (h w) = 1 − α = 1 / (h w + 1)
    p_x = prior @ p_x_t
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.nansum(prior[:, None] * p_x_t * np.log(p_x_t / p_x[None]))
    assert 0.5 < mi <= math.log(5)
    assert filter_loss(peaked).item() == pytest.approx(-mi, abs=1e-5)


def test_filter_loss_under_bf16_autocast_and_gradients():
    x = (torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 50).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = filter_loss(x.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert_close(low, filter_loss(x).detach(), atol=0.02, rtol=0.05)  # bf16 inputs: ~3 digits
    filter_loss(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_filter_loss_scores_stay_float32_under_autocast():
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 50  # float32 maps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = filter_loss(x)
    assert_close(low, filter_loss(x), atol=1e-5, rtol=1e-5)


def test_filter_loss_needs_4d_maps():
    with pytest.raises(ValueError, match=r"\(B, F, h, w\)"):
        filter_loss(torch.rand(2, 4, 4))


# ------------------------------------------------------------------------------------------- mask_at_peak


def test_mask_at_peak_is_the_relu_of_the_map_times_its_peaks_template():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, 5, generator=g).relu()  # ReLU'd maps, as the explainer feeds it
    out = mask_at_peak(x)
    assert out.shape == x.shape
    t = torch.from_numpy(_templates_ref(4, 5)).float() / (0.5 / 20)  # T / tau: 1 at the peak
    for b, f in itertools.product(range(3), range(2)):
        peak = int(x[b, f].argmax())
        i, j = divmod(peak, 5)
        assert_close(out[b, f], torch.relu(x[b, f] * t[peak]))
        assert out[b, f, i, j].item() == pytest.approx(x[b, f, i, j].item())  # kept as it is at the peak
        assert (out[b, f][t[peak] < 0] == 0).all() and (out[b, f][t[peak] > 0] > 0).any()  # suppressed far away
    signed = torch.randn(3, 2, 4, 5, generator=g)  # the formula holds for any sign
    t_peak = t[signed.reshape(3, 2, 20).argmax(-1)]
    assert_close(mask_at_peak(signed), torch.relu(signed * t_peak))


def test_mask_at_peak_does_not_differentiate_the_peak_choice():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) - 0.3
    x.requires_grad_()
    mask_at_peak(x).sum().backward()
    t = torch.from_numpy(_templates_ref(4, 4)).float() / (0.5 / 16)  # T / tau
    peaks = x.detach().reshape(2, 3, 16).argmax(-1)
    expected = torch.stack([torch.stack([t[peaks[b, f]] * (x[b, f] * t[peaks[b, f]] > 0) for f in range(3)])
                            for b in range(2)])
    assert_close(x.grad, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- the explainer


def test_explainer_rejects_bad_layers_and_depths():
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"unknown layer 'nope'.*stem.*stage4"):
        Explainer(encoder, "nope")
    with pytest.raises(ValueError, match="depth must be 1 or 2"):
        Explainer(encoder, depth=3)
    assert Explainer(encoder).layer_name == "stage3"  # the default: the last but one map


@pytest.mark.parametrize(("layer", "depth"), [("stage3", 1), ("stage2", 2)])
def test_explainer_output_shapes(layer, depth):
    encoder, x = _encoder(), _images(3)
    ex = _explainer(encoder, layer=layer, depth=depth)
    out = ex(x)
    z, maps = encoder.forward_features(x)
    tap = ex.layer
    assert torch.equal(out.z, z) and out.z_hat.shape == z.shape == (3, 8)
    assert len(out.targets) == len(out.recons) == 5 - ex.target
    for t, r, m in zip(out.targets, out.recons, maps[ex.target:], strict=True):
        assert torch.equal(t, m) and r.shape == t.shape
    assert out.p.shape == (3,) and ((out.p > 0) & (out.p < 1)).all()
    assert torch.equal(out.p, torch.full((3,), 0.5))  # the gate starts at zero: p = σ(0)
    assert len(out.activations) == depth
    h = 32 // encoder.feature_strides[tap]
    assert all(a.shape == (3, ex.filters, h, h) and (a >= 0).all() for a in out.activations)
    assert out.parts is out.activations[-1]
    z_hat, recons = encoder.forward_from(ex.target, out.recons[0])  # ẑ runs through the performer's own stages
    assert torch.equal(out.z_hat, z_hat) and all(torch.equal(a, b) for a, b in zip(recons, out.recons, strict=True))


def test_explainer_on_a_torchvision_resnet():
    torch.manual_seed(0)
    encoder = TorchvisionResNet("resnet18").eval()
    ex = _explainer(encoder, filters=16, hidden=32)
    x = _images(2, size=64)
    out = ex(x)
    assert ex.layer_name == "layer3" and ex.decoder[0].out_channels == 32
    assert torch.equal(out.z, encoder(x)) and out.parts.shape == (2, 16, 4, 4)
    assert out.recons[0].shape == out.targets[0].shape == (2, 512, 2, 2)
    z_hat, _ = encoder.forward_from(4, out.recons[0])
    assert torch.equal(out.z_hat, z_hat)
    loss, _ = explainer_loss(out)
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters()) and ex.decoder[0].weight.grad.abs().sum() > 0


def test_explainer_filters_and_hidden_widths():
    ex = _explainer(_encoder(), filters=5, hidden=6)
    out = ex(_images(2))
    assert out.parts.shape == (2, 5, 4, 4) and ex.decoder[0].out_channels == 6 and ex.ordinary.out_channels == 5


def test_trainable_is_the_explainer_without_its_performer():
    encoder = _encoder()
    ex = _explainer(encoder, depth=2)
    own = {id(p) for p in ex.trainable()}
    performer = {id(p) for p in encoder.parameters()}
    assert not own & performer
    assert own | performer == {id(p) for p in ex.parameters()}
    assert all(p.requires_grad for p in ex.trainable()) and not any(p.requires_grad for p in encoder.parameters())
    ex.train()
    assert ex.training and not encoder.training  # the performer stays in eval mode


def test_explainer_on_the_last_tap_reconstructs_the_tap_itself():
    encoder, x = _encoder(), _images(2, size=64)
    ex = _explainer(encoder, layer=-1)
    assert ex.layer == ex.target == 4 and ex.layer_name == "stage4"
    out = ex(x)
    assert len(out.targets) == 1 and torch.equal(out.targets[0], encoder.features(x)[4])
    assert out.recons[0].shape == (2, 8, 4, 4) and out.parts.shape == (2, 8, 4, 4)
    assert torch.equal(out.z_hat, out.recons[0].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="too small"):  # 32 px: stage 4 is 2 x 2
        ex(_images(2, size=32))


def test_explain_maps_mixes_the_normalised_tracks_by_the_gate():
    encoder = _encoder()
    ex = _explainer(encoder, depth=2)
    with torch.no_grad():
        ex.gate.weight.normal_(generator=torch.Generator().manual_seed(3))
        ex.gate.bias.fill_(0.3)
    tap = encoder.features(_images(3))[ex.layer]
    with torch.no_grad():
        x_enc, p, acts = ex.explain_maps(tap)
        a1 = torch.relu(ex.interpretable[0](tap))
        a2 = torch.relu(ex.interpretable[1](mask_at_peak(a1)))
        ordinary = torch.relu(ex.ordinary(tap))
        p_ref = torch.sigmoid(tap.mean(dim=(2, 3)) @ ex.gate.weight[0] + 0.3)

        def norm(a: Tensor) -> Tensor:
            return a / (a.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)

        mix = p_ref[:, None, None, None]
        expected = mix * norm(mask_at_peak(a2)) + (1 - mix) * norm(ordinary)
        assert_close(p, p_ref)
        assert_close(acts[0], a1)
        assert_close(acts[1], a2)
        assert_close(x_enc, expected)
        assert not torch.allclose(p, torch.full_like(p, 0.5), atol=1e-3)  # the gate is really in use
        ex.ordinary.weight.mul_(7)  # the norm layer makes the ordinary track's scale irrelevant
        ex.ordinary.bias.mul_(7)
        assert_close(ex.explain_maps(tap)[0], x_enc, atol=1e-4, rtol=1e-4)


def test_explainer_loss_equals_its_terms():
    ex = _explainer(_encoder(), layer="stage2", depth=2)
    with torch.no_grad():  # strong filters: a filter loss well away from 0
        for conv in ex.interpretable:
            conv.weight.mul_(100)
    out = ex(_images(4))
    loss, stats = explainer_loss(out, filter_weight=3.0, prior_weight=0.5)
    recon = sum(((r - t) ** 2).sum() / (t**2).sum() for r, t in zip(out.recons, out.targets, strict=True)) / 2
    filt = (filter_loss(out.activations[0]).mean() + filter_loss(out.activations[1]).mean()) / 2
    prior = -out.p.log().mean()
    assert_close(stats["recon"], recon.detach())
    assert_close(stats["filter"], filt.detach())
    assert stats["filter"].item() < -0.01
    assert_close(stats["p"], torch.tensor(0.5))
    assert_close(loss, recon + 3.0 * filt + 0.5 * prior)
    assert prior.item() == pytest.approx(math.log(2))
    loss.backward()
    assert ex.gate.weight.grad is not None and ex.interpretable[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- training


def test_training_lowers_the_reconstruction_and_leaves_the_performer_untouched(tmp_path):
    data, encoder = _scenes(64), _encoder()
    before = _snapshot(encoder)  # weights and BatchNorm statistics
    ex = _explainer(encoder)
    modes = []
    encoder.stages[0].register_forward_pre_hook(lambda m, _: modes.append(m.training))
    h = train_explainer(ex, data["x"], ExplainerConfig(steps=40, batch_size=16, lr=1e-2), tmp_path, progress=False)
    assert h["step"] == list(range(1, 41)) and set(h) == {"step", "loss", "recon", "filter", "p"}
    assert all(math.isfinite(v) for k in ("loss", "recon", "filter", "p") for v in h[k])
    assert np.mean(h["recon"][-5:]) < 0.5 * h["recon"][0]
    assert all(-math.log(16) - 1e-5 <= v <= 1e-6 for v in h["filter"])
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert modes and not any(modes)  # the performer ran in eval mode at every step
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not ex.training and not encoder.training


def test_resume_equals_an_uninterrupted_run(tmp_path):
    encoder, x = _encoder(), _images(24)
    full = _explainer(encoder)
    h_full = train_explainer(full, x, CFG, tmp_path / "full", ckpt_every=2, progress=False)
    part = _explainer(encoder)
    train_explainer(part, x, CFG, tmp_path / "part", ckpt_every=2, stop_at=3, progress=False)
    assert load_checkpoint(tmp_path / "part" / CHECKPOINT)["step"] == 3
    resumed = _explainer(encoder, seed=7)  # other initial weights: only the checkpoint can bring the run back
    h_resumed = train_explainer(resumed, x, CFG, tmp_path / "part", ckpt_every=2, resume=True, progress=False)
    assert h_resumed == h_full and h_full["step"] == [1, 2, 3, 4, 5, 6]
    for k, w in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], w), k


def test_checkpoint_loads_onto_the_same_performer_only(tmp_path):
    encoder, x = _encoder(), _images(16)
    ex = _explainer(encoder, layer="stage2", depth=2, filters=6)
    h = train_explainer(ex, x, dataclasses.replace(CFG, steps=2), tmp_path, progress=False)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # plain tensors and containers only
    assert not any(k.startswith("encoder.") for k in ckpt["explainer"])  # the performer is not saved
    loaded = load_explainer(tmp_path / CHECKPOINT, encoder)
    assert (loaded.layer, loaded.filters, loaded.depth) == (2, 6, 2) and not loaded.training
    assert loaded.history == h
    a, b = loaded(x[:3]), ex(x[:3])
    assert torch.equal(a.z_hat, b.z_hat) and torch.equal(a.parts, b.parts) and torch.equal(a.p, b.p)
    with pytest.raises(ValueError, match="encoder_fingerprint"):
        load_explainer(tmp_path / CHECKPOINT, _encoder(seed=5))  # same architecture, other weights


def test_resume_with_other_settings_is_refused(tmp_path):
    encoder, x = _encoder(), _images(16)
    train_explainer(_explainer(encoder), x, CFG, tmp_path, stop_at=2, progress=False)
    with pytest.raises(ValueError, match="train"):
        train_explainer(_explainer(encoder), x, dataclasses.replace(CFG, lr=1e-3), tmp_path, resume=True,
                        progress=False)
    with pytest.raises(ValueError, match="filters"):
        train_explainer(_explainer(encoder, filters=4), x, CFG, tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_explainer(_explainer(encoder), x, CFG, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("changes", [dict(batch_size=17), dict(steps=0), dict(batch_size=0)])
def test_bad_settings(tmp_path, changes):
    with pytest.raises(ValueError, match="batch_size"):
        train_explainer(_explainer(_encoder()), _images(16), dataclasses.replace(CFG, **changes), tmp_path,
                        progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    encoder, x = _encoder(), _images(16)
    train_explainer(_explainer(encoder), x, CFG, tmp_path, ckpt_every=1, stop_at=2, progress=False)
    good = load_checkpoint(tmp_path / CHECKPOINT)
    original = explainer_module.explainer_loss

    def nan_loss(out, *args):
        loss, stats = original(out, *args)
        return loss * float("nan"), stats

    monkeypatch.setattr(explainer_module, "explainer_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2.*last good checkpoint"):
        train_explainer(_explainer(encoder), x, CFG, tmp_path, ckpt_every=1, resume=True, progress=False)
    after = load_checkpoint(tmp_path / CHECKPOINT)
    assert after["step"] == 2
    assert all(torch.equal(after["explainer"][k], v) for k, v in good["explainer"].items())


def test_diverged_weights_raise_before_any_checkpoint(tmp_path):
    ex = _explainer(_encoder())
    with torch.no_grad():
        ex.decoder[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0.*no checkpoint was written"):
        train_explainer(ex, _images(16), CFG, tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT).exists()


# ------------------------------------------------------------------------------------------- mixed precision


def test_training_under_bf16_autocast(tmp_path):
    encoder, x = _encoder(), _images(16)
    ex = _explainer(encoder)
    enc_before, own_before = _snapshot(encoder), {k: v.clone() for k, v in explainer_module._own_state(ex).items()}
    seen = []
    ex.decoder[-1].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = train_explainer(ex, x, dataclasses.replace(CFG, steps=2), tmp_path, progress=False)
    assert set(seen) == {torch.bfloat16}, "the decoder did not run under bf16 autocast"
    assert len(h["loss"]) == 2 and all(math.isfinite(v) for k in ("loss", "recon", "filter", "p") for v in h[k])
    assert all(not torch.equal(v, own_before[k]) for k, v in explainer_module._own_state(ex).items()
               if k.endswith("weight"))
    assert all(p.dtype == torch.float32 for p in ex.parameters())
    assert all(torch.equal(v, enc_before[k]) for k, v in encoder.state_dict().items())


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    monkeypatch.setattr(config, "amp_dtype", lambda device: torch.float16)


def test_fp16_training_scales_its_loss_and_resumes_with_the_scale(fp16_on_cpu, tmp_path):
    encoder, x = _encoder(), _images(16)
    cfg = dataclasses.replace(CFG, steps=4)
    full = _explainer(encoder)
    seen = []
    full.decoder[-1].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    h_full = train_explainer(full, x, cfg, tmp_path / "full", ckpt_every=2, progress=False)
    assert set(seen) == {torch.float16}
    assert all(math.isfinite(v) for v in h_full["loss"])
    part = _explainer(encoder)
    train_explainer(part, x, cfg, tmp_path / "part", ckpt_every=2, stop_at=2, progress=False)
    resumed = _explainer(encoder, seed=7)
    h_resumed = train_explainer(resumed, x, cfg, tmp_path / "part", ckpt_every=2, resume=True, progress=False)
    assert h_resumed == h_full
    for k, w in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], w), k
    scaler = load_checkpoint(tmp_path / "full" / CHECKPOINT)["scaler"]
    assert load_checkpoint(tmp_path / "part" / CHECKPOINT)["scaler"] == scaler  # the scale went on, not restarted
    assert scaler["_growth_tracker"] == 4  # no step overflowed: the explainer really trained in fp16
    assert h_full["p"][-1] != 0.5


# ------------------------------------------------------------------------------------------- devices


def _on(device: torch.device, *tensors: Tensor) -> bool:
    return all(t.device.type == device.type for t in tensors)


def test_forward_loss_and_explain_parts_on_the_device_of_x(device):
    encoder = _encoder().to(device)
    ex = _explainer(encoder, layer="stage2", depth=2)
    x = _images(3).to(device)
    assert all(_on(device, p) for p in ex.parameters())
    with stray_tensor_guard():
        out = ex(x)
        loss, stats = explainer_loss(out)
        loss.backward()
        parts = explain_parts(ex, x, batch_size=2)
        on_cpu = explain_parts(ex, x.cpu(), batch_size=2)  # documented: results on x's device
    assert all(v.device.type == "cpu" for v in on_cpu.values())
    assert _on(device, out.z, out.z_hat, out.p, *out.targets, *out.recons, *out.activations, loss, *stats.values())
    assert _on(device, *parts.values(), *(p.grad for p in ex.trainable()))
    assert all(v.dtype == torch.float32 for v in parts.values()) and math.isfinite(loss.item())


def test_train_and_load_on_the_device(device, tmp_path):
    encoder = _encoder().to(device)
    ex = _explainer(encoder)
    x = _images(8).to(device)
    before = {k: v.clone() for k, v in explainer_module._own_state(ex).items()}
    with stray_tensor_guard():
        h = train_explainer(ex, x, dataclasses.replace(CFG, steps=2, batch_size=4), tmp_path, progress=False)
    with stray_tensor_guard():
        loaded = load_explainer(tmp_path / CHECKPOINT, encoder, map_location=device)
    with stray_tensor_guard():
        out = loaded(x[:2])
    assert len(h["loss"]) == 2 and all(math.isfinite(v) for v in h["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in explainer_module._own_state(ex).items())
    assert all(_on(device, p) for p in loaded.parameters()) and _on(device, out.z_hat, out.parts)
    for k, v in explainer_module._own_state(ex).items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_explainer_builds_beside_the_performer_whatever_the_default_device(tmp_path):
    encoder = _encoder()
    train_explainer(_explainer(encoder), _images(8), dataclasses.replace(CFG, steps=1, batch_size=4), tmp_path,
                    progress=False)
    with stray_tensor_guard():
        loaded = load_explainer(tmp_path / CHECKPOINT, encoder)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_explain_parts_equals_a_direct_forward_whatever_the_batching():
    encoder = _encoder()
    ex = _explainer(encoder).train()
    x = _images(16)
    small, large = explain_parts(ex, x, batch_size=5), explain_parts(ex, x, batch_size=16)
    assert ex.training and not encoder.training  # the mode is restored, the performer's kept
    assert set(small) == {"parts", "performer", "z", "z_hat", "p", "recon_error"}
    for k, v in large.items():
        assert_close(small[k], v, atol=1e-5, rtol=1e-5)
    ex.eval()
    with torch.no_grad():
        out = ex(x)
    assert_close(large["parts"], out.parts)
    assert_close(large["z"], out.z)
    assert_close(large["z_hat"], out.z_hat)
    assert_close(large["p"], out.p)
    assert_close(large["performer"], encoder.features(x)[ex.layer])
    t, r = out.targets[0], out.recons[0]
    err = torch.stack([((r[i] - t[i]) ** 2).sum() / (t[i] ** 2).sum() for i in range(16)])
    assert_close(large["recon_error"], err)
    assert large["parts"].shape == (16, 8, 4, 4) and large["recon_error"].shape == (16,)


# ------------------------------------------------------------------------------------------- dissection


def test_part_units_expose_the_part_filters_to_dissection():
    data, encoder = _scenes(16), _encoder()
    ex = _explainer(encoder, filters=6).eval()
    units = PartUnits(ex)
    assert units.feature_names[-1] == "parts" and units.feature_names[:-1] == ("stem", "stage1", "stage2",
                                                                                "stage3", "stage4")
    assert units.feature_channels[-1] == 6 and units.feature_strides[-1] == encoder.feature_strides[3]
    z, maps = units.forward_features(data["x"])
    assert torch.equal(z, encoder(data["x"]))
    assert_close(maps[-1], explain_parts(ex, data["x"])["parts"], atol=0, rtol=0)
    out = dissect(units, data["x"], data["labels"], layers=["parts", "stage3"], batch_size=8, progress=False)
    assert out["parts"].iou.shape == (6, data["labels"].shape[1]) and out["stage3"].iou.shape == (8, 18)
    assert ((out["parts"].iou >= 0) & (out["parts"].iou <= 1)).all()
