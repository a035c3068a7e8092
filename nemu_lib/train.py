"""Train a NEM-U decoder: one loop for a CPU, one GPU or many (torch.distributed DDP).

    model = NEMU(encoder)
    history = train(model, train_x, val_x, TrainConfig(objective="nem", steps=2000), "outputs/nemu/run")

Launched with ``torchrun --nproc_per_node=N -m nemu_lib.train ...`` (the same arguments as ``nemu train``)
every process trains one replica: the frozen encoder is copied (it has no gradients), only the decoder is
wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPU), a DistributedSampler gives each rank its
share of every global batch, and rank 0 writes the checkpoints. ``batch_size`` is the *global* batch:
with GroupNorm in the decoder, N processes reach the weights one process reaches on the same batches.

Checkpoints (every ``ckpt_every`` steps and at the end, atomically) hold the decoder, the optimiser, the
scheduler, the RNG states, the step and the loss history; ``resume=True`` continues from one exactly. A
non-finite loss stops training with a clear error and leaves the last good checkpoint in place.

From the shell (:mod:`nemu_lib.launch`; ``nemu train`` takes the same arguments)::

    nemu train --encoder simclr --dataset shapes --profile cpu --out outputs/nemu/simclr
    torchrun --nproc_per_node=4 -m nemu_lib.train --encoder resnet50-dino --dataset imagenette --profile gpu

writes ``OUT/checkpoint.pt`` and ``OUT/run.json`` (encoder spec, profile, data set, image size, settings),
from which ``nemu explain --run OUT`` rebuilds the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .budget import NEMU_PASSES, announce, forward_gflops
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from .config import autocast, grad_scaler, module_device
from .encoders import Encoder
from .nem import NEMU, OBJECTIVES, build_objective, encoder_fingerprint
from .progress import tqdm

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that determines a training run (and must match when resuming).

    Attributes:
        objective: ``nem``, ``nem-contrastive`` or ``relax``.
        steps: optimiser steps in total.
        batch_size: the global batch (over all processes and accumulation micro-batches).
        grad_accum: micro-batches per step (per process).
        lr, weight_decay: AdamW's (Prodigy: lr = 1 is its usual setting).
        optimizer: ``adamw``, ``prodigy`` (the authors'; needs ``pip install prodigyopt``) or ``sgd``
            (momentum 0.9; its updates are linear in the gradients, which makes runs comparable bit for bit).
        warmup: share of the steps with a linear warm-up; cosine decay to 0 after it.
        alpha, beta, eps: the NEM objectives' weights (see :mod:`nemu_lib.nem`).
        relax_masks: K, RELAX masks per image per step (``relax`` objective).
        seed: seeds the data order and the masks.
        amp: autocast on CUDA: bf16, or fp16 with loss scaling on GPUs older than Ampere (T4)
            (:func:`nemu_lib.config.autocast`); on other devices an outer ``torch.autocast`` stays in force,
            which is how the tests check dtype safety on a CPU.
    """

    objective: str = "nem"
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup: float = 0.05
    alpha: float = 4.0
    beta: float = 0.5
    eps: float = 0.01
    relax_masks: int = 16
    seed: int = 0
    amp: bool = True

    def objective_kwargs(self) -> dict:
        if self.objective == "relax":
            return {"n_masks": self.relax_masks}
        return {"alpha": self.alpha, "beta": self.beta, "eps": self.eps}


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check(cfg: TrainConfig, n: int, world: int) -> int:
    """Validate the config for ``n`` samples on ``world`` processes; return the micro-batch size."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}: choose one of {OBJECTIVES}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError(f"steps, batch_size and grad_accum must be >= 1, got {cfg.steps}, {cfg.batch_size}, "
                         f"{cfg.grad_accum}")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum = "
                         f"{world} x {cfg.grad_accum}")
    if n // world < cfg.batch_size // world:
        raise ValueError(f"{n} training images cannot fill a batch of {cfg.batch_size}: lower batch_size")
    return cfg.batch_size // (world * cfg.grad_accum)


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ImportError("optimizer 'prodigy' needs `pip install prodigyopt`; or use 'adamw'") from None
        return Prodigy(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose 'adamw', 'prodigy' or 'sgd'")


def _schedule(cfg: TrainConfig):
    warmup = max(1, round(cfg.warmup * cfg.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    return factor


def _mask_generator(
    cfg: TrainConfig, step: int, rank: int, device: torch.device, validation: bool = False
) -> torch.Generator:
    """A generator seeded by (seed, step, rank): resuming needs no saved state for the masks."""
    seed = int(np.random.SeedSequence([cfg.seed, int(validation), step, rank]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(seed)


def _batches(n: int, cfg: TrainConfig, rank: int, world: int, start: int) -> Iterator[tuple[int, Tensor]]:
    """``(step, this rank's indices of the step's global batch)`` from step ``start`` on.

    DistributedSampler hands rank r the samples perm[r::world] of the epoch's permutation, so the r-th
    shares of step t together are exactly the single-process batch perm[t B:(t + 1) B].
    """
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    per_rank = cfg.batch_size // world
    per_epoch = len(sampler) // per_rank
    step = start
    while step < cfg.steps:
        epoch, offset = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        with torch.device("cpu"):  # the sampler's randperm (CPU generator) must not follow a default device
            indices = torch.tensor(list(sampler), dtype=torch.long)
        for b in range(offset, per_epoch):
            yield step, indices[b * per_rank:(b + 1) * per_rank]
            step += 1
            if step >= cfg.steps:
                return


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the legacy global state)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore :func:`_rng_state`. RNG states must be CPU byte tensors: a checkpoint loaded with
    ``map_location="cuda"`` brings them back on the GPU, so they are moved back first."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def checkpoint_config(model: NEMU, cfg: TrainConfig) -> dict:
    """What a checkpoint records and a resumed run must match: the model and the training settings."""
    return {**model.config, "train": dataclasses.asdict(cfg)}


@torch.no_grad()
def validation_loss(model: NEMU, images: Tensor, cfg: TrainConfig, batch_size: int = 64) -> float:
    """The objective on ``images`` (fixed masks for ``relax``), averaged over images."""
    objective = build_objective(cfg.objective, **cfg.objective_kwargs())
    dev = next(model.decoder.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(dev)
        loss, _ = objective(model, x, _mask_generator(cfg, i, 0, dev, validation=True))
        total += loss.item() * len(x)
    model.train(was_training)
    return total / len(images)


def train(
    model: NEMU,
    images: Tensor,
    val_images: Tensor | None,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    ckpt_every: int = 100,
    val_every: int = 100,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train ``model.decoder`` on normalised ``images (N, C, H, W)``; return the history.

    Args:
        model: the NEM-U model; its encoder stays frozen. Move it to the device first.
        images, val_images: training and validation images (normalised as the encoder expects).
        cfg: the run's settings (:class:`TrainConfig`).
        out_dir: where ``checkpoint.pt`` goes (rank 0 writes it).
        ckpt_every, val_every: checkpoint and validation intervals in steps.
        resume: continue from ``out_dir/checkpoint.pt`` (its model and settings must match).
        stop_at: stop after this step (checkpointing it), as if interrupted; ``resume`` continues.
        progress: tqdm bar with the loss and the objective's two statistics (rank 0).

    Returns:
        ``{"step", "loss", <stat 1>, <stat 2>, "val_step", "val_loss"}`` lists, the resumed part included;
        the statistics are the objective's ``stat_names``: ``"area"`` (mean(m)) and ``"sim"``
        (cos(f(x), f(x ⊙ m))) for ``nem`` and ``nem-contrastive``; ``"spread"`` (the std of e over an
        image's pixels) and ``"masked_sim"`` (mean s_k of the random masked copies) for ``relax``.
    """
    rank, world = rank_world()
    micro = _check(cfg, len(images), world)
    dev = next(model.decoder.parameters()).device
    if cfg.objective == "relax" and not model.uncertainty:
        raise ValueError("the 'relax' objective trains an uncertainty head: build NEMU(encoder, uncertainty=True)")
    objective = build_objective(cfg.objective, **cfg.objective_kwargs())
    path = Path(out_dir) / CHECKPOINT
    decoder = model.decoder
    opt = _optimizer(cfg, decoder.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    scaler = grad_scaler(dev, cfg.amp)
    names = objective.stat_names
    history: dict[str, list[float]] = {k: [] for k in ("step", "loss", *names, "val_step", "val_loss")}
    start = 0
    config = checkpoint_config(model, cfg)
    if resume:
        ckpt = load_checkpoint(path, expect=config, map_location=dev)
        decoder.load_state_dict(ckpt["decoder"])
        restore_optimizer(ckpt, opt, cfg.steps, path)
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():  # fp16's loss scale (bf16 / fp32 runs save an empty one)
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history, start = ckpt["history"], ckpt["step"]

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint({"config": config, "decoder": decoder.state_dict(),
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "scaler": scaler.state_dict(), "rng": _rng_state(), "step": step,
                             "history": history}, path)

    ddp = dist.is_available() and dist.is_initialized()  # under torchrun, one process too (NCCL is exercised)
    if ddp:
        model.decoder = DistributedDataParallel(decoder, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    if rank == 0 and end > start:
        passes, masked = (2, cfg.relax_masks) if cfg.objective == "relax" else (NEMU_PASSES[cfg.objective], 0)
        images_left = (end - start) * cfg.batch_size
        announce(f"NEM-U ({cfg.objective}), {end - start} steps of {cfg.batch_size} images",
                 forward_gflops(model.encoder, images[:1].to(dev)), train_images=images_left * passes / 3,
                 infer_images=images_left * masked, calls=end - start, device=dev)
    bar = tqdm(total=end, initial=start, desc=f"NEM-U ({cfg.objective})", disable=not progress or rank > 0)
    try:
        for step, idx in _batches(len(images), cfg, rank, world, start):
            if step >= end:
                break
            gen = _mask_generator(cfg, step, rank, dev)
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(3, device=dev)  # loss and the two statistics, summed over micro-batches
            for j, chunk in enumerate(idx.split(micro)):
                sync = j == cfg.grad_accum - 1 or not ddp
                with (contextlib.nullcontext() if sync else model.decoder.no_sync()), autocast(dev, cfg.amp):
                    loss, s = objective(model, images[chunk].to(dev, non_blocking=True), gen)
                    scaler.scale(loss / cfg.grad_accum).backward()
                stats += torch.stack([loss.detach().float(), *(s[k].float() for k in names)]) / cfg.grad_accum
            if ddp:
                dist.all_reduce(stats)
                stats /= world
            loss_value, stat1, stat2 = stats.tolist()
            if not math.isfinite(loss_value):
                last = f"the last good checkpoint {path} is kept" if path.exists() else "no checkpoint was written"
                raise FloatingPointError(f"non-finite loss at step {step}: {last}; lower the lr or check the data")
            scaler.step(opt)  # with fp16, skipped when the scaled gradients overflowed
            scaler.update()
            sched.step()
            for k, v in zip(("step", "loss", *names), (step + 1, loss_value, stat1, stat2), strict=True):
                history[k].append(v)
            bar.set_postfix({"loss": f"{loss_value:.4f}", names[0]: f"{stat1:.3f}", names[1]: f"{stat2:.3f}"})
            bar.update()
            done = step + 1
            if val_images is not None and rank == 0 and (done % val_every == 0 or done == cfg.steps):
                wrapped, model.decoder = model.decoder, decoder  # validate without DDP's hooks
                history["val_step"].append(done)
                history["val_loss"].append(validation_loss(model, val_images, cfg))
                model.decoder = wrapped
            if done % ckpt_every == 0 or done == end:
                save(done)
    finally:
        bar.close()
        model.decoder = decoder
        model.eval()
    return history


def load_nemu(path: str | os.PathLike, encoder: Encoder, map_location: str | torch.device = "cpu") -> NEMU:
    """Rebuild a trained NEM-U on ``encoder`` from a checkpoint of :func:`train`.

    The encoder must be the one the decoder was trained on (architecture *and* weights, compared by
    :func:`nemu_lib.nem.encoder_fingerprint`); another raises ``ValueError`` naming the difference. The decoder
    is built on the encoder's device (``map_location`` only says where the checkpoint's tensors are read to).
    """
    expect = {"encoder": encoder.config, "encoder_fingerprint": encoder_fingerprint(encoder)}
    ckpt = load_checkpoint(path, expect=expect, map_location=map_location)
    config = ckpt["config"]
    with torch.device(module_device(encoder)):  # beside the encoder, not the default device
        model = NEMU(encoder, uncertainty=config["uncertainty"], max_width=config["max_width"],
                     min_stride=config["min_stride"])
    model.decoder.load_state_dict(ckpt["decoder"])
    return model.eval()



if __name__ == "__main__":  # torchrun --nproc_per_node=N -m nemu_lib.train ... (the arguments of `nemu train`)
    from nemu_lib.launch import main

    main()
