"""Explainer networks: part filters that explain one layer of a frozen encoder (Zhang et al. 2018).

Where RELAX and NEM-U say *which pixels* a representation uses, an explainer says *which parts* a layer
encodes. Given the maps ``x (B, C, h, w)`` of one layer of the frozen encoder (the *performer*), the explainer
works like an auto-encoder::

    x_int = N(mask(ReLU(conv(x))))        interpretable track: each filter should fire on one part
    x_ord = N(ReLU(conv(x)))              ordinary track: what parts cannot carry (textures, colour)
    x_enc = p x_int + (1 − p) x_ord       p = σ(w · GAP(x) + b) ∈ (0, 1), one per image
    x̂_{l+1} = decoder(x_enc)             the performer's next map, fed on through its frozen stages → ẑ

``N(a) = a / mean|a|`` (the "norm" layers) puts both tracks on one scale, so p is the share of the layer's
signal that goes through parts. The loss (learned by distillation, without annotations)::

    L = Σ_{l > tap} λ_l ‖x̂_l − x*_l‖² / ‖x*_l‖²  +  λ mean_f Loss_f  −  η mean log p

sums the performer's maps above the tap (x*, detached; each error relative to the map's energy so the
weights need no tuning per encoder, and λ_l = 1 / #maps), the filter loss of every interpretable layer and a
prior that pushes signal through the interpretable track.

**Filter loss** (Zhang, Wu, Zhu, *Interpretable Convolutional Neural Networks*, CVPR 2018, §3). For one
filter's map x ``(h, w)`` after the ReLU: h·w positive templates T_µ, one per position µ, and one negative
template T⁻::

    T_µ[i, j] = τ max(1 − β (|i − µ_i| + |j − µ_j|) / n, −1),   T⁻ = −τ,   τ = 0.5 / (h w),  β = 4,  n = max(h, w)
    p(T_µ) = α / (h w),  p(T⁻) = 1 − α,  α = h w / (1 + h w)
    p(x | T) = exp(tr(x · T)) / Z_T,  Z_T = Σ_{x ∈ batch} exp(tr(x · T))
    Loss_f = −MI(X; T) = −Σ_T p(T) Σ_x p(x | T) log[p(x | T) / p(x)],  p(x) = Σ_T p(T) p(x | T)

(n × n maps in the paper; here n is the longer side.) With one category (no labels) every image is a
positive. In the forward pass each map is multiplied by the positive template at its own peak
µ̂ = argmax x (the choice is not differentiated), scaled to 1 at µ̂ (T_µ̂ / τ: τ only sets the loss's
scale), and ReLU'd again: activations away from the peak are suppressed, so a filter can only say "my part
is here".

:func:`train_explainer` trains one (checkpoints, resume, progress as :func:`nemu_lib.train.train`);
:func:`explain_parts` runs a trained one over a data set; :class:`PartUnits` exposes its part filters to
Network Dissection; :mod:`nemu_lib.parts` scores where they fire (location instability).

References: Q. Zhang, Y. Yang, Y. Liu, Y. N. Wu, S.-C. Zhu, *Unsupervised learning of neural networks to
explain neural networks*, arXiv 1805.07468 (2018); Q. Zhang, Y. N. Wu, S.-C. Zhu, *Interpretable
convolutional neural networks*, CVPR 2018, arXiv 1710.00935.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import announce, forward_gflops
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from .config import autocast, grad_scaler, module_device
from .dissection import _layer_index, layer_names
from .encoders import Encoder
from .nem import encoder_fingerprint
from .progress import tqdm
from .train import CHECKPOINT, _batches, _optimizer, _rng_state, _schedule, _set_rng_state

BETA = 4.0  # the templates' fall-off (ICNN)


# ------------------------------------------------------------------------------- templates and filter loss

def templates(height: int, width: int, beta: float = BETA, device: str | torch.device | None = None) -> Tensor:
    """The ``h w`` positive templates (row-major µ) and the negative one: ``(h w + 1, h, w)``, float32."""
    if height < 3 or width < 3:
        raise ValueError(f"a {height}x{width} map is too small for part templates (at least 3x3): tap a finer "
                         "layer or feed larger images")
    n, tau = max(height, width), 0.5 / (height * width)
    i = torch.arange(height, device=device, dtype=torch.float32)
    j = torch.arange(width, device=device, dtype=torch.float32)
    di = (i[:, None] - i[None, :]).abs()  # (µ_i, i)
    dj = (j[:, None] - j[None, :]).abs()  # (µ_j, j)
    dist = di[:, None, :, None] + dj[None, :, None, :]  # (µ_i, µ_j, i, j)
    positive = tau * (1 - beta * dist / n).clamp(min=-1)
    negative = torch.full((1, height, width), -tau, device=device)
    return torch.cat([positive.reshape(height * width, height, width), negative])  # (h w + 1, h, w)


def template_log_priors(positions: int, device: str | torch.device | None = None) -> Tensor:
    """``log p(T)`` ``(positions + 1,)``: α / positions for each positive template, 1 − α for the negative."""
    alpha = positions / (1 + positions)
    prior = torch.full((positions + 1,), alpha / positions, device=device, dtype=torch.float64)
    prior[-1] = 1 - alpha
    return prior.log().float()


def filter_loss(x: Tensor) -> Tensor:
    """``Loss_f = −MI(X; T)`` per filter, ``(F,)``, for ReLU'd maps ``x (B, F, h, w)`` of one batch.

    Vectorised over the batch and the filters: scores ``S = X (B F × h w) · T (h w × (h w + 1))``, then
    ``log p(x | T) = S − logsumexp_batch S`` (computed in float32 under any autocast). Lower is better:
    −MI ranges from 0 (every image looks alike to every template) down to −min(H(T), log B).
    """
    if x.ndim != 4:
        raise ValueError(f"filter maps must have shape (B, F, h, w), got {tuple(x.shape)}")
    b, f, h, w = x.shape
    t = templates(h, w, device=x.device).reshape(h * w + 1, h * w)  # (T, h w)
    with torch.autocast(x.device.type, enabled=False):  # an outer bf16 autocast would round the scores
        scores = x.float().reshape(b, f, h * w) @ t.T  # (B, F, T): tr(x · T)
    log_px_t = scores - scores.logsumexp(dim=0, keepdim=True)  # log p(x | T), normalised over the batch
    log_prior = template_log_priors(h * w, x.device)  # (T,)
    log_px = (log_prior + log_px_t).logsumexp(dim=-1, keepdim=True)  # (B, F, 1): log p(x)
    mi = (log_prior.exp() * log_px_t.exp() * (log_px_t - log_px)).sum(dim=(0, 2))  # (F,)
    return -mi


def mask_at_peak(x: Tensor) -> Tensor:
    """``ReLU(x ∘ T_µ̂ / τ)`` with µ̂ = argmax of each map ``x (B, F, h, w)``: the map is kept at its peak, faded
    around it and cut beyond ``n / β``; the choice of µ̂ is not differentiated."""
    b, f, h, w = x.shape
    t = templates(h, w, device=x.device)[:-1] * (h * w / 0.5)  # (h w, h, w): the positive ones over τ, 1 at µ
    peak = x.detach().reshape(b, f, h * w).argmax(dim=-1)  # (B, F)
    return F.relu(x * t[peak].to(x.dtype))  # (B, F, h, w)


# ------------------------------------------------------------------------------- the explainer network

def _norm(a: Tensor, eps: float = 1e-6) -> Tensor:
    """Divide each image's maps by their mean magnitude (the paper's "norm" layer)."""
    return a / (a.abs().mean(dim=(1, 2, 3), keepdim=True) + eps)


@dataclass
class ExplainerOutput:
    """One forward pass. ``z (B, D)`` the performer's representation, ``z_hat (B, D)`` the one from the
    reconstruction; ``targets`` and ``recons`` the performer's maps above the tap and their reconstructions
    (fine to coarse); ``p (B,)`` the parts' share; ``activations`` each interpretable layer's ReLU'd maps
    ``(B, F, h, w)`` before the template mask (the filter loss's input; the last one is the part filters);
    ``tap (B, C, h, w)`` the performer's map they explain."""

    z: Tensor
    z_hat: Tensor
    targets: list[Tensor]
    recons: list[Tensor]
    p: Tensor
    activations: list[Tensor]
    tap: Tensor

    @property
    def parts(self) -> Tensor:
        """The part filters' maps ``(B, F, h, w)``: the last interpretable layer before its mask."""
        return self.activations[-1]


class Explainer(nn.Module):
    """An explainer network on one layer of a frozen ``encoder`` (see the module docstring).

    Args:
        encoder: any :class:`~nemu_lib.encoders.Encoder` with ``forward_from``; frozen and kept in eval mode.
        layer: the tapped map, by name (:func:`nemu_lib.dissection.layer_names`) or index.
        filters: part filters F (default: the layer's channels), also the ordinary track's width.
        depth: interpretable conv layers (1 or 2), each conv → ReLU → template mask.
        hidden: the decoder's width (default: the reconstructed map's channels).

    The decoder reconstructs the performer's next map (the tapped one when it is the last) with a 3×3 conv,
    one stride-2 conv per halving of resolution and a 1×1 conv; the performer's own stages take it on to ẑ.
    """

    def __init__(self, encoder: Encoder, layer: str | int = -2, filters: int | None = None, depth: int = 1,
                 hidden: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer = _layer_index(encoder, layer)
        with torch.device(module_device(encoder)):  # beside the performer, whatever the default device
            self._build(encoder, filters, depth, hidden)

    def _build(self, encoder: Encoder, filters: int | None, depth: int, hidden: int | None) -> None:
        self.layer_name = layer_names(encoder)[self.layer]
        if depth not in (1, 2):
            raise ValueError(f"depth must be 1 or 2 interpretable layers, got {depth}")
        channels = encoder.feature_channels[self.layer]
        self.filters, self.depth = filters or channels, depth
        self.target = min(self.layer + 1, len(encoder.feature_channels) - 1)
        out = encoder.feature_channels[self.target]
        self.hidden = hidden or out
        halvings = round(math.log2(encoder.feature_strides[self.target] / encoder.feature_strides[self.layer]))
        self.interpretable = nn.ModuleList(
            nn.Conv2d(channels if i == 0 else self.filters, self.filters, 3, padding=1) for i in range(depth))
        self.ordinary = nn.Conv2d(channels, self.filters, 3, padding=1)
        self.gate = nn.Linear(channels, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # p = 0.5 at the start
        layers: list[nn.Module] = [nn.Conv2d(self.filters, self.hidden, 3, padding=1), nn.ReLU()]
        for _ in range(halvings):
            layers += [nn.Conv2d(self.hidden, self.hidden, 3, stride=2, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(self.hidden, out, 1))

    @property
    def config(self) -> dict:
        """What a checkpoint must match: the performer's architecture and weights, the explainer's shape."""
        return {"encoder": self.encoder.config, "encoder_fingerprint": encoder_fingerprint(self.encoder),
                "layer": self.layer, "filters": self.filters, "depth": self.depth, "hidden": self.hidden}

    def train(self, mode: bool = True) -> Explainer:
        super().train(mode)
        self.encoder.eval()  # the performer's BatchNorm statistics never change
        return self

    def trainable(self) -> list[nn.Parameter]:
        """The explainer's own parameters (the performer's are frozen)."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    def explain_maps(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(x_enc (B, F, h, w), p (B,), activations)`` from the tapped maps ``x (B, C, h, w)``."""
        templates(*x.shape[-2:])  # a one-line error for maps too small for part templates
        activations, a = [], x
        for conv in self.interpretable:
            a = F.relu(conv(a))  # (B, F, h, w)
            activations.append(a)
            a = mask_at_peak(a)
        p = torch.sigmoid(self.gate(x.mean(dim=(2, 3))).float()).squeeze(1)  # (B,)
        mix = p[:, None, None, None]
        x_enc = mix * _norm(a.float()) + (1 - mix) * _norm(F.relu(self.ordinary(x)).float())  # (B, F, h, w)
        return x_enc, p, activations

    def forward(self, x: Tensor) -> ExplainerOutput:
        """Run the performer on images ``x (B, C, H, W)`` (no gradients), then the explainer on its tapped map."""
        with torch.no_grad():
            z, maps = self.encoder.forward_features(x)
        x_enc, p, activations = self.explain_maps(maps[self.layer])
        target = maps[self.target]
        recon = self.decoder(x_enc)  # (B, C_t, h_t, w_t)
        if recon.shape[-2:] != target.shape[-2:]:  # odd sizes: stride-2 convs round up
            recon = F.interpolate(recon, size=target.shape[-2:], mode="bilinear", align_corners=False)
        z_hat, recons = self.encoder.forward_from(self.target, recon)
        return ExplainerOutput(z, z_hat, maps[self.target:], recons, p, activations, maps[self.layer])


def explainer_loss(out: ExplainerOutput, filter_weight: float = 10.0, prior_weight: float = 0.1
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss (module docstring) and its parts ``{"recon", "filter", "p"}`` (detached means)."""
    recon = sum(((r.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp(min=1e-12)
                for r, t in zip(out.recons, out.targets, strict=True)) / len(out.targets)
    filt = sum(filter_loss(a).mean() for a in out.activations) / len(out.activations)
    prior = -out.p.clamp(min=1e-6).log().mean()
    loss = recon + filter_weight * filt + prior_weight * prior
    return loss, {"recon": recon.detach(), "filter": filt.detach(), "p": out.p.detach().mean()}


# ------------------------------------------------------------------------------- training

@dataclass
class ExplainerConfig:
    """Everything that determines an explainer's training (and must match when resuming).

    Attributes:
        steps, batch_size: optimiser steps and images per step.
        lr, weight_decay, optimizer, warmup: as in :class:`nemu_lib.train.TrainConfig` (cosine decay after a
            linear warm-up).
        filter_weight: λ, the filter loss's weight; prior_weight: η, the weight of −log p.
        seed: seeds the data order.
        amp: autocast on CUDA (bf16, or fp16 with loss scaling on older GPUs); an outer autocast stays in force
            elsewhere.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup: float = 0.05
    filter_weight: float = 10.0
    prior_weight: float = 0.1
    seed: int = 0
    amp: bool = True


def checkpoint_config(explainer: Explainer, cfg: ExplainerConfig) -> dict:
    """What an explainer's checkpoint records and a resumed run must match: the explainer and its training."""
    return {**explainer.config, "train": dataclasses.asdict(cfg)}


def train_explainer(
    explainer: Explainer,
    images: Tensor,
    cfg: ExplainerConfig,
    out_dir: str | os.PathLike,
    ckpt_every: int = 100,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train ``explainer`` on normalised ``images (N, C, H, W)``; return ``{"step", "loss", "recon", "filter",
    "p"}`` per step (the resumed part included).

    Checkpoints ``out_dir/checkpoint.pt`` atomically every ``ckpt_every`` steps and at the end (the explainer
    without the performer, optimiser, scheduler, loss scaler, RNG states, step, history); ``resume=True``
    continues one exactly (its performer and settings must match); ``stop_at`` stops after that step as if
    interrupted. One process (an explainer trains in minutes); a non-finite loss stops with a clear error
    and keeps the last good checkpoint.
    """
    if cfg.steps < 1 or not 1 <= cfg.batch_size <= len(images):
        raise ValueError(f"need steps >= 1 and 1 <= batch_size <= {len(images)} images, got {cfg.steps} and "
                         f"{cfg.batch_size}")
    dev = module_device(explainer)
    params = explainer.trainable()
    opt = _optimizer(cfg, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    scaler = grad_scaler(dev, cfg.amp)
    path = Path(out_dir) / CHECKPOINT
    config = checkpoint_config(explainer, cfg)
    history: dict[str, list[float]] = {k: [] for k in ("step", "loss", "recon", "filter", "p")}
    start = 0
    if resume:
        ckpt = load_checkpoint(path, expect=config, map_location=dev)
        explainer.load_state_dict(ckpt["explainer"], strict=False)
        restore_optimizer(ckpt, opt, cfg.steps, path)
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history, start = ckpt["history"], ckpt["step"]

    def save(step: int) -> None:
        save_checkpoint({"config": config, "explainer": _own_state(explainer), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                         "step": step, "history": history}, path)

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    if end > start:
        announce(f"explainer on {explainer.layer_name}, {end - start} steps of {cfg.batch_size} images",
                 forward_gflops(explainer.encoder, images[:1].to(dev)),
                 train_images=(end - start) * cfg.batch_size / 3, calls=end - start, device=dev)
    explainer.train()
    bar = tqdm(total=end, initial=start, desc=f"explainer ({explainer.layer_name})", disable=not progress)
    try:
        for step, idx in _batches(len(images), cfg, 0, 1, start):
            if step >= end:
                break
            opt.zero_grad(set_to_none=True)
            with autocast(dev, cfg.amp):
                loss, stats = explainer_loss(explainer(images[idx].to(dev, non_blocking=True)),
                                             cfg.filter_weight, cfg.prior_weight)
            scaler.scale(loss).backward()
            values = torch.stack([loss.detach().float(), stats["recon"], stats["filter"], stats["p"]]).tolist()
            if not math.isfinite(values[0]):
                last = f"the last good checkpoint {path} is kept" if path.exists() else "no checkpoint was written"
                raise FloatingPointError(f"non-finite loss at step {step}: {last}; lower the lr or check the data")
            scaler.step(opt)
            scaler.update()
            sched.step()
            for k, v in zip(history, (step + 1, *values), strict=True):
                history[k].append(v)
            bar.set_postfix({"recon": f"{values[1]:.3f}", "filter": f"{values[2]:.3f}", "p": f"{values[3]:.2f}"})
            bar.update()
            if (step + 1) % ckpt_every == 0 or step + 1 == end:
                save(step + 1)
    finally:
        bar.close()
        explainer.eval()
    return history


def _own_state(explainer: Explainer) -> dict[str, Tensor]:
    return {k: v for k, v in explainer.state_dict().items() if not k.startswith("encoder.")}


def load_explainer(path: str | os.PathLike, encoder: Encoder, map_location: str | torch.device = "cpu") -> Explainer:
    """Rebuild a trained explainer on ``encoder`` (the performer it was trained on: architecture *and* weights,
    else ``ValueError`` naming the difference) from a checkpoint of :func:`train_explainer`."""
    expect = {"encoder": encoder.config, "encoder_fingerprint": encoder_fingerprint(encoder)}
    ckpt = load_checkpoint(path, expect=expect, map_location=map_location)
    c = ckpt["config"]
    explainer = Explainer(encoder, c["layer"], c["filters"], c["depth"], c["hidden"])
    explainer.load_state_dict(ckpt["explainer"], strict=False)
    explainer.history = ckpt["history"]
    return explainer.eval()


# ------------------------------------------------------------------------------- reading a trained explainer

@torch.no_grad()
def explain_parts(explainer: Explainer, x: Tensor, batch_size: int = 128, progress: bool = False) -> dict[str, Tensor]:
    """Run ``explainer`` over images ``x (N, C, H, W)`` in batches (results do not depend on the batching).

    Returns float32 tensors on ``x``'s device: ``parts (N, F, h, w)`` (the part filters), ``performer
    (N, C, h, w)`` (the performer's own filters at the same layer), ``z``, ``z_hat (N, D)``, ``p (N,)`` and
    ``recon_error (N,)``: ‖x̂ − x*‖² / ‖x*‖² of the reconstructed map, per image.
    """
    dev, keys = module_device(explainer), ("parts", "performer", "z", "z_hat", "p", "recon_error")
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    was_training = explainer.training
    explainer.eval()
    for i in tqdm(range(0, len(x), batch_size), desc="explainer", disable=not progress):
        xb = x[i:i + batch_size].to(dev)
        o = explainer(xb)
        target, recon = o.targets[0].float(), o.recons[0].float()
        err = ((recon - target) ** 2).sum(dim=(1, 2, 3)) / (target**2).sum(dim=(1, 2, 3)).clamp(min=1e-12)
        for k, v in zip(keys, (o.parts, o.tap, o.z, o.z_hat, o.p, err), strict=True):
            out[k].append(v.float().to(x.device))
    explainer.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


class PartUnits(Encoder):
    """The performer with the explainer's part filters as one more map, ``"parts"`` (for Network Dissection:
    ``dissect(PartUnits(explainer), x, labels, layers=["parts", explainer.layer_name])``); ``z`` is the
    performer's."""

    def __init__(self, explainer: Explainer) -> None:
        super().__init__()
        self.explainer, enc = explainer, explainer.encoder
        self.feature_names = (*layer_names(enc), "parts")
        self.feature_channels = (*enc.feature_channels, explainer.filters)
        self.feature_strides = (*enc.feature_strides, enc.feature_strides[explainer.layer])
        for attr in ("embed_dim", "min_size", "in_channels", "mean", "std", "config"):
            setattr(self, attr, getattr(enc, attr))

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z, maps = self.explainer.encoder.forward_features(x)
        return z, [*maps, self.explainer.explain_maps(maps[self.explainer.layer])[2][-1]]
