"""nemu_lib.relax: equal to relax-xai on the same masks, invariances, known answers, Monte-Carlo rate, errors."""


import pytest
import relax_xai.relax as reference_module
import torch
from conftest import stray_tensor_guard
from torch import Tensor, nn
from torch.testing import assert_close

from nemu_lib.encoders import SmallResNet
from nemu_lib.masks import relax_masks
from nemu_lib.relax import RelaxResult, relax


def _encoder(dtype=torch.float32) -> SmallResNet:
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(8, 16, 32, 64)).to(dtype)
    encoder.train()  # exercise the eval/restore logic: BatchNorm must use running statistics
    for m in encoder.modules():  # non-trivial running statistics, so eval and train modes differ
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return encoder


def _reference_relax(encoder: nn.Module, x: Tensor, masks: Tensor, batch_size: int, monkeypatch):
    """Run relax-xai on image ``x (1, C, H, W)`` with our ``masks`` in place of its own draws."""
    batches = iter(masks.split(batch_size))
    monkeypatch.setattr(reference_module, "mask_generator", lambda *a, **k: iter([next(batches)]))
    ref = reference_module.RELAX(x, encoder, batch_size=batch_size, num_batches=len(masks) // batch_size)
    for name in ("importance", "uncertainty", "sum_of_weights"):  # its state is float32 by default
        setattr(ref, name, getattr(ref, name).to(x.dtype))
    with torch.no_grad():
        ref.forward()
    return ref



class RegionSum(nn.Module):
    """Toy encoder f(x) = (mean_{region} x, 1): only the pixels of ``region`` matter."""

    in_channels = 3

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: Tensor) -> Tensor:
        s = x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3))
        return torch.stack([s, torch.ones_like(s)], dim=1)


class Constant(nn.Module):
    """Toy encoder that ignores its input."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return self.z.expand(len(x), -1)


# ----------------------------------------------------------------------------- the reference package

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_reference_on_the_same_masks(dtype, monkeypatch):
    encoder = _encoder(dtype).eval()
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    masks = relax_masks(300, (32, 32), generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = _reference_relax(encoder, x, masks, 100, monkeypatch)
    ours = relax(encoder, x, masks=masks)
    # float64: equal to rounding; float32: the reference's running updates drift by ~1e-7 per 100 masks
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    assert_close(ours.importance[0], ref.importance.double(), atol=tol, rtol=0)
    assert_close(ours.uncertainty_reference[0], ref.uncertainty.double(), atol=tol * 10, rtol=1e-5)
    ref_mask = ref.uncertainty <= ref.uncertainty.median()
    if dtype == torch.float64:
        assert torch.equal(ours.u_relax_mask[0], ref_mask)
        assert_close(ours.u_relax[0], ref.importance * ref_mask, atol=tol, rtol=0)
    else:  # the reference's float32 running sums reorder pixels within rounding of the median
        assert (ours.u_relax_mask[0] == ref_mask).float().mean() > 0.97
    assert ours.n_masks == 300 and ours.importance.dtype == torch.float64


def test_equals_reference_end_to_end_from_the_same_seed():
    """With its own mask draws from the global generator seeded like ours, relax-xai gives our maps."""
    encoder = _encoder().eval()
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(5)
    ref = reference_module.RELAX(x, encoder, batch_size=50, num_batches=4)
    with torch.no_grad():
        ref.forward()
    ours = relax(encoder, x, n_masks=200, batch_size=50, seed=5)
    assert_close(ours.importance[0].float(), ref.importance, atol=2e-6, rtol=0)
    assert_close(ours.uncertainty_reference[0].float(), ref.uncertainty, atol=2e-6, rtol=1e-4)


def test_uncertainty_is_the_weighted_variance():
    encoder = _encoder().eval()
    x = torch.randn(2, 3, 32, 32)
    masks = relax_masks(120, (32, 32), generator=torch.Generator().manual_seed(0))
    out = relax(encoder, x, masks=masks, batch_size=50)
    with torch.no_grad():
        h = encoder(x)
        s = torch.stack([nn.functional.cosine_similarity(h[i:i + 1], encoder(x[i] * masks)) for i in range(2)])
    m, s = masks[:, 0].double(), s.double()  # (N, H, W), (B, N)
    r = torch.einsum("bn,nhw->bhw", s, m) / m.sum(0)
    u = torch.einsum("nhw,bnhw->bhw", m, (s[:, :, None, None] - r[:, None]) ** 2) / m.sum(0)
    assert_close(out.importance, r, atol=1e-6, rtol=0)
    assert_close(out.uncertainty, u, atol=1e-9, rtol=1e-4)
    assert_close(out.weights, m.sum(0))


# ----------------------------------------------------------------------------------------- invariances

def test_a_batch_of_images_equals_one_by_one():
    encoder = _encoder().eval()
    x = torch.randn(3, 3, 32, 32)
    together = relax(encoder, x, n_masks=200, batch_size=50, seed=2)
    for i in range(3):
        alone = relax(encoder, x[i:i + 1], n_masks=200, batch_size=50, seed=2)
        # equal up to the float32 batch effects of the encoder's own f(x) (B = 3 vs 1)
        assert_close(together.importance[i], alone.importance[0], atol=1e-6, rtol=0)
        assert_close(together.uncertainty[i], alone.uncertainty[0], atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 37, 200])
def test_mask_batch_size_changes_nothing(batch_size):
    encoder = _encoder().eval()
    x = torch.randn(2, 3, 32, 32)
    masks = relax_masks(200, (32, 32), generator=torch.Generator().manual_seed(4))
    base = relax(encoder, x, masks=masks, batch_size=100)
    other = relax(encoder, x, masks=masks, batch_size=batch_size)
    assert_close(other.importance, base.importance, atol=1e-6, rtol=0)  # encoder float32 batch effects only
    assert_close(other.uncertainty, base.uncertainty, atol=1e-8, rtol=1e-3)


def test_masks_as_an_iterable_of_batches_equal_a_tensor():
    encoder = _encoder().eval()
    x = torch.randn(1, 3, 32, 32)
    masks = relax_masks(100, (32, 32), generator=torch.Generator().manual_seed(4))
    as_tensor = relax(encoder, x, masks=masks, batch_size=25)
    as_iter = relax(encoder, x, masks=(m[:, 0] for m in masks.split(25)))  # (M, H, W) batches work too
    assert_close(as_iter.importance, as_tensor.importance, atol=0, rtol=0)


def test_reference_equal_to_own_representation_is_the_default():
    encoder = _encoder().eval()
    x = torch.randn(2, 3, 32, 32)
    default = relax(encoder, x, n_masks=100, seed=1)
    with torch.no_grad():
        h = encoder(x)
    explicit = relax(encoder, x, n_masks=100, seed=1, reference=h)
    assert_close(explicit.importance, default.importance, atol=0, rtol=0)
    one = relax(encoder, x[:1], n_masks=100, seed=1, reference=h[0])  # (D,) broadcasts over the batch
    assert_close(one.importance[0], default.importance[0], atol=0, rtol=0)


def test_train_mode_is_restored_and_eval_is_used():
    encoder = _encoder()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    in_train = relax(encoder, x, n_masks=50, seed=0)
    assert encoder.training
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())  # BN statistics untouched
    in_eval = relax(encoder.eval(), x, n_masks=50, seed=0)
    assert not encoder.training
    assert_close(in_train.importance, in_eval.importance, atol=0, rtol=0)


# --------------------------------------------------------------------------------------- known answers

def test_region_encoder_puts_importance_on_its_region():
    encoder = RegionSum(slice(8, 16), slice(20, 28))
    x = torch.ones(1, 3, 32, 32)
    out = relax(encoder, x, n_masks=2000, batch_size=250, seed=0)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[8:16, 20:28] = True
    imp = out.importance[0]
    inside, far = imp[region].mean(), imp[24:, :8].mean()  # far corner: masks there are ~independent
    assert inside - far > 5 * imp[24:, :8].std()
    top = imp.flatten().topk(int(region.sum())).indices
    assert region.flatten()[top].float().mean() > 0.8  # most of the top-|region| pixels lie in the region


def test_encoder_that_ignores_its_input_gives_a_flat_map_and_no_uncertainty():
    out = relax(Constant(), torch.rand(2, 3, 24, 24), n_masks=200, batch_size=64, seed=0)
    assert_close(out.importance, torch.ones_like(out.importance), atol=1e-6, rtol=0)  # float32 cosine of 1
    assert out.uncertainty.abs().max() < 1e-12
    assert (out.importance.std(dim=(1, 2)) < 1e-12).all()  # flat


def test_monte_carlo_error_falls_like_one_over_sqrt_n():
    """The spread of independent estimates (no ground truth needed) shrinks by sqrt(4) = 2 for 4x the masks."""
    encoder = RegionSum(slice(4, 10), slice(4, 10))
    x = torch.ones(1, 3, 16, 16)

    def spread(n: int) -> float:
        runs = torch.stack([relax(encoder, x, n_masks=n, batch_size=n, seed=s).importance[0] for s in range(24)])
        return runs.var(dim=0).mean().sqrt().item()  # RMS over pixels of the per-pixel std over seeds

    ratio = spread(250) / spread(1000)
    assert 1.7 < ratio < 2.35, f"error ratio for 4x the masks is {ratio:.2f}, expected ~2 = sqrt(4)"


# ----------------------------------------------------------------------------------------- merging runs

def test_merge_by_hand():
    """Pixel 0: s = 1 under W1 = 1, s = 3 under W2 = 3; pixel 1: no mask in the second run; pixel 2: in none."""
    a = RelaxResult(torch.tensor([[[1.0, 2.0, 0.0]]]), torch.tensor([[[0.0, 0.5, 0.0]]]),
                    torch.tensor([[1.0, 2.0, 0.0]]), 2)
    b = RelaxResult(torch.tensor([[[3.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0, 0.0]]]),
                    torch.tensor([[3.0, 0.0, 0.0]]), 3)
    both = a.merge(b)
    # R = (1·1 + 3·3) / 4 = 2.5; U = (1²·1 + 3²·3) / 4 − 2.5² = 7 − 6.25 = 0.75
    assert_close(both.importance, torch.tensor([[[2.5, 2.0, 0.0]]], dtype=torch.float64))
    assert_close(both.uncertainty, torch.tensor([[[0.75, 0.5, 0.0]]], dtype=torch.float64))
    assert_close(both.weights, torch.tensor([[4.0, 2.0, 0.0]], dtype=torch.float64))
    assert both.n_masks == 5 and both.importance.dtype == torch.float64


def test_merging_two_runs_equals_one_run_over_all_masks():
    encoder = _encoder().eval()
    x = torch.randn(2, 3, 32, 32)
    masks = relax_masks(300, (32, 32), generator=torch.Generator().manual_seed(3))
    whole = relax(encoder, x, masks=masks, batch_size=100)
    merged = relax(encoder, x, masks=masks[:100], batch_size=100).merge(relax(encoder, x, masks=masks[100:]))
    assert_close(merged.importance, whole.importance, atol=1e-12, rtol=0)
    assert_close(merged.uncertainty, whole.uncertainty, atol=1e-12, rtol=1e-9)
    assert_close(merged.weights, whole.weights)
    assert merged.n_masks == 300
    assert torch.equal(merged.u_relax_mask, whole.u_relax_mask)


def test_merge_stays_on_the_device_of_the_runs(device):
    encoder, x = _encoder().eval().to(device), torch.randn(2, 3, 32, 32).to(device)
    a, b = relax(encoder, x, n_masks=20, seed=0), relax(encoder, x, n_masks=30, seed=1)
    with stray_tensor_guard():
        both = a.merge(b)
    for t in (both.importance, both.uncertainty, both.weights):
        assert t.device.type == device.type and t.dtype == torch.float64
    assert both.n_masks == 50


def test_merge_of_other_images_is_an_error():
    encoder = _encoder().eval()
    one = relax(encoder, torch.randn(1, 3, 32, 32), n_masks=10)
    two = relax(encoder, torch.randn(2, 3, 32, 32), n_masks=10)
    with pytest.raises(ValueError, match="same images"):
        one.merge(two)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (torch.randn(3, 32, 32), {}, ValueError, "add the batch dimension"),
        (torch.randn(1, 1, 32, 32), {}, ValueError, "channels"),
        (torch.full((1, 3, 32, 32), float("nan")), {}, ValueError, "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), {}, TypeError, "floating point"),
        (torch.randn(1, 3, 32, 32), {"n_masks": 0}, ValueError, "n_masks"),
        (torch.randn(1, 3, 32, 32), {"batch_size": 0}, ValueError, "batch_size"),
        (torch.randn(1, 3, 32, 32), {"masks": torch.rand(10, 1, 16, 16)}, ValueError, r"\(M, 1, 32, 32\)"),
        (torch.randn(1, 3, 32, 32), {"masks": torch.rand(10, 2, 32, 32)}, ValueError, "masks must have shape"),
        (torch.randn(1, 3, 32, 32), {"masks": torch.ones(10, 1, 32, 32, dtype=torch.bool)}, TypeError, "float"),
        (torch.randn(1, 3, 32, 32), {"masks": torch.full((4, 1, 32, 32), float("inf"))}, ValueError, "NaN or Inf"),
        (torch.randn(1, 3, 32, 32), {"masks": iter([])}, ValueError, "empty"),
        (torch.randn(1, 3, 32, 32), {"reference": torch.randn(7)}, ValueError, "reference must have shape"),
        (torch.randn(2, 3, 32, 32), {"reference": torch.randn(3, 64)}, ValueError, "reference must have shape"),
        (torch.randn(1, 3, 32, 32), {"reference": torch.full((64,), float("nan"))}, ValueError, "reference"),
        (torch.randn(1, 3, 32, 32), {"similarity": "euclid"}, ValueError, "unknown similarity"),
    ],
)
def test_bad_input(x, kwargs, error, match):
    encoder = _encoder().eval()
    with pytest.raises(error, match=match):
        relax(encoder, x, n_masks=kwargs.pop("n_masks", 20), batch_size=kwargs.pop("batch_size", 10), **kwargs)
    assert not encoder.training  # the mode is restored on errors too
