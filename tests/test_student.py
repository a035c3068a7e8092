"""Student copies (nemu_lib.student): solutions gone, each check right after its answer, and run top to bottom
with every answer left None, every check prints its hint and none says "correct"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nemu_lib import student

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _cell(kind: str, source: str, tags: list[str] | None = None) -> dict:
    cell = {"cell_type": kind, "metadata": {"tags": tags} if tags else {}, "source": source}
    return cell | ({"outputs": [{"output_type": "stream", "name": "stdout", "text": "x"}], "execution_count": 3}
                   if kind == "code" else {})


def _toy() -> dict:
    return {"cells": [
        _cell("markdown", "## Exercises"),
        _cell("markdown", "In this complete version ...", ["solution"]),
        _cell("code", "answer = None  # the mean"),
        _cell("code", "answer = 2.0", ["solution"]),
        _cell("code", "if answer is None:\n    print('Hint: mean')\nelse:\n    assert answer == 2.0"),
    ], "metadata": {"widgets": {"state": {}}}, "nbformat": 4, "nbformat_minor": 5}


def test_student_copy_drops_solutions_and_outputs():
    nb = _toy()
    assert student.exercises(nb) == [(2, 3, 4)]
    copy = student.student_copy(nb)
    assert [c["source"][:12] for c in copy["cells"]] == ["## Exercises", "answer = Non", "if answer is"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in copy["cells"] if c["cell_type"] == "code")
    assert "widgets" not in copy["metadata"]
    assert len(nb["cells"]) == 5 and nb["cells"][2]["outputs"], "the complete notebook is left as it was"


@pytest.mark.parametrize("misplace", ["no answer before", "no check after"])
def test_a_misplaced_solution_is_an_error(misplace):
    nb = _toy()
    if misplace == "no answer before":
        nb["cells"][2]["source"] = "answer = 1.0"
    else:
        nb["cells"][4]["source"] = "print(answer)"
    with pytest.raises(ValueError, match="between an answer cell"):
        student.student_copy(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_every_notebook_has_exercises_a_student_copy_can_take(path):
    nb = json.loads(path.read_text())
    found = student.exercises(nb)
    assert len(found) >= 3, f"{path.name}: {len(found)} exercises"
    copy = student.student_copy(nb)
    assert not any(student.is_solution(c) for c in copy["cells"])
    for i, cell in enumerate(copy["cells"]):
        if student.CHECK in "".join(cell["source"]) and cell["cell_type"] == "code":
            assert student.ANSWER.search("".join(copy["cells"][i - 1]["source"])), (path.name, i)


def test_make_student_writes_every_notebook(tmp_path):
    assert student.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]


def _outputs_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.append("".join(out.get("data", {}).get("text/plain", "")))
        if out.get("output_type") == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_student_notebook_run_top_to_bottom_prints_hints(path, monkeypatch):
    """The smoke profile, every answer left None: each check prints a hint, none prints "correct"."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    for key, value in {"NEMU_PROFILE": "smoke", "NEMU_BATCH": "1", "NEMU_PROGRESS": "final",
                       "NEMU_OUTPUTS": str(ROOT / "outputs" / "smoke")}.items():
        monkeypatch.setenv(key, os.environ.get(key, value) if key == "NEMU_OUTPUTS" else value)
    nb = nbformat.reads(json.dumps(student.student_copy(json.loads(path.read_text()))), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    checks = [c for c in nb.cells if c.cell_type == "code" and student.CHECK in c.source]
    assert len(checks) >= 3
    for cell in checks:
        text = _outputs_text(cell)
        assert "hint" in text.lower() or "this exercise uses" in text, (path.name, cell.source[:80], text[:300])
        assert "correct" not in text.lower(), (path.name, cell.source[:80], text[:300])
