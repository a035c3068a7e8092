"""The notebooks' first cell: one install bootstrap in every notebook, and a clear sentence when it fails."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))


def _bootstrap(path: Path) -> str:
    """The first code cell's lines up to and including the ``import nemu_lib`` of the install branch."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    source = next("".join(c["source"]) for c in cells if "except ImportError" in "".join(c["source"]))
    end = source.index("    import nemu_lib\n", source.index("except ImportError")) + len("    import nemu_lib\n")
    return source[:end]


def test_every_notebook_has_the_same_bootstrap():
    assert len(NOTEBOOKS) >= 6
    first = _bootstrap(NOTEBOOKS[0])
    assert "NEMU_SOURCE" in first and "nemu-xai" not in first
    for path in NOTEBOOKS[1:]:
        assert _bootstrap(path) == first, path.name


def _run(code: str, env: dict, colab: bool) -> subprocess.CompletedProcess:
    """Run the bootstrap in a fresh interpreter where ``import nemu_lib`` fails (and Colab is faked)."""
    prelude = textwrap.dedent(f"""
        import sys, types
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "nemu_lib":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        if {colab}:
            sys.modules["google.colab"] = types.ModuleType("google.colab")
    """)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("colab", [False, True])
def test_a_failed_install_says_what_to_do(tmp_path, colab):
    env = {"PATH": "/usr/bin:/bin", "NEMU_SOURCE": str(tmp_path / "no-such-folder"), "PIP_NO_INDEX": "1",
           "HOME": str(tmp_path), "NEMU_DATA": str(tmp_path), "NEMU_OUTPUTS": str(tmp_path)}
    out = _run(_bootstrap(NOTEBOOKS[0]), env, colab)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: could not install nemu_lib from ") and "%env NEMU_SOURCE=" in last
    assert "upload the repository to /content/nemu" in last


def test_outside_colab_without_a_source_it_points_to_make_setup(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = _run(_bootstrap(NOTEBOOKS[0]), env, colab=False)
    assert out.returncode != 0 and "run `make setup` in the repository root" in out.stderr
