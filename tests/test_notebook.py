"""nemu_lib.notebook.setup: the one call every notebook's first cell makes."""

import os
import sys
import types
from pathlib import Path

import torch

from nemu_lib import budget, config, notebook, reference, viz
from nemu_lib.config import get_profile


def test_setup_returns_profile_device_outputs_and_prints_one_header(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setenv("NEMU_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(viz, "_PREFIX", [None])
    p, dev, out = notebook.setup("smoke", seed=3, notebook="03_nemu", prefer="cpu")
    assert p == get_profile("smoke") and dev == torch.device("cpu") and out == tmp_path / "out"
    assert viz._PREFIX == ["03"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("profile smoke | device cpu")
    assert lines[1] == "expected wall time: under a minute on an idle CPU"  # budget.MEASURED
    uses, line = reference.status("smoke", 3)
    assert not uses and lines[2] == line  # reference models ship for the cpu profile and seed 0 only
    assert lines[3:] == [f"data    -> {tmp_path / 'data'}", f"outputs -> {tmp_path / 'out'}"]
    a = torch.rand(3)
    notebook.setup("smoke", seed=3, prefer="cpu")
    assert torch.equal(a, torch.rand(3))  # seeded the same way both times


def test_setup_retrain_turns_the_reference_models_off_for_the_kernel(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    monkeypatch.setattr(reference, "_enabled", None)
    notebook.setup("cpu", notebook="03_nemu", prefer="cpu", retrain=True)
    assert not reference.enabled()
    out = capsys.readouterr().out
    assert "every model is trained here" in out and budget.MEASURED["03_nemu"]["cpu"] in out
    notebook.setup("cpu", notebook="03_nemu", prefer="cpu")
    assert reference.enabled()
    with_reference = budget.expected_time("03_nemu", "cpu", "cpu", reference=True)
    assert (with_reference in capsys.readouterr().out) == bool(reference.manifest()["files"])


def test_setup_estimates_the_time_nobody_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    notebook.setup("gpu", notebook="02_relax", prefer="cpu")
    assert "estimated by nemu_lib.budget" in capsys.readouterr().out


def test_on_colab_data_and_outputs_go_to_content(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    for name in ("NEMU_DATA", "NEMU_OUTPUTS"):  # set, then delete: teardown restores the original state
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    folders = {}
    monkeypatch.setattr(config, "_dir", lambda env, default: folders.setdefault(env, Path(os.environ[env])))
    notebook.setup("smoke", prefer="cpu")
    assert notebook.in_colab()
    assert folders == {"NEMU_DATA": Path("/content/nemu/data"), "NEMU_OUTPUTS": Path("/content/nemu/outputs")}


def test_batch_runs_are_not_interactive(monkeypatch):
    monkeypatch.delenv("NEMU_BATCH", raising=False)
    assert notebook.interactive()
    monkeypatch.setenv("NEMU_BATCH", "1")
    assert not notebook.interactive()
    monkeypatch.setenv("NEMU_BATCH", "0")
    assert notebook.interactive()
