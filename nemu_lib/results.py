"""Key results: notebooks record their figures of merit; ``make run`` gathers them into one summary.

Each notebook calls ``record("01_encoders", {...}, profile="cpu")``, which writes
``outputs/results/cpu/01_encoders.json`` atomically: runs of different profiles (``make run`` on a laptop,
``NEMU_PROFILE=gpu make run`` on a GPU) keep their own records. ``python -m nemu_lib.results`` (the end of
``make run``) gathers them into ``outputs/results.md`` (one section per profile, one table per notebook;
notebook 04's evaluation as its method x metric table per encoder) and ``outputs/results.json`` (everything,
by profile and notebook).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import atomic_write
from .config import PROFILES, outputs_dir
from .evaluation import to_markdown


def record_path(name: str, profile: str | None = None) -> Path:
    """``outputs/results/<profile>/<name>.json``, where :func:`record` keeps ``name``'s results."""
    return outputs_dir() / "results" / (profile or "unnamed") / f"{name}.json"


def recorded(name: str, profile: str | None = None) -> dict:
    """The values another notebook recorded as ``name`` in ``profile``; ``{}`` if it has not run yet."""
    path = record_path(name, profile)
    return json.loads(path.read_text())["values"] if path.is_file() else {}


def record(name: str, values: dict, profile: str | None = None) -> Path:
    """Save ``values`` (JSON-serialisable numbers and strings) as the results of ``name`` in ``profile``."""
    path = record_path(name, profile)
    payload = {"name": name, "profile": profile, "values": values}
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2, default=float).encode()))
    return path


def _cell(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _profiles(folder: Path) -> list[Path]:
    """``folder/results/<profile>`` folders holding records, in the profiles' order (smoke, cpu, gpu, full)."""
    order = {name: i for i, name in enumerate(PROFILES)}
    found = [p for p in (folder / "results").glob("*") if p.is_dir() and any(p.glob("*.json"))]
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))


def summarize(folder: Path) -> str:
    """Markdown tables of every ``results/<profile>/*.json`` under ``folder``, one section per profile."""
    lines = ["# nemu results", ""]
    profiles = _profiles(folder)
    if not profiles:
        return "\n".join(lines + ["No results recorded yet: run `make run`."]) + "\n"
    for profile_dir in profiles:
        lines += [f"## Profile `{profile_dir.name}`", ""]
        for path in sorted(profile_dir.glob("*.json")):
            result = json.loads(path.read_text())
            lines += [f"### {result['name']} (profile: {result.get('profile')})", ""]
            scalars = {k: v for k, v in result["values"].items() if not isinstance(v, dict)}
            if scalars:
                lines += ["| quantity | value |", "|---|---|"]
                lines += [f"| {key} | {_cell(value)} |" for key, value in scalars.items()]
                lines.append("")
            for key, value in result["values"].items():
                if isinstance(value, dict):  # e.g. notebook 04: one evaluation per encoder
                    lines += [f"#### {key}", ""]
                    if "table" in value:
                        lines += [to_markdown(value["table"]), ""]
                    lines += [f"- {k}: {_cell(v)}" for k, v in value.items() if k != "table"]
                    lines.append("")
    return "\n".join(lines) + "\n"


def gather(folder: Path) -> dict:
    """Every ``results/<profile>/*.json`` under ``folder``: ``{profile: {notebook: record}}``."""
    return {d.name: {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} for d in _profiles(folder)}


# Keys of measured durations and of ratios between them: they differ from run to run (seconds_per_image, speedup_*,
# train_seconds_*, ms_per_masked_copy, latency_*, nemu_over_encoder, cnn_relax_over_nemu, ...)
TIMING_WORDS = ("second", "speedup", "time", "per_s", "ms_per", "latency", "over_encoder", "relax_over_nemu")


def differences(a: object, b: object, key: str = "") -> list[str]:
    """Where two results (``results.json`` contents) differ, as ``"key.sub: a -> b"``, timings left out.

    A run's timings (keys naming seconds, speed-ups or times) always move; every other number repeats when the
    models are the same (the shipped reference models) on the same machine.

    >>> differences({"probe": 0.33, "seconds": 4.0}, {"probe": 0.33, "seconds": 5.1})
    []
    """
    if any(word in key.rsplit(".", 1)[-1] for word in TIMING_WORDS):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in {**a, **b} for d in differences(a.get(k), b.get(k), f"{key}.{k}".lstrip("."))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{key}[{i}]")]
    return [] if a == b else [f"{key}: {a!r} -> {b!r}"]


def main(argv: list[str] | None = None) -> None:
    """``python -m nemu_lib.results [FOLDER]`` writes the summary; ``--compare A.json B.json`` lists differences."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compare"]:
        found = differences(*(json.loads(Path(f).read_text()) for f in argv[1:3]))
        print("\n".join(found) or f"{argv[1]} and {argv[2]} agree (timings left out)")
        sys.exit(1 if found else 0)
    folder = Path(argv[0]) if argv else outputs_dir()
    text = summarize(folder)
    atomic_write(folder / "results.md", lambda f: f.write(text.encode()))
    atomic_write(folder / "results.json", lambda f: f.write(json.dumps(gather(folder), indent=2).encode()))
    print(text)


if __name__ == "__main__":
    main()
