"""The ``nemu`` command.

    nemu profiles                                  # the sizes of each profile
    nemu pretrain --kind simclr --profile cpu      # train (or load) an encoder into outputs/encoders/
    nemu pretrain --kind all --profile smoke --retrain
    nemu train --encoder simclr --dataset shapes --profile cpu --out runs/simclr     # a NEM-U decoder
    nemu explain --run runs/simclr photo.png folder/ --out explanations/             # masks and overlays
    nemu relax photo.png folder/ --encoder resnet50-dino --out relax/                  # RELAX maps, N = 3,000
    nemu relax folder/ --encoder simclr --profile cpu --reference cat.png --n-masks 1000 --out why-like-cat/
    nemu evaluate --encoder simclr --profile cpu     # notebook 04's table: outputs/evaluation/simclr-cpu-seed0.md
    nemu evaluate --encoder resnet50-dino photos/ --out eval/   # no ground truth: RELAX, U-RELAX, gradients and
                                                   # a random map on your images -> eval/evaluation.md and .json

``nemu train`` takes the arguments of ``python -m nemu_lib.train`` (``torchrun`` for several GPUs). Expected
failures (a missing file, an unreadable image, a checkpoint of another encoder, a data set that needs
internet) end with one line ``nemu: error: ...`` and exit status 2; ``NEMU_DEBUG=1`` shows the traceback.
``nemu relax`` and ``nemu evaluate IMAGES`` are the exception for images they cannot read: they name each on
stderr, go on with the others and exit with status 1. Explaining never trains an encoder (``nemu pretrain``
does); ``nemu evaluate`` trains what the evaluation needs and is missing, as notebook 04 does (with IMAGES: a
Shapes encoder only; no NEM-U decoder is trained or scored there).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import evaluation, launch, metrics, relax, ssl, train
from .checkpoint import atomic_write
from .config import PROFILES, Profile, get_profile, outputs_dir
from .config import device as default_device
from .data import normalize
from .evaluation import describe_worth
from .progress import tqdm

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


def output_names(paths: list[Path]) -> list[str]:
    """One output name per image, unique: the file's stem, ``a-2``, ``a-3`` ... for a.png, a.jpg, ..."""
    names: list[str] = []
    for path in paths:
        name, k = path.stem, 2
        while name in names:
            name, k = f"{path.stem}-{k}", k + 1
        names.append(name)
    return names


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
    names = output_names(paths)  # a.png and a.jpg become a and a-2
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


# ------------------------------------------------------------------------------------------------- relax

IMAGES_PER_CALL = 4  # images per RELAX call: they share each batch of masks (drawn once), and their maps
# are written after each call. Sharing saves only the masks' drawing (on a CPU one call of 8 Shapes images took
# as long as 8 calls of one), so small calls keep the results coming


def save_relax_figure(image: Tensor, importance: np.ndarray, uncertainty: np.ndarray, path: str | Path,
                      title: str | None = None) -> None:
    """``image (3, H, W)`` in [0, 1] | its RELAX importance over it | its uncertainty over it, as a PNG.

    Each map is coloured from its own minimum to its maximum (RELAX's importance varies by ~1e-2 around the
    level of the similarities), which the panel's title gives.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from . import viz

    fig = Figure(figsize=(9.0, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: the global backend stays as it is (notebooks)
    axes = fig.subplots(1, 3)
    viz.show_image(axes[0], image, "image")
    for ax, m, name, cmap in ((axes[1], importance, "importance R", "viridis"),
                              (axes[2], uncertainty, "uncertainty U", "magma")):
        viz.overlay(ax, image, m, alpha=0.6, cmap=cmap, title=f"{name} ({m.min():.3g} to {m.max():.3g})")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path)


def _check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Each option of ``names`` that is set must be >= 1 (a one-line error naming it otherwise)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _input_size(args: argparse.Namespace) -> tuple[bool, Profile | None, int]:
    """``(Shapes spec?, its profile, input side)``: the profile's size for Shapes encoders, 224 px for pretrained
    ones, ``--size`` over both."""
    launch.check_encoder_spec(args.encoder)
    shapes = args.encoder not in launch.PRETRAINED_SPECS
    profile = get_profile(args.profile) if shapes else None
    return shapes, profile, args.size or (profile.image_size if shapes else 224)


def _read_or_skip(path: Path, size: int, failed: list[dict]) -> Tensor | None:
    """The image at ``path`` (:func:`read_image`), or ``None`` for an unreadable file: said on one line on stderr
    and appended to ``failed``."""
    try:
        return read_image(path, size)
    except ValueError as err:
        reason = " ".join(str(err).split())
        tqdm.write(f"nemu: skipped: {reason}", file=sys.stderr)
        failed.append({"file": str(path), "reason": reason})
        return None


def _relax(args: argparse.Namespace) -> None:
    """``nemu relax``: RELAX maps of image files; exit status 1 (``SystemExit``) when some could not be read."""
    _check_positive(args, ("n_masks", "batch_size", "size"))
    shapes, profile, size = _input_size(args)
    paths = image_paths(args.inputs)
    dev = default_device(args.device)
    encoder = launch.resolve_encoder(args.encoder, profile, args.encoder_seed, dev, allow_training=False,
                                     progress=not args.no_progress)
    reference = None
    if args.reference:
        if not Path(args.reference).is_file():
            raise FileNotFoundError(f"--reference {args.reference} does not exist: pass an image file (png, jpg)")
        x_ref = normalize(read_image(args.reference, size)[None], encoder.mean, encoder.std).to(dev)
        with torch.inference_mode():
            reference = encoder.eval()(x_ref)[0]  # (D,): r = f(reference), "why is each image like it?"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    record = {"encoder": args.encoder, "encoder_seed": args.encoder_seed if shapes else None,
              "profile": profile.name if shapes else None, "size": size, "n_masks": args.n_masks,
              "batch_size": args.batch_size, "seed": args.seed, "device": str(dev),
              "reference": str(args.reference) if args.reference else None,
              "mean": list(encoder.mean), "std": list(encoder.std), "images": [], "failed": []}
    bar = tqdm(total=len(paths), desc="RELAX", unit="image", disable=args.no_progress)
    for start in range(0, len(paths), IMAGES_PER_CALL):
        todo, images = [], []
        for i in range(start, min(start + IMAGES_PER_CALL, len(paths))):
            image = _read_or_skip(paths[i], size, record["failed"])
            if image is None:
                bar.update(1)
            else:
                images.append(image)
                todo.append(i)
        if not images:
            continue
        batch = torch.stack(images)  # (B, 3, S, S) in [0, 1]
        x = normalize(batch, encoder.mean, encoder.std).to(dev)
        if record["batch_size"] is None:
            record["batch_size"] = relax.default_batch_size(x)
        began = time.perf_counter()
        result = relax.relax(encoder, x, n_masks=args.n_masks, batch_size=args.batch_size, reference=reference,
                             seed=args.seed, progress=not args.no_progress)
        seconds = (time.perf_counter() - began) / len(todo)  # the call's time, shared by its images
        maps = {"importance": result.importance, "uncertainty": result.uncertainty, "u_relax": result.u_relax}
        for j, i in enumerate(todo):
            name = names[i]
            arrays = {k: v[j].float().cpu().numpy().astype(np.float32) for k, v in maps.items()}  # (S, S) each
            written = []
            for key, a in arrays.items():
                np.save(out / f"{name}_{key}.npy", a)
                written.append(f"{name}_{key}.npy")
            save_relax_figure(batch[j], arrays["importance"], arrays["uncertainty"], out / f"{name}_relax.png",
                              title=f"{paths[i].name}: RELAX on {args.encoder}, N = {args.n_masks}"
                                    + (f", reference {Path(args.reference).name}" if args.reference else ""))
            written.append(f"{name}_relax.png")
            record["images"].append({"file": str(paths[i]), "name": name, "seconds": seconds, "written": written})
            imp = arrays["importance"]
            tqdm.write(f"{paths[i]}: importance {imp.min():.4g} to {imp.max():.4g}, {seconds:.3g} s -> "
                       f"{', '.join(written)}", file=sys.stdout)
        bar.update(len(todo))
        _write_json(out / "relax.json", record)  # after every call: an interrupted run keeps what it did
    bar.close()
    _write_json(out / "relax.json", record)
    failed = len(record["failed"])
    print(f"explained {len(record['images'])} of {len(paths)} image(s) with RELAX on {args.encoder} into {out}"
          + (f"; {failed} could not be read (listed in relax.json)" if failed else ""))
    if failed:
        raise SystemExit(1)


def _write_json(path: Path, record: dict) -> None:
    text = json.dumps(record, indent=2, default=float) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------------------- evaluate

def evaluation_files(spec: str, profile: str, seed: int) -> tuple[Path, Path]:
    """``outputs/evaluation/<spec>-<profile>-seed<seed>.md`` and ``.json``, beside the evaluation's cache."""
    base = outputs_dir() / "evaluation" / f"{spec}-{profile}-seed{seed}"
    return base.with_suffix(".md"), base.with_suffix(".json")


IMAGE_OPTIONS = {"n_masks": "--n-masks", "size": "--size", "deletion_steps": "--deletion-steps", "out": "--out"}
# with IMAGES: the methods that need no trained decoder, in notebook 04's order, and the library's defaults
IMAGE_METHODS = tuple(m for m in evaluation.METHODS if m not in evaluation.DECODER_METHODS)
DELETION_STEPS = inspect.signature(metrics.deletion_insertion).parameters["steps"].default  # 16
DELETION_BATCH = inspect.signature(metrics.deletion_insertion).parameters["batch_size"].default
IG_STEPS = inspect.signature(evaluation.explain_all).parameters["ig_steps"].default  # for pretrained encoders (32)


def _evaluate(args: argparse.Namespace) -> None:
    from . import report, runs

    launch.check_encoder_spec(args.encoder)
    if args.inputs:
        return _evaluate_images(args)
    given = [flag for name, flag in IMAGE_OPTIONS.items() if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to image files: pass IMAGES (files or folders) to evaluate them, "
                         f"or drop {'them' if len(given) > 1 else 'it'} for the Shapes evaluation")
    if args.encoder not in ssl.ENCODER_KINDS:
        raise ValueError(f"nemu evaluate scores maps against the Shapes scenes' object masks and needs NEM-U "
                         f"decoders trained on the encoder, so it evaluates the Shapes encoders only: "
                         f"{', '.join(ssl.ENCODER_KINDS)}. For {args.encoder}, pass image files or folders "
                         f"(`nemu evaluate --encoder {args.encoder} IMAGES`) to score RELAX and the gradient "
                         f"baselines on them without ground truth, or explain images with "
                         f"`nemu relax IMAGES --encoder {args.encoder} --out DIR`")
    p = get_profile(args.profile)
    kind, seed = args.encoder, args.seed
    # evaluating trains what is missing (as notebook 04 does): say so before it starts
    missing = [] if ssl.encoder_path(kind, p, seed).is_file() else [f"{kind} encoder"]
    missing += [f"NEM-U decoder ({objective})" for objective in runs.RUN_NAMES
                if not (runs.run_dir(kind, objective, p) / train.CHECKPOINT).is_file()]
    if missing:
        print(f"not in {outputs_dir()}, trained first: {', '.join(missing)}")
    result = report.evaluate_encoder(kind, p, seed=seed, device=args.device, recompute=args.recompute,
                                     progress=not args.no_progress)
    headline = report.results_record([result])[kind]
    n_masks = p.extra["eval_relax_masks"]
    md_path, json_path = evaluation_files(kind, p.name, seed)
    listed = {k: v for k, v in headline.items() if k != "table"}
    listed["nemu_worth_n_masks"] = {m: describe_worth(n, result.ns) for m, n in result.worth.items()}
    text = (f"**{kind} encoder**, profile {p.name}, seed {seed} ({len(result.images)} held-out scenes, RELAX N = "
            f"{n_masks})\n\n{result.markdown}\n" + "".join(f"- {k}: {_brief(v)}\n" for k, v in listed.items()))
    record = {"encoder": kind, "profile": p.name, "seed": seed, "eval_images": len(result.images),
              "relax_masks": n_masks, **headline}
    atomic_write(md_path, lambda f: f.write(text.encode()))
    _write_json(json_path, record)
    print(text)
    print(f"written: {md_path}, {json_path}")


def _evaluate_images(args: argparse.Namespace) -> None:
    """``nemu evaluate --encoder SPEC IMAGES``: notebook 04's encoder-only methods on image files, scored on
    the metrics that need no object masks; exit status 1 (``SystemExit``) when some could not be read."""
    _check_positive(args, ("n_masks", "size", "deletion_steps"))
    if args.recompute:
        raise ValueError("--recompute applies to the Shapes evaluation (its saved maps): image files are always "
                         "explained afresh, drop it")
    spec, seed = args.encoder, args.seed
    shapes, profile, size = _input_size(args)
    n_masks = args.n_masks or 3000
    steps = args.deletion_steps or DELETION_STEPS
    ig_steps = profile.extra["ig_steps"] if shapes else IG_STEPS
    paths = image_paths(args.inputs)
    out = Path(args.out) if args.out else outputs_dir() / "evaluation" / f"{spec}-images"
    dev = default_device(args.device)
    progress = not args.no_progress
    if shapes and not ssl.encoder_path(spec, profile, seed).is_file():  # evaluating trains what is missing
        print(f"not in {outputs_dir()}, trained first: {spec} encoder")
    encoder = launch.resolve_encoder(spec, profile, seed, dev, progress=progress)

    record: dict = {"encoder": spec, "encoder_seed": seed if shapes else None,
                    "profile": profile.name if shapes else None, "size": size, "n_masks": n_masks,
                    "ig_steps": ig_steps, "deletion_steps": steps, "seed": seed, "device": str(dev),
                    "mean": list(encoder.mean), "std": list(encoder.std), "methods": list(IMAGE_METHODS),
                    "metrics": list(evaluation.MASK_FREE_METRICS), "table": [], "images": [], "failed": []}
    images, read = [], []
    for path in tqdm(paths, desc="reading", unit="image", disable=not progress):
        image = _read_or_skip(path, size, record["failed"])
        if image is not None:
            images.append(image)
            read.append(path)
    out.mkdir(parents=True, exist_ok=True)
    heading = (f"**{spec} encoder**" + (f", profile {profile.name}, seed {seed}" if shapes else "")
               + f": {len(read)} image(s) at {size} px, RELAX N = {n_masks}, deletion/insertion {steps} steps, "
               f"IG {ig_steps} steps; no object masks, so no locality metrics")
    if read:
        x = normalize(torch.stack(images), encoder.mean, encoder.std).to(dev)  # (N, 3, S, S)
        maps, seconds = evaluation.explain_all(encoder, {}, x, n_masks=n_masks, ig_steps=ig_steps, seed=seed,
                                               methods=IMAGE_METHODS, progress=progress)
        scores = evaluation.score_maps(encoder, x, None, maps, reference=maps["RELAX"], steps=steps,
                                          batch_size=DELETION_BATCH, progress=progress)
        for key in ("fidelity_pearson", "fidelity_spearman"):
            scores["RELAX"].pop(key)  # RELAX against itself: 1 by construction
        rows = evaluation.summarize(scores, seconds)
        record["table"] = _finite(rows)
        names = output_names(read)
        record["images"] = [{"file": str(path), "name": names[i],
                             "values": {m: _finite({k: v[i].item() for k, v in s.items()}) for m, s in scores.items()}}
                            for i, path in enumerate(read)]
        table = evaluation.to_markdown(rows, keys=evaluation.MASK_FREE_METRICS)
        notes = ("- fidelity: Pearson and Spearman correlation with RELAX's map of the same image (RELAX's own "
                 "row has none)\n- complexity and sparseness of the min-max normalised maps; deletion and insertion "
                 "AUC of the cosine similarity of representations as pixels are removed or kept, most important "
                 "first\n- mean ± standard error over the images; s / image: wall clock on "
                 f"{dev} (U-RELAX shares RELAX's run)\n")
    else:
        table, notes = "no image could be read: nothing to evaluate\n", ""
    failed = record["failed"]
    text = (f"{heading}\n\n{table}\n{notes}"
            + (f"- could not be read: {', '.join(f['file'] for f in failed)}\n" if failed else ""))
    md_path, json_path = out / "evaluation.md", out / "evaluation.json"
    atomic_write(md_path, lambda f: f.write(text.encode()))
    _write_json(json_path, record)
    print(text)
    print(f"written: {md_path}, {json_path}" + (f"; {len(failed)} of {len(paths)} image(s) could not be read "
                                                "(listed in evaluation.json)" if failed else ""))
    if failed:
        raise SystemExit(1)


def _finite(value: object) -> object:
    """``value`` with NaN and infinities as ``None`` (null in JSON), through dicts and lists."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _brief(value: object) -> str:
    """A headline figure as the Markdown lists it: 4 significant digits, dicts as ``key value, ...``."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_brief(v)}" for k, v in value.items())
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)


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

    rx = sub.add_parser("relax", help="RELAX maps of image files (no training needed)",
                        description="Explain image files with RELAX: writes <name>_importance.npy, "
                                    "<name>_uncertainty.npy, <name>_u_relax.npy (float32, S x S), <name>_relax.png "
                                    "and relax.json (settings, seconds per image, files that could not be read). "
                                    "Unreadable images are named on stderr and skipped; the exit status is then 1.")
    rx.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="png / jpg files or folders of them")
    rx.add_argument("--encoder", required=True, metavar="SPEC",
                    help=f"the encoder to explain: {', '.join(launch.ENCODER_SPECS)} (the Shapes ones must have "
                         "been trained: nemu pretrain)")
    rx.add_argument("--out", required=True, help="folder for the maps, figures and relax.json")
    rx.add_argument("--n-masks", type=int, default=3000, help="N, random masks per image (default: 3000)")
    rx.add_argument("--batch-size", type=int, default=None,
                    help="masks per encoder call (default: 100 on a CPU, up to 1000 on a GPU)")
    rx.add_argument("--reference", default=None, metavar="IMAGE",
                    help="explain why each image is like this one: score masked copies against its representation")
    rx.add_argument("--size", "--image-size", dest="size", type=int, default=None,
                    help="px the images are resized to (default: the profile's for a Shapes encoder, 224 for a "
                         "pretrained ResNet)")
    rx.add_argument("--profile", default=None, choices=sorted(PROFILES),
                    help="which Shapes encoders (default: NEMU_PROFILE or the hardware)")
    rx.add_argument("--encoder-seed", type=int, default=0,
                    help="which Shapes encoder of the profile (outputs/encoders/<kind>-<profile>-seed<N>.pt)")
    rx.add_argument("--seed", type=int, default=0, help="the masks' random seed")
    rx.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    rx.add_argument("--no-progress", action="store_true", help="no progress bars")
    rx.set_defaults(func=_relax)

    ev = sub.add_parser("evaluate", help="notebook 04's table for a Shapes encoder, or for any encoder on images",
                        description="Without IMAGES: evaluate every explanation method on a Shapes encoder's "
                                    "held-out scenes (notebook 04): writes outputs/evaluation/<encoder>-<profile>-"
                                    "seed<N>.md and .json and prints the table. Trains the encoder and its NEM-U "
                                    "decoders if they are missing. With IMAGES (any encoder spec): explain the "
                                    "image files with RELAX, U-RELAX, the label-free gradient and integrated "
                                    "gradients and a random map, score them on the metrics that need no object "
                                    "masks (complexity, sparseness, deletion and insertion AUC, fidelity to RELAX, "
                                    "seconds per image) and write OUT/evaluation.md and OUT/evaluation.json. "
                                    "Unreadable images are named on stderr and skipped; the exit status is then 1.")
    ev.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER",
                    help="png / jpg files or folders of them to evaluate on (default: the Shapes test scenes)")
    ev.add_argument("--encoder", required=True, metavar="SPEC",
                    help=f"one of {', '.join(ssl.ENCODER_KINDS)}; with IMAGES also "
                         f"{', '.join(launch.PRETRAINED_SPECS)}")
    ev.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: NEMU_PROFILE or hardware")
    ev.add_argument("--seed", type=int, default=0, help="the encoder's seed, and the evaluation's (RELAX's masks)")
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    ev.add_argument("--recompute", action="store_true",
                    help="compute RELAX and the other encoder-only maps again instead of reusing the saved ones")
    ev.add_argument("--out", default=None,
                    help="with IMAGES: folder for evaluation.md and .json (default: outputs/evaluation/<spec>-images)")
    ev.add_argument("--n-masks", type=int, default=None, help="with IMAGES: RELAX's N (default: 3000)")
    ev.add_argument("--deletion-steps", type=int, default=None,
                    help=f"with IMAGES: steps of the deletion and insertion curves (default: {DELETION_STEPS})")
    ev.add_argument("--size", "--image-size", dest="size", type=int, default=None,
                    help="with IMAGES: px the images are resized to (default: the profile's for a Shapes encoder, "
                         "224 for a pretrained one)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    launch.run_command(parser, args.func, args)


if __name__ == "__main__":
    main()
