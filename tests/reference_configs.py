"""What today's code would record for each shipped reference file: the configs `test_reference.py` fingerprints.

Each family is rebuilt the way its notebook builds it, with the notebook's default parameters (read from its
`parameters` cell), on the shipped encoders' weights (a decoder's config names its encoder's weights).
"""

from __future__ import annotations

import ast
from pathlib import Path

import papermill
import torch
import torchvision
from torch import nn

from nemu_lib import reference
from nemu_lib.config import REPO_ROOT, get_profile
from nemu_lib.data import SHAPES_MEAN, SHAPES_STD
from nemu_lib.encoders import Encoder, build_encoder
from nemu_lib.explainer import Explainer, ExplainerConfig
from nemu_lib.explainer import checkpoint_config as explainer_config
from nemu_lib.nem import NEMU
from nemu_lib.report import cache_key, random_encoder_like
from nemu_lib.runs import RUN_NAMES, profile_config
from nemu_lib.ssl import encoder_config
from nemu_lib.train import checkpoint_config
from nemu_lib.vit import vit_tiny

OBJECTIVES = {run: objective for objective, run in RUN_NAMES.items()}  # run folder name -> objective


def notebook_defaults(name: str) -> dict:
    """The default parameters of ``notebooks/<name>.ipynb``."""
    params = papermill.inspect_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"))
    return {k: ast.literal_eval(v["default"]) for k, v in params.items()}


def own_encoders(folder: Path, profile_name: str, seed: int) -> dict[str, Encoder]:
    """Notebook 07's CNN and ViT, built as the notebook builds them, with the shipped weights."""
    nb = notebook_defaults("07_your_own_encoder")
    size = get_profile(profile_name).image_size
    cnn = torchvision.models.get_model(nb["cnn"], weights=None)
    last = [n for n, m in cnn.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attr = last.rpartition(".")
    setattr(cnn.get_submodule(parent), attr, nn.Identity())  # without its classifier, as notebook 07 does
    encoders = {"cnn": (nb["cnn"], Encoder.wrap(cnn, probe_size=size, mean=SHAPES_MEAN, std=SHAPES_STD))}
    torch.manual_seed(seed)
    encoders["vit"] = (f"vit-{nb['vit']}", vit_tiny(image_size=size, patch_size=8))
    out = {}
    for label, (name, encoder) in encoders.items():
        state = reference.load(f"encoders/own-{name}-{profile_name}-seed{seed}.pt", folder)["state"]
        encoder.load_state_dict(state)
        out[label] = encoder.eval()
    return out


def expected_configs(folder: Path, manifest: dict) -> dict[str, dict]:
    """``{file: config}`` for every entry of ``manifest``, as the code would record it now."""
    p, seed = get_profile(manifest["profile"]), manifest["seed"]
    small = {}
    for kind in ("simclr", "supervised", "random"):
        ckpt = reference.load(f"encoders/{kind}-{p.name}-seed{seed}.pt", folder)
        small[kind] = build_encoder(**ckpt["config"]["encoder"])
        small[kind].load_state_dict(ckpt["state_dict"])
    own = own_encoders(folder, p.name, seed)
    nb06, nb07 = notebook_defaults("06_explainer_networks"), notebook_defaults("07_your_own_encoder")
    expected = {}
    for rel, entry in manifest["files"].items():
        family, name = entry["family"], Path(rel).parent.name if rel.endswith("checkpoint.pt") else Path(rel).stem
        if family == "encoder":
            kind = name.split("-")[0]
            expected[rel] = encoder_config(kind, p, seed)
        elif family == "nemu":  # <kind>-<run>-<profile>
            kind, run = name.split("-")[:2]
            objective = OBJECTIVES[run]
            model = NEMU(small[kind], uncertainty=objective == "relax")
            expected[rel] = checkpoint_config(model, profile_config(objective, p, seed))
        elif family == "evaluation":
            kind = name.split("-")[0]
            expected[rel] = {"key": cache_key(small[kind], random_encoder_like(small[kind], seed), p, seed)}
        elif family == "explainer":  # <kind>-<profile>-<layer>-seed<seed>
            kind = name.split("-")[0]
            cfg = ExplainerConfig(steps=nb06["steps"] or p.extra["explainer_steps"],
                                  batch_size=nb06["batch_size"] or p.extra["explainer_batch_size"],
                                  filter_weight=nb06["filter_weight"], prior_weight=nb06["prior_weight"], seed=seed)
            expected[rel] = explainer_config(Explainer(small[kind], nb06["layer"]), cfg)
        elif family == "own":
            label = "vit" if name.startswith("own-vit") else "cnn"
            epochs = nb07["epochs"] or 2 * p.supervised_epochs
            expected[rel] = {"encoder": own[label].config, "epochs": epochs, "seed": seed}
        elif family == "own-nemu":  # own-<label>-<profile>-seed<seed>
            label = name.split("-")[1]
            expected[rel] = checkpoint_config(NEMU(own[label]), profile_config("nem", p, seed))
    return expected
