"""NEM-U speed: one pass for ``(z, m)`` against the encoder alone (the limit) and RELAX with N = 3,000.

Goals (the project's speed targets):

- NEM-U ``(z, m) = NEMU(encoder)(x)`` costs at most 1.3x the encoder's own forward pass ``encoder(x)``;
- NEM-U is at least 1,000x faster than RELAX with N = 3,000 masks per image.

Measured per image, side by side in one process (absolute CPU timings move +-50 % between processes;
compare the ratios), all in eval mode under ``torch.inference_mode``:

- encoder: ``encoder(x)`` on a batch of B images (the limit: NEM-U runs it once, then the decoder);
- NEM-U: ``nemu_lib.nem.NEMU(encoder, max_width=w)(x)``, one row per ``--max-width`` w (an untrained
  decoder costs what a trained one does);
- gradient: the label-free gradient saliency of ``nemu_lib.baselines`` (gradient of <f(x), sg(f(x))>),
  with autograd; "n/a" while that module does not exist (the function is looked up by a few likely names,
  see ``GRADIENT_NAMES``, and called as ``fn(encoder, x)``);
- RELAX: ``nemu_lib.relax.relax(encoder, x, n_masks=N, batch_size=100)`` on ``--relax-images`` images
  (each image gets its own N masked copies, so its per-image cost does not depend on B). Its cost is
  linear in N (N / 100 encoder calls of 100 masked copies, plus one unmasked pass and O(N) accumulation),
  so RELAX-3000 = (time at the measured N) x 3000 / N; the measured N and the factor are printed. On a CPU,
  N = 3,000 on a ResNet-50 takes minutes per image: measure with ``--relax-masks resnet50=200``.

Each method is called once to warm up (RELAX on 2 masks only: a full mask batch of a ResNet-50 costs a
minute on a CPU; the first repeat meets the batch-100 kernels, and the median leaves that out). Each repeat
then times every method once, in an order that rotates from repeat to repeat; a timed block repeats its
call until it lasts ``--seconds`` (calibrated on one call). Ratios are paired within a repeat (NEM-U /
encoder, RELAX-3000 / NEM-U), then summarised by median [min, max] over ``--repeats``.

Also printed, to explain the ratio: the parameters and the multiply-adds per image (MACs, from
``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and matrix products only, not
GroupNorm, interpolation or elementwise ops) of the encoder and of the decoder, and where the decoder's
cost goes: MACs and time (forward hooks, one call at the case's largest batch) of the bottleneck, each
level (``decoder.blocks[i]``, fusing the skip of stride s_i) and the head; "other" is what the hooks
leave out (interpolation, concatenation).

Cases (the issue's): ``small``, ``SmallResNet(widths=(16, 32, 64, 128))`` at 64 px, B = 1 and 64;
``resnet50``, torchvision's ResNet-50 (random weights) at 224 px, B = 1 and 16; ``vit-s16``, a ViT-S/16 of
DINO's sizes (random weights; four taps of 384 channels at stride 16, the decoder adds two x2 levels) at
224 px, B = 1 and 16. RELAX dominates the run
time: on a 2-core CPU a ResNet-50 pass takes 0.2-0.5 s per masked image, so RELAX-3000 there is 10-25
minutes per repeat; reduce N for that case (``--relax-masks resnet50=100`` or ``200``: about 6-11 minutes
in all with ``--threads 1 --max-width 256,32,16`` on a 2-core CPU shared with other work).

On a busy machine, OpenMP threads that wait for each other can make small calls 100x slower (seen: 300 ms
instead of 2 ms for the small ResNet at B = 1 with 2 threads on 2 loaded cores): use ``--threads 1`` there.

Usage::

    python bench/nemu_speed.py --relax-masks resnet50=200,vit-s16=100   # every case (ViT-S/16 too), a table
    python bench/nemu_speed.py --quick --json                      # smoke check, one JSON dict
    python bench/nemu_speed.py --threads 1 --relax-masks resnet50=200 --max-width 256,64,32,16
    python bench/nemu_speed.py --device cuda --channels-last --bf16

Set ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184`` to take the glibc
allocator's page faults out of large CPU batches (the Makefile sets it); the value in effect is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator

import torch
from _common import add_device_arguments, json_quiet, machine_info, parse_per_case, summary, sync
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from nemu_lib.encoders import Encoder, SmallResNet, build_encoder
from nemu_lib.nem import NEMU
from nemu_lib.relax import default_batch_size, relax
from nemu_lib.vit import build_vit

# name: (description, encoder factory, image size, batch sizes)
CASES: dict[str, tuple[str, Callable[[], Encoder], int, tuple[int, ...]]] = {
    "small": ("SmallResNet(widths=(16, 32, 64, 128))", lambda: SmallResNet(widths=(16, 32, 64, 128)), 64, (1, 64)),
    "resnet50": ("torchvision ResNet-50, random weights", lambda: build_encoder("resnet50"), 224, (1, 16)),
    "vit-s16": ("ViT-S/16 (torchvision VisionTransformer, DINO's sizes), random weights",
                lambda: build_vit(image_size=224, patch_size=16, layers=12, hidden=384, heads=6, mlp=1536),
                224, (1, 16)),
}
QUICK = {"batches": {"small": (1, 4), "resnet50": (1, 2), "vit-s16": (1, 2)}, "relax_masks": 10, "relax_batch": 10,
         "repeats": 1, "seconds": 0.05}
RELAX_N = 3000  # the N that the goal is about
GOAL_NEMU_OVER_ENCODER = 1.3
GOAL_RELAX_OVER_NEMU = 1000.0
DEFAULT_MAX_WIDTH = inspect.signature(NEMU).parameters["max_width"].default
DEFAULT_MIN_STRIDE = inspect.signature(NEMU).parameters["min_stride"].default
GRADIENT_NAMES = ("label_free_saliency", "label_free_gradient", "gradient_saliency", "saliency", "gradient")


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def gradient_baseline() -> tuple[Callable[[nn.Module, Tensor], object] | None, str]:
    """``(fn(encoder, x), name)`` of the label-free gradient saliency, or ``(None, why not)``."""
    try:
        baselines = importlib.import_module("nemu_lib.baselines")
    except ModuleNotFoundError as err:
        if err.name != "nemu_lib.baselines":
            raise
        return None, "nemu_lib.baselines does not exist yet"
    for name in GRADIENT_NAMES:
        fn = getattr(baselines, name, None)
        if callable(fn):
            return fn, f"nemu_lib.baselines.{name}"
    return None, f"nemu_lib.baselines has none of {', '.join(GRADIENT_NAMES)}"


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _decoder_parts(model: NEMU, image_size: int) -> list[tuple[str, nn.Module, str]]:
    """``(label, module, where)`` for the bottleneck, each level coarse to fine, and the head."""
    decoder = model.decoder
    strides = model.encoder.feature_strides[decoder.first:]  # the taps the decoder uses
    parts = [("bottleneck", decoder.bottleneck,
              f"stride {strides[-1]}, {image_size // strides[-1]} px, width {decoder.bottleneck[0].out_channels}")]
    for i in reversed(range(len(decoder.blocks))):
        conv = decoder.blocks[i][0]
        parts.append((f"level {i}", decoder.blocks[i],
                      f"stride {strides[i]}, {image_size // strides[i]} px, "
                      f"{conv.in_channels} -> {conv.out_channels} ch"))
    for j, block in enumerate(decoder.up):  # x2 levels without skips after a single-stride pyramid (ViTs)
        stride = strides[0] // 2 ** (j + 1)
        parts.append((f"up {j}", block, f"stride {stride}, {image_size // stride} px, x2 without a skip"))
    final = strides[0] // 2 ** len(decoder.up)
    parts.append(("head", decoder.head, f"{image_size // final} px, {decoder.head.in_channels} -> 1 ch"))
    return parts


def count_macs(model: NEMU, image_size: int, device: torch.device) -> dict:
    """Multiply-adds per image (batch 1) of the encoder, the decoder and each decoder part."""
    x = torch.zeros(1, model.encoder.in_channels, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        model.encoder(x)
    encoder = counter.get_total_flops() // 2
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        model(x)
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__  # the counter names modules "NEMU.decoder.blocks.0"
    names = {id(m): n for n, m in model.named_modules()}
    return {
        "encoder": encoder,
        "decoder": counter.get_total_flops() // 2 - encoder,
        "parts": {label: flops.get(f"{root}.{names[id(m)]}", 0) // 2
                  for label, m, _ in _decoder_parts(model, image_size)},
    }


@contextlib.contextmanager
def _part_timer(model: NEMU, image_size: int, device: torch.device, acc: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in the decoder and in each of its parts to ``acc`` while active.

    (``NEMU`` calls ``encoder.forward_features``, which module hooks do not see: the encoder's share is
    the call's total minus the decoder's.)
    """
    parts = [("decoder", model.decoder), *[(label, m) for label, m, _ in _decoder_parts(model, image_size)]]
    handles, starts = [], {}
    for label, module in parts:
        def pre(_m, _i, label=label) -> None:
            sync(device)
            starts[label] = time.perf_counter()

        def post(_m, _i, _o, label=label) -> None:
            sync(device)
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - starts[label]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _timed(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def run_case(name: str, batches: tuple[int, ...], widths: list[int], relax_masks: int, relax_images: int,
             relax_batch: int, repeats: int, seconds: float, device: torch.device, channels_last: bool,
             bf16: bool, gradient: Callable | None, min_stride: int = DEFAULT_MIN_STRIDE, seed: int = 0,
             compile_mode: str | None = None) -> dict:
    description, factory, size, _ = CASES[name]
    torch.manual_seed(seed)
    encoder = factory().to(device).eval()
    models = {w: NEMU(encoder, max_width=w, min_stride=min_stride).to(device).eval()  # all share the encoder
              for w in widths}
    macs = {w: count_macs(m, size, device) for w, m in models.items()}  # before channels_last: same counts
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in models.values():
        m.to(memory_format=fmt)
    mean = torch.tensor(encoder.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(1, -1, 1, 1)
    n_images = max(*batches, relax_images)
    x_all = (torch.rand(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
             - mean) / std
    x_all = x_all.contiguous(memory_format=fmt)
    # torch.compile (CUDA graphs with mode="reduce-overhead"): the launch-bound small decoder's remedy on a GPU;
    # the encoder alone is compiled the same way, so the ratio compares like with like
    compiled = {} if compile_mode is None else {
        "encoder_compiled": torch.compile(encoder, mode=compile_mode),
        **{f"nemu_compiled_w{w}": torch.compile(m, mode=compile_mode) for w, m in models.items()}}

    def autocast() -> contextlib.AbstractContextManager:
        return _autocast(device, bf16)

    def infer(fn: Callable[[Tensor], object], x: Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode(), autocast():
                return fn(x)
        return call

    def with_grad(x: Tensor) -> Callable[[], object]:
        def call() -> object:
            with autocast():
                return gradient(encoder, x)
        return call

    # the timed blocks: (key, images per call, call); each timed once per repeat
    blocks: list[tuple[str, int, Callable[[], object]]] = []
    b_profile = max(batches)
    profiles: dict[int, dict[str, float]] = {}  # max_width: seconds per part, one call at b_profile
    calls: dict[str, int] = {}
    for b in batches:
        x = x_all[:b]
        methods = [("encoder", infer(encoder, x))]
        methods += [(f"nemu_w{w}", infer(m, x)) for w, m in models.items()]
        methods += [(key, infer(m, x)) for key, m in compiled.items()]
        if gradient is not None:
            methods.append(("gradient", with_grad(x)))
        for key, call in methods:
            first = _timed(call, 1, device)  # warm-up (kernel selection, allocator)
            w = int(key.removeprefix("nemu_w")) if key.startswith("nemu_w") else None
            if w is not None and b == b_profile:  # where the decoder's time goes: one call with hooks
                profile: dict[str, float] = {}
                with _part_timer(models[w], size, device, profile):
                    first = profile["total"] = _timed(call, 1, device)
                profiles[w] = profile
            elif first < seconds:  # cheap: calibrate on a second call (the first one is slower)
                first = _timed(call, 1, device)
            calls[f"{key}_b{b}"] = max(1, math.ceil(seconds / first))
            blocks.append((key, b, call))
    x_relax = x_all[:relax_images]
    relax_batch = relax_batch or default_batch_size(x_relax)

    def relax_call(n: int) -> Callable[[], object]:
        def call() -> object:
            with autocast():
                return relax(encoder, x_relax, n_masks=n, batch_size=relax_batch)
        return call

    # warm-up of RELAX's own code (mask drawing, accumulation) on 2 masks; the encoder's kernels for the mask
    # batch shape are first met in the first repeat, a cost the median over repeats leaves out
    relax_call(2)()
    blocks.append(("relax", relax_images, relax_call(relax_masks)))
    calls[f"relax_b{relax_images}"] = 1

    raw: dict[str, list[float]] = {}  # "<method>_b<B>": seconds per image, one per repeat
    for r in range(repeats):
        shift = r % len(blocks)
        for key, b, call in blocks[shift:] + blocks[:shift]:
            n = calls[f"{key}_b{b}"]
            raw.setdefault(f"{key}_b{b}", []).append(_timed(call, n, device) / b)
    relax_measured = raw.pop(f"relax_b{relax_images}")
    factor = RELAX_N / relax_masks
    relax_full = [t * factor for t in relax_measured]

    results = []
    for b in batches:
        per_image = {key.removesuffix(f"_b{b}"): v for key, v in raw.items() if key.endswith(f"_b{b}")}
        # RELAX-3000 / encoder alone: the most any explainer that runs the encoder once can reach
        ratios = {f"relax{RELAX_N}_over_encoder": [r / e for r, e in
                                                   zip(relax_full, per_image["encoder"], strict=True)]}
        for w in widths:
            nemu = per_image[f"nemu_w{w}"]
            ratios[f"nemu_w{w}_over_encoder"] = [n / e for n, e in zip(nemu, per_image["encoder"], strict=True)]
            ratios[f"relax{RELAX_N}_over_nemu_w{w}"] = [r / n for r, n in zip(relax_full, nemu, strict=True)]
            if compiled:
                ratios[f"nemu_compiled_w{w}_over_encoder_compiled"] = [
                    n / e for n, e in zip(per_image[f"nemu_compiled_w{w}"], per_image["encoder_compiled"], strict=True)]
        if "gradient" in per_image:
            ratios["gradient_over_encoder"] = [g / e for g, e in zip(per_image["gradient"], per_image["encoder"],
                                                                      strict=True)]
        results.append({
            "batch": b,
            "calls_per_block": {k.removesuffix(f"_b{b}"): v for k, v in calls.items() if k.endswith(f"_b{b}")},
            "seconds_per_image": {k: summary(v) for k, v in per_image.items()},
            "seconds_per_image_raw": per_image,
            "ratios": {k: summary(v) for k, v in ratios.items()},
        })

    decoders = {}
    for w, m in models.items():
        prof = profiles[w]
        parts = _decoder_parts(m, size)
        in_parts = sum(prof[label] for label, _, _ in parts)
        decoder_seconds = prof["decoder"]
        decoders[w] = {
            "widths": [blk[0].out_channels for blk in m.decoder.blocks],
            "params": _params(m.decoder),
            "macs": macs[w]["decoder"],
            "macs_over_encoder": macs[w]["decoder"] / max(macs[w]["encoder"], 1),
            "profile_batch": b_profile,
            "profile_seconds_per_image": {"encoder": (prof["total"] - decoder_seconds) / b_profile,
                                          "decoder": decoder_seconds / b_profile},
            "parts": [{"part": label, "where": where, "macs": macs[w]["parts"][label],
                       "macs_share": macs[w]["parts"][label] / max(macs[w]["decoder"], 1),
                       "seconds_per_image": prof[label] / b_profile,
                       "time_share": prof[label] / decoder_seconds if decoder_seconds > 0 else float("nan")}
                      for label, _, where in parts]
            + [{"part": "other", "where": "interpolate, cat", "macs": 0, "macs_share": 0.0,
                "seconds_per_image": (decoder_seconds - in_parts) / b_profile,
                "time_share": (decoder_seconds - in_parts) / decoder_seconds if decoder_seconds > 0 else float("nan")}],
        }
    return {
        "case": name,
        "encoder": description,
        "image_size": size,
        "encoder_params": _params(encoder),
        "encoder_macs": macs[widths[0]]["encoder"],
        "min_stride": min_stride,
        "compile": compile_mode,
        "decoders": decoders,
        "relax": {
            "n_masks_measured": relax_masks,
            "n_masks_target": RELAX_N,
            "extrapolation_factor": factor,
            "images": relax_images,
            "masks_per_encoder_call": relax_batch,
            "seconds_per_image_measured": summary(relax_measured),
            f"seconds_per_image_{RELAX_N}": summary(relax_full),
            "seconds_per_image_measured_raw": relax_measured,
        },
        "batches": results,
    }


def _t(seconds: float) -> str:
    """A duration with a readable unit."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def _x(v: float) -> str:
    """A ratio: three significant digits, or thousands separators from 1,000 on."""
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def _r(q: dict) -> str:
    return f"{_x(q['median'])} [{_x(q['min'])}, {_x(q['max'])}]"


def _print_case(c: dict, widths: list[int], gradient_why: str) -> None:
    r = c["relax"]
    print(f"\n{c['case']}: {c['encoder']} at {c['image_size']} px; encoder {c['encoder_params'] / 1e6:.2f} M params, "
          f"{c['encoder_macs'] / 1e6:.1f} M MACs per image")
    for w in widths:
        d = c["decoders"][w]
        print(f"  decoder max_width {w}, min_stride {c['min_stride']} (level widths {d['widths']}): "
              f"{d['params'] / 1e6:.3f} M params, "
              f"{d['macs'] / 1e6:.1f} M MACs per image = {d['macs_over_encoder']:.2f}x the encoder's")
    print(f"  RELAX measured at N = {r['n_masks_measured']} on {r['images']} image(s), "
          f"{r['masks_per_encoder_call']} masks per encoder call: {_t(r['seconds_per_image_measured']['median'])} "
          f"per image; RELAX-{RELAX_N} = measured x {r['extrapolation_factor']:.3g} "
          f"(cost linear in N{'' if r['extrapolation_factor'] == 1 else ', extrapolated'})")
    for bres in c["batches"]:
        b, s = bres["batch"], bres["seconds_per_image"]
        enc = s["encoder"]["median"]
        print(f"\n  batch {b}: seconds per image{'':<11}{'median':>11}{'min':>11}{'max':>11}{'x encoder':>11}")
        rows = [("encoder alone (the limit)", s["encoder"])]
        rows += [(f"NEM-U (z, m), max_width {w}", s[f"nemu_w{w}"]) for w in widths]
        if c["compile"]:
            rows.append((f"encoder, compiled ({c['compile']})", s["encoder_compiled"]))
            rows += [(f"NEM-U compiled, max_width {w}", s[f"nemu_compiled_w{w}"]) for w in widths]
        rows.append(("label-free gradient", s.get("gradient")))
        rows.append((f"RELAX-{RELAX_N} (N = {r['n_masks_measured']} x {r['extrapolation_factor']:.3g})",
                     r[f"seconds_per_image_{RELAX_N}"]))
        for label, q in rows:
            if q is None:
                print(f"  {label:<37}{'n/a':>11}  ({gradient_why})")
                continue
            print(f"  {label:<37}{_t(q['median']):>11}{_t(q['min']):>11}{_t(q['max']):>11}"
                  f"{_x(q['median'] / enc):>10}x")
        print(f"  bound: RELAX-{RELAX_N} / encoder alone {_r(bres['ratios'][f'relax{RELAX_N}_over_encoder'])} "
              f"(no one-pass explainer can exceed it)")
        for w in widths:
            q1 = bres["ratios"][f"nemu_w{w}_over_encoder"]
            q2 = bres["ratios"][f"relax{RELAX_N}_over_nemu_w{w}"]
            print(f"  max_width {w}: NEM-U / encoder {_r(q1)} (goal <= {GOAL_NEMU_OVER_ENCODER}); "
                  f"RELAX-{RELAX_N} / NEM-U {_r(q2)} (goal >= {GOAL_RELAX_OVER_NEMU:,.0f})")
            if c["compile"]:
                print(f"  max_width {w}, both compiled: NEM-U / encoder "
                      f"{_r(bres['ratios'][f'nemu_compiled_w{w}_over_encoder_compiled'])}")
    for w in widths:
        d = c["decoders"][w]
        p = d["profile_seconds_per_image"]
        print(f"\n  where the decoder's cost goes, max_width {w} (MACs; time from hooks, one call at batch "
              f"{d['profile_batch']}: encoder {_t(p['encoder'])}, decoder {_t(p['decoder'])} per image)")
        print(f"  {'part':<12}{'where':<36}{'M MACs':>9}{'share':>8}{'time':>11}{'share':>8}")
        for part in d["parts"]:
            print(f"  {part['part']:<12}{part['where']:<36}{part['macs'] / 1e6:>9.1f}{part['macs_share']:>8.0%}"
                  f"{_t(part['seconds_per_image']):>11}{part['time_share']:>8.0%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of a table")
    parser.add_argument("--cases", default="small,resnet50,vit-s16", help=f"comma-separated, among {sorted(CASES)}")
    parser.add_argument("--max-width", default=str(DEFAULT_MAX_WIDTH),
                        help=f"NEMU decoder max_width, comma-separated for several NEM-U rows "
                             f"(default {DEFAULT_MAX_WIDTH}, the library's)")
    parser.add_argument("--min-stride", type=int, default=DEFAULT_MIN_STRIDE,
                        help=f"NEMU decoder min_stride: the finest encoder tap it uses (default {DEFAULT_MIN_STRIDE}, "
                             f"the library's)")
    parser.add_argument("--relax-masks", default=None,
                        help=f"N measured for RELAX, for every case (an int) or per case ('resnet50=200'); "
                             f"timings are scaled linearly to N = {RELAX_N} (default {RELAX_N})")
    parser.add_argument("--relax-images", type=int, default=1, help="images RELAX explains per call (default 1)")
    parser.add_argument("--relax-batch", type=int, default=None,
                        help="RELAX masks per encoder call (default: relax.default_batch_size, 100 on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (default 3)")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="minimum length of one timed block of encoder / NEM-U calls (default 0.5)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke check: batches {QUICK['batches']}, RELAX N = {QUICK['relax_masks']} in "
                             f"batches of {QUICK['relax_batch']}, one repeat, blocks of {QUICK['seconds']} s")
    add_device_arguments(parser)
    parser.add_argument("--channels-last", action="store_true",
                        help="models and images in channels_last memory format (meant for CUDA)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast around every call (meant for CUDA)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="also time the encoder and NEM-U under torch.compile with this mode (e.g. default, "
                             "reduce-overhead: CUDA graphs); compiling takes a minute or more")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose among {sorted(CASES)}")
    try:
        widths = [int(w) for w in args.max_width.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--max-width takes integers, got {args.max_width!r}")
    batches = {c: CASES[c][3] for c in cases}
    if args.quick:
        batches = {c: QUICK["batches"][c] for c in cases}
        relax_masks = dict.fromkeys(cases, QUICK["relax_masks"])
        args.relax_batch, args.repeats, args.seconds = QUICK["relax_batch"], QUICK["repeats"], QUICK["seconds"]
    else:
        relax_masks = parse_per_case(args.relax_masks, dict.fromkeys(cases, RELAX_N), list(CASES), "--relax-masks")
    if not widths or min(widths) < 1 or min(relax_masks.values()) < 1 or args.min_stride < 1:
        parser.error("--max-width, --min-stride and --relax-masks must be >= 1")
    if min(args.relax_images, args.relax_batch or 1, args.repeats, args.threads) < 1 or args.seconds < 0:
        parser.error("--relax-images, --relax-batch, --repeats and --threads must be >= 1, --seconds >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gradient, gradient_why = gradient_baseline()

    with json_quiet(args.json):
        result = {
            **machine_info(device),
            "channels_last": args.channels_last,
            "bf16_autocast": args.bf16,
            "repeats": args.repeats,
            "seconds_per_block": args.seconds,
            "max_widths": widths,
            "goals": {"nemu_over_encoder_at_most": GOAL_NEMU_OVER_ENCODER,
                      f"relax{RELAX_N}_over_nemu_at_least": GOAL_RELAX_OVER_NEMU},
            "gradient_baseline": gradient_why if gradient is not None else None,
            "gradient_baseline_missing": None if gradient is not None else gradient_why,
            "cases": [run_case(c, batches[c], widths, relax_masks[c], args.relax_images, args.relax_batch,
                               args.repeats, args.seconds, device, args.channels_last, args.bf16, gradient,
                               args.min_stride, compile_mode=args.compile)
                      for c in cases],
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return

    print(f"torch {result['torch']}, {result['threads']} threads, {result['device']} ({result['device_name']}, "
          f"{result['machine']}), GLIBC_TUNABLES={result['glibc_tunables'] or 'unset'}, "
          f"channels_last {'on' if args.channels_last else 'off'}, bf16 autocast {'on' if args.bf16 else 'off'}")
    print(f"{args.repeats} repeats (median [min, max]); encoder / NEM-U blocks of >= {args.seconds} s; "
          f"label-free gradient: {gradient_why}")
    for c in result["cases"]:
        _print_case(c, widths, gradient_why)


if __name__ == "__main__":
    main()
