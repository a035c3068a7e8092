"""Can the Shapes generator keep up with training? Scenes/s against one small-ResNet training step.

Measures, in one process (absolute CPU timings move between processes; the ratio is what to compare):

- ``ShapesScenes`` generation throughput (scenes/s, one process, ``dataset[i]`` including the tensor
  conversion) at 32, 64 and 128 px;
- the training throughput of the small ResNet (``SmallResNet(widths=(16, 32, 64, 128))``): forward,
  backward and an AdamW step on a batch of 128 images at 64 px (images/s);
- the ratio generation / training at 64 px: above 1, one data-loading worker keeps the model busy;
  below 1, generate with ``num_workers >= 1 / ratio`` workers or cache the tensors.

Generation runs in one process with NumPy (single-threaded); training uses torch's threads
(``--threads`` to fix them). On a busy machine, OpenMP spin-waiting can slow the training step a lot:
compare runs made under the same load.

Usage::

    python bench/data_speed.py            # a readable table
    python bench/data_speed.py --json     # one JSON dict
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from nemu_lib.data import ShapesScenes, normalize
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


def training_rate(seconds: float, batch_size: int = 128, image_size: int = 64, min_steps: int = 3) -> dict:
    """Images per second for forward + backward + AdamW step of the small ResNet."""
    torch.manual_seed(0)
    model = SmallResNet(widths=(16, 32, 64, 128)).train()
    head = torch.nn.Linear(model.embed_dim, 6)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    x = normalize(torch.rand(batch_size, 3, image_size, image_size))
    y = torch.randint(0, 6, (batch_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        loss.backward()
        opt.step()

    step()  # warm-up (kernel selection, optimizer state)
    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < seconds:
        step()
        n += 1
    elapsed = time.perf_counter() - start
    return {"image_size": image_size, "batch_size": batch_size, "steps": n, "seconds": elapsed,
            "seconds_per_step": elapsed / n, "images_per_s": n * batch_size / elapsed}


def run(seconds: float) -> dict:
    generation = [generation_rate(size, seconds) for size in (32, 64, 128)]
    training = training_rate(2 * seconds)
    at_64 = next(g for g in generation if g["image_size"] == 64)["scenes_per_s"]
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "generation": generation,
        "training": training,
        "ratio_generation_over_training_64px": at_64 / training["images_per_s"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of a table")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="time per generation measurement (training gets twice this); default 4")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the training step (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args.seconds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"torch {result['torch']}, {result['threads']} threads, {result['machine']}")
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


if __name__ == "__main__":
    main()
