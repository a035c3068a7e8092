"""NEM-U: a U-net masking network on a frozen encoder (Møller et al., "Finding NEM-U", ICML 2024).

The frozen encoder f is the contracting path of a U-net; a trained decoder turns its intermediate maps
(skip connections) into an occlusion mask m ∈ [0, 1]^{H×W}, so one forward pass gives the representation
*and* its explanation::

    model = NEMU(encoder)
    z, m = model(x)           # z (B, D) == encoder(x) exactly; m (B, 1, H, W)

Only the decoder is trained, with one of three objectives (d(a, b) = (1 − cos(a, b)) / 2):

- ``nem`` (the authors' published NEM code):      L = α · d(f(x), f(x ⊙ m)) + β · mean(m)      (α = 4, β = 0.5)
- ``nem-contrastive`` (keep what matters, and make the rest unlike it):
      L = β · mean(m) + α · d_keep − d(f(x ⊙ m), f(x ⊙ (1 − m))) · (d_keep + ε),  d_keep = d(f(x), f(x ⊙ m))
- ``relax`` (amortised RELAX, beyond the paper): K random RELAX masks M_k per image with similarities
  s_k = cos(f(x), f(x ⊙ M_k)), standardised per image, t_k = (s_k − mean_k s) / std_k s; the importance head
  e minimises Σ_k Σ_ij M_k,ij (e_ij − t_k)² / Σ M, whose minimiser is RELAX's importance Σ M s / Σ M
  (Wickstrøm et al., IJCV 2023, Eq. 3) in the image's own units; a second head predicts a log-variance ℓ
  with the Gaussian negative log-likelihood Σ M ((t − sg(e))² e^{−ℓ} + ℓ) / Σ M, whose minimiser
  e^ℓ = Σ M (t − e)² / Σ M is RELAX's uncertainty (Eq. 4) in the same units — one-pass importance *and*
  uncertainty. Why standardise: a trained encoder's s_k sit at ~0.9 ± 0.01 within an image while images'
  means differ by more, so raw targets teach the head each image's level and barely its pattern.

Masks multiply the *normalised* image: a removed pixel becomes 0, the data set mean.

How good and how dear the masks are: :func:`mask_quality` (kept similarity, against another image's mask,
area, overlap with the object, per image) and :func:`summarize_quality`, :func:`complement_similarity` (what
the removed part still holds), :func:`multiply_adds` (the decoder's cost beside the encoder's).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import count_flops
from .encoders import Encoder
from .masks import relax_masks


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: unlike BatchNorm it does not depend on the batch, so DDP equals one process."""
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class DecoderBlock(nn.Sequential):
    """Two conv3x3 + GroupNorm + ReLU, after the ×2 upsampling and the skip concatenation."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm(c_out), nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """The expanding path: from the coarsest map up through the skips to the input resolution.

    Taps finer than ``min_stride`` are not used: the logits of the finest used level are upsampled
    bilinearly to the input size instead (the 1x1 head first, then the upsampling: both are linear, so this
    is the same map at a fraction of the cost). The default, 4, gives masks at a quarter of the input's
    resolution (16 x 16 logits for 64 px, 56 x 56 for 224 px): a stride-2 level costs as many multiply-adds
    as all the coarser levels together, and on a CPU half the decoder's time (bench/nemu_speed.py), for
    masks that are smooth at that scale anyway.

    The levels follow the strides it is given. Each skip is fused at its own size (the coarser level is
    interpolated to it: x2 for a CNN's pyramid, x1 for a ViT's single-stride one, where every tap has
    stride p). When the finest used tap's stride s is coarser than ``min_stride`` (a ViT: s = p = 8 or 16),
    ``up`` adds x2 levels without a skip (bilinear x2, then a :class:`DecoderBlock` of the same width) while
    s / 2 >= ``min_stride``: p = 16 and ``min_stride`` 4 give two, so the head runs at stride 4 as for a
    CNN. A CNN whose finest used tap already sits within x2 of ``min_stride`` gets none (``up`` is empty),
    so its decoder, parameters and checkpoints are those of before; only a CNN asked for masks finer than
    its finest tap gets ``up`` levels too (a torchvision ResNet, stem stride 2, with ``min_stride`` 1: one).

    Args:
        feature_channels: channels of the encoder's maps, fine to coarse.
        feature_strides: their strides.
        out_channels: output maps (1: a mask; 2: importance and log-variance).
        max_width: cap on the decoder's channels per level; each level has ``skip channels // 4``
            (at least 8, at most ``max_width``), which keeps the decoder well below the encoder's cost.
        min_stride: the finest tap used, and the stride the ``up`` levels reach down to.
    """

    def __init__(
        self,
        feature_channels: tuple[int, ...],
        feature_strides: tuple[int, ...],
        out_channels: int = 1,
        max_width: int = 32,
        min_stride: int = 4,
    ) -> None:
        super().__init__()
        self.first = next((i for i, s in enumerate(feature_strides) if s >= min_stride), len(feature_strides) - 1)
        channels = feature_channels[self.first:]
        widths = [max(8, min(c // 4, max_width)) for c in channels]
        self.bottleneck = nn.Sequential(nn.Conv2d(channels[-1], widths[-1], 1, bias=False),
                                        _norm(widths[-1]), nn.ReLU(inplace=True))
        # blocks[i] fuses level i + 1 (upsampled) with skip i, coarse to fine
        self.blocks = nn.ModuleList(
            DecoderBlock(widths[i + 1] + channels[i], widths[i]) for i in range(len(widths) - 1)
        )
        stride, n_up = feature_strides[self.first], 0
        while stride / 2 >= min_stride:  # no finer tap to fuse: x2 levels without a skip
            stride, n_up = stride / 2, n_up + 1
        self.up = nn.ModuleList(DecoderBlock(widths[0], widths[0]) for _ in range(n_up))  # empty for a CNN
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, maps: list[Tensor], size: tuple[int, int]) -> Tensor:
        maps = maps[self.first:]
        h = self.bottleneck(maps[-1])  # (B, w_L, H / s_L, W / s_L)
        for i in reversed(range(len(self.blocks))):
            skip = maps[i]
            # ×2 in general; sizing to the skip makes odd and non-square inputs work
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = self.blocks[i](torch.cat([h, skip], dim=1))  # (B, w_i, H / s_i, W / s_i)
        for block in self.up:
            h = block(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False))  # (B, w_0, 2h, 2w)
        logits = self.head(h)  # (B, out_channels, H / s, W / s), s = s_0 / 2^len(up)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits  # (B, out_channels, H, W)


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A short hash of the encoder's weights and buffers: tells a SimCLR encoder from a supervised one."""
    digest = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class NEMU(nn.Module):
    """A frozen encoder with a trainable U-net decoder: ``(z, m) = NEMU(encoder)(x)`` in one pass.

    Args:
        encoder: any :class:`nemu_lib.encoders.Encoder`; frozen (no gradients) and kept in eval mode.
        uncertainty: add the second head (log-variance) of the amortised-RELAX objective.
        max_width: the decoder's channel cap per level.
        min_stride: the finest encoder tap the decoder uses (masks at 1 / ``min_stride`` of the input's
            resolution, upsampled bilinearly). ``max_width`` 32 and ``min_stride`` 4 keep NEM-U within
            about 1.3x the encoder's time (bench/nemu_speed.py).
    """

    def __init__(self, encoder: Encoder, uncertainty: bool = False, max_width: int = 32, min_stride: int = 4) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.uncertainty = uncertainty
        self.max_width, self.min_stride = max_width, min_stride
        self.decoder = UNetDecoder(encoder.feature_channels, encoder.feature_strides, 2 if uncertainty else 1,
                                   max_width, min_stride)

    @property
    def config(self) -> dict:
        """What a checkpoint must match: the encoder's architecture and weights, the decoder's shape."""
        return {"encoder": self.encoder.config, "encoder_fingerprint": encoder_fingerprint(self.encoder),
                "uncertainty": self.uncertainty, "max_width": self.max_width, "min_stride": self.min_stride}

    def train(self, mode: bool = True) -> NEMU:
        super().train(mode)
        self.encoder.eval()  # BatchNorm statistics of the encoder never change
        return self

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z (B, D), logits (B, 1 or 2, H, W))`` from one pass of the encoder.

        The pass goes through ``encoder.forward_features``, not ``encoder(x)``: forward hooks registered on
        the encoder module itself do not fire (hooks on its submodules do).
        """
        z, maps = self.encoder.forward_features(x)
        return z, self.decoder(maps, (x.shape[-2], x.shape[-1]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z (B, D), m (B, 1, H, W))``: the representation and its mask (1 = the pixel matters)."""
        z, logits = self.logits(x)
        return z, torch.sigmoid(logits[:, :1])

    def explain(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(z, m, u)``: ``u (B, 1, H, W)`` the predicted RELAX uncertainty (``None`` without that head).

        For an amortised-RELAX decoder ``m`` = sigmoid of the standardised importance (0.5 at the image's
        mean similarity) and ``u`` is in units of that image's variance of s_k (:class:`RelaxObjective`).
        """
        z, logits = self.logits(x)
        u = logits[:, 1:2].exp() if self.uncertainty else None
        return z, torch.sigmoid(logits[:, :1]), u


# ------------------------------------------------------------------------------- cost and mask quality

def multiply_adds(model: NEMU, x: Tensor) -> tuple[float, float]:
    """Multiply-adds per image of the encoder and of the decoder, ``(encoder, decoder)``, at ``x``'s size.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on ``x[:1]`` (FLOPs / 2): convolutions and matrix
    products only; normalisations, activations and interpolations are left out. A conv layer costs
    C_in · C_out · k_h · k_w · H_out · W_out (per group: C_in / groups). The decoder's count is what the mask
    adds to the representation's price.

    >>> enc, dec = multiply_adds(NEMU(encoder), x)            # e.g. 1.0e6 and 0.2e6 for the smoke small ResNet
    """
    x1 = x[:1]
    with torch.no_grad():
        maps = model.encoder.features(x1)
    size = (x1.shape[-2], x1.shape[-1])
    return count_flops(model.encoder, x1) / 2, count_flops(model.decoder, maps, size) / 2


@torch.inference_mode()
def mask_quality(model: NEMU, x: Tensor, obj: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
    """How good a NEM-U model's masks of ``x (B, C, H, W)`` are, per image: a dict of ``(B,)`` float64 on the CPU.

    With the mask m of each image, its main object's mask o ``(B, H, W)`` or ``(B, 1, H, W)`` (bool or 0/1) and
    f the model's encoder:

    - ``sim``: the kept similarity cos(f(x), f(x ⊙ m));
    - ``sim_control``: cos(f(x), f(x ⊙ m')) with m' the mask of the *previous* image (image 0 takes the last
      one's): a mask of the same kind and size, unrelated to the image;
    - ``area``: mean(m);
    - ``inside``, ``outside``: the mean of m inside and outside the object, Σ m o / Σ o and Σ m (1 − o) / Σ (1 − o);
    - ``mass_share``: the share of the mask's mass on the object, Σ m o / Σ m;
    - ``object_share``: the object's share of the image, mean(o), the mass share of a mask unrelated to it.

    ``batch_size`` images per call; the control pairs are fixed over the whole batch, so it changes nothing.
    """
    f = model.encoder
    obj = obj.reshape(len(x), 1, *x.shape[-2:]).to(x.device, x.dtype)  # (B, 1, H, W) in {0, 1}
    chunks = range(0, len(x), batch_size)
    masks = torch.cat([model(x[i:i + batch_size])[1] for i in chunks])  # (B, 1, H, W)
    z = torch.cat([f(x[i:i + batch_size]) for i in chunks])  # (B, D)
    control = masks.roll(1, dims=0)  # image i gets the mask of image i - 1
    sims, sims_control = [], []
    for i in chunks:
        sl = slice(i, i + batch_size)
        sims.append(F.cosine_similarity(z[sl], f(x[sl] * masks[sl]), dim=1))
        sims_control.append(F.cosine_similarity(z[sl], f(x[sl] * control[sl]), dim=1))
    m, o = masks.flatten(1), obj.flatten(1)  # (B, HW)
    out = {
        "sim": torch.cat(sims),
        "sim_control": torch.cat(sims_control),
        "area": m.mean(1),
        "inside": (m * o).sum(1) / o.sum(1),
        "outside": (m * (1 - o)).sum(1) / (1 - o).sum(1),
        "mass_share": (m * o).sum(1) / m.sum(1).clamp_min(1e-8),
        "object_share": o.mean(1),
    }
    return {k: v.double().cpu() for k, v in out.items()}


def summarize_quality(q: dict[str, Tensor]) -> dict[str, float]:
    """The means over images of :func:`mask_quality`'s values, and four ratios read from them:

    - ``inside_over_outside``: mean(inside) / mean(outside), how much more mask the object gets;
    - ``mass_share_over_chance``: mean(mass_share) / mean(object_share), 1 for a mask unrelated to the object;
    - ``control_gap``: mean(sim − sim_control), what the image's own mask keeps beyond another image's;
    - ``control_wins``: the share of images whose own mask keeps more, sim > sim_control.
    """
    s = {k: v.mean().item() for k, v in q.items()}
    s["inside_over_outside"] = s["inside"] / max(s["outside"], 1e-8)
    s["mass_share_over_chance"] = s["mass_share"] / s["object_share"]
    s["control_gap"] = (q["sim"] - q["sim_control"]).mean().item()
    s["control_wins"] = (q["sim"] > q["sim_control"]).double().mean().item()
    return s


@torch.inference_mode()
def complement_similarity(model: NEMU, x: Tensor, batch_size: int = 64) -> Tensor:
    """What the removed part still holds: cos(f(x), f(x ⊙ (1 − m))) per image, ``(B,)`` float64 on the CPU.

    Low means the mask took what the representation needs; the contrastive objective pushes it down.
    """
    sims = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        z, m = model(xb)
        sims.append(F.cosine_similarity(z, model.encoder(xb * (1 - m)), dim=1))
    return torch.cat(sims).double().cpu()


# ---------------------------------------------------------------------------------------- objectives

def cos_distance(a: Tensor, b: Tensor) -> Tensor:
    """d(a, b) = (1 − cos(a, b)) / 2 ∈ [0, 1], per row ``(B,)``."""
    return (1 - F.cosine_similarity(a, b, dim=1)) / 2


def nem_loss(z: Tensor, z_keep: Tensor, m: Tensor, alpha: float = 4.0, beta: float = 0.5) -> Tensor:
    """L = α · d(f(x), f(x ⊙ m)) + β · mean(m), averaged over the batch."""
    return (alpha * cos_distance(z, z_keep) + beta * m.flatten(1).mean(1)).mean()


def nem_contrastive_loss(
    z: Tensor, z_keep: Tensor, z_drop: Tensor, m: Tensor, alpha: float = 4.0, beta: float = 0.5, eps: float = 0.01
) -> Tensor:
    """L = β · mean(m) + α · d_keep − d(f(x ⊙ m), f(x ⊙ (1 − m))) · (d_keep + ε), averaged over the batch."""
    d_keep = cos_distance(z, z_keep)
    return (beta * m.flatten(1).mean(1) + alpha * d_keep - cos_distance(z_keep, z_drop) * (d_keep + eps)).mean()


def amortised_relax_loss(e: Tensor, log_var: Tensor | None, masks: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted regression onto RELAX's importance (and uncertainty) from K masks per image.

    Args:
        e: importance ``(B, 1, H, W)``; log_var: log-variance ``(B, 1, H, W)`` or ``None``.
        masks: ``(B, K, H, W)``; s: the targets ``(B, K)``: similarities of the masked images, or their
            per-image z-scores (:func:`standardize`; then the minimisers are RELAX's maps in those units).

    Returns:
        ``(L_e, L_v)``: Σ M (e − s)² / Σ M and Σ M ((s − sg(e))² e^{−ℓ} + ℓ) / Σ M (0 without ``log_var``),
        each summed over pixels and masks per image, then averaged over the batch.
    """
    w = masks.sum(dim=1).clamp_min(1e-8)  # (B, H, W): Σ_k M_k
    resid = s[:, :, None, None] - e  # (B, K, H, W) broadcast over the masks
    loss_e = ((masks * resid**2).sum(1) / w).mean()
    if log_var is None:
        return loss_e, torch.zeros((), device=e.device)
    sq = (s[:, :, None, None] - e.detach()) ** 2
    loss_v = ((masks * (sq * torch.exp(-log_var) + log_var)).sum(1) / w).mean()
    return loss_e, loss_v


class Objective(nn.Module):
    """``objective(model, x, generator) -> (loss, stats)``; ``stats`` holds the two scalars ``stat_names``."""

    name: str
    needs_uncertainty = False
    stat_names: tuple[str, str] = ("area", "sim")  # mask area mean(m), kept similarity cos(f(x), f(x ⊙ m))


class NEMObjective(Objective):
    """The NEM objective (``nem``) and its contrastive variant (``nem-contrastive``)."""

    def __init__(self, alpha: float = 4.0, beta: float = 0.5, contrastive: bool = False, eps: float = 0.01) -> None:
        super().__init__()
        self.alpha, self.beta, self.contrastive, self.eps = alpha, beta, contrastive, eps
        self.name = "nem-contrastive" if contrastive else "nem"

    def forward(self, model: NEMU, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        z, m = model(x)  # (B, D), (B, 1, H, W)
        z = z.detach()
        if self.contrastive:
            z_keep, z_drop = model.encoder(torch.cat([x * m, x * (1 - m)])).chunk(2)  # one encoder call
            loss = nem_contrastive_loss(z, z_keep, z_drop, m, self.alpha, self.beta, self.eps)
        else:
            z_keep = model.encoder(x * m)
            loss = nem_loss(z, z_keep, m, self.alpha, self.beta)
        sim = F.cosine_similarity(z, z_keep, dim=1).mean()
        return loss, {"area": m.mean().detach(), "sim": sim.detach()}


class RelaxObjective(Objective):
    """Amortised RELAX (``relax``): K RELAX masks per image per step, importance and uncertainty heads.

    The heads regress the logits directly onto per-image standardised similarities (no sigmoid while
    training): both heads start at their targets' level (0 and log 1) from the default initialisation, and
    the squashing never flattens a z-score's gradient. :meth:`NEMU.explain` returns sigmoid(e), 0.5 at the
    image's mean similarity, and e^ℓ, in units of the variance of that image's s_k.
    """

    needs_uncertainty = True
    name = "relax"
    stat_names = ("spread", "masked_sim")  # std of e over an image's pixels, mean s_k of the masked copies

    def __init__(self, n_masks: int = 16, num_cells: int = 7, p_keep: float = 0.5) -> None:
        super().__init__()
        if n_masks < 2:
            raise ValueError(f"the relax objective standardises K similarities per image: n_masks must be >= 2, "
                             f"got {n_masks}")
        self.n_masks, self.num_cells, self.p_keep = n_masks, num_cells, p_keep

    def similarities(
        self, model: NEMU, x: Tensor, z: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """K random RELAX masks per image ``(B, K, H, W)`` and s_k = cos(f(x), f(x ⊙ M_k)) ``(B, K)``, float32."""
        b, k, shape = x.shape[0], self.n_masks, (x.shape[-2], x.shape[-1])
        masks = relax_masks(b * k, shape, self.num_cells, self.p_keep, generator, x.device).to(x.dtype)
        with torch.no_grad():
            masked = (x[:, None] * masks.view(b, k, 1, *shape)).flatten(0, 1)  # (B K, C, H, W)
            z_masked = model.encoder(masked).float()
            s = F.cosine_similarity(z.detach().float().repeat_interleave(k, 0), z_masked, dim=1).view(b, k)
        return masks.view(b, k, *shape), s

    def forward(self, model: NEMU, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        z, logits = model.logits(x)
        masks, s = self.similarities(model, x, z, generator)
        e = logits[:, :1].float()  # (B, 1, H, W)
        loss_e, loss_v = amortised_relax_loss(e, logits[:, 1:2].float() if model.uncertainty else None, masks,
                                              standardize(s))
        return loss_e + loss_v, {"spread": e.flatten(1).std(1).mean().detach(), "masked_sim": s.mean()}


def standardize(s: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-row z-scores ``(s − mean) / (std + eps)`` of similarities ``(B, K)``: each image in its own units."""
    return (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)


def build_objective(name: str, **kwargs) -> Objective:
    """``nem``, ``nem-contrastive`` or ``relax`` with its keyword arguments."""
    if name == "nem":
        return NEMObjective(**kwargs)
    if name == "nem-contrastive":
        return NEMObjective(contrastive=True, **kwargs)
    if name == "relax":
        return RelaxObjective(**kwargs)
    raise ValueError(f"unknown objective {name!r}: choose one of {OBJECTIVES}")


OBJECTIVES = ("nem", "nem-contrastive", "relax")

