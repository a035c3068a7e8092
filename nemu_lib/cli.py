"""The ``nemu`` command.

    nemu profiles                                  # the sizes of each profile
    nemu pretrain --kind simclr --profile cpu      # train (or load) an encoder into outputs/encoders/
    nemu pretrain --kind all --profile smoke --retrain
"""

from __future__ import annotations

import argparse
import json
import sys

from . import ssl
from .config import PROFILES, get_profile


def _profiles(args: argparse.Namespace) -> None:
    for name, profile in PROFILES.items():
        print(name, json.dumps(profile.as_dict()))


def _pretrain(args: argparse.Namespace) -> None:
    profile = get_profile(args.profile)
    kinds = ssl.ENCODER_KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        ssl.pretrained_encoder(kind, profile, seed=args.seed, device=args.device, retrain=args.retrain)
        print(f"{kind}: {ssl.encoder_path(kind, profile, args.seed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nemu", description="Explaining representations: SimCLR, RELAX, NEM-U.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profiles", help="print the profiles' sizes").set_defaults(func=_profiles)
    pre = sub.add_parser("pretrain", help="train (or load) a Shapes encoder: simclr, supervised, random")
    pre.add_argument("--kind", default="simclr", choices=[*ssl.ENCODER_KINDS, "all"])
    pre.add_argument("--profile", default=None, choices=sorted(PROFILES), help="default: NEMU_PROFILE or hardware")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    pre.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    pre.set_defaults(func=_pretrain)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.func(args)


if __name__ == "__main__":
    main()
