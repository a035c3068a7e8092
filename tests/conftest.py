"""Shared test settings and the device fixtures.

Tiny models run fastest (and most repeatably) on one thread.

Device safety on a machine without a GPU: :func:`stray_tensor_guard` makes ``meta`` the default device
while a function runs, so any tensor it creates without naming a device (``torch.zeros(n)``, a
``torch.tensor`` of constants) lands on ``meta`` and the first operation that mixes it with the inputs
fails, as it would on CUDA with the inputs on the GPU and the stray tensor on the CPU. The ``device``
fixture adds ``cuda`` where one is present (``make gpu-check``).
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def references_as_in_a_new_process(monkeypatch) -> None:
    """Each test starts as a new kernel would: no notebook has chosen for or against the reference models yet
    (``nemu_lib.notebook.setup`` sets that per process), so ``NEMU_RETRAIN`` decides."""
    from nemu_lib import reference

    monkeypatch.setattr(reference, "_enabled", None)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """A fresh outputs folder per test module (set NEMU_OUTPUTS to it): trained models shared by its tests."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every available device: ``cpu``, and ``cuda`` when present."""
    return torch.device(request.param)


@contextlib.contextmanager
def stray_tensor_guard() -> Iterator[None]:
    """Run the block with ``meta`` as the default device: a tensor created without a device fails to mix."""
    with torch.device("meta"):
        yield



def cli_error(capsys, argv: list[str]) -> str:
    """Run ``nemu argv``, expect a clean failure (exit status 2, one line, no traceback); return the line."""
    from nemu_lib import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("nemu: error: ")
    return line
