"""Input validation shared by every module: one clear error that names the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor


def check_images(
    x: object,
    channels: int | None = 3,
    min_size: int | None = None,
    name: str = "x",
) -> Tensor:
    """Check that ``x`` is a finite float image batch ``(B, C, H, W)``; return it unchanged.

    Args:
        x: the candidate batch.
        channels: the channel count the model takes (``None``: any).
        min_size: the smallest height/width the model takes (``None``: any).
        name: how the error messages call the argument.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: wrong number of dimensions, wrong channel count, too small, NaN or Inf.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} has dtype {x.dtype}; images must be floating point: convert with "
            f"{name}.float() / 255 (uint8) and normalise before calling"
        )
    if x.ndim != 4:
        hint = f" (add the batch dimension: {name}[None])" if x.ndim == 3 else ""
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}{hint}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but the model takes {channels}: "
            f"shape {tuple(x.shape)}; channels-last input must be permuted to (B, C, H, W)"
        )
    if min_size is not None and min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"{name} is {x.shape[-2]}x{x.shape[-1]} px, but the model needs at least "
            f"{min_size}x{min_size} px: resize the images (e.g. torch.nn.functional.interpolate)"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values: check the data and its normalisation")
    return x
