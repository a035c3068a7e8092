"""Reference models that ship with the repository: the ``cpu`` profile's trained models, loaded instead of trained.

A course run retrains nothing it does not need to: everything the ``cpu`` profile trains for seed 0 (the SimCLR,
supervised and random encoders, the NEM-U decoders, the explainers, notebook 07's CNN and ViT) and the costly
reference RELAX maps of notebook 04 are committed under ``data/reference/`` (the one folder of the repository
that holds binaries), laid out as they lie in ``outputs/`` and packed with xz (RELAX's smooth maps to a third)::

    data/reference/manifest.json                          what each file is, its SHA-256, size and fingerprint
    data/reference/encoders/simclr-cpu-seed0.pt.xz        -> outputs/encoders/simclr-cpu-seed0.pt
    data/reference/nemu/simclr-nem-cpu/checkpoint.pt.xz   -> outputs/nemu/simclr-nem-cpu/checkpoint.pt

Every load-or-train function calls :func:`adopt` with the path it would load and the settings it expects: when
nothing was trained there yet and a shipped file matches those settings, it is checked against its SHA-256 and
unpacked into place (a ``weights_only``-loadable checkpoint), and the loader finds it as if it had trained it; one
line says so. A finished run ships without its optimiser state (:func:`nemu_lib.checkpoint.finished`). With
``use=False`` (the notebooks' ``retrain=True``, ``NEMU_RETRAIN=1 make run``) everything is trained here instead: a
copy of a shipped file in ``outputs/`` is recognised by its hash and removed; a model this run trained is kept.

The manifest records, for each file: where it goes, its SHA-256 and size (packed and unpacked), the checkpoint's
``config`` and its fingerprint (the config with the Shapes generator's version), the notebook that trains it and
how long that notebook took when the references were built, and the headline figures the model gave then. ``make
reference`` retrains them all (``NEMU_RETRAIN=1`` into a fresh outputs folder) and rewrites the folder with
:func:`collect`; ``tests/test_reference.py`` fails when a shipped fingerprint no longer matches what the code
would train.

Outside a checkout (``pip install`` of the repository, Colab) the files come with the package as
``nemu_lib/_reference/`` (``pyproject.toml`` maps ``data/reference`` there); ``NEMU_REFERENCE`` points elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .budget import expected_time, short_expected
from .checkpoint import CheckpointMismatch, atomic_write, finished, load_checkpoint
from .config import REPO_ROOT, outputs_dir

MANIFEST = "manifest.json"
PROFILE, SEED = "cpu", 0  # what the shipped models were trained for
MAX_BYTES = 25 * 2**20  # the repository's budget for them

# What `collect` takes from a finished run (outputs-relative globs, `{p}` the profile, `{s}` the seed), which notebook
# trains it, and its headline figures: (results record, keys), `{kind}` the encoder (or notebook 07's model) it
# belongs to, a dot for a nested key.
FAMILIES: dict[str, dict] = {
    "encoder": {"glob": "encoders/{kind}-{p}-seed{s}.pt", "kinds": ("simclr", "supervised", "random"),
                "notebook": "01_self_supervised_encoders", "what": "{kind} encoder",
                "figures": ("01_encoders", ("{kind}_linear_probe", "{kind}_knn"))},
    "nemu": {"glob": "nemu/*-{p}/checkpoint.pt", "notebook": "03_nemu", "what": "NEM-U decoder {name}",
             "figures": ("04_evaluation", ("{kind}.nemu_worth_n_masks",))},
    "evaluation": {"glob": "evaluation/*-{p}-seed{s}.pt", "notebook": "04_evaluating_explanations",
                   "what": "RELAX maps {name}",
                   "figures": ("04_evaluation", ("{kind}.relax_noise_ceiling_pearson",
                                                 "{kind}.sanity_median_spearman"))},
    "explainer": {"glob": "explainers/*-{p}-*-seed{s}/checkpoint.pt", "notebook": "06_explainer_networks",
                  "what": "explainer {name}",
                  "figures": ("06_explainer_networks", ("{kind}_instability_explainer", "{kind}_instability_performer",
                                                        "{kind}_cos_z"))},
    "own": {"glob": "encoders/own-*-{p}-seed{s}.pt", "notebook": "07_your_own_encoder", "what": "encoder {name}",
            "figures": ("07_your_own_encoder", ("{kind}_probe",))},
    "own-nemu": {"glob": "nemu/own-*-{p}-seed{s}/checkpoint.pt", "notebook": "07_your_own_encoder",
                 "what": "NEM-U decoder {name}",
                 "figures": ("07_your_own_encoder", ("{kind}_nemu_sim", "{kind}_nemu_area",
                                                     "{kind}_nemu_relax_pearson"))},
}


def _owner(family: str, name: str) -> str:
    """The encoder (or notebook 07's model, ``cnn`` / ``vit``) a file of ``family`` called ``name`` belongs to."""
    if family == "own":
        return "vit" if name.startswith("own-vit") else "cnn"
    return name.split("-")[1] if family == "own-nemu" else name.split("-")[0]


def _figures(values: dict, keys: tuple[str, ...], kind: str) -> dict:
    """``values[key]`` for each key template (``{kind}`` filled in, dots for nested keys) that the record holds."""
    out = {}
    for template in keys:
        key, found = template.format(kind=kind), values
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found is not None:
            out[key] = found
    return out


def reference_dir() -> Path:
    """Where the shipped files are: ``$NEMU_REFERENCE``, else ``data/reference`` in a checkout, else the package's
    ``nemu_lib/_reference`` (an installed copy)."""
    if os.environ.get("NEMU_REFERENCE"):
        return Path(os.environ["NEMU_REFERENCE"])
    checkout = REPO_ROOT / "data" / "reference"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "_reference"


def manifest(directory: Path | None = None) -> dict:
    """The manifest of ``directory`` (default :func:`reference_dir`); ``{"files": {}}`` when none ships."""
    path = (directory or reference_dir()) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"files": {}}


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(config: Mapping, generator_version: int | None = None) -> str:
    """A short hash of what a model was trained with: its checkpoint ``config`` and the Shapes generator's version.

    >>> fingerprint({"epochs": 20}, 1) == fingerprint({"epochs": 20}, 1) != fingerprint({"epochs": 12}, 1)
    True
    """
    from .data import GENERATOR_VERSION

    version = GENERATOR_VERSION if generator_version is None else generator_version
    text = json.dumps({"config": config, "generator_version": version}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _relative(path: Path) -> str | None:
    """``path`` relative to ``outputs_dir()`` as a POSIX string, or ``None`` outside it."""
    try:
        return Path(path).resolve().relative_to(outputs_dir().resolve()).as_posix()
    except ValueError:
        return None


def entry(path: str | os.PathLike) -> dict | None:
    """The manifest entry shipped for the outputs file ``path``, or ``None``."""
    rel = _relative(Path(path))
    return manifest()["files"].get(rel) if rel else None


def is_reference_copy(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is byte for byte the shipped reference for it (unpacked)."""
    e = entry(path)
    return e is not None and Path(path).is_file() and sha256(path) == e["unpacked_sha256"]


def load(rel: str, directory: Path | None = None) -> dict:
    """The shipped checkpoint for the outputs file ``rel`` (e.g. ``"encoders/simclr-cpu-seed0.pt"``), unpacked and
    loaded with ``weights_only=True``."""
    directory = directory or reference_dir()
    e = manifest(directory)["files"][rel]
    return torch.load(io.BytesIO(lzma.decompress((directory / e["file"]).read_bytes())), weights_only=True)


_enabled: bool | None = None  # set_enabled's choice for this process; None: from NEMU_RETRAIN


def set_enabled(flag: bool) -> None:
    """Whether the loaders of this process take shipped reference models (a notebook's ``retrain`` sets it)."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    """Whether loaders take shipped reference models: :func:`set_enabled`'s choice, else not ``NEMU_RETRAIN=1``."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("NEMU_RETRAIN", "").lower() not in ("1", "true", "yes")


def adopt(path: str | os.PathLike, expect: Mapping | None = None, use: bool | None = None) -> bool:
    """Put the shipped reference for ``path`` there when nothing is trained there yet; return whether it did.

    Args:
        path: the file a loader is about to load or train into (under ``outputs_dir()``).
        expect: entries the reference's checkpoint ``config`` must match (as :func:`load_checkpoint` checks them):
            a reference trained with other settings is not used, and one line says which settings differ.
        use: ``False`` trains here instead: a copy of the reference already at ``path`` is removed (a model
            trained here stays). Default: :func:`enabled`.

    Raises:
        ValueError: the shipped file's SHA-256 differs from the manifest's (a damaged or replaced file).
    """
    path = Path(path)
    e = entry(path)
    if e is None:
        return False
    if not (enabled() if use is None else use):
        if path.is_file() and sha256(path) == e["unpacked_sha256"]:  # a copy of the reference: train it here
            path.unlink()
        return False
    if path.exists():  # trained here, or adopted before: the loader checks its settings
        return False
    source = reference_dir() / e["file"]
    packed = source.read_bytes()
    if hashlib.sha256(packed).hexdigest() != e["sha256"]:
        raise ValueError(f"{source} does not match its SHA-256 in {MANIFEST}: restore it (git checkout "
                         "data/reference) or rebuild the references with `make reference`")
    atomic_write(path, lambda f: f.write(lzma.decompress(packed)))
    if expect:
        try:
            load_checkpoint(path, expect=expect)
        except CheckpointMismatch as err:
            path.unlink()
            print(f"not using the reference {e['what']}: it was trained with other settings "
                  f"({'; '.join(err.changes)}); training it here")
            return False
    cost = short_expected(expected_time(e["notebook"], manifest()["profile"], "cpu"))
    print(f"using the reference {e['what']} ({_shown(source)}); retrain=True trains it here (notebook "
          f"{e['notebook'][:2]}: {cost} on a 2-core CPU)")
    return True


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def status(profile: str, seed: int = 0, retrain: bool | None = None) -> tuple[bool, str]:
    """Whether a run of ``profile`` and ``seed`` uses shipped reference models, and a line that says so.

    ``retrain``: whether the run trains everything here (default: not :func:`enabled`).
    """
    shipped = manifest()
    files = shipped["files"]
    if not enabled() if retrain is None else retrain:
        return False, "retrain: every model is trained here (the shipped reference models are not used)"
    if not files:
        return False, f"no reference models ship in {_shown(reference_dir())}: every model is trained here"
    if (profile, seed) != (shipped["profile"], shipped["seed"]):
        return False, (f"reference models exist for the {shipped['profile']} profile, seed {shipped['seed']} only: "
                       "every model is trained here")
    return True, f"reference models: {_shown(reference_dir())} ({len(files)} files, {shipped['bytes'] / 2**20:.1f} MB)"


def _family_entries(run: Path, profile: str, seed: int) -> dict[str, dict]:
    """Every file of ``run`` (an outputs folder) that :data:`FAMILIES` names, with its family's details."""
    found: dict[str, dict] = {}
    for family, spec in FAMILIES.items():
        kinds = spec.get("kinds", (None,))
        for kind in kinds:
            pattern = spec["glob"].format(p=profile, s=seed, kind=kind)
            for path in sorted(run.glob(pattern)):
                rel = path.relative_to(run).as_posix()
                if family == "nemu" and rel.startswith("nemu/own-"):
                    continue  # notebook 07's decoders: their own family
                name = path.parent.name if path.name == "checkpoint.pt" else path.stem
                found[rel] = {"family": family, "kind": kind or _owner(family, name), "name": name, "path": path}
    return found


def collect(run: str | os.PathLike, dest: str | os.PathLike | None = None, profile: str = PROFILE,
            seed: int = SEED, summary: str | os.PathLike | None = None) -> dict:
    """Copy the trained models of a finished run into ``dest`` and write its manifest; return the manifest.

    Args:
        run: the outputs folder of a ``NEMU_RETRAIN=1`` run of the series (``make reference``).
        dest: the reference folder (default :func:`reference_dir`); emptied first.
        summary: the run's ``run-summary.json`` (per-notebook measured seconds); default ``run/run-summary.json``.
    """
    from .data import GENERATOR_VERSION

    run, dest = Path(run), Path(dest or reference_dir())
    summary = Path(summary or run / "run-summary.json")
    seconds = {}
    if summary.is_file():
        seconds = {nb["name"]: nb["measured_seconds"] for nb in json.loads(summary.read_text())["notebooks"]}
    files: dict[str, dict] = {}
    if dest.exists():
        shutil.rmtree(dest)
    for rel, found in _family_entries(run, profile, seed).items():
        spec = FAMILIES[found["family"]]
        record, keys = spec["figures"]
        record_file = run / "results" / profile / f"{record}.json"
        values = json.loads(record_file.read_text())["values"] if record_file.is_file() else {}
        figures = _figures(values, keys, found["kind"])
        ckpt = load_checkpoint(found["path"])
        unpacked = io.BytesIO()
        torch.save(finished(ckpt), unpacked)  # a finished run ships without its optimiser state
        target = dest / f"{rel}.xz"  # xz: RELAX's smooth maps pack to a third, weights to ~90 %
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(lzma.compress(unpacked.getvalue(), preset=9))
        config = ckpt["config"]
        files[rel] = {"file": f"{rel}.xz", "unpacked_sha256": hashlib.sha256(unpacked.getvalue()).hexdigest(),
                      "unpacked_bytes": len(unpacked.getvalue()),
                      "what": spec["what"].format(kind=found["kind"], name=found["name"]),
                      "family": found["family"], "sha256": sha256(target), "bytes": target.stat().st_size,
                      "fingerprint": fingerprint(config, GENERATOR_VERSION), "config": config,
                      "notebook": spec["notebook"], "notebook_seconds": seconds.get(spec["notebook"]),
                      "figures": figures}
    payload = {"profile": profile, "seed": seed, "generator_version": GENERATOR_VERSION,
               "torch": torch.__version__, "bytes": sum(f["bytes"] for f in files.values()), "files": files}
    if payload["bytes"] > MAX_BYTES:
        raise ValueError(f"the reference files take {payload['bytes'] / 2**20:.1f} MB, over the "
                         f"{MAX_BYTES / 2**20:.0f} MB budget: ship fewer or smaller models")
    text = json.dumps(payload, indent=1, sort_keys=True, default=repr)
    (dest / MANIFEST).write_text(text + "\n")
    return payload


def main(argv: list[str] | None = None) -> int:
    """``python -m nemu_lib.reference collect RUN [--dest DIR]`` or ``... verify``."""
    parser = argparse.ArgumentParser(prog="python -m nemu_lib.reference", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="copy a finished run's models into the reference folder, write the manifest")
    c.add_argument("run", help="the outputs folder of a NEMU_RETRAIN=1 run")
    c.add_argument("--dest", default=None, help="reference folder (default: data/reference)")
    c.add_argument("--summary", default=None, help="run-summary.json with the notebooks' times")
    sub.add_parser("verify", help="check every shipped file's SHA-256 and size against the manifest")
    args = parser.parse_args(argv)
    if args.command == "collect":
        m = collect(args.run, args.dest, summary=args.summary)
        print(f"{len(m['files'])} reference files, {m['bytes'] / 2**20:.1f} MB, in {args.dest or reference_dir()}")
        return 0
    bad = [rel for rel, e in manifest()["files"].items()
           if not (reference_dir() / e["file"]).is_file() or sha256(reference_dir() / e["file"]) != e["sha256"]]
    print("all reference files match the manifest" if not bad else f"damaged or missing: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
