"""Helpers shared by the bench scripts (run as ``python bench/<script>.py``, so this imports as ``_common``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
from collections.abc import Iterator

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_per_case(text: str | None, defaults: dict[str, int], known: list[str], option: str) -> dict[str, int]:
    """``"500"`` (every case) or ``"small=500,resnet18=100"`` over ``defaults`` (one entry per chosen case)."""
    n = dict(defaults)
    if not text:
        return n
    if "=" not in text:
        return dict.fromkeys(n, int(text))
    for item in text.split(","):
        key, value = item.split("=")
        if key not in known:
            raise SystemExit(f"{option}: unknown case {key!r}; choose among {sorted(known)}")
        if key in n:
            n[key] = int(value)
    return n


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cuda when available) and ``--threads`` (the CPUs this process may use)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the CPUs this process may use)")


@contextlib.contextmanager
def json_quiet(enabled: bool) -> Iterator[None]:
    """With ``--json``, send what the library prints while measuring (the estimates of long steps, see
    ``nemu_lib.budget.announce``) to stderr, so that stdout holds nothing but the JSON document."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def machine_info(device: torch.device) -> dict:
    """What a bench's JSON records about where it ran: torch, threads, device and its name, glibc tunables."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": platform.machine(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
