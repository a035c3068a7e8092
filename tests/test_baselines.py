"""nemu_lib.baselines: known answers on linear encoders, Captum's IG, completeness, batching, modes, errors."""

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn
from torch.testing import assert_close

from nemu_lib.baselines import QUADRATURES, label_free_gradient, label_free_integrated_gradients, random_map
from nemu_lib.config import exact_float32
from nemu_lib.encoders import SmallResNet

METHODS = sorted(QUADRATURES)


def _resnet(dtype=torch.float64, stats: bool = True) -> SmallResNet:
    """A tiny SmallResNet in train mode; ``stats``: non-trivial BatchNorm statistics (eval != train)."""
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(4, 8, 8, 16)).to(dtype)
    for m in encoder.modules():
        if stats and isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return encoder.train()


def _images(b: int = 3, size: int = 16, dtype=torch.float64, seed: int = 0) -> Tensor:
    return torch.randn(b, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


class LinearEncoder(nn.Module):
    """f(x) = W vec(x), so g_x(x') = ⟨W x', W x⟩ and ∇g_x = Wᵀ W vec(x) everywhere."""

    in_channels = 3

    def __init__(self, size: int = 8, dim: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, 3 * size * size, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(1)))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T


class SmoothEncoder(nn.Module):
    """conv → tanh → mean → linear: smooth in x, so the quadrature error follows its textbook rate."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.lin = nn.Conv2d(3, 8, 3, padding=1).double(), nn.Linear(8, 5).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class Failing(nn.Module):
    in_channels = 3

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("encoder failed")


class Score(nn.Module):
    """g_x(x') = ⟨f(x'), h⟩ per example, for Captum (``h`` arrives expanded like its inputs)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, xs: Tensor, h: Tensor) -> Tensor:
        return (self.encoder(xs) * h).sum(dim=1)


# --------------------------------------------------------------------------------------- known answers

def test_gradient_of_a_linear_encoder_is_wt_w_x():
    encoder, x = LinearEncoder(), _images(2, 8)
    w, v = encoder.weight.detach(), x.flatten(1)
    expected = (v @ w.T @ w).view_as(x).abs().amax(dim=1)  # max_c |Wᵀ W x|
    assert_close(label_free_gradient(encoder, x), expected, atol=1e-12, rtol=1e-12)


def test_gradient_is_half_the_gradient_of_the_squared_norm():
    """With sg, ∇_x' ⟨f(x'), f(x)⟩ at x' = x is ½ ∇_x ‖f(x)‖² (without sg it would be twice that)."""
    encoder, x = _resnet().eval(), _images()
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(0.5 * encoder(xg).pow(2).sum(), xg)
    assert_close(label_free_gradient(encoder, x), grad.abs().amax(dim=1), atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("baseline", ["zeros", "image", "colour"])
def test_ig_of_a_linear_encoder_is_delta_times_gradient(method, baseline):
    encoder, x = LinearEncoder(), _images(2, 8)
    colour = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(3, 1, 1)  # broadcasts to (B, C, H, W)
    x0 = {"zeros": None, "image": _images(2, 8, seed=3), "colour": colour}[baseline]
    w, v = encoder.weight.detach(), x.flatten(1)
    grad = (v @ w.T @ w).view_as(x)  # constant along the path: any rule with Σ w_k = 1 is exact
    delta = x - (0 if x0 is None else x0)
    ig, gap = label_free_integrated_gradients(encoder, x, baseline=x0, steps=3, method=method, return_gap=True)
    assert_close(ig, (delta * grad).sum(dim=1), atol=1e-10, rtol=1e-12)
    assert gap.abs().max() < 1e-10


def test_ig_of_a_homogeneous_relu_network_from_zero_is_x_times_gradient():
    """Fresh BatchNorm and no biases: f(αx) = α f(x), so ∇g_x is constant on the ray and IG = Σ_c x ⊙ ∇g_x(x)."""
    encoder, x = _resnet(stats=False).eval(), _images()
    xg = x.clone().requires_grad_()
    z = encoder(xg)
    (grad,) = torch.autograd.grad((z * z.detach()).sum(), xg)
    ig = label_free_integrated_gradients(encoder, x, steps=4)
    assert_close(ig, (x * grad).sum(dim=1), atol=1e-14, rtol=1e-10)


# ---------------------------------------------------------------------------------- Captum, completeness

@pytest.mark.parametrize("method", METHODS)
def test_ig_equals_captum(method):
    encoder, x, steps = _resnet().eval(), _images(), 8
    with torch.no_grad():
        h = encoder(x)
    theirs, delta = IntegratedGradients(Score(encoder)).attribute(
        x, additional_forward_args=(h,), n_steps=steps, method=method, return_convergence_delta=True)
    theirs = theirs.sum(dim=1)
    if method == "riemann_trapezoid":  # Captum's trapezoid weights sum to (n − 1) / n, ours to 1
        theirs = theirs * steps / (steps - 1)
    ours, gap = label_free_integrated_gradients(encoder, x, steps=steps, method=method, batch_size=5,
                                                return_gap=True)
    scale = theirs.abs().max()  # Captum casts its weights to float32: agreement to ~1e-8 of the map's scale
    assert_close(ours, theirs, atol=1e-5 * scale, rtol=1e-5)
    if method != "riemann_trapezoid":
        assert_close(gap, delta, atol=1e-5 * scale, rtol=0)


def test_gap_is_sum_of_ig_minus_the_change_of_g():
    encoder, x, x0 = SmoothEncoder(), _images(), _images(seed=5)
    ig, gap = label_free_integrated_gradients(encoder, x, baseline=x0, steps=4, return_gap=True)
    with torch.no_grad():
        h = encoder(x)
        change = (h * h).sum(dim=1) - (encoder(x0) * h).sum(dim=1)  # g_x(x) − g_x(x̄)
    assert_close(gap, ig.sum(dim=(1, 2)) - change, atol=1e-14, rtol=0)
    assert (gap.abs() > 1e-9).all()  # 4 nodes are not exact on a tanh network


def test_gauss_legendre_completeness_converges_fast_on_a_smooth_encoder():
    encoder, x = SmoothEncoder(), _images()
    _, gap4 = label_free_integrated_gradients(encoder, x, steps=4, return_gap=True)
    ig, gap16 = label_free_integrated_gradients(encoder, x, steps=16, return_gap=True)
    assert (gap4.abs() > 1e-8).all()
    assert (gap16.abs() < 1e-12 * ig.abs().sum(dim=(1, 2))).all()  # Σ IG = g_x(x) − g_x(x̄) to rounding


@pytest.mark.parametrize("method", ["riemann_trapezoid", "riemann_middle"])
def test_second_order_rules_gap_falls_like_one_over_n_squared(method):
    encoder, x = SmoothEncoder(), _images()
    _, gap8 = label_free_integrated_gradients(encoder, x, steps=8, method=method, return_gap=True)
    _, gap32 = label_free_integrated_gradients(encoder, x, steps=32, method=method, return_gap=True)
    ratio = gap8.abs() / gap32.abs()
    assert ((ratio > 12) & (ratio < 20)).all(), ratio  # 4x the steps: 16x smaller


def test_completeness_on_a_relu_resnet():
    encoder, x = _resnet().eval(), _images()
    ig, gap = label_free_integrated_gradients(encoder, x, steps=128, return_gap=True)
    assert (gap.abs() < 0.005 * ig.abs().sum(dim=(1, 2))).all()  # kinks: slower than on a smooth encoder


# ----------------------------------------------------------------------------------------- invariances

def test_a_batch_equals_one_by_one():
    encoder, x = _resnet().eval(), _images()
    sal, ig = label_free_gradient(encoder, x), label_free_integrated_gradients(encoder, x, steps=6, batch_size=4)
    for i in range(len(x)):
        assert_close(sal[i], label_free_gradient(encoder, x[i:i + 1])[0], atol=1e-14, rtol=1e-10)
        assert_close(ig[i], label_free_integrated_gradients(encoder, x[i:i + 1], steps=6)[0], atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_ig_batch_size_changes_nothing(batch_size):
    encoder, x = _resnet().eval(), _images()
    base = label_free_integrated_gradients(encoder, x, steps=5, batch_size=15)
    assert_close(label_free_integrated_gradients(encoder, x, steps=5, batch_size=batch_size), base,
                 atol=1e-14, rtol=1e-10)


@pytest.mark.parametrize("explain", [label_free_gradient, label_free_integrated_gradients])
def test_eval_mode_is_used_and_train_mode_restored(explain):
    encoder, x = _resnet(), _images()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    in_train = explain(encoder, x)
    assert encoder.training and all(m.training for m in encoder.modules())
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())  # BN statistics untouched
    in_eval = explain(encoder.eval(), x)
    assert not encoder.training
    assert_close(in_train, in_eval, atol=0, rtol=0)


@pytest.mark.parametrize("explain", [label_free_gradient, label_free_integrated_gradients])
def test_train_mode_is_restored_after_an_error(explain):
    encoder = Failing().train()
    with pytest.raises(RuntimeError, match="encoder failed"):
        explain(encoder, _images())
    assert encoder.training


@pytest.mark.parametrize("explain", [label_free_gradient, label_free_integrated_gradients])
def test_no_gradient_is_left_on_parameters_or_input(explain):
    encoder, x = _resnet().eval(), _images().requires_grad_()
    first = next(encoder.parameters())
    first.grad = torch.ones_like(first)  # an existing .grad stays as it was
    explain(encoder, x)
    assert torch.equal(first.grad, torch.ones_like(first))
    assert all(p.grad is None for p in list(encoder.parameters())[1:])
    assert x.grad is None


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("explain", [label_free_gradient, label_free_integrated_gradients])
def test_works_with_autograd_off(context, explain):
    encoder, x = _resnet().eval(), _images()
    expected = explain(encoder, x)
    with context():
        out = explain(encoder, x.clone())  # under inference_mode, an inference tensor
    assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))])
def test_maps_on_the_device_of_x(device):
    encoder, x = _resnet(torch.float32).eval().to(device), _images(dtype=torch.float32).to(device)
    for out in (label_free_gradient(encoder, x), label_free_integrated_gradients(encoder, x, steps=4),
                random_map(x)):
        assert out.shape == (3, 16, 16) and out.device.type == device and out.dtype == torch.float32
    cpu = label_free_gradient(encoder.cpu(), x.cpu())
    with exact_float32():  # cuDNN's TF32 convolutions differ from the CPU's by ~1e-4 relative
        on_device = label_free_gradient(encoder.to(device), x)
    assert_close(on_device.cpu(), cpu, atol=1e-5 * cpu.max(), rtol=1e-4)


# ------------------------------------------------------------------------------------------ random map

def test_random_map_is_seeded_uniform_noise():
    x = torch.zeros(4, 3, 64, 64)
    a = random_map(x)
    assert a.shape == (4, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, random_map(x, seed=0)) and not torch.equal(a, random_map(x, seed=1))
    assert torch.equal(random_map(x, generator=torch.Generator().manual_seed(7)), random_map(x, seed=7))
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.01 and abs(a.var() - 1 / 12) < 0.005
    assert torch.equal(random_map(x + 5), a)  # only the shape matters, not the pixels


def test_random_map_seed_none_uses_the_global_generator():
    x = torch.zeros(1, 3, 8, 8)
    torch.manual_seed(3)
    a = random_map(x, seed=None)
    torch.manual_seed(3)
    assert torch.equal(a, random_map(x, seed=None))


# ------------------------------------------------------------------------------------------- bad input

BAD_IMAGES = [
    (torch.zeros(3, 16, 16), ValueError, r"\(B, C, H, W\).*x\[None\]"),
    (torch.zeros(2, 16, 16, 3), ValueError, "channels"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), TypeError, "floating point"),
    (torch.full((2, 3, 16, 16), float("nan")), ValueError, "NaN"),
    ([[0.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize(("x", "error", "match"), BAD_IMAGES)
@pytest.mark.parametrize("explain", [label_free_gradient, label_free_integrated_gradients])
def test_bad_images_are_refused(explain, x, error, match):
    encoder = _resnet(torch.float32)
    with pytest.raises(error, match=match):
        explain(encoder, x)
    assert encoder.training


@pytest.mark.parametrize(("x", "error", "match"), [b for b in BAD_IMAGES if "channels" not in b[2]])
def test_random_map_refuses_bad_images(x, error, match):
    with pytest.raises(error, match=match):
        random_map(x)


def test_images_smaller_than_the_encoder_takes_are_refused():
    with pytest.raises(ValueError, match="at least 16x16"):
        label_free_gradient(_resnet(torch.float32), torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 1, "method": "riemann_trapezoid"}, "steps must be >= 2"),
    ({"method": "simpson"}, "unknown method 'simpson'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"baseline": torch.zeros(2, 3, 16, 16)}, r"baseline of shape \(2, 3, 16, 16\) does not broadcast"),
    ({"baseline": torch.tensor([0.0, float("inf"), 0.0]).view(3, 1, 1)}, "NaN or Inf"),
])
def test_bad_ig_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        label_free_integrated_gradients(LinearEncoder(16), _images(), **kwargs)
