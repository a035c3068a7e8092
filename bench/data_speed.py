"""Can the Shapes generator keep up with training? Scenes/s against one small-ResNet training step.

Measures, in one process (absolute CPU timings move between processes; the ratio is what to compare):

- ``ShapesScenes`` generation throughput (scenes/s, one process, ``dataset[i]`` including the tensor
  conversion) at 32, 64 and 128 px;
- the training throughput of the small ResNet (``SmallResNet(widths=(16, 32, 64, 128))``): forward,
  backward and an AdamW step on a batch of 128 images at 64 px (images/s);
- the ratio generation / training at 64 px: above 1, one data-loading worker keeps the model busy;
  below 1, generate with ``num_workers >= 1 / ratio`` workers or cache the tensors;
- a whole split as :func:`nemu_lib.data.load_split` gets it (``--split-size`` scenes at 64 px, default
  4,000: the ``cpu`` profile's training split): rendered by :func:`nemu_lib.scene_cache.render_split` in
  one process and with worker processes (scenes/s; the two results must be identical), written to the
  disk cache and loaded back from it (scenes/s, file size). The file is read right after it is written,
  so the load rate is that of a warm page cache (a later notebook on the same machine sees the same).

Generation runs in one process with NumPy (single-threaded); training uses torch's threads
(``--threads`` to fix them). On a busy machine, OpenMP spin-waiting can slow the training step a lot:
compare runs made under the same load.

Usage::

    python bench/data_speed.py            # a readable table
    python bench/data_speed.py --json     # one JSON dict
    python bench/data_speed.py --device cuda --json   # the training step on a GPU (make gpu-check)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _common import json_quiet, sync

from nemu_lib import scene_cache
from nemu_lib.data import GENERATOR_VERSION, ShapesScenes, normalize
from nemu_lib.encoders import SmallResNet


def generation_rate(image_size: int, seconds: float, min_scenes: int = 10) -> dict:
    """Scenes per second for ``ShapesScenes[i]`` at ``image_size`` px, timed for about ``seconds``."""
    ds = ShapesScenes("train", size=100_000, image_size=image_size, seed=0)
    ds[0]  # warm-up (imports, allocator)
    n, start = 0, time.perf_counter()
    while n < min_scenes or time.perf_counter() - start < seconds:
        ds[1 + n]
        n += 1
    elapsed = time.perf_counter() - start
    return {"image_size": image_size, "scenes": n, "seconds": elapsed, "scenes_per_s": n / elapsed}


def training_rate(seconds: float, batch_size: int = 128, image_size: int = 64, min_steps: int = 3,
                  device: str = "cpu") -> dict:
    """Images per second for forward + backward + AdamW step of the small ResNet on ``device``."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = SmallResNet(widths=(16, 32, 64, 128)).train().to(dev)
    head = torch.nn.Linear(model.embed_dim, 6).to(dev)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    x = normalize(torch.rand(batch_size, 3, image_size, image_size)).to(dev)
    y = torch.randint(0, 6, (batch_size,)).to(dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        loss.backward()
        opt.step()
        sync(dev)  # CUDA: time the work, not its queueing (nothing on a CPU)

    step()  # warm-up (kernel selection, optimizer state)
    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < seconds:
        step()
        n += 1
    elapsed = time.perf_counter() - start
    return {"device": str(dev), "image_size": image_size, "batch_size": batch_size, "steps": n, "seconds": elapsed,
            "seconds_per_step": elapsed / n, "images_per_s": n * batch_size / elapsed}


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def split_rates(size: int, image_size: int = 64, workers: int | None = None, loads: int = 3) -> dict:
    """Render a training split in one process and in ``workers`` processes, write it to the disk cache
    and load it back (best of ``loads``): seconds and scenes/s for each, and the file's size."""
    if workers is None:
        workers = scene_cache.default_workers(max(size, scene_cache.PARALLEL_MIN_SCENES))
    split, seed = "train", 0

    def rate(seconds: float) -> dict:
        return {"seconds": seconds, "scenes_per_s": size / seconds}

    one, t_one = _timed(lambda: scene_cache.render_split(split, size, image_size, seed, num_workers=0,
                                                          progress=False))
    result = {"split": split, "size": size, "image_size": image_size, "generator_version": GENERATOR_VERSION,
              "memory_bytes": sum(t.numel() * t.element_size() for t in one.values()),
              "render_one_process": rate(t_one)}
    if workers >= 2:
        many, t_many = _timed(lambda: scene_cache.render_split(split, size, image_size, seed,
                                                                num_workers=workers, progress=False))
        result["render_workers"] = {"workers": workers, **rate(t_many)}
        result["workers_identical"] = list(one) == list(many) and all(torch.equal(one[k], many[k]) for k in one)
    with tempfile.TemporaryDirectory() as tmp:
        path = scene_cache.cache_path(split, size, image_size, seed, directory=Path(tmp))
        key = scene_cache.cache_key(split, size, image_size, seed)
        _, t_write = _timed(lambda: scene_cache.save_split(one, path, key))
        result["cache_write"] = rate(t_write)
        result["file_bytes"] = path.stat().st_size
        t_load = min(_timed(lambda: scene_cache.load_split_file(path, key))[1] for _ in range(loads))
        result["cache_load"] = rate(t_load)
        back = scene_cache.load_split_file(path, key)
        result["cache_identical"] = list(one) == list(back) and all(torch.equal(one[k], back[k]) for k in one)
    return result


def run(seconds: float, split_size: int = 4000, workers: int | None = None, device: str = "cpu") -> dict:
    generation = [generation_rate(size, seconds) for size in (32, 64, 128)]
    training = training_rate(2 * seconds, device=device)
    at_64 = next(g for g in generation if g["image_size"] == 64)["scenes_per_s"]
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "generation": generation,
        "training": training,
        "ratio_generation_over_training_64px": at_64 / training["images_per_s"],
        "split": split_rates(split_size, 64, workers) if split_size > 0 else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of a table")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="time per generation measurement (training gets twice this); default 4")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the training step (default: torch's choice)")
    parser.add_argument("--device", default="cpu",
                        help="device of the training step (default cpu; scenes are always generated on the CPU)")
    parser.add_argument("--split-size", type=int, default=4000,
                        help="scenes in the split rendered, cached and loaded (64 px; default 4000, 0 skips)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes for the parallel render (default: one per CPU, at most 8)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with json_quiet(args.json):
        result = run(args.seconds, args.split_size, args.workers, args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    on = f", training on {args.device}" if args.device != "cpu" else ""
    print(f"torch {result['torch']}, {result['threads']} threads, {result['machine']}{on}")
    print(f"{'what':<44}{'rate':>14}")
    for g in result["generation"]:
        label = f"ShapesScenes generation, {g['image_size']} px"
        print(f"{label:<44}{g['scenes_per_s']:>9.1f} sc/s")
    t = result["training"]
    label = f"SmallResNet train step, {t['image_size']} px, batch {t['batch_size']}"
    print(f"{label:<44}{t['images_per_s']:>9.1f} im/s  ({t['seconds_per_step']:.2f} s/step)")
    ratio = result["ratio_generation_over_training_64px"]
    print(f"{'ratio generation / training at 64 px':<44}{ratio:>14.2f}")
    if ratio < 1:
        print(f"-> generation is the bottleneck: use >= {int(1 / ratio) + 1} DataLoader workers or cache tensors")
    else:
        print("-> one process generates scenes faster than the model trains on them")
    sp = result["split"]
    if sp is None:
        return
    print(f"{sp['split']} split, {sp['size']} scenes at {sp['image_size']} px (load_split):")
    print(f"{'  render, 1 process':<44}{sp['render_one_process']['scenes_per_s']:>9.1f} sc/s"
          f"  ({sp['render_one_process']['seconds']:.1f} s)")
    if "render_workers" in sp:
        w = sp["render_workers"]
        same = "identical" if sp["workers_identical"] else "DIFFERENT from 1 process"
        print(f"{'  render, ' + str(w['workers']) + ' worker processes':<44}{w['scenes_per_s']:>9.1f} sc/s"
              f"  ({w['seconds']:.1f} s, {same})")
    print(f"{'  write to the disk cache':<44}{sp['cache_write']['scenes_per_s']:>9.1f} sc/s"
          f"  ({sp['cache_write']['seconds']:.2f} s, {sp['file_bytes'] / 2**20:.0f} MiB file,"
          f" {sp['memory_bytes'] / 2**20:.0f} MiB in memory)")
    same = "identical" if sp["cache_identical"] else "DIFFERENT from the render"
    print(f"{'  load from the disk cache':<44}{sp['cache_load']['scenes_per_s']:>9.1f} sc/s"
          f"  ({sp['cache_load']['seconds']:.2f} s, {same})")


if __name__ == "__main__":
    main()
