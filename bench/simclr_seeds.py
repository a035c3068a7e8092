"""SimCLR's shape probe against its untrained initialisation, seed by seed (notebook 01's check, outside it).

For every seed, exactly as notebook 01 measures it: the small ResNet is built after ``seed_everything(seed)``
(so the untrained control and SimCLR's starting point are the same network, as
``pretrained_encoder("random" | "simclr", profile, seed)`` builds them), SimCLR trains a copy on the profile's
training scenes (:func:`nemu_lib.ssl.train_simclr`), and both networks are probed: ``z = f(normalize(x))``
(the pooled last stage, :func:`nemu_lib.probes.embed`) of the training and test scenes, a logistic regression
on standardised ``z`` fit on the training scenes for the main object's shape and scored on the test scenes
(:func:`nemu_lib.probes.linear_probe` with ``seed``). The margin is SimCLR's accuracy minus the untrained
network's; notebook 01 asserts a margin above max(0.05, 3 standard errors) for the profile's seed 0. Training time is
reported as wall-clock seconds and as this process's CPU seconds (all threads), which a busy machine moves less.

Recipe settings can be overridden for experiments (``--epochs``, ``--batch-size``, ``--lr``, ``--temperature``,
``--widths``, ``--aug`` for :class:`nemu_lib.augment.SimCLRAugment`'s arguments). Trained encoders are saved
under ``--save-dir`` (default ``outputs/bench/simclr_seeds``), never in ``outputs/encoders``, so the notebooks'
cached encoders are left alone.

Usage::

    python bench/simclr_seeds.py --profile cpu                        # seeds 0, 1, 2: ~5 min each on 2 cores
    python bench/simclr_seeds.py --profile cpu --seeds 1,2 --aug "scale=(0.4,1.0),p_blur=0.8" --json
    python bench/simclr_seeds.py --profile smoke --seeds 0
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import add_device_arguments, json_quiet, machine_info

from nemu_lib.checkpoint import save_checkpoint
from nemu_lib.config import PROFILES, get_profile, outputs_dir, seed_everything
from nemu_lib.data import load_split, normalize
from nemu_lib.encoders import Encoder, build_encoder
from nemu_lib.probes import accuracy_se, embed, linear_probe
from nemu_lib.ssl import encoder_path, train_simclr, training_steps


def parse_kwargs(text: str | None) -> dict:
    """``"scale=(0.4,1.0),p_blur=0.8"`` -> ``{"scale": (0.4, 1.0), "p_blur": 0.8}`` (values are Python literals)."""
    if not text:
        return {}
    call = ast.parse(f"f({text})", mode="eval").body
    if not isinstance(call, ast.Call) or call.args:
        raise SystemExit(f"--aug: expected key=value pairs, got {text!r}")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def probe(encoder: Encoder, train: dict, test: dict, seed: int) -> float:
    """Notebook 01's linear probe: main-object shape from ``z`` of the normalised scenes, fit on train, test acc."""
    z_train, z_test = embed(encoder, normalize(train["image"])), embed(encoder, normalize(test["image"]))  # (N, D)
    return linear_probe(z_train, train["label"], z_test, test["label"], seed=seed)


def run_seed(p, seed: int, augment: dict, device: str, save_dir: Path, label: str, progress: bool) -> dict:
    """Train SimCLR for one seed; probe it and its untrained initialisation; save the trained encoder."""
    train, test = load_split("train", p), load_split("test", p)
    seed_everything(seed)
    untrained = build_encoder("small_resnet", widths=p.encoder_widths).to(device)  # as pretrained_encoder builds it
    simclr = copy.deepcopy(untrained)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = train_simclr(simclr, train["image"], epochs=p.ssl_epochs, batch_size=p.batch_size, lr=p.lr,
                           temperature=p.temperature, seed=seed, progress=progress, augment=augment)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    acc_untrained, acc_simclr = probe(untrained, train, test, seed), probe(simclr, train, test, seed)
    path = save_dir / f"{label}-{p.name}-seed{seed}.pt"
    save_checkpoint({"config": {"profile": p.as_dict(), "seed": seed, "augment": augment,
                                "encoder": simclr.config}, "state_dict": simclr.state_dict(),
                     "history": history}, path)
    return {"seed": seed, "untrained": acc_untrained, "simclr": acc_simclr, "margin": acc_simclr - acc_untrained,
            "se": accuracy_se(acc_simclr, len(test["label"])), "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds,
            "final_loss": history[-1], "steps": len(history), "encoder": str(path)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--epochs", type=int, help="SimCLR epochs (default: the profile's ssl_epochs)")
    parser.add_argument("--batch-size", type=int, help="default: the profile's batch_size")
    parser.add_argument("--lr", type=float, help="default: the profile's lr")
    parser.add_argument("--temperature", type=float, help="default: the profile's temperature")
    parser.add_argument("--widths", help="encoder widths, e.g. 16,32,64,128 (default: the profile's)")
    parser.add_argument("--aug", help='SimCLRAugment keyword arguments, e.g. "scale=(0.4,1.0),p_blur=0.8"')
    parser.add_argument("--label", default="simclr", help="names the saved encoders <label>-<profile>-seed<s>.pt")
    parser.add_argument("--save-dir", type=Path, help="default: outputs/bench/simclr_seeds")
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of a table")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = get_profile(args.profile)
    overrides = {k: v for k, v in {"ssl_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                   "temperature": args.temperature}.items() if v is not None}
    if args.widths:
        overrides["encoder_widths"] = tuple(int(w) for w in args.widths.split(","))
    p = replace(base, **overrides)
    augment = parse_kwargs(args.aug)
    save_dir = (args.save_dir or outputs_dir() / "bench" / "simclr_seeds").resolve()
    if save_dir == encoder_path("simclr", base).parent.resolve():
        raise SystemExit(f"--save-dir: {save_dir} holds the notebooks' encoders; choose another folder")
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = training_steps(p.n_train, p.ssl_epochs, p.batch_size)
    rows = []
    with json_quiet(args.json):
        for seed in seeds:
            rows.append(run_seed(p, seed, augment, args.device, save_dir, args.label, progress=not args.json))
            if not args.json:
                r = rows[-1]
                print(f"seed {seed}: untrained {r['untrained']:.3f}, SimCLR {r['simclr']:.3f}, "
                      f"margin {r['margin']:+.3f}, {r['train_seconds']:.0f} s", flush=True)
    mean = {k: statistics.mean(r[k] for r in rows)
            for k in ("untrained", "simclr", "margin", "train_seconds", "train_cpu_seconds")}
    recipe = {"profile": p.name, "epochs": p.ssl_epochs, "batch_size": p.batch_size, "steps": steps, "lr": p.lr,
              "temperature": p.temperature, "widths": list(p.encoder_widths), "augment": augment}
    if args.json:
        json.dump({"recipe": recipe, "seeds": rows, "mean": mean, "min_margin": min(r["margin"] for r in rows),
                   "machine": machine_info(torch.device(args.device))}, sys.stdout, indent=2, default=str)
        print()
        return
    print(f"\nprofile {p.name}: {steps} steps of {2 * p.batch_size} views, lr {p.lr}, tau {p.temperature}, "
          f"widths {p.encoder_widths}, augment {augment or 'defaults'}; {args.threads} threads on {args.device}\n")
    print(f"{'seed':>6}{'untrained':>11}{'SimCLR':>9}{'margin':>9}{'train s':>10}{'CPU s':>8}")
    for r in [*rows, {"seed": "mean", **mean}]:
        print(f"{r['seed']:>6}{r['untrained']:>11.3f}{r['simclr']:>9.3f}{r['margin']:>+9.3f}"
              f"{r['train_seconds']:>10.0f}{r['train_cpu_seconds']:>8.0f}")


if __name__ == "__main__":
    main()
