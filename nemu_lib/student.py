"""Student copies of the notebooks: the exercises without their worked solutions.

The committed notebooks are the complete version: each exercise is an answer cell (``answer = None``), a worked
solution (a cell tagged ``solution``) and a check, so that running them top to bottom (``make run``, nbval)
runs and checks every solution. That order is wrong for a student: "Run All" overwrites their answer with the
solution and the check prints "correct". :func:`student_copy` drops every cell tagged ``solution`` (the worked
solutions and the note that explains them), so each check follows its answer cell and, with the answers left
``None``, prints its hint; it also drops outputs and execution counts.

Usage: ``python -m nemu_lib.student [--out outputs/student]`` (``make student``) writes a copy of every
``notebooks/[0-9]*.ipynb``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path

from .checkpoint import atomic_write
from .config import outputs_dir, project_root

SOLUTION_TAG = "solution"  # a worked solution, or a note that only makes sense beside the solutions
ANSWER = re.compile(r"^answer = None\b", re.MULTILINE)  # an exercise's answer cell
CHECK = "answer is None"  # an exercise's check: a hint while the answer is None


def _text(cell: Mapping) -> str:
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def is_solution(cell: Mapping) -> bool:
    """Whether ``cell`` is tagged as a worked solution (or a note about them)."""
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def exercises(notebook: Mapping) -> list[tuple[int, int, int]]:
    """``(answer, solution, check)`` cell indices of each exercise in a complete notebook.

    Raises:
        ValueError: a solution cell not between an answer cell and a check cell, which a student copy would
            leave without its check right after the answer.
    """
    cells = notebook["cells"]
    found = []
    for i, cell in enumerate(cells):
        if not is_solution(cell) or cell.get("cell_type") != "code":
            continue
        answer, check = i - 1, i + 1
        if (answer < 0 or check >= len(cells) or not ANSWER.search(_text(cells[answer]))
                or CHECK not in _text(cells[check])):
            raise ValueError(f"cell {i} is a solution but not between an answer cell ('answer = None') and a check "
                             f"('if answer is None: ...'): put it there, or drop its '{SOLUTION_TAG}' tag")
        found.append((answer, i, check))
    return found


def student_copy(notebook: Mapping) -> dict:
    """``notebook`` without its solution cells, outputs and execution counts (module docstring)."""
    exercises(notebook)  # the structure a student copy relies on
    nb = copy.deepcopy(dict(notebook))
    nb["cells"] = [c for c in nb["cells"] if not is_solution(c)]
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def write_student_copies(notebooks: Path, out: Path) -> list[Path]:
    """A student copy of every ``notebooks/[0-9]*.ipynb`` in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(notebooks.glob("[0-9]*.ipynb")):
        nb = student_copy(json.loads(path.read_text()))
        text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        atomic_write(out / path.name, lambda f, text=text: f.write(text.encode()))
        written.append(out / path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m nemu_lib.student``: write the student copies, print where."""
    parser = argparse.ArgumentParser(prog="python -m nemu_lib.student", description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=project_root() / "notebooks", metavar="FOLDER",
                        help="the complete notebooks (default: notebooks/)")
    parser.add_argument("--out", type=Path, default=None, metavar="FOLDER",
                        help="where the copies go (default: outputs/student)")
    args = parser.parse_args(argv)
    out = args.out or outputs_dir() / "student"
    written = write_student_copies(args.notebooks, out)
    n = sum(len(exercises(json.loads((args.notebooks / p.name).read_text()))) for p in written)
    print(f"{len(written)} student notebooks, {n} exercises without their solutions -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
