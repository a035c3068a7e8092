"""Amortised RELAX against RELAX as its training goes on: the curve behind notebook 04's "worth N masks".

The profile's amortised-RELAX decoder (``relax`` objective, :func:`nemu_lib.runs.profile_config`; ``--steps``
changes the length of its cosine schedule) is trained in stretches of ``--every`` steps: the training stops and
resumes from its checkpoint, which gives the same weights as one uninterrupted run (``tests/test_train.py``).
After each stretch it explains notebook 04's held-out scenes, and the table gives, against RELAX's maps saved by
notebook 04 (or ``bench/quality.py``; N = ``eval_relax_masks``), the per-scene Pearson r of the importance and
of the uncertainty (median and mean), the scenes below r = 0.2, and the number of RELAX masks the importance is
worth (:func:`nemu_lib.evaluation.worth_n_masks`, on the convergence scenes). Figures, never pass/fail.

Usage::

    python bench/amortised_relax_curve.py --profile cpu --encoder simclr              # the profile's 300 steps, ~2 min
    python bench/amortised_relax_curve.py --profile cpu --steps 600 --every 100 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

import torch
from _common import add_device_arguments, json_quiet

from nemu_lib import evaluation as ev
from nemu_lib.config import PROFILES, get_profile, seed_everything
from nemu_lib.data import load_split, normalize
from nemu_lib.metrics import pearson
from nemu_lib.nem import NEMU
from nemu_lib.report import saved_maps
from nemu_lib.runs import profile_config, training_images
from nemu_lib.ssl import ENCODER_KINDS, pretrained_encoder
from nemu_lib.train import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: NEMU_PROFILE")
    parser.add_argument("--encoder", default="simclr", choices=ENCODER_KINDS)
    parser.add_argument("--steps", type=int, help="length of the schedule (default: the profile's nemu_relax_steps)")
    parser.add_argument("--every", type=int, default=50, help="evaluate after every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of a table")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    torch.set_num_threads(args.threads)
    p = get_profile(args.profile)
    with json_quiet(args.json):
        encoder = pretrained_encoder(args.encoder, p, seed=args.seed, device=args.device, progress=not args.json)
        saved = saved_maps(args.encoder, encoder, p, args.seed)
        if saved is None:
            sys.exit(f"no saved RELAX maps for the {args.encoder} encoder in the {p.name} profile: run notebook 04 "
                     f"or `python bench/quality.py --profile {p.name} --encoders {args.encoder}` first")
        reference = saved["maps"]["RELAX"].double()  # (N, H, W)
        reference_u = saved["maps"][ev.RELAX_UNCERTAINTY].double()
        n_ceiling = saved["convergence"].shape[1]
        x = normalize(load_split("test", p)["image"][:len(reference)], encoder.mean, encoder.std).to(args.device)
        x_train, x_val = training_images(encoder, p)  # as pretrained_nemu trains the profile's decoder
        cfg = profile_config("relax", p, args.seed)
        cfg = dataclasses.replace(cfg, steps=args.steps or cfg.steps)
        seed_everything(args.seed)  # the decoder's initialisation, as pretrained_nemu draws it
        model = NEMU(encoder, uncertainty=True).to(args.device)
        rows, start = [], time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="amortised-curve-") as out_dir:
            stops = sorted({*range(args.every, cfg.steps, args.every), cfg.steps})
            for i, stop in enumerate(stops):
                train(model, x_train, x_val, cfg, out_dir, ckpt_every=cfg.steps, val_every=cfg.steps,
                      resume=i > 0, stop_at=stop, progress=False)
                model.eval()
                with torch.inference_mode():
                    _, e, u = model.explain(x)  # (N, 1, H, W) each
                r = pearson(e[:, 0].double().cpu(), reference)  # (N,)
                r_u = pearson(u[:, 0].double().cpu(), reference_u)
                rows.append({"step": stop, "r_median": r.nanmedian().item(), "r_mean": r.nanmean().item(),
                             "uncertainty_r_median": r_u.nanmedian().item(),
                             "uncertainty_r_mean": r_u.nanmean().item(), "scenes_below_0.2": int((r < 0.2).sum()),
                             "worth_n_masks": ev.worth_n_masks(saved["ns"], saved["convergence"],
                                                               r[:n_ceiling].nanmean().item()),
                             "seconds": time.perf_counter() - start})
    if args.json:
        print(json.dumps({"profile": p.name, "encoder": args.encoder, "steps": cfg.steps,
                          "relax_masks": cfg.relax_masks, "batch_size": cfg.batch_size, "lr": cfg.lr,
                          "scenes": len(reference), "reference_n_masks": saved["ns"][-1], "rows": rows}))
        return
    print(f"profile {p.name}, {args.encoder} encoder: amortised RELAX, {cfg.steps}-step schedule "
          f"(K = {cfg.relax_masks} masks, {cfg.batch_size} scenes per step, lr {cfg.lr:g}) against "
          f"RELAX-{saved['ns'][-1]} on {len(reference)} held-out scenes\n")
    print(f"{'step':>6} {'r median':>9} {'r mean':>7} {'unc. median':>12} {'unc. mean':>10} {'r < 0.2':>8} "
          f"{'worth':>8} {'s':>6}")
    for row in rows:
        print(f"{row['step']:>6} {row['r_median']:>9.3f} {row['r_mean']:>7.3f} {row['uncertainty_r_median']:>12.3f} "
              f"{row['uncertainty_r_mean']:>10.3f} {row['scenes_below_0.2']:>8} "
              f"{ev.describe_worth(row['worth_n_masks'], saved['ns']):>8} {row['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
