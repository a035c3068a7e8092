"""Training runs from the shell: ``nemu train``, ``python -m nemu_lib.train`` and torchrun.

    nemu train --encoder simclr --dataset shapes --profile cpu --out outputs/nemu/simclr
    torchrun --nproc_per_node=4 -m nemu_lib.train --encoder resnet50-dino --dataset imagenette --profile gpu

A run folder holds ``checkpoint.pt`` (:func:`nemu_lib.train.train`) and ``run.json`` (encoder spec, profile,
data set, image size, settings), from which ``nemu explain --run OUT`` rebuilds the model. Expected errors
(missing files, offline data sets, mismatched checkpoints) end the command with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from . import ssl
from .checkpoint import atomic_write
from .config import PROFILES, Profile, get_profile, outputs_dir, seed_everything
from .config import device as default_device
from .data import NormalizedImages, ShapesScenes, load_split
from .encoders import PRETRAINED, Encoder, WeightsUnavailableError, load_pretrained
from .nem import NEMU, OBJECTIVES
from .progress import tqdm
from .real_data import DatasetUnavailableError, load_real_dataset
from .runs import profile_config
from .train import CHECKPOINT, TrainConfig, rank_world, train
from .vit import PRETRAINED_VITS, load_pretrained_vit

PRETRAINED_SPECS = (*PRETRAINED, *PRETRAINED_VITS)  # downloaded once: ResNets and ViTs
ENCODER_SPECS = (*ssl.ENCODER_KINDS, *PRETRAINED_SPECS)
REAL_DATASETS = ("imagenette", "stl10", "voc")
DATASETS = ("shapes", *REAL_DATASETS)
RUN_FILE = "run.json"
_VAL_SPLIT = {"imagenette": "val", "stl10": "test", "voc": "val"}
# what a command reports as one line ("nemu: error: ...") instead of a traceback; NEMU_DEBUG=1 shows it
USER_ERRORS = (FileNotFoundError, ValueError, DatasetUnavailableError, WeightsUnavailableError, ImportError,
               FloatingPointError)


def check_encoder_spec(spec: str) -> str:
    """Return ``spec`` if it names an encoder (see :func:`resolve_encoder`), else raise ``ValueError``."""
    if spec not in ENCODER_SPECS:
        raise ValueError(f"unknown encoder {spec!r}: choose one of {', '.join(ENCODER_SPECS)} (the first three are "
                         "the Shapes encoders of the profile, the others pretrained ResNets and ViTs)")
    return spec


def resolve_encoder(
    spec: str,
    profile: str | Profile | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    allow_training: bool = True,
    progress: bool = True,
) -> Encoder:
    """The encoder an encoder spec names, in eval mode on ``device``.

    Specs: ``simclr``, ``supervised``, ``random``: the profile's Shapes small ResNet
    (:func:`nemu_lib.ssl.pretrained_encoder`, ``seed`` picks the file in ``outputs/encoders``); or a
    pretrained ResNet of :data:`nemu_lib.encoders.PRETRAINED` (``resnet18-supervised``,
    ``resnet50-supervised``, ``resnet50-dino``, ``resnet50-swav``) or ViT of :data:`nemu_lib.vit.PRETRAINED_VITS`
    (``vit-s16-dino``, ``vit-b16-dino``, ``vit-b16-supervised``); downloaded once, ``profile`` and ``seed`` unused).
    With ``allow_training=False`` a Shapes encoder that is not on disk raises ``FileNotFoundError``
    naming the ``nemu pretrain`` command, instead of being trained (explaining should not train encoders).
    """
    check_encoder_spec(spec)
    if spec in PRETRAINED:
        return load_pretrained(spec, progress=progress).to(default_device(device))
    if spec in PRETRAINED_VITS:
        return load_pretrained_vit(spec, progress=progress).to(default_device(device))
    p = get_profile(profile)
    if allow_training:
        return ssl.pretrained_encoder(spec, p, seed=seed, device=device, progress=progress)
    path = ssl.encoder_path(spec, p, seed)
    if not path.is_file():
        raise FileNotFoundError(f"no {spec} encoder of profile {p.name} (seed {seed}) at {path}: train it with "
                                f"`nemu pretrain --kind {spec} --profile {p.name} --seed {seed}`, or set NEMU_OUTPUTS "
                                "to the outputs folder that holds it")
    return ssl.load_encoder(path).to(default_device(device))


def default_image_size(spec: str, dataset: str, profile: str | Profile | None = None) -> int:
    """224 px for a pretrained ResNet or ViT on a real data set, else the profile's image size."""
    return 224 if spec in PRETRAINED_SPECS and dataset != "shapes" else get_profile(profile).image_size


def _rank0_first(fn, group=None):
    """Run ``fn`` on rank 0 first, then on the others (downloads and encoder training happen once).

    ``group``: a gloo group with a long timeout (see :func:`_init_distributed`), so the others may wait for
    rank 0 to train an encoder or download a data set longer than NCCL's timeout.
    """
    rank, world = rank_world()
    if world > 1 and rank > 0:
        dist.barrier(group=group)
    result = fn()
    if world > 1 and rank == 0:
        dist.barrier(group=group)
    return result


def _shapes_images(split: str, p: Profile, image_size: int) -> Tensor:
    if image_size == p.image_size:
        return load_split(split, p)["image"]  # cached and shared: read-only
    n = p.n_train if split == "train" else p.n_val
    return ShapesScenes(split, n, image_size).stack(progress=False)["image"]


def _real_images(name: str, split: str, image_size: int, n: int, seed: int, download: bool) -> Tensor:
    """A seeded random subset of ``n`` images of a real data set, as uint8 ``(n, 3, S, S)``."""
    ds = load_real_dataset(name, split, image_size=image_size, download=download)
    n = min(n, len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=64)
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    i = 0
    for x, _ in tqdm(loader, desc=f"{name} {split}", disable=rank_world()[0] > 0):
        out[i:i + len(x)] = (x.expand(-1, 3, -1, -1) * 255).round().clamp(0, 255).to(torch.uint8)
        i += len(x)
    return out


def training_images(
    dataset: str, profile: str | Profile | None, image_size: int, encoder: Encoder, seed: int = 0
) -> tuple[NormalizedImages, NormalizedImages]:
    """Training and validation images of ``dataset``, normalised as ``encoder`` expects.

    ``shapes``: the profile's Shapes splits (``n_train``, ``n_val``). A real data set (``imagenette``,
    ``stl10``, ``voc``): a random subset of at most as many images of its training and validation splits,
    resized and centre-cropped to ``image_size`` (needs internet once; offline
    :class:`~nemu_lib.real_data.DatasetUnavailableError` says where to put the files).
    """
    p = get_profile(profile)
    if dataset == "shapes":
        train_x, val_x = _shapes_images("train", p, image_size), _shapes_images("val", p, image_size)
    elif dataset in REAL_DATASETS:
        download = rank_world()[0] == 0  # the other ranks read what rank 0 downloaded (see _rank0_first)
        train_x = _real_images(dataset, "train", image_size, p.n_train, seed, download)
        val_x = _real_images(dataset, _VAL_SPLIT[dataset], image_size, p.n_val, seed, download)
    else:
        raise ValueError(f"unknown data set {dataset!r}: choose one of {', '.join(DATASETS)}")
    return NormalizedImages(train_x, encoder.mean, encoder.std), NormalizedImages(val_x, encoder.mean, encoder.std)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``nemu train`` and ``python -m nemu_lib.train`` (shared)."""
    parser.add_argument("--encoder", default="simclr", metavar="SPEC",
                        help=f"the encoder to explain: {', '.join(ENCODER_SPECS)} (default: simclr)")
    parser.add_argument("--encoder-seed", type=int, default=0,
                        help="which Shapes encoder of the profile (outputs/encoders/<kind>-<profile>-seed<N>.pt)")
    parser.add_argument("--dataset", default="shapes", choices=DATASETS,
                        help="shapes (embedded, offline) or a real data set (needs internet once)")
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help="sizes; default: NEMU_PROFILE or the hardware")
    parser.add_argument("--image-size", type=int, default=None,
                        help="px; default: the profile's, 224 for a pretrained ResNet on a real data set")
    parser.add_argument("--objective", default="nem", choices=OBJECTIVES)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimiser steps (default: the profile's for the objective)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the global batch over all processes (default: the profile's)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and process")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: the profile's (cpu: 1e-2, relax objective 3e-3) for adamw, 1.0 for prodigy")
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "prodigy"],
                        help="prodigy needs `pip install prodigyopt`")
    parser.add_argument("--relax-masks", type=int, default=TrainConfig.relax_masks,
                        help="RELAX masks per image per step (objective relax)")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--val-every", type=int, default=100, help="steps between validation losses")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this step (checkpointed); --resume continues the run")
    parser.add_argument("--seed", type=int, default=0, help="data order, masks, decoder initialisation")
    parser.add_argument("--out", default=None,
                        help="run folder for checkpoint.pt and run.json "
                             "(default: outputs/nemu/<encoder>-<dataset>-<profile>-<objective>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: best available; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _init_distributed(prefer: str | None) -> tuple[torch.device, dist.ProcessGroup]:
    """Join torchrun's process group: NCCL with one GPU per process (cuda:LOCAL_RANK), else gloo on CPU.

    Returns the device and a gloo group with a 4-hour timeout for the set-up waits (:func:`_rank0_first`);
    training's collectives keep the default timeout.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (prefer is None or str(prefer).startswith("cuda"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: lower --nproc_per_node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dev, dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))


def _run_record(args: argparse.Namespace, p: Profile, cfg: TrainConfig, image_size: int) -> dict:
    """What ``run.json`` records (JSON types): enough for ``nemu explain`` to rebuild the model."""
    record = {"encoder": args.encoder, "encoder_seed": args.encoder_seed, "profile": p.name, "dataset": args.dataset,
              "image_size": image_size, "uncertainty": cfg.objective == "relax", "train": dataclasses.asdict(cfg)}
    return json.loads(json.dumps(record))


def train_command(args: argparse.Namespace) -> dict[str, list[float]]:
    """``nemu train``: resolve the encoder and data, train (DDP under torchrun), write the run folder.

    Returns the history (see :func:`train`).
    """
    check_encoder_spec(args.encoder)
    p = get_profile(args.profile)
    base = profile_config(args.objective, p, args.seed)  # the notebooks' settings for this profile
    cfg = dataclasses.replace(
        base,
        steps=base.steps if args.steps is None else args.steps,
        batch_size=base.batch_size if args.batch_size is None else args.batch_size,
        grad_accum=args.grad_accum,
        lr=(1.0 if args.optimizer == "prodigy" else base.lr) if args.lr is None else args.lr,
        weight_decay=args.weight_decay, optimizer=args.optimizer, relax_masks=args.relax_masks,
        amp=not args.no_amp,
    )
    image_size = args.image_size or default_image_size(args.encoder, args.dataset, p)
    out = Path(args.out or outputs_dir() / "nemu" / f"{args.encoder}-{args.dataset}-{p.name}-{cfg.objective}")
    record = _run_record(args, p, cfg, image_size)
    ckpt_path, run_path = out / CHECKPOINT, out / RUN_FILE
    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}: train without --resume first, or "
                                    "check --out")
        if run_path.is_file():
            old = json.loads(run_path.read_text())
            diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in record.items() if old.get(k) != v]
            if diff:
                raise ValueError(f"--resume: {run_path} records another run ({'; '.join(diff)}): pass the first "
                                 "run's arguments, or another --out for a new run")
    elif ckpt_path.exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a run ({CHECKPOINT}): pass --resume to continue it, --overwrite to "
                         "start over, or another --out")

    # torchrun (it always sets TORCHELASTIC_RUN_ID) joins a process group even with one process, so a one-GPU
    # machine runs the NCCL path too
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    dev, setup = _init_distributed(args.device) if distributed else (default_device(args.device), None)
    try:
        rank, world = rank_world()
        progress = not args.no_progress and rank == 0
        encoder = _rank0_first(lambda: resolve_encoder(args.encoder, p, args.encoder_seed, dev, progress=progress),
                               setup)
        images, val_images = _rank0_first(lambda: training_images(args.dataset, p, image_size, encoder, cfg.seed),
                                          setup)
        if rank == 0 and not args.resume:
            ckpt_path.unlink(missing_ok=True)  # --overwrite: no stale checkpoint beside the new run.json
            text = json.dumps({**record, "mean": list(encoder.mean), "std": list(encoder.std), "world_size": world},
                              indent=2)
            atomic_write(run_path, lambda f: f.write(text.encode() + b"\n"))
        seed_everything(cfg.seed)  # the decoder's initialisation (DDP broadcasts rank 0's anyway)
        model = NEMU(encoder, uncertainty=record["uncertainty"]).to(dev)
        history = train(model, images, val_images, cfg, out, ckpt_every=args.ckpt_every, val_every=args.val_every,
                        resume=args.resume, stop_at=args.stop_at, progress=progress)
        if rank == 0:
            done = history["step"][-1] if history["step"] else 0
            line = f"NEM-U ({cfg.objective}) on {args.encoder}, {args.dataset}: step {done}/{cfg.steps}"
            if history["loss"]:
                line += f", loss {history['loss'][-1]:.4f}"
            if history["val_loss"]:
                line += f", validation loss {history['val_loss'][-1]:.4f}"
            print(f"{line}; {ckpt_path}")
            if done < cfg.steps:
                print(f"stopped early: continue with the same arguments and --resume (--out {out})")
        return history
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def run_command(parser: argparse.ArgumentParser, func, args: argparse.Namespace):
    """``func(args)``, with the expected errors (:data:`USER_ERRORS`) as one line and exit status 2."""
    try:
        return func(args)
    except USER_ERRORS as err:
        if os.environ.get("NEMU_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m nemu_lib.train`` / ``torchrun --nproc_per_node=N -m nemu_lib.train``: as ``nemu train``."""
    parser = argparse.ArgumentParser(prog="python -m nemu_lib.train",
                                     description="Train a NEM-U decoder (one process, or many under torchrun).")
    add_train_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_command(parser, train_command, args)


if __name__ == "__main__":
    main()
