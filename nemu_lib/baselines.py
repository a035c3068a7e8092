"""Gradient baselines for representations: label-free saliency and integrated gradients, and a random map.

Label-free feature importance (Crabbé & van der Schaar, ICML 2022; arXiv 2203.01928) turns an encoder f,
whose output has no label to explain, into a scalar per image by holding the image's own representation
fixed (sg = stop-gradient):

    g_x(x') = ⟨f(x'), sg(f(x))⟩

and attributes g_x to the pixels of x with any label-based method:

    saliency              S = max_c |∂g_x/∂x'_c| at x' = x          (Simonyan et al., ICLR-W 2014; 1312.6034)
    integrated gradients  IG = Σ_c (x − x̄)_c ⊙ ∫₀¹ ∂g_x/∂x'_c (x̄ + α (x − x̄)) dα
                                                                     (Sundararajan et al., ICML 2017; 1703.01365)

The channel reductions follow each method's own paper. Saliency takes the largest gradient magnitude over
channels: a pixel matters whether brightening or darkening it moves g, and the max keeps one strongly used
colour channel from being diluted by the others. IG sums its signed contributions over channels, so the map
keeps completeness: Σ_hw IG = g_x(x) − g_x(x̄).

The baseline x̄ defaults to zeros, the data set mean in normalised space (the fill of a removed pixel, as
for RELAX's masks). The encoder runs in eval mode, so every image's map depends on that image alone.
:func:`random_map` is the sanity floor every explanation must beat (Adebayo et al., NeurIPS 2018).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_images


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1]
    return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)


def _trapezoid(n: int) -> tuple[Tensor, Tensor]:
    w = torch.full((n,), 1 / (n - 1), dtype=torch.float64, device="cpu")
    w[[0, -1]] /= 2
    return torch.linspace(0, 1, n, dtype=torch.float64, device="cpu"), w


def _riemann(offset: float) -> Callable[[int], tuple[Tensor, Tensor]]:
    def rule(n: int) -> tuple[Tensor, Tensor]:
        nodes = (torch.arange(n, dtype=torch.float64, device="cpu") + offset) / n
        return nodes, torch.full((n,), 1 / n, dtype=torch.float64, device="cpu")
    return rule


# method: n -> (nodes α_k, weights w_k) of ∫₀¹ φ(α) dα ≈ Σ_k w_k φ(α_k), float64 on the CPU (whatever the default
# device; moved to the images' device and dtype by the caller), Σ_k w_k = 1
QUADRATURES: dict[str, Callable[[int], tuple[Tensor, Tensor]]] = {
    "gausslegendre": _gauss_legendre,
    "riemann_trapezoid": _trapezoid,
    "riemann_left": _riemann(0.0),
    "riemann_middle": _riemann(0.5),
    "riemann_right": _riemann(1.0),
}


def _check(encoder: nn.Module, x: object) -> Tensor:
    return check_images(x, channels=getattr(encoder, "in_channels", None), min_size=getattr(encoder, "min_size", None))


@contextlib.contextmanager
def _gradients_in_eval(encoder: nn.Module) -> Iterator[None]:
    """Eval mode with autograd on (also inside ``torch.inference_mode``/``no_grad``); the mode is restored."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        encoder.train(was_training)


def label_free_gradient(encoder: nn.Module, x: Tensor) -> Tensor:
    """Label-free saliency of ``x (B, C, H, W)``: S = max_c |∂g_x/∂x_c| with g_x(x') = ⟨f(x'), sg(f(x))⟩.

    The gradient is J_f(x)ᵀ f(x) (Crabbé & van der Schaar 2022 with the saliency of Simonyan et al. 2014),
    from one forward and one backward pass of the batch. Only the input gets a gradient: the encoder's
    parameters keep their ``.grad``.

    Args:
        encoder: maps ``(n, C, H, W)`` to ``(n, D)``; put in eval mode for the call, then restored.
        x: normalised images, on the encoder's device.

    Returns:
        The saliency maps ``(B, H, W)``, ≥ 0, in ``x``'s dtype.

    >>> label_free_gradient(SmallResNet(widths=(8, 16, 32, 64)), torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 32, 32])
    """
    _check(encoder, x)
    with _gradients_in_eval(encoder):
        x = x.detach().clone().requires_grad_()  # a leaf of our own (x may be an inference tensor)
        z = encoder(x)  # (B, D)
        g = (z * z.detach()).sum()  # Σ_i g_{x_i}(x_i): image i's gradient is that of its own term
        (grad,) = torch.autograd.grad(g, x)  # (B, C, H, W)
    return grad.abs().amax(dim=1)  # (B, H, W)


def label_free_integrated_gradients(
    encoder: nn.Module,
    x: Tensor,
    baseline: Tensor | float | None = None,
    steps: int = 32,
    method: str = "gausslegendre",
    batch_size: int = 64,
    return_gap: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Label-free integrated gradients of ``x (B, C, H, W)``, summed over channels.

    IG = Σ_c (x − x̄)_c ⊙ Σ_k w_k ∂g_x/∂x'_c (x̄ + α_k (x − x̄)) with g_x(x') = ⟨f(x'), sg(f(x))⟩
    (Sundararajan et al. 2017, Eq. 1, applied to g_x as in Crabbé & van der Schaar 2022). The path integral
    is a quadrature with nodes α_k and weights w_k, Σ_k w_k = 1 (:data:`QUADRATURES`):

    - ``"gausslegendre"`` (default, as Captum's): exact for integrands polynomial in α of degree < 2 n; the
      nodes lie inside (0, 1);
    - ``"riemann_left"``, ``"riemann_middle"``, ``"riemann_right"``: α_k = (k + 0, ½, 1) / n, w_k = 1 / n;
    - ``"riemann_trapezoid"``: α_k = k / (n − 1), w_k = 1 / (n − 1) halved at both ends. (Captum's
      ``riemann_trapezoid`` halves 1 / n instead, so its weights sum to 1 − 1 / n: its maps are ours
      times (n − 1) / n.)

    The n · B interpolated images are run through the encoder ``batch_size`` at a time.

    Args:
        encoder: maps ``(n, C, H, W)`` to ``(n, D)``; put in eval mode for the call, then restored.
        x: normalised images.
        baseline: x̄, broadcastable to ``x`` (``(B, C, H, W)``, ``(C, 1, 1)``, a number); default zeros, the
            data set mean in normalised space.
        steps: n, quadrature nodes (≥ 2 for the trapezoid).
        method: the quadrature, a key of :data:`QUADRATURES`.
        batch_size: interpolated images per encoder call.
        return_gap: also return the completeness gap Σ_hw IG − (g_x(x) − g_x(x̄)) ``(B,)`` (Captum's
            convergence delta); it costs one more forward pass of B images.

    Returns:
        The maps ``(B, H, W)`` (signed), or ``(maps, gap)`` with ``return_gap``.

    >>> enc = SmallResNet(widths=(8, 16, 32, 64))
    >>> ig, gap = label_free_integrated_gradients(enc, torch.randn(2, 3, 32, 32), return_gap=True)
    >>> ig.shape, gap.shape
    (torch.Size([2, 32, 32]), torch.Size([2]))
    """
    _check(encoder, x)
    if method not in QUADRATURES:
        raise ValueError(f"unknown method {method!r}: choose one of {sorted(QUADRATURES)}")
    if steps < (2 if method == "riemann_trapezoid" else 1):
        raise ValueError(f"steps must be >= {2 if method == 'riemann_trapezoid' else 1} for {method}, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x0 = torch.as_tensor(0.0 if baseline is None else baseline, dtype=x.dtype, device=x.device)
    if not torch.isfinite(x0).all():
        raise ValueError("baseline contains NaN or Inf values")
    try:
        x0 = x0.expand_as(x).clone()  # (B, C, H, W)
    except RuntimeError as err:
        raise ValueError(f"baseline of shape {tuple(x0.shape)} does not broadcast to x {tuple(x.shape)}") from err
    alphas, weights = (t.to(x) for t in QUADRATURES[method](steps))  # (n,), (n,)
    b = len(x)
    with _gradients_in_eval(encoder):
        with torch.no_grad():
            h = encoder(x)  # (B, D), the fixed sg(f(x))
        delta = x - x0  # (B, C, H, W)
        total = torch.zeros_like(x)  # Σ_k w_k ∇g_x(x̄ + α_k δ)   (B, C, H, W)
        for j in torch.arange(steps * b, device=x.device).split(batch_size):  # pair j = (node j // B, image j % B)
            k, i = j // b, j % b
            xs = (x0[i] + alphas[k, None, None, None] * delta[i]).requires_grad_()  # (m, C, H, W)
            g = (encoder(xs) * h[i]).sum()  # Σ over the m pairs of g_{x_i}(xs)
            (grad,) = torch.autograd.grad(g, xs)  # (m, C, H, W)
            total.index_add_(0, i, weights[k, None, None, None] * grad)
        ig = (delta * total).sum(dim=1)  # (B, H, W)
        if not return_gap:
            return ig
        with torch.no_grad():
            g_x0 = (encoder(x0) * h).sum(dim=1)  # (B,)
    return ig, ig.sum(dim=(1, 2)) - ((h * h).sum(dim=1) - g_x0)


def random_map(x: Tensor, generator: torch.Generator | None = None, seed: int | None = 0) -> Tensor:
    """Uniform noise U[0, 1) shaped like the maps of ``x (B, C, H, W)``: the floor every explanation must beat.

    Args:
        x: the images (only their shape, dtype and device are used).
        generator: the random source; default a new one on ``x``'s device seeded with ``seed``
            (``seed=None``: the global generator).

    Returns:
        ``(B, H, W)`` in ``x``'s dtype.
    """
    check_images(x, channels=None)
    if generator is None and seed is not None:
        generator = torch.Generator(x.device).manual_seed(seed)
    return torch.rand(x.shape[0], *x.shape[-2:], generator=generator, dtype=x.dtype, device=x.device)
