"""Self-supervised encoders: SimCLR, a supervised baseline and a random control, trained or loaded.

SimCLR (Chen et al., ICML 2020, arXiv 2002.05709) pulls two augmented views of an image together in
representation space and pushes the other 2N - 2 views of the batch away. With projections
``p = g(f(x))`` normalised to the unit sphere and ``sim(a, b) = a.b / (|a||b|)``, the NT-Xent loss of the
positive pair (i, j) is (eq. 1 of the paper)::

    l(i, j) = -log exp(sim(p_i, p_j) / tau) / sum_{k != i} exp(sim(p_i, p_k) / tau)

averaged over all 2N ordered positive pairs. The encoder ``f`` is what we keep and explain; the
projection head ``g`` is thrown away after training.

The augmentations live in :mod:`nemu_lib.augment`, the probes that measure what an encoder learned in
:mod:`nemu_lib.probes`. ``pretrained_encoder(kind, profile)`` loads
``outputs/encoders/<kind>-<profile>-seed<seed>.pt`` or trains it, so every notebook can run alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .augment import SimCLRAugment
from .budget import announce, forward_gflops
from .checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from .config import Profile, autocast, get_profile, grad_scaler, outputs_dir, seed_everything
from .config import device as default_device
from .data import SHAPES, load_split
from .encoders import Encoder, build_encoder
from .progress import tqdm

# ------------------------------------------------------------------------------------------ losses

def nt_xent(p1: Tensor, p2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR eq. 1) of two batches of projections ``(N, d)``, the views of the same N images.

    >>> p = torch.randn(4, 8)
    >>> bool(nt_xent(p, p, 0.5) < nt_xent(p, torch.randn(4, 8), 0.5))
    True
    """
    if p1.shape != p2.shape or p1.ndim != 2:
        raise ValueError(f"p1 and p2 must both have shape (N, d), got {tuple(p1.shape)} and {tuple(p2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = p1.shape[0]
    p = F.normalize(torch.cat([p1, p2]), dim=1)  # (2N, d) on the unit sphere
    logits = p @ p.T / temperature  # (2N, 2N) sim(p_i, p_k) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=p.device), float("-inf"))  # k != i
    positives = torch.cat([torch.arange(n, 2 * n, device=p.device), torch.arange(n, device=p.device)])  # j(i)
    return F.cross_entropy(logits, positives)


class ProjectionHead(nn.Module):
    """g: Linear - BatchNorm - ReLU - Linear (SimCLR's MLP head)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# ---------------------------------------------------------------------------------------- training

def fit(
    model: nn.Module,
    loss_fn: Callable[[Tensor], Tensor],
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    amp: bool = True,
    stop_at: int | None = None,
) -> list[float]:
    """Train ``model``'s parameters with AdamW and a cosine schedule (5 % linear warm-up).

    ``loss_fn(idx)`` computes the loss of the batch of sample indices ``idx``; batches are reshuffled
    every epoch with a generator seeded by ``seed`` and the last incomplete batch is dropped (BatchNorm
    and NT-Xent want full batches). With ``amp``, on CUDA the forward runs under autocast (bf16, or fp16 with
    loss scaling on GPUs older than Ampere: :func:`nemu_lib.config.autocast`); on other devices an outer
    ``torch.autocast`` is left in force. Returns the loss of
    every step; ``callback(step, loss)`` sees them live. ``stop_at`` ends the run after that many steps, with the
    schedule of the whole run: the first steps of a long run, retraced.
    """
    if n < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"nothing to train: {n} samples, batch size {batch_size}, {epochs} epochs")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    if total < 1:
        raise ValueError(f"nothing to train: {n} samples, batch size {batch_size}, {epochs} epochs")
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = grad_scaler(dev, amp)
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    model.train()
    end = total if stop_at is None else min(stop_at, total)
    with tqdm(total=end, desc=desc, disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen, device="cpu")
            for b in range(steps_per_epoch):
                if len(history) == end:
                    break
                idx = order[b * batch_size:(b + 1) * batch_size]
                with autocast(dev, amp):
                    loss = loss_fn(idx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: non-finite loss at step {len(history)}; lower the lr")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                history.append(loss.item())
                bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                bar.update()
                if callback is not None:
                    callback(len(history), history[-1])
    model.eval()
    return history


def _check_unit_images(images: Tensor) -> None:
    """Training augments images in [0, 1] and normalises them last: normalised inputs are a mistake to name."""
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        raise ValueError(f"training images must be in [0, 1] (these span [{low:.2f}, {high:.2f}]): pass them before "
                         "normalize(); the augmentation normalises with the encoder's mean and std")


def train_simclr(
    encoder: Encoder,
    images: Tensor,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    augment: dict | None = None,
    stop_at: int | None = None,
) -> list[float]:
    """SimCLR-pretrain ``encoder`` in place on ``images (N, 3, H, W)`` in [0, 1]; return the loss per step.

    ``augment`` holds keyword arguments of :class:`~nemu_lib.augment.SimCLRAugment` that replace its defaults
    (e.g. ``{"scale": (0.4, 1.0), "p_blur": 0.8}``); ``None`` keeps them all. ``stop_at``: only the first steps of
    the run (:func:`fit`).
    """
    _check_unit_images(images)
    dev = next(encoder.parameters()).device
    seed_everything(seed)
    aug = SimCLRAugment(images.shape[-1], encoder.mean, encoder.std, **(augment or {})).to(dev)
    model = nn.ModuleDict({"f": encoder, "g": ProjectionHead(encoder.embed_dim)}).to(dev)

    def loss_fn(idx: Tensor) -> Tensor:
        batch = images[idx].to(dev, non_blocking=True)
        views = torch.cat([aug(batch), aug(batch)])  # (2N, 3, S, S): one pass for both views
        p1, p2 = model["g"](model["f"](views)).float().chunk(2)
        return nt_xent(p1, p2, temperature)

    steps = epochs * (len(images) // min(batch_size, len(images)))
    steps = steps if stop_at is None else min(steps, stop_at)
    announce(f"SimCLR, {steps} steps of {2 * batch_size} views", forward_gflops(encoder, images[:1].to(dev)),
             train_images=steps * 2 * batch_size, calls=steps, device=dev)
    return fit(model, loss_fn, len(images), epochs, batch_size, lr, seed=seed, desc="SimCLR",
               progress=progress, callback=callback, stop_at=stop_at)


def train_supervised(
    encoder: Encoder,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``encoder`` in place with a linear classifier and cross-entropy (light crop/flip augmentation).

    ``images`` are in [0, 1], not normalised: the augmentation normalises its crops with ``encoder.mean`` and
    ``encoder.std`` last.
    """
    _check_unit_images(images)
    dev = next(encoder.parameters()).device
    seed_everything(seed)
    augment = SimCLRAugment(images.shape[-1], encoder.mean, encoder.std, scale=(0.6, 1.0),
                            p_jitter=0.0, p_gray=0.0, p_blur=0.0).to(dev)
    n_classes = int(labels.max()) + 1
    model = nn.ModuleDict({"f": encoder, "head": nn.Linear(encoder.embed_dim, n_classes)}).to(dev)

    def loss_fn(idx: Tensor) -> Tensor:
        logits = model["head"](model["f"](augment(images[idx].to(dev))))
        return F.cross_entropy(logits.float(), labels[idx].to(dev))

    steps = epochs * (len(images) // min(batch_size, len(images)))
    announce(f"supervised training, {steps} steps of {batch_size} images", forward_gflops(encoder, images[:1].to(dev)),
             train_images=steps * batch_size, calls=steps, device=dev)
    return fit(model, loss_fn, len(images), epochs, batch_size, lr, seed=seed, desc="supervised",
               progress=progress, callback=callback)


def training_steps(n: int, epochs: int, batch_size: int) -> int:
    """Optimiser steps of :func:`fit` on ``n`` samples: ``epochs * (n // min(batch_size, n))``.

    The last incomplete batch of every epoch is dropped, and a batch never holds more than ``n`` samples.

    >>> training_steps(100, epochs=3, batch_size=32)  # 3 full batches of 32 per epoch
    9
    """
    if n < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(f"need n >= 1, batch_size >= 1 and epochs >= 0, got {n}, {batch_size}, {epochs}")
    return epochs * (n // min(batch_size, n))


# ---------------------------------------------------------------------------------- trained encoders

ENCODER_KINDS = ("simclr", "supervised", "random")
TRAINING_VERSION = 3  # bump when the training recipe changes, so saved encoders are retrained


def encoder_path(kind: str, profile: Profile, seed: int = 0) -> Path:
    return outputs_dir() / "encoders" / f"{kind}-{profile.name}-seed{seed}.pt"


def load_encoder(
    path: str | Path,
    image_size: int | None = None,
    encoder_config: dict | None = None,
    training: dict | None = None,
) -> Encoder:
    """Rebuild an encoder from a checkpoint of :func:`pretrained_encoder`, checking what it was built for.

    Any of ``image_size``, ``encoder_config`` (architecture) and ``training`` (the settings it was trained
    with) that is given must match the checkpoint, else ``ValueError`` names the differences.
    """
    expect = {"image_size": image_size, "encoder": encoder_config, "training": training}
    ckpt = load_checkpoint(path, expect={k: v for k, v in expect.items() if v is not None})
    encoder = build_encoder(**ckpt["config"]["encoder"])
    encoder.load_state_dict(ckpt["state_dict"])
    encoder.history = ckpt.get("history", [])
    return encoder.eval()


def encoder_config(kind: str, profile: Profile, seed: int = 0, encoder: Encoder | None = None) -> dict:
    """What :func:`pretrained_encoder` records with an encoder of ``kind``: architecture, sizes and training."""
    encoder = encoder or build_encoder("small_resnet", widths=profile.encoder_widths)
    epochs = {"simclr": profile.ssl_epochs, "supervised": profile.supervised_epochs, "random": 0}[kind]
    training = {"n_train": profile.n_train, "epochs": epochs, "batch_size": profile.batch_size, "lr": profile.lr,
                "temperature": profile.temperature if kind == "simclr" else None, "mean": list(encoder.mean),
                "std": list(encoder.std), "version": TRAINING_VERSION}
    return {"kind": kind, "profile": profile.name, "image_size": profile.image_size, "seed": seed,
            "encoder": encoder.config, "training": training}


def pretrained_encoder(
    kind: str,
    profile: str | Profile | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    retrain: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> Encoder:
    """The small-ResNet encoder of ``kind`` for ``profile``: loaded from ``outputs/encoders`` or trained.

    When nothing is saved there, the shipped reference encoder (:mod:`nemu_lib.reference`, the ``cpu`` profile
    for seed 0) is taken if it was trained with these settings. ``retrain``: train it here even so.

    Kinds: ``simclr`` (self-supervised), ``supervised`` (main-object shape classification) and ``random``
    (initialisation only: the control). Training uses the profile's Shapes training split; the result is
    saved atomically with its config and loss history (``encoder.history``). Returns it in eval mode on
    ``device``.
    """
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}: choose one of {ENCODER_KINDS}")
    p = get_profile(profile)
    dev = default_device(device)
    path = encoder_path(kind, p, seed)
    seed_everything(seed)
    encoder = build_encoder("small_resnet", widths=p.encoder_widths)
    config = encoder_config(kind, p, seed, encoder)
    training = config["training"]
    if not retrain:  # nothing trained here yet: the shipped reference encoder when it matches
        reference.adopt(path, expect={k: config[k] for k in ("image_size", "encoder", "training")})
    if path.exists() and not retrain:
        try:
            return load_encoder(path, image_size=p.image_size, encoder_config=encoder.config,
                                training=training).to(dev)
        except CheckpointMismatch as err:  # trained with other settings: say which, then retrain
            print(f"retraining {kind}: {path.name} was trained with other settings ({'; '.join(err.changes)})")
    encoder = encoder.to(dev)
    history: list[float] = []
    if kind != "random":
        data = load_split("train", p)  # the fixed data stream; ``seed`` varies initialisation and order
        common = dict(epochs=training["epochs"], batch_size=p.batch_size, lr=p.lr, seed=seed, progress=progress,
                      callback=callback)
        if kind == "simclr":
            history = train_simclr(encoder, data["image"], temperature=p.temperature, **common)
        else:
            history = train_supervised(encoder, data["image"], data["label"], **common)
    save_checkpoint({"config": config, "state_dict": encoder.state_dict(), "history": history,
                     "classes": list(SHAPES)}, path)
    encoder.history = history
    return encoder.eval()
