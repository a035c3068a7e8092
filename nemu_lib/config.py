"""Profiles, device choice, seeding and paths.

A *profile* fixes sizes only (image size, data set sizes, epochs, batch sizes); what to explain is chosen
separately (data set, encoder). Four profiles exist:

- ``smoke``: the test suite; seconds per notebook, tiny sizes, checks that the code paths run.
- ``cpu``: a 2-core laptop; meaningful results in at most ~10 minutes per notebook (measured).
- ``gpu``: a free Colab runtime, a T4-class GPU with 2 CPU cores; each notebook's first run is estimated at
  <= ~5 minutes there (:func:`nemu_lib.budget.notebook_seconds`: an H100's measured throughput divided by 9,
  the speed factor assumed for a T4 on these convnets), so ~10 minutes holds with the estimate 2x off.
- ``full``: paper-scale Shapes on a large GPU (50,000 scenes, a 4x wider encoder, 100 SimCLR epochs:
  ~11 minutes for notebook 01 on an H100).

The profile comes from the argument, else the ``NEMU_PROFILE`` environment variable, else ``gpu`` when
CUDA is available and ``cpu`` otherwise. ``NEMU_DATA`` and ``NEMU_OUTPUTS`` move ``data/`` and
``outputs/`` (by default they sit in the checkout, or in the working directory when nemu is installed as a
package).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def project_root() -> Path:
    """The checkout (editable install) or, for an installed package (e.g. Colab), the working directory."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()


@dataclass(frozen=True)
class Profile:
    """Sizes for one profile. Every field has a comment: these are the knobs a reader may turn.

    ``extra`` holds the later chapters' sizes: RELAX's ``relax_masks`` (N) and ``relax_images`` (notebook 02);
    the NEM-U decoders' ``nemu_steps``, ``nemu_batch_size``, ``nemu_lr``, ``nemu_contrastive_steps``,
    ``nemu_contrastive_eps``, ``nemu_relax_steps`` and ``nemu_relax_lr`` (:func:`nemu_lib.runs.profile_config`);
    the evaluation's ``eval_relax_masks`` (the reference RELAX's N), ``eval_images`` (held-out scenes),
    ``ceiling_images`` (RELAX's convergence and the randomisation test),
    ``ig_steps``, ``deletion_steps`` and ``mosaics`` (:func:`nemu_lib.report.evaluate_encoder`); Network Dissection's
    ``dissection_images`` and ``dissection_rotations`` (notebook 05); the explainer networks' ``explainer_steps``
    and ``explainer_batch_size`` (notebook 06, :class:`nemu_lib.explainer.ExplainerConfig`).
    """

    name: str
    image_size: int  # side of the square Shapes scenes, px (32-128)
    n_train: int  # Shapes training scenes (SimCLR, supervised baseline, probe fitting)
    n_val: int  # validation scenes (model selection, held-out losses)
    n_test: int  # test scenes (probe accuracy, explanations)
    encoder_widths: tuple[int, ...]  # channels of the small ResNet's four stages
    batch_size: int  # SimCLR / supervised batch size (SimCLR sees 2x this many views)
    ssl_epochs: int  # SimCLR pretraining epochs
    supervised_epochs: int  # epochs of the supervised (shape classification) baseline
    lr: float  # AdamW learning rate for encoder training, cosine-decayed to 0
    temperature: float  # NT-Xent temperature tau
    knn_k: int  # neighbours in the k-NN probe
    extra: dict = field(default_factory=dict)  # sizes added by later chapters, read with .get()

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        image_size=32,
        n_train=128,
        n_val=32,
        n_test=64,
        encoder_widths=(8, 16, 32, 64),
        batch_size=32,
        ssl_epochs=1,
        supervised_epochs=1,
        lr=2e-3,
        temperature=0.2,
        knn_k=5,
        extra={"relax_masks": 300, "relax_images": 4, "nemu_steps": 4, "nemu_batch_size": 16, "nemu_lr": 1e-2,
               "nemu_contrastive_steps": 1, "nemu_contrastive_eps": 0.3,
               "nemu_relax_steps": 2, "nemu_relax_lr": 3e-3,
               "eval_relax_masks": 300,
               "eval_images": 8, "ceiling_images": 4, "ig_steps": 4, "deletion_steps": 8, "mosaics": 1,
               "dissection_images": 64, "dissection_rotations": 1,
               "explainer_steps": 4, "explainer_batch_size": 16},
    ),
    "cpu": Profile(
        name="cpu",
        image_size=64,
        n_train=4000,
        n_val=500,
        n_test=1000,
        encoder_widths=(16, 32, 64, 128),
        batch_size=32,  # SimCLR's shape probe at 12 epochs: 0.33 vs 0.31 with 64 and 0.29 with 16, in the same time
        # SimCLR: 2,500 steps (~4.6 min) at tau 0.1; its shape probe beats the untrained network by >= 0.08 on seeds
        # 0-2 (+0.089 / +0.088 / +0.121; 12 epochs at tau 0.2: +0.10 / +0.062 / +0.078; bench/simclr_seeds.py)
        ssl_epochs=20,
        supervised_epochs=6,
        lr=2e-3,
        temperature=0.1,
        knn_k=20,
        extra={"relax_masks": 3000, "relax_images": 8, "nemu_steps": 600, "nemu_batch_size": 32, "nemu_lr": 1e-2,
               "nemu_contrastive_steps": 600, "nemu_contrastive_eps": 0.3,
               "nemu_relax_steps": 600, "nemu_relax_lr": 3e-3,
               "eval_relax_masks": 1000,
               "eval_images": 100, "ceiling_images": 32, "ig_steps": 32, "deletion_steps": 16, "mosaics": 2,
               "dissection_images": 1000, "dissection_rotations": 3,
               "explainer_steps": 600, "explainer_batch_size": 64},
    ),
    "gpu": Profile(  # a free Colab runtime (T4-class GPU, 2 CPU cores): each notebook <= ~5 min estimated there
        name="gpu",
        image_size=64,
        n_train=20_000,
        n_val=1_000,
        n_test=2_000,
        encoder_widths=(32, 64, 128, 256),  # 0.12 GFLOP per 64-px image, a quarter of `full`'s
        batch_size=256,
        ssl_epochs=40,  # 3,120 steps of 512 views: ~4 min on a T4 (budget.notebook_seconds)
        supervised_epochs=10,
        lr=2e-3,
        temperature=0.2,
        knn_k=20,
        extra={"relax_masks": 3000, "relax_images": 16, "nemu_steps": 2000, "nemu_batch_size": 64, "nemu_lr": 1e-2,
               "nemu_contrastive_steps": 1500, "nemu_contrastive_eps": 0.3,
               "nemu_relax_steps": 1000, "nemu_relax_lr": 3e-3,
               "eval_relax_masks": 3000,
               "eval_images": 300, "ceiling_images": 48, "ig_steps": 32, "deletion_steps": 32, "mosaics": 8,
               "dissection_images": 2000, "dissection_rotations": 3,
               "explainer_steps": 2000, "explainer_batch_size": 128},
    ),
    "full": Profile(  # paper-scale Shapes on a large GPU: ~11 min for notebook 01 on an H100 (measured SimCLR 8.5 min)
        name="full",
        image_size=64,
        n_train=50_000,
        n_val=2_000,
        n_test=5_000,
        encoder_widths=(64, 128, 256, 512),
        batch_size=512,
        ssl_epochs=100,
        supervised_epochs=30,
        lr=2e-3,
        temperature=0.2,
        knn_k=20,
        extra={"relax_masks": 3000, "relax_images": 32, "nemu_steps": 5000, "nemu_batch_size": 128, "nemu_lr": 1e-2,
               "nemu_contrastive_steps": 5000, "nemu_contrastive_eps": 0.3,
               "nemu_relax_steps": 2500, "nemu_relax_lr": 3e-3,
               "eval_relax_masks": 3000,
               "eval_images": 1000, "ceiling_images": 200, "ig_steps": 64, "deletion_steps": 32, "mosaics": 16,
               "dissection_images": 5000, "dissection_rotations": 5,
               "explainer_steps": 4000, "explainer_batch_size": 128},
    ),
}


def default_profile_name() -> str:
    """``NEMU_PROFILE`` if set, else ``gpu`` with CUDA, else ``cpu``."""
    return os.environ.get("NEMU_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")


def get_profile(name: str | Profile | None = None) -> Profile:
    """Return the profile called ``name`` (default: :func:`default_profile_name`).

    >>> get_profile("smoke").image_size
    32
    """
    if isinstance(name, Profile):
        return name
    name = default_profile_name() if name is None else name
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
            "(set NEMU_PROFILE or pass profile=...)"
        )
    return PROFILES[name]


def device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``prefer`` if given, else CUDA, else Apple MPS, else CPU."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step on ``device``: ``None`` (full precision) off CUDA.

    bf16 where the GPU computes it natively (compute capability 8.0 and later: A100, H100, RTX 30xx+);
    fp16 on older GPUs such as the T4 of a free Colab runtime, which emulates bf16 slowly but has fp16
    tensor cores (fp16 needs loss scaling: :func:`grad_scaler`).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for a training step on CUDA (dtype: :func:`amp_dtype`); elsewhere no context at all.

    Returning a null context (not ``torch.autocast(..., enabled=False)``) on other devices keeps an outer
    ``torch.autocast`` in force: the tests run every training loop under ``torch.autocast("cpu",
    dtype=torch.bfloat16)`` to catch on a CPU the dtype errors a GPU would raise.
    """
    dtype = amp_dtype(device) if enabled else None
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: str | torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (Micikevicius et al., ICLR 2018); a pass-through for bf16 and fp32.

    A disabled scaler's ``scale(loss)`` is ``loss`` and its ``step(opt)`` is ``opt.step()``, so one loop
    serves every device.
    """
    device = torch.device(device)
    on = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=on)


def module_device(module: torch.nn.Module, default: str | torch.device | None = "cpu") -> torch.device | None:
    """Where ``module``'s weights live: the device of its first parameter, ``default`` for a parameter-free one."""
    param = next(module.parameters(), None)
    if param is not None:
        return param.device
    return torch.device(default) if default is not None else None


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Inside the block, float32 on CUDA is float32: no TF32 in convolutions (cuDNN's default) or matmuls.

    TF32 keeps 10 mantissa bits (~1e-3 relative): checks that compare a by-hand computation with the
    library's use this block, so that float32 tolerances hold on a GPU as on a CPU (where it changes nothing).
    """
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU ``torch.Generator`` seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds the legacy global state that libraries still use)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _dir(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or project_root() / default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Where data sets and downloaded weights land: ``$NEMU_DATA`` or ``data/``."""
    return _dir("NEMU_DATA", "data")


def outputs_dir() -> Path:
    """Where checkpoints, figures and executed notebooks land: ``$NEMU_OUTPUTS`` or ``outputs/``."""
    return _dir("NEMU_OUTPUTS", "outputs")
