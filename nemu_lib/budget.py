"""Time budgets: how long a long step will take, said before it starts.

An estimate is work over throughput. Work is counted in forward passes of the encoder through one image
(its FLOPs counted once by :func:`forward_gflops`): a training step costs about three forward passes per
image (forward and backward), RELAX one per masked copy. Throughput is the *effective* TFLOP/s a device
reached on this project's own runs (:data:`SPEEDS`, with where each figure comes from), plus a fixed cost per
optimiser step or encoder call (kernel launches, Python) that small models on a GPU pay more than FLOPs:

    seconds = (3 * train_images + infer_images) * GFLOP / (1000 * TFLOP/s)  +  calls * overhead

:func:`announce` prints the estimate when it exceeds a minute; the training loops, RELAX and Network
Dissection call it. :func:`notebook_seconds` adds up a profile's notebooks the first time they run (nothing
saved yet), which is how the ``gpu`` profile was sized to a free Colab GPU (``config.PROFILES``).
Estimates are good to a factor of ~2: the CPU figures of the ``cpu`` profile are within that of the wall
times measured on a 2-core laptop (tests/test_budget.py checks it).
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class DeviceSpeed:
    """Effective throughput of one kind of device on this project's small convnets."""

    name: str  # as printed: "a T4-class GPU"
    train_tflops: float  # TFLOP/s of a training step, counting 3 forward passes per image (mixed precision on GPUs)
    infer_tflops: float  # TFLOP/s of batched inference in float32 (RELAX's masked copies, embeddings)
    overhead: float  # seconds per optimiser step or encoder call that do not scale with the FLOPs
    source: str  # where the figures come from


SPEEDS: dict[str, DeviceSpeed] = {
    "cpu": DeviceSpeed(
        "a 2-core CPU", 0.045, 0.07, 0.002,
        "fit to the notebooks' first runs on an idle 2-core CPU, cpu profile, 2026-11-28 (every estimate within "
        "0.75-1.4x of its measured time): SimCLR 2,500 steps of 64 views in 276 s on the 0.031-GFLOP small ResNet "
        "(aug included; 0.054 TFLOP/s), RELAX at 0.35 ms per masked 64-px copy (notebook 02)"),
    "h100": DeviceSpeed(
        "an H100", 27.8, 20.0, 0.004,
        "measured on an H100, 2026-11: SimCLR at batch 512 (1,024 views, 0.48-GFLOP small ResNet, bf16) at "
        "19 steps/s; inference assumed at 70 % of that (float32 with TF32 convolutions)"),
    "t4": DeviceSpeed(
        "a T4-class GPU", 3.1, 2.5, 0.01,
        "assumed: the H100 figures / 9 for fp16 training (a T4 is 8-10x slower on such convnets), fp32 "
        "inference at 2.5 TFLOP/s (a T4 has no TF32; 8.1 TFLOP/s fp32 peak), 10 ms per call (2 slow CPU cores)"),
}


def device_speed(device: str | torch.device | None = None) -> DeviceSpeed:
    """The :data:`SPEEDS` entry for ``device`` (default: :func:`nemu_lib.config.device`).

    A GPU named H100 / H200 counts as ``h100``; any other GPU as ``t4``, a lower bound for newer ones.
    """
    from .config import device as default_device

    device = default_device(device)
    if device.type != "cuda":
        return SPEEDS["cpu"]
    name = torch.cuda.get_device_name(device)
    return SPEEDS["h100"] if any(k in name for k in ("H100", "H200")) else SPEEDS["t4"]


_GFLOPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], float]] = weakref.WeakKeyDictionary()


def count_flops(model: nn.Module, *args: object) -> float:
    """FLOPs of one call ``model(*args)`` (``torch.utils.flop_counter``: convolutions and matrix products).

    The call runs in eval mode, without gradients and outside inference mode (the counter's module tracking
    needs autograd views), and the model's mode is restored: counting changes no state, e.g. no BatchNorm
    running statistics of a model that is about to be trained.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def forward_gflops(model: nn.Module, x: Tensor) -> float:
    """GFLOP of ``model``'s forward pass on one image shaped like ``x[0]`` (counted once per model and shape).

    NaN for a model the counter cannot trace (e.g. one that fails on a batch of one): no estimate is printed.
    """
    shape = tuple(x.shape[1:])
    cached = _GFLOPS.setdefault(model, {})
    if shape not in cached:
        try:
            cached[shape] = count_flops(model, x[:1].clone()) / 1e9
        except Exception:  # noqa: BLE001 (an estimate must never stop the work: a model the counter cannot trace)
            cached[shape] = math.nan
    return cached[shape]


def estimate_seconds(
    gflops: float, train_images: float = 0, infer_images: float = 0, calls: int = 0, speed: DeviceSpeed | None = None
) -> float:
    """Seconds for ``train_images`` images through training steps and ``infer_images`` through inference,
    in ``calls`` steps or encoder calls, of a model of ``gflops`` per image forward, at ``speed``."""
    speed = speed or device_speed()
    flops = gflops * (3 * train_images / speed.train_tflops + infer_images / speed.infer_tflops) / 1e3
    return flops + calls * speed.overhead


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"3.2 min"``, ``"1.4 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def announce(
    what: str, gflops: float, train_images: float = 0, infer_images: float = 0, calls: int = 0,
    device: str | torch.device | None = None, min_seconds: float = 60,
) -> float:
    """Print ``what`` and its estimated duration when that is at least ``min_seconds``; return the estimate.

    >>> s = announce("SimCLR", 0.12, train_images=1e6, calls=4000, device="cpu")
    SimCLR: about 4.4 h on a 2-core CPU (estimate; the progress bar below measures it)
    """
    speed = device_speed(device)
    seconds = estimate_seconds(gflops, train_images, infer_images, calls, speed)
    if seconds >= min_seconds:
        print(f"{what}: about {format_seconds(seconds)} on {speed.name} (estimate; the progress bar below "
              "measures it)")
    return seconds


# ------------------------------------------------------------------------------- whole notebooks

NOTEBOOK_OVERHEAD = 30  # seconds of every notebook outside its long steps: imports, figures, probes fitted on the CPU
RENDER_SCENES_PER_S = 480  # Shapes scenes per second at 64 px, one process (H100 host and this laptop alike)
NEMU_PASSES = {"nem": 4.5, "nem-contrastive": 6.5}  # forward-pass equivalents per image of a decoder step
RELAX_OBJECTIVE_MASKS = 16  # K, masked copies per image of an amortised-RELAX step (TrainConfig.relax_masks)


def small_resnet_gflops(widths: tuple[int, ...], image_size: int) -> float:
    """GFLOP of one forward pass of the small ResNet of ``widths`` at ``image_size`` px."""
    from .encoders import build_encoder

    return forward_gflops(build_encoder("small_resnet", widths=widths), torch.zeros(1, 3, image_size, image_size))


def notebook_seconds(profile: object = None, speed: DeviceSpeed | None = None) -> dict[str, float]:
    """Estimated seconds of each notebook's first run in ``profile`` at ``speed`` (nothing saved yet).

    Counts the long steps only: rendering the splits (notebook 00; later notebooks load the cached splits),
    training the SimCLR and supervised encoders and embedding the splits for the probes (01), RELAX in
    its sections (02), the NEM-U decoders of one encoder and RELAX beside them (03), the evaluation of two
    encoders (04: RELAX on every held-out scene, its convergence and the random encoder, integrated
    gradients, deletion curves, the decoders notebook 03 did not train and one on the random encoder),
    Network Dissection (05) and two explainer networks (06: the performer's forward pass and its last stage
    backward per step, then explaining the training and test splits, the probes and one dissection), and a
    torchvision CNN and a small ViT trained, explained by RELAX and given NEM-U decoders (07, at the small
    ResNet's cost per image).
    """
    from .config import get_profile

    p = get_profile(profile)
    speed = speed or device_speed()
    e = p.extra
    g = small_resnet_gflops(p.encoder_widths, p.image_size)
    n_masks, bs = e["relax_masks"], p.batch_size
    steps_per_epoch = p.n_train // bs
    relax_call = 100 if speed is SPEEDS["cpu"] else max(100, min(1000, 2**24 // (3 * p.image_size**2)))  # as relax()

    def run(train: float = 0, infer: float = 0, calls: float = 0) -> float:
        return estimate_seconds(g, train, infer, int(calls), speed)

    def relax(images: float, masks: float = n_masks) -> float:
        return run(infer=images * masks, calls=images * masks / relax_call)

    def decoder(objective: str) -> float:
        steps, batch = e[{"nem": "nemu_steps", "nem-contrastive": "nemu_contrastive_steps",
                          "relax": "nemu_relax_steps"}[objective]], e["nemu_batch_size"]
        if objective == "relax":
            return run(train=steps * batch, infer=steps * batch * RELAX_OBJECTIVE_MASKS, calls=steps)
        return run(train=steps * batch * NEMU_PASSES[objective] / 3, calls=steps)

    render = (p.n_train + p.n_val + p.n_test) / RENDER_SCENES_PER_S * (p.image_size / 64) ** 2
    ssl_steps, sup_steps = p.ssl_epochs * steps_per_epoch, p.supervised_epochs * steps_per_epoch
    probes = run(infer=3 * (p.n_train + p.n_test), calls=3 * (p.n_train + p.n_test) / 256)
    n_eval, n_ceiling = e["eval_images"], e["ceiling_images"]
    deletion = run(infer=8 * n_eval * 2 * (e["deletion_steps"] + 1), calls=8 * 2 * n_eval / 8)
    eval_masks = e["eval_relax_masks"]
    evaluation = (relax(n_eval, eval_masks) + relax(2 * n_ceiling, eval_masks) + relax(4 * e["mosaics"], eval_masks / 2)
                  + run(train=n_eval * e["ig_steps"] / 3 * 2, calls=n_eval * e["ig_steps"] / 64) + deletion)
    dissection = 3 * (1 + e["dissection_rotations"]) * run(infer=2 * e["dissection_images"],
                                                           calls=2 * e["dissection_images"] / 64)
    steps = {
        "00_setup_and_data": render,
        "01_self_supervised_encoders": (run(train=ssl_steps * 2 * bs, calls=ssl_steps)
                                        + run(train=sup_steps * bs, calls=sup_steps) + probes),
        "02_relax": relax(4.5 * e["relax_images"] + 8 * e["mosaics"]),
        "03_nemu": (2 * decoder("nem") + decoder("nem-contrastive") + decoder("relax")
                    + relax(2 * e["relax_images"])),
        # + the supervised decoders notebook 03 does not train, and the random encoder's NEM-U decoder
        "04_evaluating_explanations": 2 * evaluation + decoder("nem-contrastive") + decoder("relax") + decoder("nem"),
        "05_network_dissection": dissection + 2 * probes / 3,
        "06_explainer_networks": 2 * (run(infer=e["explainer_steps"] * e["explainer_batch_size"],
                                          train=e["explainer_steps"] * e["explainer_batch_size"] / 8,
                                          calls=e["explainer_steps"])
                                      + probes / 3 + dissection / (6 * (1 + e["dissection_rotations"]))),
        "07_your_own_encoder": 2 * (run(train=sup_steps * bs, calls=sup_steps) + decoder("nem")
                                    + relax(e["relax_images"]) + probes / 3),  # counted at the small ResNet's cost
    }
    return {name: seconds + NOTEBOOK_OVERHEAD for name, seconds in steps.items()}


# Wall times measured per notebook and profile (2-core CPU, 2026-11): what the notebooks print before an estimate.
MEASURED = {
    "00_setup_and_data": {"smoke": "~15 s", "cpu": "~1 min on a 2-core CPU"},
    "01_self_supervised_encoders": {
        "smoke": "well under a minute",
        "cpu": "~6.5 min on a 2-core CPU (SimCLR ~4.6 min of it); ~1 min once the encoders are saved"},
    "02_relax": {
        "smoke": "well under a minute",
        "cpu": "~1.5 min on an idle 2-core CPU (+ ~6 min if notebook 01's encoders must be trained first)"},
    "03_nemu": {
        "smoke": "under a minute on an idle CPU",
        "cpu": "~5.5 min on an idle 2-core CPU the first time (four decoders ~4.5 min), ~1 min once they are saved"},
    "04_evaluating_explanations": {
        "smoke": "about a minute on an idle CPU",
        "cpu": "~8 min on an idle 2-core CPU the first time (RELAX N = 1,000 on 2 x 100 scenes, three decoders), "
               "~1.6 min once outputs/evaluation and outputs/nemu hold them"},
    "05_network_dissection": {
        "smoke": "under a minute",
        "cpu": "~1 min on a 2-core CPU (+ ~6 min if notebook 01's encoders must be trained first)"},
    "06_explainer_networks": {
        "smoke": "~15 s",
        "cpu": "~2 min on an idle 2-core CPU (two explainers ~1.2 min), ~1 min once outputs/explainers holds them "
               "(+ ~6 min if notebook 01's encoders must be trained first)"},
    "07_your_own_encoder": {
        "smoke": "~15 s",
        "cpu": "~5 min on an idle 2-core CPU (training the CNN and the ViT ~3 min), ~40 s once they and their "
               "decoders are saved"},
}


# With the shipped reference models (nemu_lib.reference: the cpu profile, seed 0), nothing is trained: measured on the
# same 2-core CPU, a fresh clone's `NEMU_PROFILE=cpu make run` (2026-12-07: 5:19 for the series).
MEASURED_WITH_REFERENCE = {
    "00_setup_and_data": "~20 s on a 2-core CPU",
    "01_self_supervised_encoders": "~40 s on a 2-core CPU with the reference encoders (~6.5 min training them)",
    "02_relax": "~1 min on a 2-core CPU",
    "03_nemu": "~40 s on a 2-core CPU with the reference decoders (~5.5 min training them)",
    "04_evaluating_explanations": "~1 min on a 2-core CPU with the reference decoders and RELAX maps (~8 min without)",
    "05_network_dissection": "~40 s on a 2-core CPU",
    "06_explainer_networks": "~35 s on a 2-core CPU with the reference explainers (~2 min training them)",
    "07_your_own_encoder": "~35 s on a 2-core CPU with the reference CNN, ViT and decoders (~5 min training them)",
}


def short_expected(text: str) -> str:
    """The duration an :func:`nemu_lib.budget.expected_time` text starts with: ``"~5.5 min"`` of
    ``"~5.5 min on an idle 2-core CPU the first time (...)"``; ``"well under a minute"`` stays whole."""
    return re.split(r" on | \(|, |; ", text, maxsplit=1)[0]


def expected_time(notebook: str, profile: object = None, device: str | torch.device | None = None,
                  reference: bool = False) -> str:
    """``notebook``'s first-run time in ``profile`` on ``device``, as the notebooks print it: measured
    (:data:`MEASURED`) where it was, else estimated; ``reference``: when the shipped reference models are used
    (:mod:`nemu_lib.reference`), the time measured with them (:data:`MEASURED_WITH_REFERENCE`).

    >>> expected_time("03_nemu", "gpu", "cpu")
    '~3.4 h on a 2-core CPU (estimated by nemu_lib.budget for a first run)'
    """
    from .config import get_profile

    p = get_profile(profile)
    speed = device_speed(device)
    if reference and p.name == "cpu" and speed is SPEEDS["cpu"] and notebook in MEASURED_WITH_REFERENCE:
        return MEASURED_WITH_REFERENCE[notebook]
    if p.name in MEASURED.get(notebook, {}) and speed is SPEEDS["cpu"]:
        return MEASURED[notebook][p.name]
    seconds = notebook_seconds(p, speed)[notebook]
    return f"~{format_seconds(seconds)} on {speed.name} (estimated by nemu_lib.budget for a first run)"
