"""Checkpoints that are never half-written and load without running pickled code.

Writes go to a temporary file in the target folder, then ``os.replace`` moves it into place (atomic on
POSIX and Windows). Reads use ``torch.load(..., weights_only=True)``, so a checkpoint holds only tensors
and plain Python containers; each carries a ``config`` dict that says what model it belongs to, and
:func:`load_checkpoint` compares it with what the caller expects.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place atomically.

    A failure leaves any earlier file at ``path`` untouched and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(obj: Mapping, path: str | os.PathLike) -> Path:
    """Write ``obj`` (a dict of tensors and plain values) to ``path`` atomically; return the path."""
    return atomic_write(path, lambda f: torch.save(dict(obj), f))


def load_checkpoint(
    path: str | os.PathLike,
    expect: Mapping | None = None,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Args:
        path: the file.
        expect: entries that ``checkpoint["config"]`` must match (e.g. architecture, image size);
            a mismatch raises ``ValueError`` naming every differing key.
        map_location: where tensors land.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first or check the path")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise ValueError(f"{path} is not a nemu checkpoint (no 'config' entry)")
    if expect:
        config = ckpt["config"]
        changes = [c for k, v in expect.items() for c in _changes(k, _normalise(config.get(k)), _normalise(v))]
        if changes:
            raise CheckpointMismatch(path, changes)
    return ckpt


def restore_optimizer(ckpt: Mapping, optimizer: torch.optim.Optimizer, total_steps: int, path: Path) -> None:
    """Load a training checkpoint's ``optimizer`` state; a finished run's checkpoint may do without one.

    The shipped reference models (:mod:`nemu_lib.reference`) keep a finished run's weights, schedule, random state
    and history but not the optimiser's moments (two thirds of the file): nothing is left to train with them.
    """
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    elif ckpt["step"] < total_steps:
        raise ValueError(f"{path} holds no optimiser state, so its run cannot go on from step {ckpt['step']} of "
                         f"{total_steps}: delete it to train anew")


def finished(ckpt: Mapping) -> dict:
    """``ckpt`` without its optimiser state when its run is finished (step = the configured steps), else as it is."""
    steps = ckpt.get("config", {}).get("train", {}).get("steps")
    done = "optimizer" in ckpt and steps is not None and ckpt.get("step") == steps
    return {k: v for k, v in ckpt.items() if not (done and k == "optimizer")}


class CheckpointMismatch(ValueError):
    """A checkpoint whose ``config`` differs from what the caller expects; ``changes`` lists each difference
    as ``"training.epochs: 12 -> 20"`` (the checkpoint's value, then the expected one)."""

    def __init__(self, path: Path, changes: list[str]) -> None:
        self.path, self.changes = path, changes
        super().__init__(f"checkpoint {path} was built for another model ({'; '.join(changes)}); "
                         "build the model with the checkpoint's config or delete the file to retrain")


def _changes(key: str, have: object, want: object) -> list[str]:
    """The differing leaves of two normalised configs, as ``"key.sub: have -> want"``.

    >>> _changes("training", {"epochs": 12, "lr": 0.002}, {"epochs": 20, "lr": 0.002})
    ['training.epochs: 12 -> 20']
    """
    if isinstance(have, dict) and isinstance(want, dict):
        return [c for k in {**have, **want} for c in _changes(f"{key}.{k}", have.get(k), want.get(k))]
    return [] if have == want else [f"{key}: {have!r} -> {want!r}"]


def _normalise(value: object) -> object:
    """Tuples and lists compare equal at any depth (torch.save keeps tuples; configs may come from JSON)."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_normalise(v) for v in value]
    return value
