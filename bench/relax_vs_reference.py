"""RELAX speed: ours (``nemu_lib.relax``) against the reference package ``relax-xai`` and the encoder floor.

Goal: RELAX is bound by the encoder (N masks cost N forward passes), so ours should cost at most 1.1x the
*floor*, N forward passes of the encoder alone at the same encoder batch size.

Measured side by side in one process (absolute CPU timings move +-50 % between processes; compare the
ratios), with alternating runs (the order floor / ours / reference rotates from repeat to repeat), the same
encoder (eval mode) and the same masks:

- floor: N passes of the encoder over precomputed masked copies of one image, batches of ``--mask-batch``,
  under ``torch.inference_mode``;
- ours: ``nemu_lib.relax.relax(encoder, x, masks=masks, batch_size=...)`` explains the B images in one
  call (every image shares every mask batch);
- reference: ``relax_xai.relax.RELAX(x[i:i+1], encoder, batch_size, num_batches).forward()`` for each of
  the B images in turn (it explains one image at a time), under ``torch.no_grad``, with
  ``relax_xai.relax.mask_generator`` monkeypatched to yield the same pre-drawn mask batches.

The masks are drawn once with ``nemu_lib.masks.relax_masks`` (their drawing time is printed apart, not in
the timings). Reported per case: seconds per image (median, min and max over ``--repeats``), the paired
ratios ours / floor and reference / floor, the speed-up reference / ours, the time outside the encoder per
mask, and the agreement of the outputs: max |delta| of the importance maps, max |delta| of the uncertainty
under the documented relation (ours ``.uncertainty_reference`` = U * sum M against the reference's
unnormalised ``.uncertainty``) and whether the U-RELAX masks are identical (ours ``.u_relax_mask`` against
``reference.uncertainty <= reference.uncertainty.median()``). Figures, never pass/fail.

Cases (the issue's): ``small``, ``SmallResNet(widths=(16, 32, 64, 128))`` at 64 px with N = 3,000; ``resnet18``,
torchvision's ResNet-18 (random weights) at 224 px with N = 500; B = 8 images, 100 masks per encoder call.
On a 2-core CPU the full default run takes hours (the ResNet-18 does ~10 images/s there): shrink it with
``--images`` and ``--n-masks`` (the ratios barely depend on them), or run it on a GPU.

Usage::

    python bench/relax_vs_reference.py                                  # the issue's cases, a table
    python bench/relax_vs_reference.py --quick --json                   # smoke check, one JSON dict
    python bench/relax_vs_reference.py --repeats 3 --images 4 --n-masks small=500,resnet18=100
    python bench/relax_vs_reference.py --cases resnet18 --device cuda

Set ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184`` to take the glibc
allocator's page faults out of large CPU batches (the Makefile sets it); the value in effect is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator

import relax_xai.relax as reference_relax
import torch
from _common import add_device_arguments, json_quiet, machine_info, parse_per_case, summary, sync
from torch import Tensor, nn

from nemu_lib.encoders import SmallResNet, build_encoder
from nemu_lib.masks import relax_masks
from nemu_lib.relax import RelaxResult, relax

# name: (description, encoder factory, image size, N)
CASES: dict[str, tuple[str, Callable[[], nn.Module], int, int]] = {
    "small": ("SmallResNet(widths=(16, 32, 64, 128))", lambda: SmallResNet(widths=(16, 32, 64, 128)), 64, 3000),
    "resnet18": ("torchvision ResNet-18, random weights", lambda: build_encoder("resnet18"), 224, 500),
}
QUICK = {"images": 2, "n_masks": 20, "mask_batch": 10, "repeats": 1}
METHODS = ("floor", "ours", "reference")


@contextlib.contextmanager
def _patched_mask_generator(batches: list[Tensor]) -> Iterator[None]:
    """Make ``relax_xai.relax.mask_generator`` yield ``batches`` in order, one per call (as it yields one)."""
    stream = iter(batches)

    def fake(batch_size: int, shape: tuple, device: object, **kwargs) -> Iterator[Tensor]:
        m = next(stream)
        if len(m) != batch_size or tuple(m.shape[-2:]) != tuple(shape):
            raise RuntimeError(f"pre-drawn mask batch {tuple(m.shape)} does not fit ({batch_size}, 1, {shape})")
        yield m

    original = reference_relax.mask_generator
    reference_relax.mask_generator = fake
    try:
        yield
    finally:
        reference_relax.mask_generator = original


def run_floor(encoder: nn.Module, masked: list[Tensor], device: torch.device) -> float:
    """Seconds for the encoder alone over the precomputed masked batches (N passes)."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for xb in masked:
            encoder(xb)
    sync(device)
    return time.perf_counter() - start


def run_ours(encoder: nn.Module, x: Tensor, masks: Tensor, mask_batch: int,
             device: torch.device) -> tuple[float, RelaxResult]:
    sync(device)
    start = time.perf_counter()
    result = relax(encoder, x, masks=masks, batch_size=mask_batch)
    sync(device)
    return time.perf_counter() - start, result


def run_reference(encoder: nn.Module, x: Tensor, batches: list[Tensor],
                  device: torch.device) -> tuple[float, list[reference_relax.RELAX]]:
    """Seconds for the reference explaining the images of ``x`` one by one with the same mask batches."""
    explainers = []
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(len(x)):
            with _patched_mask_generator(batches):
                explainer = reference_relax.RELAX(x[i:i + 1], encoder, batch_size=len(batches[0]),
                                                  num_batches=len(batches))
                explainer.forward()
            explainers.append(explainer)
    sync(device)
    return time.perf_counter() - start, explainers


def agreement(ours: RelaxResult, explainers: list[reference_relax.RELAX]) -> dict:
    """max |delta| of importance and of the unnormalised uncertainty; differing U-RELAX mask pixels."""
    ref_importance = torch.stack([e.importance for e in explainers]).double().cpu()
    ref_uncertainty = torch.stack([e.uncertainty for e in explainers]).double().cpu()
    ref_mask = torch.stack([e.uncertainty <= e.uncertainty.median() for e in explainers]).cpu()
    importance, uncertainty = ours.importance.cpu(), ours.uncertainty_reference.cpu()
    mask_diff = int((ours.u_relax_mask.cpu() != ref_mask).sum())
    return {
        "importance_max_abs_diff": float((importance - ref_importance).abs().max()),
        "importance_range": [float(ref_importance.min()), float(ref_importance.max())],
        "uncertainty_max_abs_diff": float((uncertainty - ref_uncertainty).abs().max()),
        "uncertainty_max": float(ref_uncertainty.abs().max()),
        "u_relax_mask_identical": mask_diff == 0,
        "u_relax_mask_pixels_differing": mask_diff,
        "u_relax_mask_pixels": ref_mask.numel(),
    }


def run_case(name: str, n_masks: int, images: int, mask_batch: int, repeats: int, device: torch.device,
             seed: int = 0) -> dict:
    description, factory, size, _ = CASES[name]
    if n_masks % mask_batch:
        raise ValueError(f"{name}: N = {n_masks} must be a multiple of the mask batch {mask_batch} "
                         "(the reference draws num_batches x batch_size masks)")
    torch.manual_seed(seed)
    encoder = factory().to(device).eval()
    mean = torch.tensor(encoder.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(1, -1, 1, 1)
    x = (torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device) - mean) / std

    gen = torch.Generator(device).manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    masks = relax_masks(n_masks, (size, size), generator=gen, device=device)  # (N, 1, H, W)
    sync(device)
    draw_ours = time.perf_counter() - start
    batches = list(masks.split(mask_batch))
    start = time.perf_counter()
    for _ in batches:  # the reference's own generator, for scale only
        next(reference_relax.mask_generator(mask_batch, (size, size), device))
    sync(device)
    draw_reference = time.perf_counter() - start
    masked = [x[:1] * m for m in batches]  # the floor's inputs: image 0 under every mask

    # warm-up (kernel selection, allocator): one mask batch through each method
    run_floor(encoder, masked[:1], device)
    run_ours(encoder, x[:1], batches[0], mask_batch, device)
    run_reference(encoder, x[:1], batches[:1], device)

    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    ours_result, explainers = None, None
    for r in range(repeats):
        order = METHODS[r % 3:] + METHODS[:r % 3]
        for method in order:
            if method == "floor":
                seconds["floor"].append(run_floor(encoder, masked, device))  # N passes = one image
            elif method == "ours":
                t, ours_result = run_ours(encoder, x, masks, mask_batch, device)
                seconds["ours"].append(t / images)
            else:
                t, explainers = run_reference(encoder, x, batches, device)
                seconds["reference"].append(t / images)

    floor = seconds["floor"]
    ratios = {
        "ours_over_floor": [o / f for o, f in zip(seconds["ours"], floor, strict=True)],
        "reference_over_floor": [r / f for r, f in zip(seconds["reference"], floor, strict=True)],
        "speedup_ours_vs_reference": [r / o for r, o in zip(seconds["reference"], seconds["ours"], strict=True)],
    }
    per_image = {m: summary(v) for m, v in seconds.items()}
    floor_median = per_image["floor"]["median"]
    outside = {m: (per_image[m]["median"] - floor_median) / n_masks * 1e6 for m in ("ours", "reference")}
    return {
        "case": name,
        "encoder": description,
        "image_size": size,
        "n_masks": n_masks,
        "images": images,
        "mask_batch": mask_batch,
        "repeats": repeats,
        "seconds_per_image": per_image,
        "seconds_per_image_raw": seconds,
        "ratios": {k: summary(v) for k, v in ratios.items()},
        "outside_encoder_us_per_mask": outside,
        "mask_drawing_seconds": {"ours_relax_masks": draw_ours, "reference_mask_generator": draw_reference},
        "agreement": agreement(ours_result, explainers),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of a table")
    parser.add_argument("--cases", default="small,resnet18", help=f"comma-separated, among {sorted(CASES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (default 3)")
    parser.add_argument("--images", type=int, default=8, help="B, images explained (default 8)")
    parser.add_argument("--n-masks", default=None,
                        help="N for every case (an int) or per case ('small=500,resnet18=100'); "
                             "default the issue's 3000 and 500")
    parser.add_argument("--mask-batch", type=int, default=100, help="masks per encoder call (default 100)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke check: {QUICK['images']} images, N = {QUICK['n_masks']}, "
                             f"mask batch {QUICK['mask_batch']}, one repeat")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose among {sorted(CASES)}")
    if args.quick:
        args.images, args.mask_batch, args.repeats = QUICK["images"], QUICK["mask_batch"], QUICK["repeats"]
        n_masks = dict.fromkeys(cases, QUICK["n_masks"])
    else:
        n_masks = parse_per_case(args.n_masks, {c: CASES[c][3] for c in cases}, list(CASES), "--n-masks")
    if min(args.images, args.repeats, args.mask_batch, args.threads) < 1:
        parser.error("--images, --repeats, --mask-batch and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with json_quiet(args.json):
        result = {
            **machine_info(device),
            "cases": [run_case(c, n_masks[c], args.images, args.mask_batch, args.repeats, device) for c in cases],
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return

    print(f"torch {result['torch']}, {result['threads']} threads, {result['device']} ({result['device_name']}, "
          f"{result['machine']}), GLIBC_TUNABLES={result['glibc_tunables'] or 'unset'}")
    for c in result["cases"]:
        print(f"\n{c['case']}: {c['encoder']} at {c['image_size']} px, N = {c['n_masks']} masks, "
              f"B = {c['images']} images, {c['mask_batch']} masks per encoder call, {c['repeats']} repeats")
        print(f"{'seconds per image':<34}{'median':>9}{'min':>9}{'max':>9}{'x floor (median [min, max])':>32}")
        labels = {"floor": "floor (N encoder passes)", "ours": "ours (nemu_lib.relax)",
                  "reference": "reference (relax-xai)"}
        for m in METHODS:
            s = c["seconds_per_image"][m]
            ratio = ""
            if m != "floor":
                q = c["ratios"][f"{m}_over_floor"]
                ratio = f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]"
            print(f"{labels[m]:<34}{s['median']:>9.3f}{s['min']:>9.3f}{s['max']:>9.3f}{ratio:>32}")
        q = c["ratios"]["speedup_ours_vs_reference"]
        print(f"speed-up ours vs reference: {q['median']:.2f}x [{q['min']:.2f}, {q['max']:.2f}] (paired, per repeat)")
        o = c["outside_encoder_us_per_mask"]
        print(f"outside the encoder, per mask and image: ours {o['ours']:.0f} us, reference {o['reference']:.0f} us")
        d = c["mask_drawing_seconds"]
        print(f"drawing the N masks (not timed above): relax_masks {d['ours_relax_masks']:.3f} s, "
              f"reference mask_generator {d['reference_mask_generator']:.3f} s")
        a = c["agreement"]
        print(f"max |d| importance: {a['importance_max_abs_diff']:.2e} "
              f"(maps within [{a['importance_range'][0]:.4f}, {a['importance_range'][1]:.4f}])")
        print(f"max |d| uncertainty (ours .uncertainty_reference vs reference .uncertainty): "
              f"{a['uncertainty_max_abs_diff']:.2e} (max {a['uncertainty_max']:.3e})")
        print(f"U-RELAX masks identical: {'yes' if a['u_relax_mask_identical'] else 'no'} "
              f"({a['u_relax_mask_pixels_differing']} of {a['u_relax_mask_pixels']} pixels differ)")


if __name__ == "__main__":
    main()
