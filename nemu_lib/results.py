"""Key results: notebooks record their figures of merit; ``make run`` gathers them into one summary.

Each notebook calls ``record("01_encoders", {...})``, which writes ``outputs/results/01_encoders.json``
atomically. ``python -m nemu_lib.results`` writes ``outputs/RESULTS.md``: one table per notebook.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import atomic_write
from .config import outputs_dir


def record(name: str, values: dict, profile: str | None = None) -> Path:
    """Save ``values`` (JSON-serialisable numbers and strings) as the results of ``name``."""
    path = outputs_dir() / "results" / f"{name}.json"
    payload = {"name": name, "profile": profile, "values": values}
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2, default=float).encode()))
    return path


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize(folder: Path) -> str:
    """Markdown tables of every ``results/*.json`` under ``folder``."""
    lines = ["# nemu results", ""]
    files = sorted((folder / "results").glob("*.json"))
    if not files:
        return "\n".join(lines + ["No results recorded yet: run `make run`."]) + "\n"
    for path in files:
        result = json.loads(path.read_text())
        lines += [f"## {result['name']} (profile: {result.get('profile')})", "", "| quantity | value |",
                  "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in result["values"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else outputs_dir()
    text = summarize(folder)
    (folder / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
