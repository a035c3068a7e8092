"""The explanation-quality table of notebook 04, outside the notebook.

Every method (NEM-U, NEM-U contrastive, amortised RELAX, RELAX with the profile's N, U-RELAX, label-free
gradient and integrated gradients, random) on the profile's held-out Shapes scenes, for each encoder, scored
on locality against the main object, complexity, sparseness, deletion and insertion AUC, fidelity to RELAX
and seconds per image, plus RELAX's noise ceiling, "NEM-U is worth N masks", the randomisation test and
RELAX's reference mode on mosaics (:func:`nemu_lib.report.evaluate_encoder`). Encoders and decoders are
loaded from ``outputs/`` or trained; the encoder-only maps (RELAX and the rest) are cached in
``outputs/evaluation`` and shared with the notebook, so a second run only re-runs the decoders and re-scores
(``--recompute`` explains everything again). Figures, never pass/fail.

Usage::

    python bench/quality.py --profile cpu              # Markdown tables (20-30 min the first time on 2 cores)
    python bench/quality.py --profile cpu --json       # one JSON dict: the tables and headline figures
    python bench/quality.py --profile smoke --encoders random
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import add_device_arguments, cpu_name, json_quiet

from nemu_lib.config import PROFILES, get_profile
from nemu_lib.report import evaluate_encoder, results_record
from nemu_lib.ssl import ENCODER_KINDS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: NEMU_PROFILE")
    parser.add_argument("--encoders", default="simclr,supervised",
                        help=f"comma-separated, among {', '.join(ENCODER_KINDS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recompute", action="store_true", help="explain again even if maps are cached")
    parser.add_argument("--json", action="store_true", help="print one JSON dict instead of tables")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    kinds = args.encoders.split(",")
    unknown = [k for k in kinds if k not in ENCODER_KINDS]
    if unknown:
        raise SystemExit(f"--encoders: unknown {unknown}; choose among {', '.join(ENCODER_KINDS)}")
    torch.set_num_threads(args.threads)
    p = get_profile(args.profile)
    start = time.perf_counter()
    with json_quiet(args.json):
        evaluations = [evaluate_encoder(k, p, seed=args.seed, device=args.device, recompute=args.recompute,
                                        progress=not args.json) for k in kinds]
    record = results_record(evaluations)
    info = {"profile": p.name, "device": args.device, "threads": args.threads, "cpu": cpu_name(),
            "torch": torch.__version__, "images": p.extra["eval_images"], "relax_masks": p.extra["eval_relax_masks"],
            "seconds": time.perf_counter() - start}
    if args.json:
        json.dump({"info": info, "encoders": record}, sys.stdout, indent=2, default=float)
        print()
        return
    print(f"profile {p.name}, {info['images']} test scenes, RELAX N = {info['relax_masks']}, device {args.device} "
          f"({args.threads} threads, {info['cpu']}), {info['seconds']:.0f} s\n")
    for e in evaluations:
        r = record[e.encoder_kind]
        print(f"## {e.encoder_kind}\n\n{e.markdown}")
        print(f"NEM-U {r['speedup_nemu_vs_relax']:,.0f}x faster than RELAX; RELAX's noise ceiling (independent "
              f"run, Pearson) {r['relax_noise_ceiling_pearson']:.3f}; worth N masks: "
              + ", ".join(f"{m} {n:,.0f}" for m, n in r["nemu_worth_n_masks"].items()))
        print("randomisation test, median Spearman (trained vs random encoder): "
              + ", ".join(f"{m} {v:.2f}" for m, v in r["sanity_median_spearman"].items()))
        print(f"RELAX reference mode on mosaics: share on the queried tile {r['mosaic_share_on_queried_tile']:.3f} "
              f"(chance 0.25), ranked first {r['mosaic_queried_tile_first']:.0%}\n")


if __name__ == "__main__":
    main()
