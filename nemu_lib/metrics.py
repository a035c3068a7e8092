"""Batched metrics for explanation maps: locality, complexity, faithfulness, fidelity and speed.

Definitions as in Quantus (Hedström et al., JMLR 2023; arXiv 2202.06861) and agreeing with it numerically
(``tests/test_metrics.py``), for maps ``a (B, H, W)`` and ground-truth masks ``gt (B, H, W)``:

    Relevance Mass Accuracy   Σ_{p∈GT} a⁺_p / Σ_p a⁺_p                  (Arras et al., Inf. Fusion 2022)
    Relevance Rank Accuracy   |top-|GT| pixels of a ∩ GT| / |GT|         (Arras et al., Inf. Fusion 2022)
    Pointing Game             [argmax_p a_p ∈ GT]                          (Zhang et al., IJCV 2018)
    Complexity                −Σ_p P_p log P_p,  P = |a| / Σ|a|             (Bhatt et al., IJCAI 2020)
    Sparseness (Gini)         Σ_k (2k − n − 1) |a|_(k) / (n Σ|a|)          (Chalasani et al., ICML 2020)

plus deletion / insertion curves in representation space (Petsiuk et al., BMVC 2018, with the cosine
similarity of representations in place of a class score), per-image Pearson / Spearman agreement of two maps
and the wall-clock cost of an explainer. Every metric returns one float64 value per image, ``(B,)``, so callers
average and take error bars. A map with no mass (Σ|a| = 0, or no positive mass for the mass accuracy) has
no defined locality, complexity or sparseness: those metrics return NaN for it (use ``torch.nanmean`` and
report how many); maps with NaN/Inf, mismatched shapes or empty masks raise a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_images


def _check_maps(a: object, name: str = "a") -> Tensor:
    """Check that ``a`` is a finite float map batch ``(B, H, W)``; return it as float64."""
    if not isinstance(a, Tensor) or not a.is_floating_point():
        raise TypeError(f"{name} must be a float tensor of shape (B, H, W), got {getattr(a, 'dtype', type(a))}")
    if a.ndim != 3:
        hint = f" (drop the channel axis: {name}[:, 0], or pool it: {name}.sum(1))" if a.ndim == 4 else ""
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(a.shape)}{hint}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf values: fix or drop those maps before scoring them")
    return a.double()


def _check_locality(a: Tensor, gt: object) -> tuple[Tensor, Tensor]:
    """Maps ``(B, n)`` float64 and non-empty masks ``(B, n)`` bool, flattened, or a clear error."""
    a = _check_maps(a)
    if not isinstance(gt, Tensor) or gt.shape != a.shape:
        raise ValueError(
            f"gt must be a tensor shaped like the maps {tuple(a.shape)}, got {tuple(getattr(gt, 'shape', ()))}: "
            "resize the masks to the map size (nearest neighbour) and drop any channel axis"
        )
    if gt.dtype != torch.bool:
        if not ((gt == 0) | (gt == 1)).all():
            raise ValueError("gt must be bool or hold only 0 and 1: threshold soft masks first, e.g. gt > 0.5")
        gt = gt != 0
    empty = (~gt.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"gt is empty for image(s) {empty}: locality is undefined without a target; "
            "keep only images with an object, e.g. keep = gt.flatten(1).any(1)"
        )
    return a.flatten(1), gt.flatten(1)


def _no_mass_to_nan(score: Tensor, mass: Tensor) -> Tensor:
    return torch.where(mass > 0, score, torch.nan)


def relevance_mass_accuracy(a: Tensor, gt: Tensor, positive: bool = True) -> Tensor:
    """Share of the attribution mass that falls inside the ground truth, ``(B,)`` in [0, 1].

    RMA = Σ_{p∈GT} a⁺_p / Σ_p a⁺_p with a⁺ = max(a, 0), the positive evidence (Arras et al., "CLEVR-XAI",
    Information Fusion 2022). NaN for a map with no positive mass (``positive=False``: for Σ a = 0).

    Quantus: ``RelevanceMassAccuracy(abs=False, normalise=False)`` on ``a.clamp(min=0)``; it does not clamp,
    so ``positive=False`` here (Σ_GT a / Σ a, unbounded with mixed signs) equals it on the raw map.
    """
    a, gt = _check_locality(a, gt)
    if positive:
        a = a.clamp(min=0)
    total = a.sum(1)
    return _no_mass_to_nan((a * gt).sum(1) / torch.where(total != 0, total, 1), total.abs())


def relevance_rank_accuracy(a: Tensor, gt: Tensor) -> Tensor:
    """Share of the K = |GT| highest-attributed pixels that lie inside the ground truth, ``(B,)`` in [0, 1].

    RRA = |{top-K pixels of a} ∩ GT| / K (Arras et al., Information Fusion 2022). Ties at the K-th
    value are broken by a stable sort: the earlier pixel in row-major order ranks higher. NaN for an all-zero
    map.

    Quantus: ``RelevanceRankAccuracy(abs=False)``; it sorts with NumPy's unstable default, so the two can
    differ only when tied pixels straddle rank K with some inside GT and some outside.
    """
    a, gt = _check_locality(a, gt)
    k = gt.sum(1, keepdim=True)  # (B, 1)
    order = a.sort(dim=1, descending=True, stable=True).indices  # (B, n)
    top = torch.arange(a.shape[1], device=a.device) < k  # (B, n): the first K ranks
    hits = (gt.gather(1, order) & top).sum(1).double()
    return _no_mass_to_nan(hits / k[:, 0], a.abs().sum(1))


def pointing_game(a: Tensor, gt: Tensor) -> Tensor:
    """1.0 when the maximum of the map lies in the ground truth, else 0.0, ``(B,)``.

    Zhang et al., "Top-down neural attention by excitation backprop", IJCV 2018, without their 15-px
    tolerance. When several pixels share the maximum, it is a hit if any of them is inside GT, as in Quantus
    ``PointingGame(weighted=False, abs=False)``. NaN for an all-zero map (Quantus counts it as a hit).
    """
    a, gt = _check_locality(a, gt)
    at_max = a == a.max(1, keepdim=True).values  # (B, n)
    return _no_mass_to_nan((at_max & gt).any(1).double(), a.abs().sum(1))


def complexity(a: Tensor) -> Tensor:
    """Entropy of the normalised absolute map, ``(B,)`` in [0, log HW]; lower = simpler.

    −Σ_p P_p log P_p with P = |a| / Σ|a| and 0 log 0 = 0 (Bhatt et al., "Evaluating and aggregating
    feature-based model explanations", IJCAI 2020). A uniform map gives log(HW), a one-hot map 0; an
    all-zero map NaN (as in Quantus).

    Quantus: ``Complexity(abs=True)``; it computes P log(P + 1e-12), at most HW · 1e-12 away.
    """
    p = _check_maps(a).flatten(1).abs()
    mass = p.sum(1, keepdim=True)
    p = p / torch.where(mass > 0, mass, 1)
    return _no_mass_to_nan(-torch.xlogy(p, p).sum(1), mass[:, 0])


def sparseness(a: Tensor) -> Tensor:
    """Gini index of the absolute map, ``(B,)`` in [0, 1 − 1/n]; higher = sparser.

    G = Σ_k (2k − n − 1) |a|_(k) / (n Σ|a|) over the n = HW values sorted ascending, |a|_(1) ≤ … ≤ |a|_(n)
    (Chalasani et al., "Concise explanations of neural networks using adversarial training", ICML 2020;
    Hurley & Rickard 2009). A constant map gives 0, a one-hot map 1 − 1/n; an all-zero map NaN.

    Quantus: ``Sparseness(abs=True)``; it adds 1e-7 to every |a| first, which scales G by
    Σ|a| / (Σ|a| + n · 1e-7) — a relative 2.6e-5 for a max-normalised one-hot 16×16 map, negligible for
    maps with Σ|a| ≫ n · 1e-7 (it returns 0, not NaN, for an all-zero map).
    """
    v = _check_maps(a).flatten(1).abs().sort(dim=1).values  # (B, n) ascending
    n = v.shape[1]
    weight = 2 * torch.arange(1, n + 1, dtype=v.dtype, device=v.device) - n - 1  # (n,)
    mass = v.sum(1)
    return _no_mass_to_nan((v * weight).sum(1) / (n * torch.where(mass > 0, mass, 1)), mass)


@dataclass
class PerturbationCurves:
    """Deletion and insertion curves of B maps over S steps, float64.

    Attributes:
        fractions: share of pixels removed (deletion) or inserted (insertion) at each point ``(S+1,)``,
            from 0 to 1.
        deletion: cos(f(x), f(x with those pixels zeroed)) ``(B, S+1)``; starts at 1.
        insertion: cos(f(x), f(only those pixels of x kept)) ``(B, S+1)``; ends at 1.
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor

    @property
    def deletion_auc(self) -> Tensor:
        """Trapezoid area under the deletion curve over the fraction axis, ``(B,)``; lower = more faithful."""
        return torch.trapezoid(self.deletion, self.fractions, dim=1)

    @property
    def insertion_auc(self) -> Tensor:
        """Trapezoid area under the insertion curve over the fraction axis, ``(B,)``; higher = more faithful."""
        return torch.trapezoid(self.insertion, self.fractions, dim=1)


@torch.inference_mode()
def deletion_insertion(
    encoder: nn.Module,
    x: Tensor,
    a: Tensor,
    steps: int = 16,
    batch_size: int = 64,
) -> PerturbationCurves:
    """Deletion and insertion curves of maps ``a (B, H, W)`` for images ``x (B, C, H, W)`` in representation space.

    Pixels are ranked by attribution, highest first (ties: the earlier pixel in row-major order first, by a
    stable sort, so a constant map removes pixels in raster order). At step j the top k_j = ⌊j n / S⌋ of
    the n = HW pixels are

        deleted    x'_j = x ⊙ [rank ≥ k_j]   (all channels set to 0, the data set mean)
        inserted   x'_j = x ⊙ [rank < k_j]   (into the all-zero image)

    and scored by cos(f(x), f(x'_j)) (Petsiuk et al., "RISE", BMVC 2018, with the encoder's representation
    in place of a class probability). ``fractions`` are k_j / n, equal to j / S when S divides n.

    Args:
        encoder: maps ``(m, C, H, W)`` to ``(m, D)``; put in eval mode for the call, then restored.
        x: the images, normalised as the encoder takes them.
        a: one map per image; only its order matters.
        steps: S, the number of steps between 0 and 1 (S + 1 points per curve).
        batch_size: perturbed images per encoder call; the chunks run over (curve, image, step) triples,
            so the result does not depend on it.

    Returns:
        :class:`PerturbationCurves` with the curves and their areas.
    """
    check_images(x, channels=getattr(encoder, "in_channels", None))
    a = _check_maps(a).to(x.device)
    if a.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"a must hold one (H, W) map per image, shape {(x.shape[0], *x.shape[2:])}, got {tuple(a.shape)}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    b, n, dev = x.shape[0], a[0].numel(), x.device
    order = a.flatten(1).sort(dim=1, descending=True, stable=True).indices  # (B, n)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, n))  # (B, n)
    k = torch.arange(steps + 1, device=dev) * n // steps  # (S+1,) pixels removed / inserted per step

    was_training = encoder.training
    encoder.eval()
    try:
        h = torch.cat([encoder(chunk) for chunk in x.split(batch_size)])  # (B, D)
        jobs = torch.arange(2 * b * (steps + 1), device=dev)  # (curve, image, step), flattened
        scores = []
        for job in jobs.split(batch_size):
            curve, i, j = job // (b * (steps + 1)), job // (steps + 1) % b, job % (steps + 1)
            inserted = rank[i] < k[j, None]  # (m, n): the top k_j pixels of each image
            keep = torch.where(curve[:, None] == 0, ~inserted, inserted).view(-1, 1, *x.shape[2:])
            scores.append(F.cosine_similarity(h[i], encoder(x[i] * keep), dim=1))  # (m,)
    finally:
        encoder.train(was_training)
    deletion, insertion = torch.cat(scores).double().view(2, b, steps + 1)
    return PerturbationCurves(k.double() / n, deletion, insertion)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Pearson correlation of two map batches ``(B, H, W)`` over pixels, ``(B,)``.

    r = Σ (a − ā)(b − b̄) / sqrt(Σ (a − ā)² Σ (b − b̄)²) (Pearson 1895), as ``scipy.stats.pearsonr``;
    NaN when either map is constant.
    """
    a, b = _check_maps(a), _check_maps(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.flatten(1), b.flatten(1)  # (B, n)
    constant = (a == a[:, :1]).all(1) | (b == b[:, :1]).all(1)  # exactly, before rounding in the mean
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(constant, torch.nan, r)


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks 1..n along dim 1, tied values sharing their average rank (``scipy.stats.rankdata``), ``(B, n)``."""
    sorted_v, order = v.sort(dim=1, stable=True)  # (B, n)
    n = v.shape[1]
    pos = torch.arange(n, device=v.device).expand_as(order)
    first = torch.ones_like(order, dtype=torch.bool)
    first[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]  # starts a group of equal values
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, 0).cummax(1).values  # first position of the group
    end = torch.where(last, pos, n).flip(1).cummin(1).values.flip(1)  # last position of the group
    return torch.empty_like(v).scatter_(1, order, (start + end).to(v.dtype) / 2 + 1)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Spearman rank correlation of two map batches ``(B, H, W)``, ``(B,)``.

    ρ = Pearson correlation of the ranks, tied values sharing their average rank (Spearman 1904), as
    ``scipy.stats.spearmanr``; NaN when either map is constant.
    """
    a, b = _check_maps(a), _check_maps(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return pearson(_average_ranks(a.flatten(1)).view_as(a), _average_ranks(b.flatten(1)).view_as(b))


@dataclass
class Timing:
    """Wall-clock cost of one call on a batch.

    Attributes:
        seconds_per_image: the median over repeats (the lower one for an even count) of seconds per call / B.
        images_per_second: its inverse.
        seconds: the duration of every timed call, in order.
        batch: B, the images per call.
    """

    seconds_per_image: float
    images_per_second: float
    seconds: list[float]
    batch: int


def time_per_image(
    fn: Callable[[Tensor], object],
    x: Tensor,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str | None = None,
) -> Timing:
    """Time ``fn(x)`` on a batch ``x (B, ...)``: seconds per image (median of ``repeats`` calls) and images/s.

    ``warmup`` untimed calls come first (allocator, kernel selection). On CUDA, ``torch.cuda.synchronize``
    runs before starting and before stopping each clock, so queued kernels are counted. ``fn`` decides its own
    grad mode (RELAX runs under ``torch.inference_mode``; gradient methods need grad). Time the encoder's own
    forward pass, ``time_per_image(encoder, x)``, as the floor any explainer built on it pays.

    Args:
        fn: called as ``fn(x)``; its result is discarded.
        x: the batch.
        warmup: untimed calls first.
        repeats: timed calls (at least 1).
        device: where ``fn`` runs (default ``x.device``); only whether it is CUDA matters.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    cuda = torch.device(device if device is not None else x.device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn(x)
    seconds = []
    for _ in range(repeats):
        sync()
        start = perf_counter()
        fn(x)
        sync()
        seconds.append(perf_counter() - start)
    per_image = sorted(seconds)[(repeats - 1) // 2] / len(x)  # the (lower) median
    return Timing(per_image, 1 / per_image, seconds, len(x))


def object_contrast(a: Tensor, gt: Tensor) -> Tensor:
    """How much higher a map is inside the ground truth than outside it, in units of its spread, ``(B,)``.

    C = (mean_{p∈GT} a_p − mean_{p∉GT} a_p) / std_p(a), with the sample standard deviation over the map's
    pixels (n − 1). Unlike the mass accuracy it ignores the map's level: a RELAX map sits on the average
    similarity (~0.9) and varies by ~1e-3 around it, so only its pattern can favour the object. NaN for a
    constant map, or when GT covers the whole image.

    >>> object_contrast(torch.tensor([[[3.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[True, False], [False, False]]]))
    tensor([2.], dtype=torch.float64)
    """
    a, gt = _check_locality(a, gt)  # (B, n) float64, (B, n) bool
    inside = (a * gt).sum(1) / gt.sum(1)
    outside = (a * ~gt).sum(1) / (~gt).sum(1)  # 0 / 0 = NaN without a background
    spread = a.std(1)
    return _no_mass_to_nan((inside - outside) / torch.where(spread > 0, spread, 1), spread)


def relative_rms_error(a: Tensor, ref: Tensor) -> Tensor:
    """Root-mean-square difference of two map batches ``(B, H, W)``, in units of the reference's spread, ``(B,)``.

    E = sqrt(mean_p (a_p − ref_p)²) / std_p(ref) (sample standard deviation, n − 1): 1 means an error as large
    as the variation the reference map shows, which is what a map is read for. NaN for a constant reference.
    Used for RELAX's Monte-Carlo error against a run with many more masks (notebook 02).
    """
    a, ref = _check_maps(a), _check_maps(ref, "ref")
    if a.shape != ref.shape:
        raise ValueError(f"a and ref must have the same shape, got {tuple(a.shape)} and {tuple(ref.shape)}")
    spread = ref.flatten(1).std(1)
    rms = (a - ref).flatten(1).square().mean(1).sqrt()
    return _no_mass_to_nan(rms / torch.where(spread > 0, spread, 1), spread)


def tile_means(a: Tensor, k: int) -> Tensor:
    """The mean of each of the ``k x k`` equal tiles of maps ``a (B, kh, kw)``, row by row, ``(B, k * k)``.

    Tile t = k r + c covers rows r h … (r + 1) h − 1 and columns c w … (c + 1) w − 1, numbered as
    :func:`nemu_lib.data.mosaic` numbers the scenes of a mosaic. In RELAX's reference mode the tile whose
    scene gave the reference should have the highest mean importance.

    >>> tile_means(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), 2)
    tensor([[1., 2., 3., 4.]], dtype=torch.float64)
    """
    a = _check_maps(a)
    b, height, width = a.shape
    if k < 1 or height % k or width % k:
        raise ValueError(f"maps of {height} x {width} px do not split into {k} x {k} equal tiles")
    return a.view(b, k, height // k, k, width // k).mean((2, 4)).flatten(1)  # (B, k, k) -> (B, k * k)
