"""The notebooks' first code cell: one install bootstrap in every notebook, and a clear sentence when it fails."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))
END = "    from nemu_lib.notebook import setup\n"  # the install branch's last line


def _first_cell(path: Path) -> str:
    """The first code cell after the tagged parameters cell."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    return "".join(cells[tagged[0] + 1]["source"])


def _bootstrap(path: Path) -> str:
    source = _first_cell(path)
    return source[:source.rindex(END) + len(END)]


def test_every_notebook_starts_with_the_same_short_setup_cell():
    assert len(NOTEBOOKS) >= 6
    first = _bootstrap(NOTEBOOKS[0])
    assert "NEMU_SOURCE" in first and "nemu-xai" not in first
    for path in NOTEBOOKS:
        cell = _first_cell(path)
        assert cell.startswith(first), path.name
        setup_line = f'P, dev, out = setup(profile, seed, "{path.stem}", retrain=retrain)'
        assert cell[len(first):].strip() == setup_line, path.name
        assert len(cell.splitlines()) <= 12, path.name


@pytest.mark.parametrize("colab", [False, True])
def test_a_failed_install_says_what_to_do(tmp_path, colab):
    """In a fresh interpreter where ``import nemu_lib`` fails (Colab faked or not), pip fails, the cell explains."""
    prelude = textwrap.dedent(f"""
        import sys, types
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "nemu_lib" or name.startswith("nemu_lib."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        if {colab}:
            sys.modules["google.colab"] = types.ModuleType("google.colab")
    """)
    env = {"PATH": "/usr/bin:/bin", "NEMU_SOURCE": str(tmp_path / "no-such-folder"), "PIP_NO_INDEX": "1",
           "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", prelude + _bootstrap(NOTEBOOKS[0])], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: could not install nemu_lib from {tmp_path / 'no-such-folder'}: ")
    for hint in ("run `make setup`", "%env NEMU_SOURCE=", "upload the repository to /content/nemu"):
        assert hint in last
