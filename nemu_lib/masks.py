"""Random occlusion masks for RELAX (Wickstrøm et al., IJCV 2023; arXiv 2112.10161).

The distribution is the one of the reference package ``relax-xai`` (itself a variant of RISE's masks,
Petsiuk et al., BMVC 2018): a ``num_cells x num_cells`` grid of Bernoulli cells that are *kept* (1) with
probability ``p_keep``, upsampled bilinearly to the image size, reflect-padded by ``num_cells // 2``
pixels on every side and cropped back to the image size at a random shift of ``0 .. num_cells - 1``
pixels per axis. The shift breaks the grid's alignment with the image; the bilinear upsampling makes the
masks smooth, with values in [0, 1].

Random numbers are drawn in the reference's order (grid, row shifts, column shifts), so a
``torch.Generator`` seeded like the global generator of the reference yields exactly its masks, but
batched: the per-mask Python crop loop of the reference becomes one gather.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_mask_args(shape: tuple[int, int], num_cells: int, p_keep: float) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) with positive sides, got {tuple(shape)}")
    if num_cells < 1:
        raise ValueError(f"num_cells must be >= 1, got {num_cells}")
    if min(shape) <= num_cells // 2:
        raise ValueError(
            f"images of {shape[0]}x{shape[1]} px are too small for num_cells={num_cells}: reflect padding by "
            f"{num_cells // 2} px needs sides > {num_cells // 2}; lower num_cells or use larger images"
        )
    if not 0.0 <= p_keep <= 1.0:
        raise ValueError(f"p_keep is a probability, got {p_keep}")


def relax_masks(
    n: int,
    shape: tuple[int, int],
    num_cells: int = 7,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` RELAX masks ``(n, 1, H, W)`` float32 in [0, 1] (1 = keep the pixel).

    Args:
        n: number of masks.
        shape: image size ``(H, W)``.
        num_cells: grid cells per side (the reference uses 7).
        p_keep: probability that a cell is kept (the reference calls it ``probablity_of_drop``, but a
            cell drawn below it becomes 1, i.e. is kept).
        generator: source of randomness (``None``: the global generator); on ``device``.
        device: where to draw and return the masks (default: the generator's device, else CPU).
    """
    _check_mask_args(shape, num_cells, p_keep)
    if n < 1:
        raise ValueError(f"n must be >= 1 mask, got {n}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    h, w = shape
    pad = num_cells // 2
    grid = (torch.rand(n, 1, num_cells, num_cells, generator=generator, device=device) < p_keep).float()
    up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    up = F.pad(up, (pad, pad, pad, pad), mode="reflect") if pad else up  # (n, 1, H + 2p, W + 2p)
    shift_rows = torch.randint(0, num_cells, (n,), generator=generator, device=device)
    shift_cols = torch.randint(0, num_cells, (n,), generator=generator, device=device)
    rows = shift_rows[:, None] + torch.arange(h, device=device)  # (n, H)
    cols = shift_cols[:, None] + torch.arange(w, device=device)  # (n, W)
    batch = torch.arange(n, device=device)[:, None, None]
    return up[:, 0][batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (n, 1, H, W)


def mask_batches(
    n_masks: int,
    batch_size: int,
    shape: tuple[int, int],
    num_cells: int = 7,
    p_keep: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterator[Tensor]:
    """Yield ``n_masks`` masks in batches ``(<= batch_size, 1, H, W)``; only one batch lives at a time.

    With ``n_masks`` a multiple of ``batch_size`` the stream equals the reference's ``num_batches`` calls
    of its ``mask_generator(batch_size, ...)`` from the same random state.
    """
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n_masks, batch_size):
        yield relax_masks(min(batch_size, n_masks - start), shape, num_cells, p_keep, generator, device)
