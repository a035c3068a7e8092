"""Trained NEM-U decoders shared between notebooks: load one from ``outputs/nemu`` or train it.

Notebook 03 trains the decoders with live curves, notebook 04 and ``bench/quality.py`` evaluate them;
both go through :func:`profile_config` and the same run folder, so a decoder is trained once::

    model = pretrained_nemu("simclr", "nem", "cpu")      # outputs/nemu/simclr-nem-cpu/checkpoint.pt

A checkpoint is reused only if it matches the encoder (architecture and weights) and every training
setting; otherwise the decoder is trained again (and an interrupted run resumes where it stopped).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .checkpoint import CheckpointMismatch, load_checkpoint
from .config import Profile, get_profile, outputs_dir, seed_everything
from .config import device as default_device
from .data import NormalizedImages, load_split
from .encoders import Encoder
from .nem import NEMU, OBJECTIVES
from .ssl import pretrained_encoder
from .train import CHECKPOINT, TrainConfig, checkpoint_config, train

RUN_NAMES = {"nem": "nem", "nem-contrastive": "contrastive", "relax": "relax"}  # run folder per objective


def profile_config(objective: str, profile: str | Profile | None = None, seed: int = 0) -> TrainConfig:
    """The training settings of a profile's decoders (``extra`` keys ``nemu_*``).

    ``nem``: ``nemu_steps`` steps at ``nemu_lr``; ``nem-contrastive``: ``nemu_contrastive_steps`` with
    ε = ``nemu_contrastive_eps`` (0.3). The complement term −d(f(x ⊙ m), f(x ⊙ (1 − m))) · (d_keep + ε) is weighted
    by d_keep + ε, and a good mask has d_keep ≈ 0.02: with the objective's default ε = 0.01 its gradient is ~40x
    smaller than α · d_keep's and it changes nothing (cpu profile, 150 steps, 256 test scenes: complement similarity
    0.940 against plain NEM-U's 0.942 at the same area). With ε = 0.3 and as many steps as NEM-U (cpu: 600) the
    complement keeps 0.891 against plain NEM-U's 0.927 at the same area (0.19) and kept similarity (0.95); after
    150 steps only 0.914 (area 0.23). The gpu profile gives it 1,500 of NEM-U's 2,000 steps (a free Colab GPU's
    budget);
    ``relax`` (amortised RELAX): ``nemu_relax_steps`` at ``nemu_relax_lr`` (its targets, the similarities
    of 16 random masks per scene, are noisy: a lower rate than NEM-U's did at least as well in notebook 03).
    The cpu profile gives it 600 steps: SimCLR's maps are then worth 104 / 113 / 106 RELAX masks over training
    seeds 0-2, against 93 / 95 / 92 after 300 (``bench/amortised_relax_curve.py``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {OBJECTIVES}")
    e = get_profile(profile).extra
    steps = {"nem": e["nemu_steps"], "nem-contrastive": e["nemu_contrastive_steps"],
             "relax": e["nemu_relax_steps"]}[objective]
    lr = e["nemu_relax_lr"] if objective == "relax" else e["nemu_lr"]
    # ε only for the contrastive objective: it is part of every run's saved settings (checkpoint_config)
    eps = e["nemu_contrastive_eps"] if objective == "nem-contrastive" else TrainConfig.eps
    return TrainConfig(objective=objective, steps=steps, batch_size=e["nemu_batch_size"], lr=lr, eps=eps, seed=seed)


def run_dir(encoder_kind: str, objective: str, profile: str | Profile | None = None) -> Path:
    """``outputs/nemu/<encoder kind>-<objective>-<profile>``."""
    return outputs_dir() / "nemu" / f"{encoder_kind}-{RUN_NAMES[objective]}-{get_profile(profile).name}"


def train_or_load(
    model: NEMU,
    images: Tensor,
    val_images: Tensor | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[dict[str, list[float]], int, float]:
    """Train ``model`` with ``cfg`` into ``out_dir``, or load the matching checkpoint there.

    A matching checkpoint of fewer steps is resumed; one with other settings (or ``retrain``) is replaced. When
    ``out_dir`` holds none, the shipped reference (:func:`nemu_lib.reference.adopt`) is used if it matches.

    Returns:
        ``(history, steps trained in this call, seconds spent training)``.
    """
    path = Path(out_dir) / CHECKPOINT
    done = 0
    if not retrain:  # nothing trained here yet: the shipped reference decoder when it matches
        reference.adopt(path, expect=checkpoint_config(model, cfg))
    if path.exists() and not retrain:
        try:
            done = load_checkpoint(path, expect=checkpoint_config(model, cfg))["step"]
        except CheckpointMismatch as err:  # another encoder or other settings: train afresh (overwrites it)
            print(f"not reusing {path}: trained with other settings ({'; '.join(err.changes)})")
    start = time.perf_counter()
    history = train(model, images, val_images, cfg, out_dir, ckpt_every=100, val_every=max(1, cfg.steps // 8),
                    resume=done > 0, progress=progress)
    return history, cfg.steps - done, time.perf_counter() - start


def training_images(
    encoder: Encoder, profile: str | Profile | None = None
) -> tuple[NormalizedImages, NormalizedImages]:
    """What the profile's decoders train on: the Shapes training split and the first 128 validation scenes (a
    fixed set for the validation loss), normalised batch by batch as ``encoder`` expects."""
    p = get_profile(profile)
    train_split, val_split = load_split("train", p), load_split("val", p)
    return (NormalizedImages(train_split["image"], encoder.mean, encoder.std),
            NormalizedImages(val_split["image"][:128], encoder.mean, encoder.std))


def pretrained_nemu(
    encoder_kind: str,
    objective: str = "nem",
    profile: str | Profile | None = None,
    seed: int = 0,
    encoder: Encoder | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> NEMU:
    """The profile's NEM-U decoder for ``objective`` on the Shapes encoder ``encoder_kind``, in eval mode.

    Loads ``outputs/nemu/<kind>-<objective>-<profile>/checkpoint.pt`` or trains it on the profile's Shapes
    training split (:func:`profile_config`). ``encoder``: the already loaded encoder of that kind (else
    :func:`nemu_lib.ssl.pretrained_encoder` loads or trains it). ``model.history`` holds the loss history.
    """
    p = get_profile(profile)
    dev = default_device(device)
    if encoder is None:
        encoder = pretrained_encoder(encoder_kind, p, seed=seed, device=dev, progress=progress)
    cfg = profile_config(objective, p, seed)
    seed_everything(seed)  # the decoder's initialisation
    model = NEMU(encoder.eval(), uncertainty=objective == "relax").to(dev)
    x_train, x_val = training_images(encoder, p)
    model.history, _, _ = train_or_load(model, x_train, x_val, cfg, run_dir(encoder_kind, objective, p),
                                        progress=progress)
    return model.eval()
