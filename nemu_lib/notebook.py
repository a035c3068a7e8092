"""The set-up every notebook shares, in one call: ``P, dev, out = setup(profile, seed, "03_nemu")``.

A notebook's first code cell installs ``nemu_lib`` when it is missing (Colab: from ``NEMU_SOURCE``, see the
README) and then calls :func:`setup`, which

- keeps data and outputs under ``/content/nemu`` on Colab (a pip-installed package has no checkout);
- resolves the profile (the argument, else ``NEMU_PROFILE``, else ``gpu`` with CUDA and ``cpu`` without);
- seeds Python, NumPy and torch, and picks the device;
- makes ``outputs/figures`` and names the notebook's figures ``<number>_<name>.png``
  (:func:`nemu_lib.viz.savefig`);
- sets plotting defaults;
- says whether the shipped reference models are used (:mod:`nemu_lib.reference`; ``retrain=True`` trains here);
- prints one header: profile, device, versions, the expected wall time and where data and outputs go.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import __version__, reference, viz
from .budget import expected_time
from .config import Profile, data_dir, device, get_profile, outputs_dir, seed_everything

COLAB_ROOT = "/content/nemu"  # data and outputs on Colab


def in_colab() -> bool:
    """Whether this kernel runs on Google Colab."""
    return "google.colab" in sys.modules


def interactive() -> bool:
    """Whether widgets may wait for a reader: not in batch runs (``NEMU_BATCH=1``: ``make run``, ``make test``,
    ``make gpu-check``), where papermill can hang on an ``ipywidgets.interact`` cell (papermill issue 723)."""
    return os.environ.get("NEMU_BATCH", "") in ("", "0")


def setup(
    profile: str | Profile | None = None,
    seed: int = 0,
    notebook: str = "",
    prefer: str | torch.device | None = None,
    retrain: bool = False,
) -> tuple[Profile, torch.device, Path]:
    """Set a notebook up; return ``(P, dev, out)``: the profile, the device and ``outputs_dir()``.

    Args:
        profile: a profile or its name (``None``: ``NEMU_PROFILE`` or the hardware default).
        seed: seeds Python, NumPy and torch.
        notebook: the notebook's name, e.g. ``"03_nemu"``: its figures are saved as ``03_<name>.png`` and its
            expected wall time is printed (:func:`nemu_lib.budget.expected_time`: measured, else estimated).
        prefer: the device to use (default: CUDA, else Apple MPS, else CPU).
        retrain: train every model here instead of loading the shipped reference models
            (:func:`nemu_lib.reference.set_enabled`); models this session already trained in ``outputs/`` stay.
    """
    if in_colab():
        os.environ.setdefault("NEMU_DATA", f"{COLAB_ROOT}/data")
        os.environ.setdefault("NEMU_OUTPUTS", f"{COLAB_ROOT}/outputs")
    p = get_profile(profile)
    seed_everything(seed)
    dev = device(prefer)
    out = outputs_dir()
    viz.use_defaults(prefix=notebook.split("_")[0] if notebook else None)
    print(f"profile {p.name} | device {dev} ({torch.get_num_threads()} CPU threads) | torch {torch.__version__} "
          f"| nemu_lib {__version__}")
    reference.set_enabled(not retrain)
    uses_reference, line = reference.status(p.name, seed)
    if notebook:
        print(f"expected wall time: {expected_time(notebook, p, dev, reference=uses_reference)}")
    print(f"{line}\ndata    -> {data_dir()}\noutputs -> {out}")
    return p, dev, out
