"""Where filters fire: peak positions and the location instability of part filters.

A filter that represents one object part fires at a spot whose distance to each landmark of the object barely
changes between images (Zhang, Wu, Zhu, *Interpretable Convolutional Neural Networks*, CVPR 2018, arXiv
1710.00935, §4; used again by Zhang, Yang, Liu, Wu, Zhu, *Unsupervised learning of neural networks to explain
neural networks*, arXiv 1805.07468). For filter f with peak p_f(x) on image x (the centre of its most active
unit, :func:`peak_positions`) and landmarks q_l(x) of the object in x::

    instability_f = (1/|L|) Σ_l  std_{x ∈ top_k(f)} ‖p_f(x) − q_l(x)‖₂  /  sqrt(H² + W²)

where top_k(f) are the k images on which f fires most strongly (the largest peak values; the paper takes
k = 100), the std is the population one (divide by n, not n − 1) over those of the k images where landmark l
is visible, and H × W is the image size. Lower is more part-like: a filter that always fires on the same part
keeps its distances to every landmark. The paper reports the mean over filters; :func:`location_instability`
returns one value per filter ``(F,)`` and the caller averages (``torch.nanmean``).

Two reference levels put a number in context, at the same map resolution and on the same landmarks:

- chance (:func:`chance_peaks`): peaks at uniformly random units, the instability of a filter that fires
  anywhere;
- the quantisation floor (:func:`quantised_landmark_peaks`): a filter that always fires on the unit containing
  the object's centre, the best a perfect centre detector can score on a map of h × w units.

Where a filter fires can also be read against a mask: :func:`on_mask` says whether each peak lies on the main
object, the part filters' counterpart of NEM-U's and RELAX's mass on the object.

Coordinates are (x, y) in image pixels with pixel k centred at k, the convention of the Shapes scenes'
``keypoints (N, 7, 2)`` (:func:`nemu_lib.data.render_scene`): landmark 0 is the object's centre, 1–6 its
corners or tips (``keypoint_valid`` says which exist; a circle has only its centre).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` in pixels from a side or an ``(H, W)`` pair, or a clear error."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(f"image_size must be a positive int or a pair (H, W) of positive ints, got {image_size!r}")
    return hw[0], hw[1]


def _check_grid(height: int, width: int) -> None:
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"the map size must be positive ints (height, width), got ({height!r}, {width!r})")


def unit_centres(
    height: int, width: int, image_size: int | tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """The image position of each unit of an ``height × width`` map, ``(h*w, 2)`` float32 (x, y) in pixels.

    Row-major: position index i·w + j holds unit (i, j). Unit row i of a map of h rows over an image of H pixel
    rows covers the rows [i·H/h, (i+1)·H/h), so its centre in pixel-centre coordinates (pixel k has centre k) is

        y_i = (i + 0.5)·H/h − 0.5,        x_j = (j + 0.5)·W/w − 0.5.

    The theoretical receptive-field centre of unit i of a ResNet stage of stride s is s·i instead: a constant
    shift of (s − 1)/2 px, which leaves the spreads of distances to landmarks nearly unchanged.

    ``image_size`` is a side in pixels or a pair (H, W).
    """
    _check_grid(height, width)
    img_h, img_w = _image_hw(image_size)
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * (img_h / height) - 0.5  # (h,)
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * (img_w / width) - 0.5  # (w,)
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (h, w)
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (h*w, 2)


def peak_positions(maps: Tensor, image_size: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Where and how strongly each filter fires: its most active unit, in image pixels.

    Args:
        maps: activations ``(N, F, h, w)``, any float dtype (computed in float32).
        image_size: the input images' side in pixels, or (H, W).

    Returns:
        ``peaks (N, F, 2)`` float32, the (x, y) centre (:func:`unit_centres`) of argmax_{i,j} A_f(x)_{ij}
        (the first in row-major order on ties), and ``weights (N, F)`` float32, the peak value max A_f(x).
    """
    if not isinstance(maps, Tensor) or maps.ndim != 4:
        raise ValueError(f"maps must be a tensor (N, F, h, w), got shape {tuple(getattr(maps, 'shape', ()))}: "
                         "pass one layer's activations, e.g. features[layer]")
    n, f, h, w = maps.shape
    if h == 0 or w == 0:
        raise ValueError(f"maps {tuple(maps.shape)} have no units: a filter needs at least one position to fire at")
    a = maps.float().flatten(2)  # (N, F, h*w)
    if not torch.isfinite(a).all():
        raise ValueError("maps contain NaN or Inf values: fix or drop those images before locating peaks")
    weights, idx = a.max(dim=2)  # (N, F), (N, F)
    peaks = unit_centres(h, w, image_size, device=maps.device)[idx]  # (N, F, 2)
    return peaks, weights


def location_instability(
    peaks: Tensor,
    landmarks: Tensor,
    weights: Tensor,
    k: int = 100,
    *,
    image_size: int | tuple[int, int],
    valid: Tensor | None = None,
) -> Tensor:
    """Location instability of each filter, ``(F,)`` float64 (Zhang et al., CVPR 2018, §4); lower = more part-like.

        instability_f = (1/|L|) Σ_l std_{x ∈ top_k(f)} ‖p_f(x) − q_l(x)‖₂ / sqrt(H² + W²)

    top_k(f) are the k = min(k, N) images with the largest ``weights[:, f]``; for each landmark l the std is the
    population std (``unbiased=False``) over those of them where l is valid. A landmark valid on fewer than 2 of
    the k images is skipped (left out of the mean over l); a filter with every landmark skipped gets NaN. The
    paper averages over filters with k = 100: take ``torch.nanmean`` of the result. Ties in ``weights`` at the
    k-th value are broken by ``torch.topk``, which may differ between devices.

    Args:
        peaks: ``(N, F, 2)`` (x, y) in pixels, e.g. from :func:`peak_positions`.
        landmarks: ``(N, L, 2)`` (x, y) in pixels; may hold anything (NaN included) where not valid.
        weights: ``(N, F)`` how strongly each filter fires on each image.
        k: how many of the strongest images per filter to use (at least 2).
        image_size: side in pixels, or (H, W): the distances are divided by the diagonal sqrt(H² + W²).
        valid: ``(N, L)`` bool, which landmarks exist in each image (default: all).
    """
    for name, t, ndim in (("peaks", peaks, 3), ("landmarks", landmarks, 3), ("weights", weights, 2)):
        if not isinstance(t, Tensor) or t.ndim != ndim:
            raise ValueError(f"{name} must be a tensor with {ndim} dims, got shape {tuple(getattr(t, 'shape', ()))}")
    if peaks.shape[-1] != 2 or landmarks.shape[-1] != 2:
        raise ValueError(f"peaks {tuple(peaks.shape)} and landmarks {tuple(landmarks.shape)} must end in 2: (x, y)")
    n, f, _ = peaks.shape
    if landmarks.shape[0] != n or weights.shape[0] != n:
        raise ValueError(f"peaks, landmarks and weights disagree on the number of images N: {n}, "
                         f"{landmarks.shape[0]}, {weights.shape[0]}")
    if weights.shape[1] != f:
        raise ValueError(f"weights {tuple(weights.shape)} do not fit peaks {tuple(peaks.shape)}: need (N, F)")
    n_landmarks = landmarks.shape[1]
    if valid is None:
        valid = torch.ones(n, n_landmarks, dtype=torch.bool, device=landmarks.device)
    elif not isinstance(valid, Tensor) or valid.shape != landmarks.shape[:2] or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor (N, L) = {tuple(landmarks.shape[:2])}, got "
                         f"{tuple(getattr(valid, 'shape', ()))} {getattr(valid, 'dtype', type(valid))}")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2 (a spread needs two images), got {k!r}")
    if not (torch.isfinite(peaks).all() and torch.isfinite(weights).all()):
        raise ValueError("peaks or weights contain NaN or Inf values: fix or drop those images first")
    if not torch.isfinite(landmarks[valid]).all():
        raise ValueError("landmarks contain NaN or Inf values where valid is True: mark them invalid instead")
    img_h, img_w = _image_hw(image_size)

    k = min(k, n)
    top = weights.topk(k, dim=0).indices  # (k, F): the strongest images of each filter
    p = peaks.double().gather(0, top[:, :, None].expand(k, f, 2))  # (k, F, 2)
    q = landmarks.double()[top]  # (k, F, L, 2)
    m = valid[top]  # (k, F, L)
    d = torch.where(m, (p[:, :, None] - q).norm(dim=-1), 0.0)  # (k, F, L): distances, 0 where invalid
    count = m.sum(0)  # (F, L)
    mean = d.sum(0) / count.clamp(min=1)  # (F, L)
    var = torch.where(m, (d - mean) ** 2, 0.0).sum(0) / count.clamp(min=1)  # (F, L), population variance
    spread = torch.where(count >= 2, var.sqrt(), torch.nan)  # (F, L)
    return spread.nanmean(dim=1) / math.hypot(img_h, img_w)  # (F,)


def chance_peaks(
    n: int,
    filters: int,
    height: int,
    width: int,
    image_size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The chance level: ``filters`` filters that fire at a uniformly random unit of each of ``n`` images.

    Returns ``peaks (n, filters, 2)`` float32, unit centres (:func:`unit_centres`) of an ``height × width`` map,
    and ``weights (n, filters)`` float32 uniform in [0, 1) (so top-k picks a random subset). Both are drawn on
    ``device`` (default: the generator's device, else the CPU) with ``generator``, which must live there.
    """
    _check_grid(height, width)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(height * width, (n, filters), generator=generator, device=device)  # (n, F)
    weights = torch.rand(n, filters, generator=generator, device=device)  # (n, F)
    return unit_centres(height, width, image_size, device=device)[idx], weights


def quantised_landmark_peaks(
    landmarks: Tensor, height: int, width: int, image_size: int | tuple[int, int]
) -> Tensor:
    """The quantisation floor: the centre of the unit containing landmark 0 in each image, ``(N, 1, 2)`` float32.

    The peaks of an ideal filter that always fires on the unit holding the object's centre (landmark 0): unit
    row i = ⌊(y + 0.5)·h/H⌋ (clamped to the map), the nearest unit centre to y, and likewise for x. Its
    :func:`location_instability` is what a perfect centre detector scores at this map resolution.
    """
    if not isinstance(landmarks, Tensor) or landmarks.ndim != 3 or landmarks.shape[1] < 1 or landmarks.shape[2] != 2:
        shape = tuple(getattr(landmarks, "shape", ()))
        raise ValueError(f"landmarks must be a tensor (N, L, 2) with L >= 1 (landmark 0 the centre), got {shape}")
    _check_grid(height, width)
    img_h, img_w = _image_hw(image_size)
    centre = landmarks[:, 0].double()  # (N, 2)
    if not torch.isfinite(centre).all():
        raise ValueError("landmark 0 (the object's centre) contains NaN or Inf values: drop those images first")
    j = ((centre[:, 0] + 0.5) * (width / img_w)).floor().clamp(0, width - 1).long()  # (N,)
    i = ((centre[:, 1] + 0.5) * (height / img_h)).floor().clamp(0, height - 1).long()  # (N,)
    return unit_centres(height, width, image_size, device=landmarks.device)[i * width + j][:, None]  # (N, 1, 2)


def on_mask(peaks: Tensor, masks: Tensor) -> Tensor:
    """Whether each peak falls on its image's mask: ``(N, F)`` bool from ``peaks (N, F, 2)`` (x, y) pixels and
    ``masks (N, H, W)`` bool (e.g. the main object's), read at the pixel nearest to the peak.

    The share of peaks on the object, against the object's share of the pixels (where a filter that fires
    anywhere lands), compares part filters with NEM-U's and RELAX's mass on the object (notebooks 03-04).
    """
    if peaks.ndim != 3 or peaks.shape[-1] != 2 or masks.ndim != 3 or len(masks) != len(peaks):
        raise ValueError(f"need peaks (N, F, 2) and masks (N, H, W) of the same N, got {tuple(peaks.shape)} and "
                         f"{tuple(masks.shape)}")
    n, f, _ = peaks.shape
    x = peaks[..., 0].round().long().clamp(0, masks.shape[2] - 1)  # (N, F)
    y = peaks[..., 1].round().long().clamp(0, masks.shape[1] - 1)  # (N, F)
    image = torch.arange(n, device=masks.device)[:, None].expand(n, f)  # (N, F)
    return masks.bool()[image, y.to(masks.device), x.to(masks.device)]  # (N, F)
