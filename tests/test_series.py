"""The series runner (``make run``) on tiny synthetic notebooks: what it prints before, during and after each
notebook, the run summary, ``retrain`` injected only where declared, and the exit status."""

import contextlib
import io
import json
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nemu_lib import series


def write_notebook(path: Path, cells: list) -> Path:
    """Save ``cells`` as a python3 notebook at ``path``."""
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                            "display_name": "Python 3"}})
    nbformat.write(nb, path)
    return path


def parameters_cell(source: str) -> nbformat.NotebookNode:
    """A code cell tagged ``parameters``, where papermill injects its parameters after."""
    return new_code_cell(source, metadata={"tags": ["parameters"]})


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> Path:
    """01 declares ``retrain`` and sleeps in a section; 02 fails an assertion; 03 has parameters but no ``retrain``
    and checks the environment its kernel inherits."""
    folder = tmp_path_factory.mktemp("notebooks")
    write_notebook(folder / "01_sleeps.ipynb", [
        new_markdown_cell("# 01 · A notebook that sleeps"),
        parameters_cell("retrain = False  # True: train again\nseed = 0"),
        new_markdown_cell("## 1. Sleeping\n\n```python\n# not a heading: a comment in a code fence\n```\n### 1.1 A sub-"
                          "heading is not a section"),
        new_code_cell("import time\n\ntime.sleep(2.5)"),
        new_markdown_cell("## 2. Checks"),
        new_code_cell("assert retrain is True"),
    ])
    write_notebook(folder / "02_fails.ipynb", [
        new_markdown_cell("# 02 · A notebook that fails"),
        new_markdown_cell("## 1. Arithmetic"),
        new_code_cell('assert "retrain" not in globals()\nassert 1 + 1 == 3, "1 + 1 is not 3\\nsecond line"'),
        new_code_cell("print('never reached')"),
    ])
    write_notebook(folder / "03_plain.ipynb", [parameters_cell("seed = 0"), new_code_cell(
        'import os\n\nassert seed == 0 and (os.environ["NEMU_PROFILE"], os.environ["NEMU_BATCH"]) == ("smoke", "1")')])
    return folder


def fake_expected_time(notebook: str, profile: object = None, device: object = None, reference: bool = False) -> str:
    """budget.expected_time for the synthetic notebooks."""
    assert profile == "smoke" and not reference  # retrain: no reference models
    return "~3 s on a test machine (fake)" if notebook.startswith("01") else "well under a minute"


def fake_status(profile: str, seed: int = 0, retrain: bool | None = None) -> tuple[bool, str]:
    """reference.status of a retraining run."""
    assert retrain is True
    return False, "retrain: every model is trained here (fake)"


@pytest.fixture(scope="module")
def run(notebooks: Path, tmp_path_factory) -> tuple[int, str, Path]:
    """``main`` once over the three notebooks with ``NEMU_RETRAIN=1``: (exit status, what it printed, outputs)."""
    out = tmp_path_factory.mktemp("outputs")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):  # the heartbeat thread's too
        env = {"NEMU_OUTPUTS": str(out), "NEMU_RETRAIN": "1", "NEMU_PROFILE": "cpu", "NEMU_BATCH": "0",
               "NEMU_PROGRESS": "final"}
        for name, value in env.items():
            mp.setenv(name, value)  # and restored afterwards: the runner sets NEMU_PROFILE and NEMU_BATCH
        mp.setattr(series.reference, "status", fake_status)
        mp.setattr(series.budget, "expected_time", fake_expected_time)
        status = series.main(["--notebooks", str(notebooks), "--profile", "smoke", "--heartbeat", "0.5"])
    return status, printed.getvalue(), out


def test_lines_before_during_and_after_each_notebook(run):
    _, printed, _ = run
    lines = printed.splitlines()
    assert lines[0].startswith(f"nemu series | profile smoke | device {series.device()} | retrain: every model is "
                               "trained here (fake) | 3 notebooks -> ")
    assert "[1/3] 01_sleeps | expected ~3 s on a test machine (fake) | reference models: no" in lines
    assert "[2/3] 02_fails | expected well under a minute | reference models: no" in lines
    beats = [line for line in lines if line.startswith("  01_sleeps | 1. Sleeping | ")]
    assert beats and all(line.endswith(" elapsed of ~3 s") for line in beats), printed
    assert not any("1.1 A sub" in line or "not a heading" in line for line in lines)
    after = {line.split(" | ")[0]: line.split(" | ", 1)[1] for line in lines if line.startswith("[") and " in " in line}
    assert after["[1/3] 01_sleeps"].startswith("ok in 0:0")
    assert after["[2/3] 02_fails"].startswith("FAILED in 0:0")
    assert after["[2/3] 02_fails"].endswith("| AssertionError: 1 + 1 is not 3 (section 1. Arithmetic)")
    assert after["[3/3] 03_plain"].startswith("ok in ")
    assert "\r" not in printed


def test_exit_status_and_failures_listed(run):
    status, printed, out = run
    assert status == 1
    last = printed.rstrip().splitlines()[-1]
    assert last.startswith("series: 2 ok, 1 failed in ") and last.endswith(
        f": FAILED 02_fails (executed copies with the error in {out / 'notebooks'})")


def test_executed_copies_keep_the_error_and_retrain_only_where_declared(run):
    _, _, out = run
    copies = {name: nbformat.read(out / "notebooks" / f"{name}.ipynb", as_version=4)
              for name in ("01_sleeps", "02_fails", "03_plain")}
    injected = {name: [c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
                for name, nb in copies.items()}
    assert injected["01_sleeps"] == ["# Parameters\nretrain = True\n"]
    assert injected["02_fails"] == injected["03_plain"] == []
    code = [c for c in copies["02_fails"].cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert [e.ename for e in errors] == ["AssertionError"]


def test_summary_markdown_and_json(run):
    _, printed, out = run
    md = (out / "run-summary.md").read_text()
    assert (f"profile smoke, retrain on, retrain: every model is trained here (fake), device {series.device()}: 3 of 3 "
            "notebooks run, 1 failed") in md
    header, rows = md.splitlines()[4], [line for line in md.splitlines() if line.startswith("| 0")]
    assert [cell.strip() for cell in header.split("|")[1:5]] == ["notebook", "expected", "measured", "result"]
    assert all(row in printed.splitlines() for row in [header, *rows])  # the same table printed at the end
    assert [row.split("|")[1].strip() for row in rows] == ["01_sleeps", "02_fails", "03_plain"]
    assert [row.split("|")[2].strip() for row in rows] == ["~3 s", "well under a minute", "well under a minute"]
    assert rows[1].split("|")[4].strip() == "FAILED: AssertionError: 1 + 1 is not 3 (section 1. Arithmetic)"
    summary = json.loads((out / "run-summary.json").read_text())
    assert (summary["profile"], summary["retrain"], summary["reference_models"], summary["planned"]) == (
        "smoke", True, False, 3)
    first, failed, _ = summary["notebooks"]
    assert first["name"] == "01_sleeps" and first["expected"] == "~3 s on a test machine (fake)"
    assert first["expected_seconds"] == 3.0 and first["ok"] and first["error"] == ""
    assert 2.5 < first["measured_seconds"] < 30
    assert failed["expected_seconds"] == 60.0 and not failed["ok"]
    assert failed["error"] == "AssertionError: 1 + 1 is not 3 (section 1. Arithmetic)"
    assert (out / "results.md").is_file()  # nemu_lib.results ran


def test_the_prose_check_runs_at_the_end(run):
    _, printed, _ = run
    assert any(line.startswith("prose numbers: ") for line in printed.splitlines()), printed


@pytest.mark.parametrize(("profile", "ok"), [("cpu", False), ("gpu", True)])
def test_a_wrong_figure_in_the_text_fails_only_the_profile_it_quotes(tmp_path, profile, ok):
    (tmp_path / "notebooks").mkdir()
    nb = {"cells": [{"cell_type": "code", "source": "print(0.55)", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": "0.55\n"}]},
        {"cell_type": "markdown", "source": "They agree: r = 0.55, not −0.20."}]}
    (tmp_path / "notebooks" / "07_x.ipynb").write_text(json.dumps(nb))
    (tmp_path / "run-summary.json").write_text(json.dumps({"profile": profile}))
    lines: list[str] = []
    assert series.check_prose(tmp_path, ["07_x"], profile, echo=lines.append) is ok
    assert lines[0].startswith("prose: 07_x cell 1: '−0.20'")
    assert lines[-1].startswith("prose numbers: 1 of 2 figures the text quotes were found in the run; 1 not (above)")
    assert ("cpu profile's run" in lines[-1]) is ok
    assert series.check_prose(tmp_path, [], profile, echo=lines.append)  # only the notebooks that ran


def test_parameters_only_when_retraining_and_declared(notebooks):
    assert series.notebook_parameters(notebooks / "01_sleeps.ipynb", retrain=True) == {"retrain": True}
    assert series.notebook_parameters(notebooks / "01_sleeps.ipynb", retrain=False) == {}
    assert series.notebook_parameters(notebooks / "03_plain.ipynb", retrain=True) == {}
    assert series.notebook_parameters(notebooks / "02_fails.ipynb", retrain=True) == {}


def test_only_selects_by_prefix(notebooks):
    paths = sorted(notebooks.glob("*.ipynb"))
    assert [p.stem for p in series.select(paths, "01, 03")] == ["01_sleeps", "03_plain"]
    assert series.select(paths, "") == paths
    with pytest.raises(SystemExit):
        series.main(["--notebooks", str(notebooks), "--only", "09"])


@pytest.mark.parametrize(("text", "short", "seconds"), [
    ("~5.5 min on an idle 2-core CPU the first time (four decoders ~4.5 min), ~1 min once they are saved",
     "~5.5 min", 330.0),
    ("~15 s", "~15 s", 15.0),
    ("~3.4 h on a 2-core CPU (estimated by nemu_lib.budget for a first run)", "~3.4 h", 3.4 * 3600),
    ("about a minute on an idle CPU", "about a minute", 60.0),
    ("well under a minute", "well under a minute", 60.0),
    ("no idea", "no idea", None),
])
def test_expected_text_and_seconds(text, short, seconds):
    assert series.short_expected(text) == short
    assert series.expected_seconds(text) == (pytest.approx(seconds) if seconds else None)


def test_heartbeat_names_a_new_section_at_once_and_a_long_one_every_six_beats():
    lines: list[str] = []
    with series.Progress("nb", "~1 s", interval=0.02, echo=lines.append) as progress:
        time.sleep(0.5)  # at most 25 beats: lines at beats 1, 7, 13, 19, 25
        progress.on_cell_start(new_markdown_cell("## 2. Next"), 3)
        deadline = time.monotonic() + 5
        while not lines[-1].startswith("  nb | 2. Next | ") and time.monotonic() < deadline:
            time.sleep(0.01)
    sections = [line.split(" | ")[1] for line in lines]
    assert 1 <= sections.count("starting the kernel") <= 5 and sections[-1] == "2. Next", lines


def test_clock():
    assert [series.clock(s) for s in (0, 9.4, 100, 3723)] == ["0:00", "0:09", "1:40", "1:02:03"]
