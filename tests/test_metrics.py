"""nemu_lib.metrics: equal to Quantus and SciPy, known answers by hand, batching, timing and errors."""

import math

import numpy as np
import pytest
import quantus
import scipy.stats
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from nemu_lib import metrics
from nemu_lib.encoders import SmallResNet
from nemu_lib.metrics import (
    complexity,
    deletion_insertion,
    pearson,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
    spearman,
    time_per_image,
)

B, H, W = 6, 12, 12


def _quantus(metric: type, a: Tensor, gt: Tensor | None = None, **settings) -> Tensor:
    """Score maps ``a (B, H, W)`` with a Quantus metric (arrays shaped (B, 1, H, W), no model needed)."""
    a_np = a.double().numpy()[:, None].copy()
    s_np = None if gt is None else gt.double().numpy()[:, None]
    scores = metric(disable_warnings=True, **settings)(
        model=None, x_batch=np.zeros_like(a_np), y_batch=np.zeros(len(a_np), dtype=int), a_batch=a_np,
        s_batch=s_np, channel_first=True,
    )
    return torch.tensor(np.asarray(scores, dtype=float))


def _cases() -> dict[str, tuple[Tensor, Tensor]]:
    """Maps and masks ``(B, H, W)``: random signed, all mass inside GT, one hot pixel, many ties."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(B, H, W, generator=g) < 0.3
    random = torch.randn(B, H, W, generator=g, dtype=torch.float64)
    inside = torch.rand(B, H, W, generator=g, dtype=torch.float64) * gt
    hot = torch.zeros(B, H, W, dtype=torch.float64)
    hot.view(B, -1)[torch.arange(B), torch.randint(H * W, (B,), generator=g)] = 1.0  # in GT or not
    ties = torch.randint(0, 3, (B, H, W), generator=g).double()
    return {"random": (random, gt), "inside": (inside, gt), "hot": (hot, gt), "ties": (ties, gt)}


CASES = _cases()


@pytest.mark.parametrize("case", CASES)
def test_relevance_mass_accuracy_equals_quantus(case):
    a, gt = CASES[case]
    ours = relevance_mass_accuracy(a, gt)
    assert_close(ours, _quantus(quantus.RelevanceMassAccuracy, a.clamp(min=0), gt, abs=False, normalise=False),
                 rtol=0, atol=1e-9)
    assert_close(relevance_mass_accuracy(a, gt, positive=False),
                 _quantus(quantus.RelevanceMassAccuracy, a, gt, abs=False, normalise=False), rtol=0, atol=1e-9)
    assert ((ours >= 0) & (ours <= 1)).all()
    if case == "inside":
        assert_close(ours, torch.ones(B, dtype=torch.float64))


@pytest.mark.parametrize("case", ["random", "inside"])
def test_relevance_rank_accuracy_equals_quantus(case):
    a, gt = CASES[case]  # no tie straddles rank |GT| here, where NumPy's unstable sort could differ
    ours = relevance_rank_accuracy(a, gt)
    assert_close(ours, _quantus(quantus.RelevanceRankAccuracy, a, gt, abs=False, normalise=False), rtol=0, atol=1e-12)
    if case == "inside":  # every GT pixel > 0 = every other pixel
        assert_close(ours, torch.ones(B, dtype=torch.float64))


def test_relevance_rank_accuracy_ties_agree_with_quantus_when_they_do_not_straddle_k():
    a, gt = CASES["ties"]
    a = a + 3 * gt  # GT pixels in {3, 4, 5}, the others in {0, 1, 2}: heavy ties, top-|GT| = GT exactly
    assert_close(relevance_rank_accuracy(a, gt), torch.ones(B, dtype=torch.float64))
    assert_close(relevance_rank_accuracy(a, gt), _quantus(quantus.RelevanceRankAccuracy, a, gt, normalise=False))


def test_relevance_rank_accuracy_breaks_ties_in_raster_order():
    a = torch.zeros(1, 4, 4)
    a[0, 1, 1] = 1.0  # flat index 5, the only non-zero pixel
    gt = torch.zeros(1, 16, dtype=torch.bool)
    gt[0, [5, 0, 15]] = True  # K = 3: top-3 = pixels 5, 0, 1 (the zeros in raster order) → 2 hits
    assert relevance_rank_accuracy(a, gt.view(1, 4, 4)).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("case", CASES)
def test_pointing_game_equals_quantus(case):
    a, gt = CASES[case]
    ours = pointing_game(a, gt)
    assert_close(ours, _quantus(quantus.PointingGame, a, gt, abs=False, normalise=False))
    if case == "hot":
        assert_close(ours, gt.flatten(1)[a.flatten(1) == 1].double())  # hit iff the hot pixel is in GT
        assert 0 < ours.sum() < B  # both outcomes occur, so the comparison is not vacuous


def test_pointing_game_counts_a_tied_maximum_inside_gt_as_a_hit():
    a = torch.tensor([[[3.0, 3.0, 0.0, -1.0]]]).expand(2, 1, 4)
    gt = torch.tensor([[[False, True, False, False]], [[False, False, True, True]]])
    assert pointing_game(a, gt).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("case", CASES)
def test_complexity_equals_quantus(case):
    a, _ = CASES[case]
    # Quantus takes P log(P + 1e-12): at most HW · 1e-12 away
    assert_close(complexity(a), _quantus(quantus.Complexity, a, abs=True, normalise=False), rtol=0, atol=1e-9)
    assert_close(complexity(a), _quantus(quantus.Complexity, a, abs=True, normalise=True), rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_sparseness_equals_quantus(case):
    a, _ = CASES[case]
    # Quantus adds 1e-7 to every |a|: at Σ|a| = 1e6 per map (the Gini is scale-free) that is < 1e-10 relative
    scaled = a / a.abs().sum((1, 2), keepdim=True) * 1e6
    assert_close(sparseness(a), _quantus(quantus.Sparseness, scaled, abs=True, normalise=False), rtol=0, atol=1e-9)


def test_sparseness_quantus_default_differs_by_its_epsilon():
    a = CASES["hot"][0]  # max-normalised one-hot: Σ|a| = 1, the largest relative effect of the 1e-7
    n = H * W
    expected = sparseness(a) * 1 / (1 + n * 1e-7)
    assert_close(_quantus(quantus.Sparseness, a), expected, rtol=1e-12, atol=0)
    assert (sparseness(a) - _quantus(quantus.Sparseness, a)).abs().min() > 1e-6  # the documented gap is real


def test_complexity_and_sparseness_by_hand():
    uniform = torch.full((1, 4, 4), -0.5)
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 2, 3] = -7.0
    assert_close(complexity(uniform), torch.tensor([math.log(16)], dtype=torch.float64))
    assert_close(complexity(one_hot), torch.tensor([0.0], dtype=torch.float64))
    assert_close(complexity(torch.tensor([[[1.0, -1.0, 2.0, 0.0]]])),  # P = (1/4, 1/4, 1/2, 0)
                 torch.tensor([1.5 * math.log(2)], dtype=torch.float64))
    assert_close(sparseness(uniform), torch.tensor([0.0], dtype=torch.float64))
    assert_close(sparseness(one_hot), torch.tensor([1 - 1 / 16], dtype=torch.float64))
    # sorted |a| = (0, 0, 1, 3), weights 2k − n − 1 = (−3, −1, 1, 3): (1 + 9) / (4 · 4)
    assert_close(sparseness(torch.tensor([[[3.0, 0.0, -1.0, 0.0]]])), torch.tensor([10 / 16], dtype=torch.float64))


def test_relevance_mass_accuracy_by_hand():
    a = torch.tensor([[[1.0, -1.0, 2.0, 0.0]]])
    gt = torch.tensor([[[1, 1, 0, 0]]])  # 0/1 integers are accepted
    assert relevance_mass_accuracy(a, gt).item() == pytest.approx(1 / 3)  # a⁺ = (1, 0, 2, 0)
    assert relevance_mass_accuracy(a, gt, positive=False).item() == pytest.approx(0.0)  # (1 − 1) / 2


def test_maps_without_mass_give_nan():
    a = torch.zeros(2, 4, 4)
    a[1] = -torch.rand(4, 4) - 0.1  # no positive mass
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[:, 0, 0] = True
    assert relevance_mass_accuracy(a, gt).isnan().all()
    assert relevance_mass_accuracy(a, gt, positive=False).isnan().tolist() == [True, False]
    for metric in (relevance_rank_accuracy, pointing_game):
        assert metric(a, gt).isnan().tolist() == [True, False]
    for metric in (complexity, sparseness):
        assert metric(a).isnan().tolist() == [True, False]


@pytest.mark.parametrize("metric", [relevance_mass_accuracy, relevance_rank_accuracy, pointing_game])
def test_locality_errors(metric):
    a, gt = torch.rand(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shaped like the maps"):
        metric(a, gt[:, :3])
    with pytest.raises(ValueError, match=r"drop the channel axis"):
        metric(a[:, None], gt[:, None])
    with pytest.raises(ValueError, match="threshold soft masks"):
        metric(a, gt * 0.7)
    empty = gt.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"empty for image\(s\) \[1\]"):
        metric(a, empty)
    with pytest.raises(TypeError, match="float tensor"):
        metric(gt, gt)


@pytest.mark.parametrize("metric", [complexity, sparseness, lambda a: pearson(a, a), lambda a: spearman(a, a)])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_maps_are_rejected(metric, bad):
    a = torch.rand(2, 4, 4)
    a[1, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        metric(a)


class TopLeftPixel(nn.Module):
    """Toy encoder f(x) = (Σ_c x[c, 0, 0], 3): only the top-left pixel (all its channels) matters."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        s = x[:, :, 0, 0].sum(1)
        return torch.stack([s, torch.full_like(s, 3.0)], dim=1)


def test_deletion_insertion_by_hand():
    encoder = TopLeftPixel().train()
    x = torch.ones(3, 3, 2, 2)  # f(x) = (3, 3); with the top-left pixel gone f = (0, 3): cos = 1/√2
    a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]],  # perfect: the top-left pixel first
                      [[1.0, 2.0], [3.0, 4.0]],  # reversed: the top-left pixel last
                      [[5.0, 5.0], [5.0, 5.0]]])  # constant: raster order, the top-left pixel first
    curves = deletion_insertion(encoder, x, a, steps=4, batch_size=5)
    s = 1 / math.sqrt(2)
    assert_close(curves.fractions, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    d = torch.tensor([[1, s, s, s, s], [1, 1, 1, 1, s], [1, s, s, s, s]], dtype=torch.float64)
    ins = torch.tensor([[s, 1, 1, 1, 1], [s, s, s, s, 1], [s, 1, 1, 1, 1]], dtype=torch.float64)
    assert_close(curves.deletion, d)
    assert_close(curves.insertion, ins)
    good, bad = 0.125 + 0.875 * s, 0.875 + 0.125 * s  # trapezoids of width 1/4
    assert_close(curves.deletion_auc, torch.tensor([good, bad, good], dtype=torch.float64))
    assert_close(curves.insertion_auc, torch.tensor([bad, good, bad], dtype=torch.float64))
    assert encoder.training and not any(encoder.modes)  # eval during the call, restored after


def test_fractions_when_steps_do_not_divide_the_pixels():
    curves = deletion_insertion(TopLeftPixel(), torch.ones(1, 3, 2, 2), torch.rand(1, 2, 2), steps=3)
    assert curves.fractions.tolist() == [0.0, 0.25, 0.5, 1.0]  # k_j = ⌊4 j / 3⌋ pixels
    assert curves.deletion.shape == curves.insertion.shape == (1, 4)


def _convnet() -> nn.Module:
    """A small random encoder without global pooling, so deletions move its representation a lot."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 16))
    for m in encoder.modules():  # running statistics that make train and eval modes differ
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return encoder


def _naive_curves(encoder: nn.Module, x: Tensor, a: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Deletion and insertion one image and one step at a time, from a stable NumPy sort."""
    n = a[0].numel()
    deletion, insertion = torch.zeros(len(x), steps + 1), torch.zeros(len(x), steps + 1)
    with torch.no_grad():
        for i in range(len(x)):
            order = torch.from_numpy(np.argsort(-a[i].flatten().numpy(), kind="stable"))
            h = encoder(x[i : i + 1])
            for j in range(steps + 1):
                top = torch.zeros(n, dtype=torch.bool)
                top[order[: j * n // steps]] = True
                top = top.view(1, 1, *a.shape[1:])
                deletion[i, j] = torch.cosine_similarity(h, encoder(x[i : i + 1] * ~top)).item()
                insertion[i, j] = torch.cosine_similarity(h, encoder(x[i : i + 1] * top)).item()
    return deletion, insertion


def test_deletion_insertion_equals_a_naive_loop_at_any_batch_size():
    encoder = _convnet().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    a = torch.randn(3, 16, 16, generator=g)
    a[2] = a[2].round()  # many ties
    runs = [deletion_insertion(encoder, x, a, steps=4, batch_size=bs) for bs in (1, 7, 1000)]
    assert encoder.training
    encoder.eval()
    deletion, insertion = _naive_curves(encoder, x, a, steps=4)
    for curves in runs:
        assert_close(curves.deletion, deletion.double(), rtol=0, atol=1e-6)
        assert_close(curves.insertion, insertion.double(), rtol=0, atol=1e-6)
        assert_close(curves.deletion, runs[0].deletion, rtol=0, atol=1e-6)
        assert_close(curves.insertion, runs[0].insertion, rtol=0, atol=1e-6)
    curves = runs[0]
    assert_close(curves.deletion[:, 0], torch.ones(3, dtype=torch.float64))  # cos(f(x), f(x))
    assert_close(curves.insertion[:, -1], torch.ones(3, dtype=torch.float64))
    assert_close(curves.deletion[:, -1], curves.insertion[:, 0])  # both f(0)
    assert (curves.deletion[:, 1:-1] < 0.99).all()  # the encoder does see the deleted pixels


def test_deletion_insertion_errors():
    encoder, x, a = TopLeftPixel(), torch.ones(2, 3, 4, 4), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match=r"add the batch dimension"):
        deletion_insertion(encoder, x[0], a[0])
    with pytest.raises(ValueError, match=r"one \(H, W\) map per image"):
        deletion_insertion(encoder, x, a[:, :3])
    with pytest.raises(ValueError, match="steps and batch_size"):
        deletion_insertion(encoder, x, a, steps=0)
    a[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        deletion_insertion(encoder, x, a)


def test_pearson_and_spearman_equal_scipy_with_ties():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 8, 8, generator=g, dtype=torch.float64)
    b = a + torch.randn(5, 8, 8, generator=g, dtype=torch.float64)
    a[3:] = a[3:].round()  # ties in a, and in both maps of the last image
    b[4] = (b[4] * 2).round()
    ours_r, ours_rho = pearson(a, b), spearman(a, b)
    for i in range(5):
        u, v = a[i].flatten().numpy(), b[i].flatten().numpy()
        assert ours_r[i].item() == pytest.approx(scipy.stats.pearsonr(u, v)[0], abs=1e-12)
        assert ours_rho[i].item() == pytest.approx(scipy.stats.spearmanr(u, v)[0], abs=1e-12)
    assert_close(spearman(a, a.exp()), torch.ones(5, dtype=torch.float64))  # monotone → ρ = 1 exactly
    assert_close(pearson(a, -3 * a + 1), -torch.ones(5, dtype=torch.float64))


def test_correlation_of_a_constant_map_is_nan_and_shapes_must_match():
    a, b = torch.rand(2, 4, 4), torch.rand(2, 4, 4)
    a[1] = 0.1  # constant, whose float mean is not exactly 0.1
    assert pearson(a, b).isnan().tolist() == [False, True]
    assert spearman(a, b).isnan().tolist() == [False, True]
    with pytest.raises(ValueError, match="same shape"):
        pearson(a, b[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        spearman(a, b[:1])


def test_time_per_image_takes_the_median_after_warmup(monkeypatch):
    clock = {"now": 0.0}
    durations = iter([9.0, 3.0, 1.0, 2.0, 8.0, 6.0, 4.0])  # 1 warmup, 3 timed; then 1 warmup, 2 timed

    def fn(x):
        clock["now"] += next(durations)

    monkeypatch.setattr(metrics, "perf_counter", lambda: clock["now"])
    t = time_per_image(fn, torch.zeros(4, 3, 8, 8), warmup=1, repeats=3)
    assert t.seconds == [3.0, 1.0, 2.0] and t.batch == 4
    assert t.seconds_per_image == 0.5 and t.images_per_second == 2.0  # median 2 s / 4 images
    t = time_per_image(fn, torch.zeros(4, 3, 8, 8), warmup=1, repeats=2)
    assert t.seconds == [6.0, 4.0] and t.seconds_per_image == 1.0  # even count: the lower median, 4 s / 4


def test_time_per_image_synchronises_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append(args))
    x = torch.zeros(2, 3, 8, 8)
    time_per_image(lambda x: None, x, warmup=2, repeats=3)
    assert calls == []  # CPU: nothing to wait for
    time_per_image(lambda x: None, x, warmup=2, repeats=3, device="cuda")
    assert len(calls) == 6  # before and after each timed call
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_per_image(lambda x: None, x, repeats=0)


def test_time_per_image_of_a_real_encoder():
    encoder, x = SmallResNet(widths=(4, 8, 8, 16)).eval(), torch.zeros(4, 3, 16, 16)
    with torch.inference_mode():
        t = time_per_image(encoder, x, warmup=1, repeats=2)
    assert len(t.seconds) == 2 and 0 < t.seconds_per_image < 1
    assert t.images_per_second == pytest.approx(1 / t.seconds_per_image)
