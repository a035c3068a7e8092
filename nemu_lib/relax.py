"""RELAX and U-RELAX: explain a representation by masking (Wickstrøm et al., IJCV 2023; arXiv 2112.10161).

For an image x, an encoder f, h = f(x) and random masks M_1 .. M_N (:mod:`nemu_lib.masks`), each masked
copy is scored by how similar its representation stays, s_n = sim(h, f(x ⊙ M_n)) (cosine by default;
``reference=r`` scores sim(r, f(x ⊙ M_n)) instead: "why is x similar to r?"). Per pixel,

    importance    R = Σ_n M_n s_n / Σ_n M_n                      (the paper's Eq. 3, mask-weighted mean)
    uncertainty   U = Σ_n M_n (s_n − R)² / Σ_n M_n               (the mask-weighted variance)
    U-RELAX         = R ⊙ [Σ_n M_n (s_n − R)² ≤ its median]       (the paper's Eq. 8)

The three sums Σ M, Σ M s and Σ M s² are streamed batch by batch in float64, so memory does not grow with
N, the whole batch of B images shares each batch of masks, and U = Σ M s² / Σ M − R² keeps the ~1e-4
variations of the maps (float32 would round the variance away). The same sums let two runs over different
masks combine into one over all of them (:meth:`RelaxResult.merge`).

Relation to the reference package ``relax-xai``: it updates R mask by mask (a running weighted mean with
Σ M started at 1e-10) and keeps the *unnormalised* uncertainty Σ M (s − R)² (West's weighted update),
i.e. ``uncertainty_reference = U · Σ M`` (:attr:`RelaxResult.uncertainty_reference`). Its U-RELAX
thresholds that unnormalised sum at its median — as the paper's Ū = (1/N) Σ M (s − R)² does, a constant
multiple — so ours does too and reproduces its masks. Thresholding U itself is a different map, since
Σ M varies from pixel to pixel (measured on the cpu SimCLR encoder: 4 % of pixels change at N = 3,000,
14 % at N = 400). Its 1e-10 start changes R by ~1e-10 / Σ M; pixels that no mask keeps
(Σ M = 0) get R = 0 and U = 0 in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import announce, forward_gflops
from .checks import check_images
from .masks import mask_batches
from .progress import tqdm

Similarity = Callable[[Tensor, Tensor], Tensor]  # (n, D), (n, D) -> (n,)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a, b, dim=1)


SIMILARITIES: dict[str, Similarity] = {"cosine": _cosine}


@dataclass
class RelaxResult:
    """RELAX maps of a batch of B images, float64.

    Attributes:
        importance: R ``(B, H, W)``.
        uncertainty: U ``(B, H, W)``, the mask-weighted variance of the similarities.
        weights: Σ M ``(H, W)``, shared by every image (they share the masks).
        n_masks: N.
    """

    importance: Tensor
    uncertainty: Tensor
    weights: Tensor
    n_masks: int

    @property
    def uncertainty_reference(self) -> Tensor:
        """The reference package's unnormalised uncertainty Σ M (s − R)² ``(B, H, W)``."""
        return self.uncertainty * self.weights

    @property
    def u_relax_mask(self) -> Tensor:
        """Where the unnormalised uncertainty is at most its per-image (lower) median, ``(B, H, W)`` bool."""
        u = self.uncertainty_reference.flatten(1)
        return (u <= u.median(dim=1, keepdim=True).values).view_as(self.uncertainty)

    @property
    def u_relax(self) -> Tensor:
        """U-RELAX: the importance kept only where it is certain, ``(B, H, W)``."""
        return self.importance * self.u_relax_mask

    def merge(self, other: RelaxResult) -> RelaxResult:
        """The RELAX maps of both runs' masks together, from the two runs' sums.

        ``self`` and ``other`` explain the same images with different masks (another seed, say). Each run's
        sums come back from its maps, Σ M = W, Σ M s = R W and Σ M s² = (U + R²) W, they add up, and

            R = (R₁ W₁ + R₂ W₂) / (W₁ + W₂),    U = ((U₁ + R₁²) W₁ + (U₂ + R₂²) W₂) / (W₁ + W₂) − R²,

        which is one run over all N₁ + N₂ masks (equal to rounding). Pixels that no mask keeps get R = U = 0,
        as in :func:`relax`.

        >>> half_a = relax(encoder, x, n_masks=1500, seed=0)
        >>> both = half_a.merge(relax(encoder, x, n_masks=1500, seed=1))     # RELAX with 3,000 masks
        """
        if self.importance.shape != other.importance.shape:
            raise ValueError(f"can only merge RELAX runs of the same images, got maps of shape "
                             f"{tuple(self.importance.shape)} and {tuple(other.importance.shape)}")
        dev = self.importance.device
        w1, w2 = self.weights.double(), other.weights.to(dev, torch.float64)  # (H, W)
        r1, r2 = self.importance.double(), other.importance.to(dev, torch.float64)  # (B, H, W)
        u1, u2 = self.uncertainty.double(), other.uncertainty.to(dev, torch.float64)  # (B, H, W)
        sum_m = w1 + w2  # Σ M over both runs
        weights = torch.where(sum_m > 0, sum_m, 1.0)
        importance = (r1 * w1 + r2 * w2) / weights  # Σ M s / Σ M
        second = ((u1 + r1**2) * w1 + (u2 + r2**2) * w2) / weights  # Σ M s² / Σ M
        uncertainty = (second - importance**2).clamp_min(0)
        return RelaxResult(importance, uncertainty, sum_m, self.n_masks + other.n_masks)


def _mask_stream(
    masks: Tensor | Iterable[Tensor] | None,
    n_masks: int,
    batch_size: int,
    shape: tuple[int, int],
    num_cells: int,
    p_keep: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Iterable[Tensor]:
    if masks is None:
        return mask_batches(n_masks, batch_size, shape, num_cells, p_keep, generator, device)
    if isinstance(masks, Tensor):
        return masks.split(batch_size)
    return masks


def _check_masks(m: Tensor, shape: tuple[int, int]) -> Tensor:
    """Mask batch ``(M, 1, H, W)`` or ``(M, H, W)`` → ``(M, 1, H, W)`` float, or a clear error."""
    if not isinstance(m, Tensor) or not m.is_floating_point():
        raise TypeError(f"masks must be float tensors of shape (M, 1, H, W), got {getattr(m, 'dtype', type(m))}")
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != shape:
        raise ValueError(
            f"masks must have shape (M, 1, {shape[0]}, {shape[1]}) to match the images, got {tuple(m.shape)}: "
            "draw them with nemu_lib.masks.relax_masks(n, (H, W)) for the image size"
        )
    if not torch.isfinite(m).all():
        raise ValueError("masks contain NaN or Inf values")
    return m


GPU_VALUES_PER_CALL = 2**24  # masked input values per encoder call on a GPU (64 MiB of float32)


def default_batch_size(x: Tensor) -> int:
    """Masks per encoder call for images like ``x``: 100 on a CPU, more on a GPU.

    100 was best on a 2-core CPU (one 800-image call was 2x slower: bench/relax_vs_reference.py) and is the reference
    package's, so CPU maps match it mask for mask. A GPU is launch-bound at 100 small images: there the batch
    holds ~2^24 input values, capped at 1,000 masks (1,000 at 64 px, 111 at 224 px: a ResNet-50's activations
    for 111 images fit a 16 GB T4).
    """
    if x.device.type == "cpu":
        return 100
    return max(100, min(1000, GPU_VALUES_PER_CALL // x[0].numel()))


@torch.inference_mode()
def relax(
    encoder: nn.Module,
    x: Tensor,
    n_masks: int = 3000,
    batch_size: int | None = None,
    similarity: str | Similarity = "cosine",
    reference: Tensor | None = None,
    masks: Tensor | Iterable[Tensor] | None = None,
    num_cells: int = 7,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
    seed: int | None = 0,
    progress: bool = False,
) -> RelaxResult:
    """Explain the representations of ``x (B, C, H, W)`` (normalised, as the encoder takes it) with RELAX.

    Args:
        encoder: maps ``(n, C, H, W)`` to ``(n, D)``; put in eval mode for the call, then restored.
        x: the images; masking multiplies them, so a removed pixel becomes 0, the data set mean.
        n_masks: N, masks drawn from :func:`nemu_lib.masks.relax_masks` (ignored when ``masks`` is given).
        batch_size: masks per encoder call (each image is masked by every mask of the batch); default
            :func:`default_batch_size` (100 on a CPU, up to 1,000 on a GPU). With drawn masks the random stream
            depends on it exactly as the reference's does.
        similarity: ``"cosine"`` or a function of two ``(n, D)`` batches returning ``(n,)``.
        reference: r ``(D,)`` or ``(B, D)``: score sim(r, f(x ⊙ M)) instead of sim(f(x), f(x ⊙ M)).
        masks: your own masks, a tensor ``(N, 1, H, W)`` (split into ``batch_size`` chunks) or an iterable of
            batches; values in [0, 1], 1 = keep.
        num_cells, p_keep: the mask distribution (see :mod:`nemu_lib.masks`).
        generator: the random source of the masks; default a new one on ``x``'s device seeded with ``seed``
            (``seed=None``: the global generator).
        progress: show a tqdm bar over mask batches.

    Returns:
        :class:`RelaxResult` with importance, uncertainty, U-RELAX and Σ M.
    """
    check_images(x, channels=getattr(encoder, "in_channels", None))
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    batch_size = default_batch_size(x) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(similarity, str):
        if similarity not in SIMILARITIES:
            raise ValueError(
                f"unknown similarity {similarity!r}; choose one of {sorted(SIMILARITIES)} or pass a function"
            )
        similarity = SIMILARITIES[similarity]
    b, shape, dev = x.shape[0], (x.shape[-2], x.shape[-1]), x.device
    if generator is None and seed is not None:
        generator = torch.Generator(dev).manual_seed(seed)

    was_training = encoder.training
    encoder.eval()
    try:
        h = encoder(x)  # (B, D)
        if masks is None:
            announce(f"RELAX of {b} images x {n_masks} masks", forward_gflops(encoder, x), infer_images=b * n_masks,
                     calls=b * -(-n_masks // batch_size), device=dev)
        if reference is not None:
            reference = torch.as_tensor(reference, dtype=h.dtype, device=dev)
            if reference.ndim == 1 and reference.shape == h.shape[1:]:
                reference = reference.expand_as(h)
            if reference.shape != h.shape:
                raise ValueError(
                    f"reference must have shape ({h.shape[1]},) or ({b}, {h.shape[1]}) like the encoder's "
                    f"representations, got {tuple(reference.shape)}"
                )
            if not torch.isfinite(reference).all():
                raise ValueError("reference contains NaN or Inf values")
            h = reference
        sum_m = torch.zeros(shape, dtype=torch.float64, device=dev)  # Σ M      (H, W)
        sum_ms = torch.zeros(b, *shape, dtype=torch.float64, device=dev)  # Σ M s    (B, H, W)
        sum_ms2 = torch.zeros_like(sum_ms)  # Σ M s²   (B, H, W)
        n_seen = 0
        stream = _mask_stream(masks, n_masks, batch_size, shape, num_cells, p_keep, generator, dev)
        total = -(-n_masks // batch_size) if masks is None else None
        for m in tqdm(stream, total=total, desc="RELAX", disable=not progress, leave=False):
            if masks is not None:  # ours are valid by construction; the user's are checked
                m = _check_masks(m, shape)
            m = m.to(device=dev, dtype=x.dtype)  # (M, 1, H, W)
            s = torch.stack([
                similarity(h[i].expand(len(m), -1), encoder(x[i] * m))  # (M,): one encoder call per image
                for i in range(b)
            ]).double()  # (B, M)
            m64 = m[:, 0].double()  # (M, H, W)
            sum_m += m64.sum(0)
            sums = torch.einsum("km,mhw->khw", torch.cat([s, s * s]), m64)  # (2B, H, W): masks read once
            sum_ms += sums[:b]
            sum_ms2 += sums[b:]
            n_seen += len(m)
    finally:
        encoder.train(was_training)
    if n_seen == 0:
        raise ValueError("masks is empty: pass at least one mask")
    weights = torch.where(sum_m > 0, sum_m, 1.0)  # Σ M = 0 only where Σ M s = Σ M s² = 0 too
    importance = sum_ms / weights
    uncertainty = (sum_ms2 / weights - importance**2).clamp_min(0)  # E_M[s²] − R², ≥ 0 up to rounding
    return RelaxResult(importance, uncertainty, sum_m, n_seen)
