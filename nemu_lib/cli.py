"""The ``nemu`` command.

    nemu profiles                                  # the sizes of each profile
    nemu pretrain --kind simclr --profile cpu      # train (or load) an encoder into outputs/encoders/
    nemu pretrain --kind all --profile smoke --retrain
    nemu train --encoder simclr --dataset shapes --profile cpu --out runs/simclr     # a NEM-U decoder
    nemu explain --run runs/simclr photo.png folder/ --out explanations/             # masks and overlays

``nemu train`` takes the arguments of ``python -m nemu_lib.train`` (``torchrun`` for several GPUs). Expected
failures (a missing file, an unreadable image, a checkpoint of another encoder, a data set that needs
internet) end with one line ``nemu: error: ...`` and exit status 2; ``NEMU_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import launch, ssl, train
from .config import PROFILES, get_profile
from .config import device as default_device
from .data import normalize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _profiles(args: argparse.Namespace) -> None:
    for name, profile in PROFILES.items():
        print(name, json.dumps(profile.as_dict()))


def _pretrain(args: argparse.Namespace) -> None:
    profile = get_profile(args.profile)
    kinds = ssl.ENCODER_KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        ssl.pretrained_encoder(kind, profile, seed=args.seed, device=args.device, retrain=args.retrain)
        print(f"{kind}: {ssl.encoder_path(kind, profile, args.seed)}")


# --------------------------------------------------------------------------------------------- explain

def image_paths(inputs: list[str]) -> list[Path]:
    """Image files from files and folders (a folder's .png/.jpg/.jpeg files, sorted; not recursive)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}): add some, or pass "
                                 "image files")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist: pass image files (png, jpg) or folders of them")
    return paths


def read_image(path: str | Path, size: int) -> Tensor:
    """An image file as ``(3, size, size)`` float in [0, 1] (RGB, EXIF orientation applied, resized without
    cropping). PIL reads it: torchvision's decoders are deprecated since torchvision 0.29."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            img = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err}): pass a PNG or JPEG file, or "
                         "remove it from the folder") from None
    x = img[None].float() / 255  # (1, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0, 1)


def save_overlay(image: Tensor, mask: np.ndarray, path: str | Path, title: str | None = None) -> None:
    """``image (3, H, W)`` in [0, 1] with ``mask (H, W)`` as a heat map on top, as a PNG (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.4 if title else 3.2), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: the global backend stays as it is (notebooks)
    ax = fig.add_axes((0, 0, 1, 0.94 if title else 1))
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="bilinear")
    ax.imshow(mask, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path)


def _explain_settings(args: argparse.Namespace) -> tuple[Path, dict]:
    """The checkpoint and ``{encoder, encoder_seed, profile, image_size}``: run.json, then the options."""
    run: dict = {}
    if args.run:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--run {run_dir} does not exist: pass the --out folder of `nemu train`")
        if not (run_dir / launch.RUN_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} has no {launch.RUN_FILE} (written by `nemu train`): pass a training's "
                                    "--out folder, or --checkpoint PATH with --encoder SPEC and --profile NAME")
        ckpt = Path(args.checkpoint) if args.checkpoint else run_dir / train.CHECKPOINT
    elif args.checkpoint:
        ckpt = Path(args.checkpoint)
        run_dir = ckpt.parent
    else:
        raise ValueError("nothing to explain with: pass --run DIR (the --out folder of `nemu train`) or "
                         "--checkpoint PATH with --encoder SPEC and --profile NAME")
    if (run_dir / launch.RUN_FILE).is_file():
        run = json.loads((run_dir / launch.RUN_FILE).read_text())
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}: train one with `nemu train --out DIR`, or check "
                                "--run / --checkpoint")
    spec = args.encoder or run.get("encoder")
    if spec is None:
        raise ValueError(f"no {launch.RUN_FILE} beside {ckpt}: name the encoder it was trained on with --encoder SPEC "
                         f"({', '.join(launch.ENCODER_SPECS)}) and --profile NAME")
    launch.check_encoder_spec(spec)
    profile = get_profile(args.profile or run.get("profile"))
    seed = run.get("encoder_seed", 0) if args.encoder_seed is None else args.encoder_seed
    size = args.image_size or run.get("image_size") or launch.default_image_size(spec, "shapes", profile)
    return ckpt, {"encoder": spec, "encoder_seed": seed, "profile": profile, "image_size": size}


def _explain(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        raise ValueError(f"--batch-size and --image-size must be >= 1, got {args.batch_size} and {args.image_size}")
    ckpt, settings = _explain_settings(args)
    paths = image_paths(args.inputs)
    size = settings["image_size"]
    images = torch.stack([read_image(p, size) for p in paths])  # (N, 3, S, S): every file read before any work
    dev = default_device(args.device)
    encoder = launch.resolve_encoder(settings["encoder"], settings["profile"], settings["encoder_seed"], dev,
                                    allow_training=False, progress=False)
    model = train.load_nemu(ckpt, encoder, map_location=dev).to(dev)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for path in paths:  # unique output names: a.png and a.jpg become a and a-2
        name, k = path.stem, 2
        while name in names:
            name, k = f"{path.stem}-{k}", k + 1
        names.append(name)
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            batch = images[start:start + args.batch_size]
            _, m, u = model.explain(normalize(batch, encoder.mean, encoder.std).to(dev))
            for i in range(len(batch)):
                name, path = names[start + i], paths[start + i]
                mask = m[i, 0].float().cpu().numpy().astype(np.float32)  # (S, S)
                np.save(out / f"{name}_mask.npy", mask)
                save_overlay(batch[i], mask, out / f"{name}_overlay.png", title=f"{path.name}: NEM-U mask")
                written = [f"{name}_mask.npy", f"{name}_overlay.png"]
                if u is not None:
                    np.save(out / f"{name}_uncertainty.npy", u[i, 0].float().cpu().numpy().astype(np.float32))
                    written.append(f"{name}_uncertainty.npy")
                print(f"{path}: mask area {mask.mean():.3f} -> {', '.join(written)}")
    print(f"explained {len(paths)} image(s) with {ckpt} into {out}")


# ------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemu", description="Explaining representations: SimCLR, RELAX, NEM-U.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profiles", help="print the profiles' sizes").set_defaults(func=_profiles)
    pre = sub.add_parser("pretrain", help="train (or load) a Shapes encoder: simclr, supervised, random")
    pre.add_argument("--kind", default="simclr", choices=[*ssl.ENCODER_KINDS, "all"])
    pre.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: NEMU_PROFILE or hardware")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    pre.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    pre.set_defaults(func=_pretrain)

    tr = sub.add_parser("train", help="train a NEM-U decoder on an encoder (as python -m nemu_lib.train)",
                        description="Train a NEM-U decoder; for several GPUs run the same arguments with "
                                    "`torchrun --nproc_per_node=N -m nemu_lib.train`.")
    launch.add_train_arguments(tr)
    tr.set_defaults(func=launch.train_command)

    ex = sub.add_parser("explain", help="masks and overlays of image files from a trained NEM-U",
                        description="Explain image files with a trained NEM-U: writes <name>_mask.npy (H, W), "
                                    "<name>_overlay.png and, with an uncertainty head, <name>_uncertainty.npy.")
    ex.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="png / jpg files or folders of them")
    ex.add_argument("--run", default=None, help="the --out folder of `nemu train` (run.json, checkpoint.pt)")
    ex.add_argument("--checkpoint", default=None, help="a checkpoint.pt (with --encoder and --profile if no "
                                                       "run.json lies beside it)")
    ex.add_argument("--encoder", default=None, metavar="SPEC",
                    help=f"the encoder the decoder was trained on: {', '.join(launch.ENCODER_SPECS)} "
                         "(default: the run's)")
    ex.add_argument("--encoder-seed", type=int, default=None, help="default: the run's")
    ex.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: the run's")
    ex.add_argument("--image-size", type=int, default=None, help="px (default: the run's)")
    ex.add_argument("--out", required=True, help="folder for the masks and overlays")
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    ex.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    launch.run_command(parser, args.func, args)


if __name__ == "__main__":
    main()
