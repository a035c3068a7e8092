"""Network Dissection: which single units of an encoder detect which concepts (Bau et al., CVPR 2017).

For unit k of a layer with activation maps A_k(x) ``(h, w)``, Network Dissection

1. sets a threshold T_k, the top-``q`` quantile of A_k over every position of every image of the data set
   (q = 0.5 %: P(A_k > T_k) = q);
2. upsamples each map to the label resolution (bilinear, S) and keeps M_k(x) = [S(A_k(x)) > T_k];
3. scores unit k against concept c, with pixel-wise labels L_c(x), by the IoU over the data set::

       IoU_{k,c} = Σ_x |M_k(x) ∧ L_c(x)| / Σ_x |M_k(x) ∨ L_c(x)|

4. calls unit k a *detector* of its best concept c* = argmax_c IoU_{k,c} when IoU_{k,c*} > 0.04.

:func:`dissect` streams the data twice (thresholds, then IoU) and accumulates only (K, C) counts: with
|M_k ∨ L_c| = |M_k| + |L_c| − |M_k ∧ L_c|, it sums the labels over the few pixels each mask keeps, and skips
maps whose peak stays below T_k (bilinear values never exceed it). Layers are the encoder's taps
(:func:`layer_names`). :class:`RotatedUnits` is the paper's rotated-basis control. The
original concept set, Broden, needs a ~1 GB download (:func:`nemu_lib.broden.load_broden`); the Shapes scenes carry
pixel-wise concepts offline (:func:`nemu_lib.data.concept_masks`).

Reading a result: :func:`totals` (detectors per layer and category), :func:`detectors_per_layer`,
:func:`unique_concepts`, :func:`best_by_category` (the best IoU per layer and category); :func:`unit_masks`
recomputes one unit's M_k(x) on a few images; :func:`concept_shares` and :func:`iou_ceiling` give the bound
IoU <= q / s_c that no unit can pass for a concept covering a share s_c of the pixels.

Reference: Bau, D., Zhou, B., Khosla, A., Oliva, A., Torralba, A. *Network Dissection: Quantifying
interpretability of deep visual representations.* CVPR 2017, arXiv 1704.05796.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .budget import announce, forward_gflops
from .config import module_device
from .data import concept_names
from .encoders import Encoder, SmallResNet, TorchvisionResNet
from .progress import tqdm


def layer_names(encoder: Encoder) -> tuple[str, ...]:
    """Names of ``encoder.features(x)``'s maps, fine to coarse: ``stem, stage1..4`` (small ResNet),
    ``stem, layer1..4`` (torchvision ResNets), else the encoder's ``feature_names`` or ``tap0, tap1, …``."""
    n = len(encoder.feature_channels)
    names = getattr(encoder, "feature_names", None)
    if names is None and isinstance(encoder, SmallResNet | TorchvisionResNet):
        names = ("stem", *(f"{'stage' if isinstance(encoder, SmallResNet) else 'layer'}{i}" for i in range(1, n)))
    return tuple(names or (f"tap{i}" for i in range(n)))


def _layer_index(encoder: Encoder, layer: str | int) -> int:
    names = layer_names(encoder)
    if isinstance(layer, int) and -len(names) <= layer < len(names):
        return layer % len(names)
    if layer not in names:
        raise ValueError(f"unknown layer {layer!r} of {type(encoder).__name__}: choose one of {list(names)} "
                         f"(or an index 0..{len(names) - 1})")
    return names.index(layer)


def _uniform_hash(index: Tensor) -> Tensor:
    """Deterministic pseudo-random numbers in [0, 1) of int64 positions (the splitmix64 finaliser)."""
    def shr(z: Tensor, s: int) -> Tensor:  # logical right shift of int64
        return (z >> s) & ((1 << (64 - s)) - 1)

    z = index * (0x9E3779B97F4A7C15 - 2**64)
    z = (z ^ shr(z, 30)) * (0xBF58476D1CE4E5B9 - 2**64)
    z = (z ^ shr(z, 27)) * (0x94D049BB133111EB - 2**64)
    return shr(z ^ shr(z, 31), 11).double() / 2**53


class TailQuantile:
    """Streaming top-``q`` quantile of K units' activations, as ``torch.quantile(a_k, 1 - q)`` computes it.

    ``torch.quantile`` interpolates linearly between the sorted values of ranks ⌊p⌋ and ⌈p⌉, p = (1 − q)(n − 1),
    so only the n − ⌊p⌋ ≤ qn + 2 largest values matter: a running top-k keeps them, exactly, while they fit
    in ``max_tail`` values per unit. For more data, positions are first subsampled at the rate
    r = max_tail / (2qn) (the same positions for every unit, chosen by a hash of their index, so batching does
    not matter) and the quantile of the n_s ≈ rn sampled values is returned. Its error, as the share of all
    values above the estimate, has the standard deviation sqrt(q (1 − q)(1 − r) / n_s) < q sqrt(2 / max_tail):
    1.1 % of q for the default 16,384 (q = 0.5 % ± 0.006 %). Memory: K × max_tail floats.

    Args: ``num_units`` K; ``total`` n, the values per unit to come (images × h × w); ``q`` the top share;
    ``max_tail`` the values kept per unit.
    """

    def __init__(self, num_units: int, total: int, q: float, max_tail: int = 16384) -> None:
        if not 0 < q < 1 or total < 1:
            raise ValueError(f"need 0 < q < 1 and at least one value, got q = {q}, {total} values")
        self.q, self.seen, self.sampled = q, 0, 0
        need = total - math.floor((1 - q) * (total - 1))  # exact: the n - ⌊p⌋ largest values
        self.rate, self.keep = (1.0, need) if need <= max_tail else (max_tail / (2 * q * total), max_tail)
        self.values = torch.empty(num_units, 0, device="cpu")  # (K, <= keep), largest first; moved to the data's device

    def update(self, a: Tensor) -> None:
        """Add activations ``a (B, K, h, w)`` (or ``(B, K)``) of the next B images in data-set order."""
        flat = a.detach().transpose(0, 1).reshape(a.shape[1], -1).float()  # (K, n_b), position-major order
        n_b, self.seen = flat.shape[1], self.seen + flat.shape[1]
        if self.rate < 1:
            flat = flat[:, _uniform_hash(torch.arange(self.seen - n_b, self.seen, device=a.device)) < self.rate]
        self.sampled += flat.shape[1]
        merged = torch.cat([self.values.to(flat.device), flat], dim=1)
        self.values = merged.topk(min(self.keep, merged.shape[1]), dim=1).values

    def quantile(self) -> Tensor:
        """T ``(K,)``: the (1 − q) quantile of every unit (of the sampled values when ``rate < 1``)."""
        n = self.sampled
        if n == 0:
            raise ValueError("no activations seen: the data set is empty")
        p = (1 - self.q) * (n - 1)  # as torch.quantile: lerp of the sorted values of ranks ⌊p⌋ and ⌈p⌉
        lo, hi = n - 1 - math.floor(p), n - 1 - math.ceil(p)  # positions in the descending tail
        if lo >= self.values.shape[1]:
            raise RuntimeError(f"the kept tail ({self.values.shape[1]}) is too short for rank {lo}: raise max_tail")
        a, b = self.values[:, lo], self.values[:, hi]
        return a + (p - math.floor(p)) * (b - a)


@dataclass
class Dissection:
    """One layer's K units against C concepts ``"category/concept"``: IoU_{k,c} ``(K, C)`` float64, T_k ``(K,)``,
    ``top_images (K, n_top)`` (indices of the images of largest peak activation per unit); derived:
    ``best_iou`` and ``best_concept`` ``(K,)`` (max and argmax over c), ``detectors`` ``(K,)`` bool."""

    layer: str
    concepts: tuple[str, ...]
    iou: Tensor
    thresholds: Tensor
    top_images: Tensor
    iou_threshold: float = 0.04

    def __post_init__(self) -> None:
        self.categories = tuple(c.split("/")[0] if "/" in c else "concept" for c in self.concepts)
        self.best_iou, self.best_concept = self.iou.max(dim=1)  # (K,), (K,)
        self.detectors = self.best_iou > self.iou_threshold  # (K,) bool

    def table(self, detectors_only: bool = False) -> list[dict]:
        """Rows ``{unit, concept, category, iou, detector}``, best IoU first (``pandas.DataFrame(rows)``)."""
        rows = [{"unit": k, "concept": self.concepts[c], "category": self.categories[c], "iou": iou,
                 "detector": iou > self.iou_threshold}
                for k, (c, iou) in enumerate(zip(self.best_concept.tolist(), self.best_iou.tolist(), strict=True))]
        rows.sort(key=lambda r: -r["iou"])
        return [r for r in rows if r["detector"]] if detectors_only else rows

    def counts(self, unique: bool = False) -> dict[str, int]:
        """Detector units per category, or (``unique``) distinct concepts detected per category."""
        out = dict.fromkeys(dict.fromkeys(self.categories), 0)
        rows = self.table(detectors_only=True)
        for row in {r["concept"]: r for r in rows}.values() if unique else rows:
            out[row["category"]] += 1
        return out


@torch.inference_mode()
def dissect(
    encoder: Encoder, images: Tensor | Iterable[tuple[Tensor, Tensor]], labels: Tensor | None = None,
    layers: Sequence[str | int] | None = None, concepts: Sequence[str] | None = None,
    top_quantile: float = 0.005, iou_threshold: float = 0.04, batch_size: int = 64, max_tail: int = 16384,
    n_top: int = 8, cache_bytes: int = 2**29, device: str | torch.device | None = None, progress: bool = True,
) -> dict[str, Dissection]:
    """Network Dissection of ``layers`` of ``encoder`` (see the module docstring for the equations).

    Args:
        encoder: any :class:`~nemu_lib.encoders.Encoder`; run in eval mode, restored afterwards.
        images: normalised images ``(N, C, H, W)`` (with ``labels``), or a re-iterable of ``(x, labels)``
            batches with a known length (e.g. a DataLoader over :func:`nemu_lib.broden.load_broden`).
        labels: concept masks ``(N, n_concepts, h, w)`` bool, at any resolution of the images' aspect
            (:func:`nemu_lib.data.concept_masks`); activation maps are upsampled to it.
        layers: names or indices of :func:`layer_names` (default: all).
        concepts: names ``"category/concept"`` of the label channels (default: the data set's ``concept_names``,
            else the Shapes concepts).
        top_quantile: q, the share of positions above each unit's threshold; ``iou_threshold``: for detectors.
        batch_size: images per encoder call (results do not depend on it); ``n_top``: top images kept per unit.
        max_tail: memory per unit for the thresholds (:class:`TailQuantile`: exact while qn + 2 values fit).
        cache_bytes: with tensor inputs, maps up to this size are kept from pass 1 for pass 2 (one encoder pass).
        device: where to compute (default: the encoder's); ``progress``: show progress bars.

    Returns ``{layer name: Dissection}``.

    >>> from nemu_lib.data import ShapesScenes, concept_masks, normalize
    >>> s = ShapesScenes("val", size=8, image_size=32).stack(progress=False)
    >>> r = dissect(SmallResNet((4, 8, 8, 8)), normalize(s["image"]), concept_masks(s["concepts"]),
    ...             layers=["stage1"], progress=False)
    >>> r["stage1"].iou.shape
    torch.Size([4, 18])
    """
    if isinstance(images, Tensor):
        if labels is None or labels.ndim != 4 or images.ndim != 4 or len(labels) != len(images):
            raise ValueError("pass images (N, C, H, W) with labels (N, n_concepts, h, w) of the same N, or an "
                             f"iterable of (x, labels) batches; got {tuple(images.shape)} and "
                             f"{None if labels is None else tuple(labels.shape)}")
        n_images = len(images)
        data = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, n_images, batch_size)]
    else:
        data, n_images = images, len(getattr(images, "dataset", images))  # a DataLoader or a list of batches
    if n_images == 0:
        raise ValueError("the data set is empty: dissection needs at least one image")
    names = layer_names(encoder)
    index = [_layer_index(encoder, layer) for layer in (range(len(names)) if layers is None else layers)]
    if concepts is None:
        concepts = getattr(getattr(images, "dataset", None), "concept_names", None) or concept_names()
    concepts = tuple(concepts)
    dev = torch.device(device) if device is not None else module_device(encoder)

    cache: dict[int, list[Tensor]] = {}  # batch -> its maps, from pass 1 to pass 2
    room = [cache_bytes if isinstance(images, Tensor) else 0]  # a DataLoader may shuffle: never cache it

    def maps_of(b: int, x: Tensor, y: Tensor) -> list[Tensor]:
        if b in cache:
            return cache.pop(b)
        if y.ndim != 4 or y.shape[0] != x.shape[0] or x.shape[-2] * y.shape[-1] != x.shape[-1] * y.shape[-2]:
            raise ValueError(f"labels {tuple(y.shape)} do not fit images {tuple(x.shape)}: need (B, n_concepts, "
                             "h, w) of the same images, with the images' aspect ratio")
        if y.shape[1] != len(concepts):
            raise ValueError(f"{len(concepts)} concept names for {y.shape[1]} label channels: pass concepts=[...]")
        feats = encoder.features(x.to(dev))
        maps = [feats[i].float() for i in index]  # [(B, K, h_l, w_l)]
        size = sum(a.numel() * a.element_size() for a in maps)
        if size <= room[0]:
            cache[b], room[0] = maps, room[0] - size
        return maps

    first = (images if isinstance(images, Tensor) else next(iter(data))[0])[:1].to(dev)
    announce(f"Network Dissection of {n_images} images", forward_gflops(encoder, first),
             infer_images=2 * n_images, calls=2 * len(data), device=dev)  # two passes (one with the cache)
    was_training = encoder.training
    encoder.eval()
    try:
        thresholds, top_images = _thresholds(maps_of, data, n_images, top_quantile, max_tail, n_top, progress)
        room[0] = 0
        inter, area_l = _intersections(maps_of, data, thresholds, progress)
    finally:
        encoder.train(was_training)
    out = {}
    for j, i in enumerate(index):
        inter_j, area_m = inter[j][:, :-1], inter[j][:, -1:]  # Σ|M_k ∧ L_c| (K, C), Σ|M_k| (K, 1)
        union = area_m + area_l[None, :] - inter_j  # |M ∨ L| = |M| + |L| - |M ∧ L|
        iou = torch.where(union > 0, inter_j / union.clamp_min(1), 0.0)  # (K, C)
        out[names[i]] = Dissection(names[i], concepts, iou, thresholds[j].cpu(), top_images[j], iou_threshold)
    return out


def _thresholds(maps_of, data, n_images, q, max_tail, n_top, progress) -> tuple[list[Tensor], list[Tensor]]:
    """Pass 1: T_k of every layer, and the top-activating images of every unit."""
    tails: list[TailQuantile] = []
    top: list[tuple[Tensor, Tensor]] = []  # (peak activations, image indices), each (K, <= n_top)
    seen = 0
    for b, (x, y) in enumerate(tqdm(data, desc="dissection: thresholds", disable=not progress)):
        for j, a in enumerate(maps_of(b, x, y)):
            k = a.shape[1]
            if j == len(tails):
                tails.append(TailQuantile(k, n_images * a.shape[2] * a.shape[3], q, max_tail))
                top.append((a.new_empty(k, 0), torch.empty(k, 0, dtype=torch.long, device=a.device)))
            tails[j].update(a)
            peak = torch.cat([top[j][0], a.amax(dim=(2, 3)).T], dim=1)  # (K, kept + B)
            ids = torch.cat([top[j][1], torch.arange(seen, seen + len(a), device=a.device).expand(k, -1)], dim=1)
            peak, order = peak.sort(dim=1, descending=True, stable=True)  # ties: the earlier image first
            top[j] = peak[:, :n_top], ids.gather(1, order[:, :n_top])
        seen += len(x)
    if not tails:
        raise ValueError("the data set is empty: dissection needs at least one image")
    return [t.quantile() for t in tails], [ids.cpu() for _, ids in top]


def _intersections(maps_of, data, thresholds, progress) -> tuple[list[Tensor], Tensor]:
    """Pass 2, float64 on the CPU: per layer [Σ|M_k ∧ L_c|, Σ|M_k|] ``(K, C + 1)``; Σ|L_c| ``(C,)``."""
    inter: list[Tensor] = [torch.zeros(0, device="cpu")] * len(thresholds)
    area_l = torch.zeros((), dtype=torch.float64, device="cpu")
    for b, (x, y) in enumerate(tqdm(data, desc="dissection: IoU", disable=not progress)):
        maps = maps_of(b, x, y)
        c, pixels = y.shape[1], y.shape[0] * y.shape[2] * y.shape[3]
        dtype = torch.float32 if pixels <= 2**24 else torch.float64  # float32 counts are exact up to 2^24
        lab = y.to(maps[0].device).permute(0, 2, 3, 1).reshape(-1, c).to(dtype)  # (B h w, C) L_c per pixel
        area_l = area_l + lab.sum(0).double().cpu()
        lab = torch.cat([lab, lab.new_ones(pixels, 1)], dim=1).view(len(y), -1, c + 1)  # (B, h w, C + 1)
        for j, a in enumerate(maps):
            t = thresholds[j].to(a.device)
            inter[j] = inter[j] if inter[j].ndim == 2 else torch.zeros(len(t), c + 1, dtype=torch.float64, device="cpu")
            # bilinear values are convex combinations of the map's: only maps whose peak exceeds T_k matter
            img, unit = (a.amax(dim=(2, 3)) > t).nonzero(as_tuple=True)  # (n,) pairs (image, unit)
            step = max(1, 2**24 // lab.shape[1])  # maps per chunk: bounds the memory of the upsampled maps
            for s0 in range(0, len(img), step):
                i, u = img[s0:s0 + step], unit[s0:s0 + step]
                up = F.interpolate(a[i, u][:, None], size=y.shape[-2:], mode="bilinear", align_corners=False)
                n, pix = (up.flatten(1) > t[u, None]).nonzero(as_tuple=True)  # the pixels of M_k(x), sparse
                counts = lab.new_zeros(len(t), c + 1).index_add_(0, u[n], lab[i[n], pix])  # Σ_p M_kp [L_p, 1]
                inter[j] += counts.double().cpu()
    return inter, area_l


def concept_shares(labels: Tensor) -> Tensor:
    """s_c, the share of all pixels of the data set labelled with concept c: labels ``(N, C, H, W)`` -> ``(C,)``
    float64.

    >>> concept_shares(torch.tensor([[[[1, 0]], [[1, 1]]]], dtype=torch.bool))
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    return labels.double().mean(dim=(0, 2, 3))


def iou_ceiling(share: Tensor, top_quantile: float = 0.005) -> Tensor:
    """The best IoU a unit mask covering a share q of the pixels can reach with a concept covering a share s_c:

        IoU <= |M| / |L| = q / s_c   (when M is inside L; 1 when s_c <= q),

    so at the paper's settings (q = 0.5 %, detectors above IoU 0.04) no concept above q / 0.04 = 12.5 % of the
    pixels can be detected. ``share (C,)`` from :func:`concept_shares`; returns ``(C,)``.

    >>> iou_ceiling(torch.tensor([0.001, 0.05, 0.25]), 0.005)
    tensor([1.0000, 0.1000, 0.0200])
    """
    return (top_quantile / share).clamp(max=1.0)


def totals(result: Mapping[str, Dissection]) -> dict[str, dict[str, int]]:
    """Detector units per layer and category, ``{layer: {category: count}}``, from :func:`dissect`'s result.

    A unit counts once, for its best concept, under that concept's category (:meth:`Dissection.counts`).
    """
    return {layer: r.counts() for layer, r in result.items()}


def detectors_per_layer(result: Mapping[str, Dissection]) -> list[int]:
    """The number of detector units of each layer, in the result's order (fine to coarse)."""
    return [int(r.detectors.sum()) for r in result.values()]


def unique_concepts(result: Mapping[str, Dissection]) -> int:
    """The number of distinct concepts detected by at least one unit of any layer."""
    return len({r.concepts[c] for r in result.values() for c in r.best_concept[r.detectors].tolist()})


def best_by_category(result: Mapping[str, Dissection]) -> dict[str, list[float]]:
    """``{category: [max over units k and the category's concepts c of IoU_{k,c}, one per layer]}``: how close
    the best unit of each layer comes to detecting a concept of each category."""
    first = next(iter(result.values()))
    cols = {cat: [j for j, c in enumerate(first.categories) if c == cat] for cat in dict.fromkeys(first.categories)}
    return {cat: [r.iou[:, idx].max().item() for r in result.values()] for cat, idx in cols.items()}


@torch.inference_mode()
def unit_masks(encoder: Encoder, x: Tensor, layer: str | int, unit: int, threshold: float | Tensor,
               size: tuple[int, int] | None = None) -> Tensor:
    """M_k(x) = [S(A_k(x)) > T_k] for the images ``x (B, C, H, W)`` (normalised): unit ``unit`` of ``layer``
    upsampled bilinearly to ``size`` (default: the images' size) and thresholded, ``(B, *size)`` bool on the CPU.

    ``threshold`` is the unit's T_k, e.g. ``dissect(...)[layer].thresholds[unit]``; the masks are those whose
    overlaps with the labels :func:`dissect` sums.
    """
    dev = module_device(encoder, x.device)
    a = encoder.features(x.to(dev))[_layer_index(encoder, layer)][:, unit:unit + 1].float()  # (B, 1, h, w)
    up = F.interpolate(a, size=size or tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return (up > torch.as_tensor(threshold, device=up.device)).cpu()


def random_rotation(k: int, seed: int = 0) -> Tensor:
    """A Haar-random orthogonal matrix ``(k, k)``: QR of a Gaussian matrix, signs fixed by R's diagonal."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same Q on every device
    q, r = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64, device="cpu"))
    return (q * torch.sign(torch.diagonal(r))).float()


class RotatedUnits(Encoder):
    """``encoder`` with the unit basis of ``layers`` rotated: A'(p) = Q A(p) at every position p, one Haar-random Q
    per layer (seeds ``seed``, ``seed + 1``, …).

    The paper's control: a rotated layer holds the same information (Q is invertible: any linear read-out is as
    good) but its units are mixtures of the original ones. Inner layers are rotated on the way out only (the
    next stage still sees A, as if Q^T undid Q), so z is unchanged; rotating the last tap rotates z to Q z (z is
    that map's spatial mean, and pooling commutes with Q).
    """

    def __init__(self, encoder: Encoder, layers: Sequence[str | int] = (-1,), seed: int = 0) -> None:
        super().__init__()
        self.encoder, self.feature_names = encoder, layer_names(encoder)
        for attr in ("embed_dim", "feature_channels", "feature_strides", "min_size", "in_channels", "mean", "std",
                     "config"):
            setattr(self, attr, getattr(encoder, attr))
        self.index = sorted({_layer_index(encoder, layer) for layer in layers})
        device = module_device(encoder, None)  # the rotations live beside the encoder's weights
        for j, i in enumerate(self.index):
            self.register_buffer(f"q{i}", random_rotation(self.feature_channels[i], seed + j).to(device))
        last = len(self.feature_names) - 1
        self.rotates_z = last in self.index and self.embed_dim == self.feature_channels[last]
        self.train(encoder.training)  # the wrapper starts in the encoder's mode

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z, maps = self.encoder.forward_features(x)
        maps = list(maps)  # a copy: the encoder's own next stages saw the unrotated maps
        for i in self.index:
            maps[i] = torch.einsum("kj,bjhw->bkhw", getattr(self, f"q{i}"), maps[i])  # (B, K, h, w)
        return (z @ getattr(self, f"q{len(maps) - 1}").T if self.rotates_z else z), maps
