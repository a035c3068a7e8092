"""Running the notebook series: ``python -m nemu_lib.series [--only 02,03] [--profile cpu] [--retrain]``.

``make run`` calls this. Each notebook runs under papermill as it would by hand: parameters injected after
its cell tagged ``parameters``, kernel ``python3``, its own folder as working directory, the executed copy
written as it goes (and kept with the error when it fails) to ``outputs/notebooks/<name>.ipynb``. Around it
the runner says where it is, in plain lines that read the same in a terminal and in a CI log:

- before each notebook: its expected time in the profile (:func:`nemu_lib.budget.expected_time`) and
  whether the shipped reference models are loaded instead of trained (:func:`nemu_lib.reference.status`);
- while it runs, the section being executed (the latest ``#`` / ``##`` heading above the running cell) and
  the time elapsed, e.g. ``03_nemu | 3. Training the decoder | 1:40 elapsed of ~5.5 min``: checked every
  ``--heartbeat`` seconds (10), printed when the section changed and every six checks within a long one;
- after it: the measured time and ``ok``, or ``FAILED`` with the error's first line. A failure does not
  stop the series.

The table of expected and measured times goes to ``outputs/run-summary.md`` and ``outputs/run-summary.json``
after every notebook (an interrupted run keeps the finished ones) and is printed at the end; then
:mod:`nemu_lib.results` gathers the notebooks' records, and the exit status is 1 when a notebook failed.

Environment, set in this process for the kernels to inherit: ``NEMU_PROFILE`` (or ``--profile``);
``NEMU_RETRAIN=1`` (or ``--retrain``): every model is trained here (:func:`nemu_lib.reference.enabled`) and
``retrain=True`` goes to every notebook whose parameters cell declares ``retrain``; ``NEMU_BATCH=1``
(:func:`nemu_lib.notebook.interactive`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import papermill
from nbformat import NotebookNode
from papermill.exceptions import PapermillExecutionError

from . import budget, prose, reference, results
from .budget import short_expected
from .checkpoint import atomic_write
from .config import device, get_profile, outputs_dir, project_root
from .progress import PROGRESS_ENV

HEADING = re.compile(r"^#{1,2}\s+(.+?)\s*$")  # a level-1 or level-2 Markdown heading
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|min|h)\b")  # "~5.5 min", "~15 s", "~3.4 h"
UNIT_SECONDS = {"s": 1, "min": 60, "h": 3600}
PROSE_PROFILE = "cpu"  # the profile whose run (seed 0, the reference models) the notebooks' text quotes
REPEAT_EVERY = 6  # heartbeats: a section that goes on is named again every 6 intervals (a minute by default)

Echo = Callable[[str], None]


def echo(line: str) -> None:
    """Print one line at once (the heartbeat thread prints too; CI logs buffer otherwise)."""
    print(line, flush=True)


def clock(seconds: float) -> str:
    """Elapsed time as a clock shows it: ``"1:40"``, ``"1:02:03"``."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def expected_seconds(text: str) -> float | None:
    """The seconds of :func:`short_expected`: 330 for ``"~5.5 min"``, 60 for ``"under a minute"`` (a bound);
    ``None`` when the text gives no figure."""
    short = short_expected(text)
    if found := DURATION.search(short):
        return float(found[1]) * UNIT_SECONDS[found[2]]
    return 60.0 if "a minute" in short else None


def section_of(cell: NotebookNode) -> str | None:
    """The last ``#`` or ``##`` heading of a Markdown cell (code fences skipped); ``None`` for other cells."""
    if cell.cell_type != "markdown":
        return None
    heading, fenced = None, False
    for line in cell.source.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (found := HEADING.match(line)):
            heading = found[1]
    return heading


def notebook_parameters(path: Path, retrain: bool) -> dict[str, object]:
    """What papermill passes to ``path``: ``retrain=True`` when asked for and its parameters cell declares it."""
    return {"retrain": True} if retrain and "retrain" in papermill.inspect_notebook(str(path)) else {}


def select(paths: list[Path], only: str) -> list[Path]:
    """The notebooks whose names start with one of the comma-separated prefixes in ``only`` (all when empty)."""
    prefixes = tuple(p.strip() for p in only.split(",") if p.strip())
    return [p for p in paths if not prefixes or p.name.startswith(prefixes)]


class Progress:
    """Where a running notebook is: nbclient's hooks follow its headings, a thread prints them
    (:data:`REPEAT_EVERY`).

    Used as ``with Progress(...) as progress:`` around one papermill call, with ``progress.on_notebook_start``
    and ``progress.on_cell_start`` passed as the hooks of the same names.
    """

    def __init__(self, name: str, expected: str, interval: float, echo: Echo = echo) -> None:
        self.name, self.expected, self.interval, self.echo = name, expected, interval, echo
        self.section = "starting the kernel"
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {name}", daemon=True)

    def on_notebook_start(self, notebook: NotebookNode) -> None:
        """nbclient hook: the kernel is up, no cell has run yet."""
        self.section = "before the first heading"

    def on_cell_start(self, cell: NotebookNode, cell_index: int) -> None:
        """nbclient hook, called for every cell in order (Markdown cells included): follow the headings."""
        self.section = section_of(cell) or self.section

    def elapsed(self) -> float:
        """Seconds since the notebook started (its kernel's start included)."""
        return time.monotonic() - self.start

    def line(self) -> str:
        """The heartbeat: ``"  03_nemu | 3. Training the decoder | 1:40 elapsed of ~5.5 min"``."""
        return f"  {self.name} | {self.section} | {clock(self.elapsed())} elapsed of {self.expected}"

    def _beat(self) -> None:
        shown, quiet = "", 0
        while not self._stop.wait(self.interval):
            quiet += 1
            if self.section != shown or quiet >= REPEAT_EVERY:
                self.echo(self.line())
                shown, quiet = self.section, 0

    def __enter__(self) -> Progress:
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class NotebookRun:
    """One notebook's row of the run summary."""

    name: str
    expected: str  # budget.expected_time's text
    expected_seconds: float | None  # its figure, when it has one
    measured_seconds: float  # wall time, the kernel's start and shutdown included
    ok: bool
    error: str  # "<exception>: <first line> (section <heading>)"; "" when ok


def run_notebook(path: Path, out: Path, expected: str, retrain: bool, heartbeat: float,
                 echo: Echo = echo) -> NotebookRun:
    """Execute ``path`` with papermill into ``out/notebooks/``, printing a heartbeat; never raises for the
    notebook's own failure (an error in a cell, a kernel that dies or does not start)."""
    error = ""
    with Progress(path.stem, short_expected(expected), heartbeat, echo) as progress:
        try:
            papermill.execute_notebook(
                path, out / "notebooks" / path.name, parameters=notebook_parameters(path, retrain),
                kernel_name="python3", cwd=path.parent, progress_bar=False,
                on_notebook_start=progress.on_notebook_start, on_cell_start=progress.on_cell_start)
        except Exception as e:  # noqa: BLE001 (any failure is this notebook's; the series goes on)
            name, value = (e.ename, e.evalue) if isinstance(e, PapermillExecutionError) else (type(e).__name__, str(e))
            first = next((line.strip() for line in value.splitlines() if line.strip()), "")
            error = f"{name}: {first} (section {progress.section})" if first else f"{name} (section {progress.section})"
    return NotebookRun(path.stem, expected, expected_seconds(expected), round(progress.elapsed(), 1), not error, error)


def summary_table(runs: list[NotebookRun]) -> str:
    """Markdown table, padded to read as plain text too: notebook, expected, measured, result."""
    rows = [("notebook", "expected", "measured", "result")] + [
        (r.name, short_expected(r.expected), clock(r.measured_seconds), "ok" if r.ok else f"FAILED: {r.error}")
        for r in runs]
    rows = [tuple(cell.replace("|", "\\|") for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, header: dict, runs: list[NotebookRun], planned: int) -> None:
    """``out/run-summary.md`` and ``out/run-summary.json``: the ``header`` (profile, retrain, ...) and ``runs``."""
    failed = sum(not r.ok for r in runs)
    text = (f"# nemu run summary\n\nprofile {header['profile']}, retrain {'on' if header['retrain'] else 'off'}, "
            f"{header['reference']}, device {header['device']}: {len(runs)} of {planned} notebooks run, {failed} "
            f"failed (their executed copies: notebooks/ beside this file).\n\n{summary_table(runs)}")
    payload = {**header, "planned": planned, "notebooks": [asdict(r) for r in runs]}
    atomic_write(out / "run-summary.md", lambda f: f.write(text.encode()))
    atomic_write(out / "run-summary.json", lambda f: f.write(json.dumps(payload, indent=2).encode()))


def run_series(paths: list[Path], profile: str, retrain: bool, out: Path, heartbeat: float = 10.0,
               echo: Echo = echo) -> list[NotebookRun]:
    """Run ``paths`` in order in ``profile`` (set as ``NEMU_PROFILE`` for the kernels), saying where it is;
    rewrite the run summary in ``out`` after each notebook. Return one :class:`NotebookRun` per notebook."""
    os.environ.update(NEMU_PROFILE=profile, NEMU_BATCH="1")
    os.environ.setdefault(PROGRESS_ENV, "final")  # saved outputs hold one line per progress bar, no widget state
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    if retrain:
        os.environ["NEMU_RETRAIN"] = "1"
    use_reference, described = reference.status(profile, retrain=retrain)
    dev = device()
    header = {"profile": profile, "retrain": retrain, "reference_models": use_reference, "reference": described,
              "device": str(dev)}
    echo(f"nemu series | profile {profile} | device {dev} | {described} | {len(paths)} notebooks -> "
         f"{out / 'notebooks'}")
    runs: list[NotebookRun] = []
    for i, path in enumerate(paths, 1):
        expected = budget.expected_time(path.stem, profile, dev, reference=use_reference)
        step = f"[{i}/{len(paths)}] {path.stem}"
        echo(f"{step} | expected {expected} | reference models: {'yes' if use_reference else 'no'}")
        run = run_notebook(path, out, expected, retrain, heartbeat, echo)
        echo(f"{step} | {'ok' if run.ok else 'FAILED'} in {clock(run.measured_seconds)}"
             + ("" if run.ok else f" | {run.error}"))
        runs.append(run)
        write_summary(out, header, runs, len(paths))
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the series (options: ``--help``), print the table, gather the results; 1 if a notebook failed."""
    parser = argparse.ArgumentParser(prog="python -m nemu_lib.series", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", metavar="PREFIXES",
                        help="comma-separated name prefixes, e.g. 02,03 (default: every notebook)")
    parser.add_argument("--profile", help="smoke | cpu | gpu | full (default: NEMU_PROFILE, else gpu with CUDA, "
                                          "else cpu)")
    parser.add_argument("--retrain", action="store_true", default=not reference.enabled(),
                        help="train every model here: retrain=True to the notebooks that declare it, NEMU_RETRAIN=1 "
                             "for the kernels (default: NEMU_RETRAIN=1 in the environment)")
    parser.add_argument("--heartbeat", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between looks at a running notebook: a line when its section changed, and "
                             f"every {REPEAT_EVERY} looks within one (default: 10)")
    parser.add_argument("--notebooks", type=Path, default=project_root() / "notebooks", metavar="FOLDER",
                        help="where the numbered notebooks [0-9]*.ipynb are (default: notebooks/)")
    args = parser.parse_args(argv)
    paths = select(sorted(args.notebooks.glob("[0-9]*.ipynb")), args.only)
    if not paths:
        parser.error(f"no notebook in {args.notebooks} matches --only {args.only!r}")
    # papermill's parameter parser warns about (and skips) lines with a second "=" in their comment: noise here
    logging.getLogger("papermill.translators").setLevel(logging.ERROR)
    out = outputs_dir()
    start = time.monotonic()
    profile_name = get_profile(args.profile).name
    runs = run_series(paths, profile_name, args.retrain, out, args.heartbeat)
    echo(f"\n{summary_table(runs)}(also in {out / 'run-summary.md'} and run-summary.json)\n")
    results.main([str(out)])
    failed = [r.name for r in runs if not r.ok]
    prose_ok = check_prose(out, [r.name for r in runs if r.ok], profile_name)
    echo(f"series: {len(runs) - len(failed)} ok, {len(failed)} failed in {clock(time.monotonic() - start)}"
         + (f": FAILED {', '.join(failed)} (executed copies with the error in {out / 'notebooks'})" if failed else ""))
    return 1 if failed or not prose_ok else 0


def check_prose(out: Path, names: list[str], profile: str, echo: Echo = echo) -> bool:
    """Check the figures the markdown of notebooks ``names`` quotes against their run (:mod:`nemu_lib.prose`);
    print what is missing. False when a figure is missing from a run in :data:`PROSE_PROFILE`, the profile the
    text is written against (in another profile, the run's figures differ and are only reported)."""
    checked, missing = prose.check_run(out, names)
    for m in missing:
        echo(f"prose: {m}")
    echo(f"prose numbers: {checked - len(missing)} of {checked} figures the text quotes were found in the run"
         + ("" if not missing else f"; {len(missing)} not (above)"
            + ("" if profile == PROSE_PROFILE else f", expected: the text quotes the {PROSE_PROFILE} profile's run")))
    return not missing or profile != PROSE_PROFILE


if __name__ == "__main__":
    raise SystemExit(main())
