"""Rendered Shapes splits kept on disk, so that each split is rendered once and not once per notebook.

Rendering runs at a few hundred scenes per second per process; every notebook is its own process, and
the in-process cache of :func:`nemu_lib.data.load_split` dies with it. :func:`cached_split` keeps each
stacked split (exactly what :meth:`nemu_lib.data.ShapesScenes.stack` returns) in one file under
``outputs_dir() / "cache" / "shapes"``, named after everything the scenes depend on::

    shapes-{split}-n{size}-{image_size}px-seed{seed}-gen{GENERATOR_VERSION}.pt

so a new :data:`nemu_lib.data.GENERATOR_VERSION` misses the cache, renders again and removes the files
of the same split written by other generator versions. The scenes stay the source of truth: a missing,
stale or unreadable file is rendered again (an unreadable one with a one-line warning), never an error.
``NEMU_SCENE_CACHE=0`` turns the disk cache off.

Storage is lossless: loading gives back tensors equal (``torch.equal``) to a fresh render. The images
are arbitrary float32 values in [0, 1] (the generator adds Gaussian noise after drawing; only the
clipped 0s and 1s are multiples of 1/255), so they are stored as float32: uint8 would not round-trip.
Boolean masks are bit-packed (1 bit per pixel) and integer fields are narrowed to the smallest integer
dtype that holds their values; both are expanded back on loading. Files are written atomically
(:func:`nemu_lib.checkpoint.atomic_write`) and read with ``torch.load(..., weights_only=True)``.

Large splits render in worker processes (:func:`render_split`); each scene is a pure function of
``(seed, global index)``, so the result is the same as one process's.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import data
from .checkpoint import atomic_write
from .config import outputs_dir
from .progress import tqdm

FORMAT_VERSION = 1  # layout of the cache file itself (encoding of fields); bump when it changes
ENV_SWITCH = "NEMU_SCENE_CACHE"  # "0" (or "false", "no", "off") turns the disk cache off
PARALLEL_MIN_SCENES = 2_000  # below this, starting worker processes costs more than it saves
MAX_AUTO_WORKERS = 8
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)  # narrowest first


# ---------------------------------------------------------------- rendering

def _render_chunk(seed: int, image_size: int, first: int, stop: int) -> dict[str, np.ndarray]:
    """Scenes with global indices ``first .. stop - 1``, each field stacked: ``(stop - first, ...)``."""
    scenes = [data.render_scene(seed, g, image_size) for g in range(first, stop)]
    chunk = {k: np.stack([np.asarray(s[k]) for s in scenes]) for k in scenes[0]}
    chunk["index"] = np.arange(first, stop, dtype=np.int64)
    return chunk


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours CPU pinning and container limits (Linux)
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(size: int) -> int:
    """Worker processes for a split of ``size`` scenes: 0 (this process) below ``PARALLEL_MIN_SCENES``,
    else one per CPU up to ``MAX_AUTO_WORKERS``."""
    cpus = _cpus()
    return 0 if size < PARALLEL_MIN_SCENES or cpus < 2 else min(cpus, MAX_AUTO_WORKERS)


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds (spawn and forkserver re-import torch: seconds each). The
    # workers only run NumPy code, so fork's hazards in a threaded parent (locks held by other threads)
    # do not reach them; torch's DataLoader relies on the same. macOS and Windows get spawn.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _chunks(first: int, size: int, pieces: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` global index ranges covering ``first .. first + size - 1`` in about ``pieces`` parts."""
    step = max(1, math.ceil(size / pieces))
    for start in range(first, first + size, step):
        yield start, min(start + step, first + size)


def render_split(
    split: str,
    size: int,
    image_size: int = 64,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Render a split: the same tensors as ``ShapesScenes(split, size, image_size, seed).stack()``.

    Args:
        split, size, image_size, seed: as :class:`nemu_lib.data.ShapesScenes`.
        num_workers: worker processes; ``0`` or ``1`` renders in this process; ``None`` chooses with
            :func:`default_workers` (workers only for splits of at least ``PARALLEL_MIN_SCENES``).
        progress: show a tqdm progress bar.

    Returns:
        ``image (N, 3, S, S)`` float32, ``object_mask (N, S, S)`` bool, ``instance_masks (N, MAX_OBJECTS,
        S, S)``, ``concepts (N, 4, S, S)`` uint8, ``label (N,)``, ``keypoints (N, NUM_KEYPOINTS, 2)``,
        ``keypoint_valid``, ``num_objects`` and ``index (N,)`` (global indices), as in
        :func:`nemu_lib.data.render_scene`.
    """
    ds = data.ShapesScenes(split, size, image_size, seed)  # validates the arguments
    first = ds.global_index(0)
    workers = default_workers(size) if num_workers is None else num_workers
    workers = min(workers, size)
    out: dict[str, np.ndarray] = {}

    def put(start: int, chunk: dict[str, np.ndarray]) -> None:
        if not out:  # allocate from the first chunk's fields, shapes and dtypes
            out.update({k: np.empty((size, *v.shape[1:]), dtype=v.dtype) for k, v in chunk.items()})
        i = start - first
        for k, v in chunk.items():
            out[k][i : i + len(v)] = v

    with tqdm(total=size, desc=f"Shapes {split}", unit="scene", disable=not progress) as bar:
        if workers <= 1:
            for start, stop in _chunks(first, size, math.ceil(size / 100)):  # chunks of <= 100 scenes
                put(start, _render_chunk(seed, image_size, start, stop))
                bar.update(stop - start)
        else:
            # At least 8 chunks per worker (a smooth progress bar, balanced load), of at most 500 scenes.
            pieces = min(max(8 * workers, math.ceil(size / 500)), size)
            ranges = list(_chunks(first, size, pieces))
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
            try:
                with warnings.catch_warnings():  # Python >= 3.12 warns on fork() in a threaded process
                    warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                                            category=DeprecationWarning)
                    futures = {pool.submit(_render_chunk, seed, image_size, a, b): a for a, b in ranges}
                for future in concurrent.futures.as_completed(futures):
                    chunk = future.result()
                    put(futures.pop(future), chunk)  # pop: the future holds its chunk until dropped
                    bar.update(len(chunk["index"]))
                    del future, chunk
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # an interrupt stops the queued chunks
    return {k: torch.from_numpy(v) for k, v in out.items()}


# ---------------------------------------------------------------- encoding for disk

def _encode(t: Tensor) -> dict:
    """A lossless compact form of ``t``: bools bit-packed, integers narrowed, floats as they are."""
    entry = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.dtype == torch.bool:
        entry["bits"] = torch.from_numpy(np.packbits(t.numpy().reshape(-1)))  # (ceil(numel / 8),) uint8
    elif not t.is_floating_point() and t.numel():
        lo, hi = int(t.min()), int(t.max())
        narrow = next(d for d in _INT_DTYPES if torch.iinfo(d).min <= lo and hi <= torch.iinfo(d).max)
        entry["data"] = t.to(narrow)
    else:
        entry["data"] = t
    return entry


def _decode(entry: dict) -> Tensor:
    """Inverse of :func:`_encode`; raises ``ValueError`` when the entry does not decode to its shape and dtype."""
    dtype, shape = getattr(torch, entry["dtype"]), tuple(entry["shape"])
    if "bits" in entry:
        numel = math.prod(shape)
        if entry["bits"].shape != (-(-numel // 8),):  # unpackbits would pad a short array with zeros
            raise ValueError(f"{tuple(entry['bits'].shape)} packed bytes for {numel} bits")
        flat = np.unpackbits(entry["bits"].numpy(), count=numel)  # (numel,) uint8 0 / 1
        t = torch.from_numpy(flat.view(np.bool_).reshape(shape))
    else:
        t = entry["data"].to(dtype)
    if t.dtype != dtype or t.shape != shape:
        raise ValueError(f"field decodes to {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    return t


# ---------------------------------------------------------------- the cache

def cache_enabled() -> bool:
    """False when ``NEMU_SCENE_CACHE`` is ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    """``outputs_dir() / "cache" / "shapes"`` (``NEMU_OUTPUTS`` moves it)."""
    return outputs_dir() / "cache" / "shapes"


def _stem(split: str, size: int, image_size: int, seed: int) -> str:
    return f"shapes-{split}-n{size}-{image_size}px-seed{seed}-gen"


def cache_path(split: str, size: int, image_size: int = 64, seed: int = 0, directory: Path | None = None) -> Path:
    """The cache file of a split under the current :data:`nemu_lib.data.GENERATOR_VERSION`."""
    directory = cache_dir() if directory is None else Path(directory)
    return directory / f"{_stem(split, size, image_size, seed)}{data.GENERATOR_VERSION}.pt"


def cache_key(split: str, size: int, image_size: int, seed: int) -> dict:
    """What a split's scenes depend on; stored in its file and compared on loading."""
    return {"split": split, "size": size, "image_size": image_size, "seed": seed,
            "generator_version": data.GENERATOR_VERSION}


def save_split(tensors: dict[str, Tensor], path: Path, key: dict) -> Path:
    """Write a stacked split to ``path`` atomically, with the ``key`` it was rendered for."""
    obj = {"format": FORMAT_VERSION, "key": key, "fields": {k: _encode(v) for k, v in tensors.items()}}
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_split_file(path: Path, key: dict | None = None) -> dict[str, Tensor]:
    """Read a file written by :func:`save_split`; raises if it is unreadable or holds another ``key``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION:
        raise ValueError(f"not a Shapes cache file of format {FORMAT_VERSION}")
    if key is not None and obj.get("key") != key:
        raise ValueError(f"holds {obj.get('key')}, expected {key}")
    tensors = {k: _decode(v) for k, v in obj["fields"].items()}
    lengths = {len(t) for t in tensors.values()}
    if len(lengths) != 1 or (key is not None and lengths != {key["size"]}):
        raise ValueError(f"fields are missing or of the wrong length ({sorted(lengths)})")
    return tensors


def _remove_other_versions(path: Path, stem: str) -> None:
    for old in path.parent.glob(f"{stem}*.pt"):
        if old.name != path.name:
            try:
                old.unlink(missing_ok=True)
            except OSError:
                pass  # someone else's file, or a read-only folder: it only costs disk space


def cached_split(
    split: str,
    size: int,
    image_size: int = 64,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
    directory: Path | None = None,
) -> dict[str, Tensor]:
    """The stacked split (as :func:`render_split`), from the disk cache when there, else rendered and stored.

    ``directory`` overrides :func:`cache_dir`. With ``NEMU_SCENE_CACHE=0`` this only renders. A file that
    cannot be read is rendered again and replaced (with a one-line warning); a file that cannot be
    written is skipped with a warning.
    """
    if not cache_enabled():
        return render_split(split, size, image_size, seed, num_workers, progress)
    data.ShapesScenes(split, size, image_size, seed)  # validates the arguments before touching the disk
    path, key = cache_path(split, size, image_size, seed, directory), cache_key(split, size, image_size, seed)
    if path.is_file():
        try:
            return load_split_file(path, key)
        except FileNotFoundError:
            pass  # removed meanwhile (another process replaced it): render
        except Exception as err:  # a damaged file can fail anywhere in zipfile, unpickling or decoding
            reason = (str(err).splitlines() or [""])[0][:200]
            warnings.warn(f"Shapes cache {path} is unreadable ({type(err).__name__}: {reason}); rendering it again",
                          RuntimeWarning, stacklevel=2)
    tensors = render_split(split, size, image_size, seed, num_workers, progress)
    try:
        save_split(tensors, path, key)
    except OSError as err:
        warnings.warn(f"could not write the Shapes cache {path} ({err}); continuing without it",
                      RuntimeWarning, stacklevel=2)
    else:
        _remove_other_versions(path, _stem(split, size, image_size, seed))
    return tensors
