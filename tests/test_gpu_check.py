"""scripts/gpu_check.py (``make gpu-check``): its no-GPU exit, the torch pins, step selection, summary lines."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_one_clear_line_and_exit_0_or_2_with_require_gpu(tmp_path):
    runs = {flag: subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *flag],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for flag in ((), ("--require-gpu",))}  # side by side: each imports torch once
    for flag, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == (2 if flag else 0), stderr
        lines = stdout.splitlines()
        assert len(lines) == 1, stdout
        assert lines[0].startswith("gpu-check: no CUDA device visible to ")
        assert f"torch {torch.__version__}" in lines[0] and "nothing to check here" in lines[0]
        assert "Runtime > Change runtime type > GPU" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing checked, nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_env_step_on_cuda_names_the_gpu(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--only", "env", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    first, last = result.stdout.splitlines()[0], result.stdout.splitlines()[-1]
    m = gpu_check.LINE_RE.match(first)
    assert m and m["step"] == "env" and m["status"] == "ok"
    assert torch.cuda.get_device_name(0) in first
    assert last.startswith("gpu-check: all 1 ok")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["device"] == "cuda" and summary["results"][0]["name"] == "env"


def test_constraints_pin_the_installed_torch_and_torchvision_exactly():
    text = gpu_check.torch_constraints(gpu_check.installed_torch_versions())
    pins = dict(line.split("==") for line in text.splitlines())
    # what pip compares: the distribution's version (PyPI's CUDA wheels have no +cuXXX there, __version__ does)
    assert pins["torch"] == importlib.metadata.version("torch")
    assert torch.__version__ == pins["torch"] or torch.__version__.startswith(pins["torch"] + "+")
    torchvision = pytest.importorskip("torchvision")
    assert pins["torchvision"] == importlib.metadata.version("torchvision")
    assert torchvision.__version__.split("+")[0] == pins["torchvision"].split("+")[0]
    assert gpu_check.torch_constraints({"torch": "2.11.0+cu130", "torchvision": "0.26.0+cu130", "torchaudio": None}) \
        == "torch==2.11.0+cu130\ntorchvision==0.26.0+cu130\n"


def test_a_local_label_pin_admits_only_that_build():
    specifiers = pytest.importorskip("packaging.specifiers")
    pin = specifiers.SpecifierSet("==2.11.0+cu130")
    assert pin.contains("2.11.0+cu130")
    assert not pin.contains("2.11.0+cu126") and not pin.contains("2.11.0") and not pin.contains("2.12.0")


def test_unmet_requirements_reads_presence_and_versions():
    assert gpu_check.unmet_requirements(["pytest>=1", "torch"]) == []
    unmet = gpu_check.unmet_requirements(["pytest>=99999", "surely-no-such-package-nemu>=1"])
    assert unmet[0].startswith(f"pytest {importlib.metadata.version('pytest')} (needs >=99999")
    assert unmet[1] == "surely-no-such-package-nemu (not installed)"


def test_requirements_from_pyproject_with_and_without_a_toml_parser():
    reqs = gpu_check.project_requirements()
    names = {gpu_check.requirement_name(r) for r in reqs}
    assert {"torch", "numpy", "pytest", "papermill", "nbval", "relax-xai"} <= names
    fallback = gpu_check._parse_pyproject_lists((ROOT / "pyproject.toml").read_text())
    assert [*fallback["project"]["dependencies"], *fallback["project"]["optional-dependencies"]["dev"]] == reqs
    wheels = {gpu_check.requirement_name(r) for r in gpu_check.wheel_requirements()}
    assert "torch" not in wheels and "torchvision" not in wheels
    assert {"setuptools", "wheel", "pytest", "relax-xai"} <= wheels  # the build back-end for --no-index


def test_step_selection():
    assert gpu_check.select_steps(None, None) == list(gpu_check.STEPS)
    assert gpu_check.select_steps("torchrun-resume,benches", None) == ["env", "torchrun-resume", "benches"]
    assert gpu_check.select_steps(None, "install, pytest") == ["env", "notebooks", "torchrun-resume", "benches"]
    assert gpu_check.select_steps("pytest,notebooks", "notebooks") == ["env", "pytest"]
    assert gpu_check.select_steps("env", None) == ["env"]
    with pytest.raises(ValueError, match="unknown step"):
        gpu_check.select_steps("pytest,gpu", None)
    with pytest.raises(ValueError, match="env cannot be skipped"):
        gpu_check.select_steps(None, "env")
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--skip", "nope"])
    assert exc.value.code == 2


def test_summary_lines_have_the_documented_form(tmp_path):
    ok = gpu_check.summary_line("pytest", True, 12.345, "120 passed,\n 0 failed")
    assert ok == "gpu-check: pytest ... ok (12.3 s): 120 passed, 0 failed"
    failed = gpu_check.summary_line("notebooks/03_nemu", False, 3.0)
    assert failed == "gpu-check: notebooks/03_nemu ... FAILED (3.0 s)"
    for line in (ok, failed):
        assert gpu_check.LINE_RE.match(line)
    results = [gpu_check.Result("env", True, 1.0), gpu_check.Result("benches/quality", False, 2.0, "boom")]
    assert gpu_check.final_line(results, tmp_path / "summary.json").startswith(
        "gpu-check: 1 of 2 ok, 1 FAILED (benches/quality); summary ")
    assert gpu_check.final_line(results[:1], tmp_path / "summary.json").startswith("gpu-check: all 1 ok; ")


def test_junit_counts_and_bench_figures(tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a[cuda]"/><testcase classname="t" name="b">'
                   '<failure message="x"/></testcase><testcase classname="t" name="c"><skipped/></testcase>'
                   '<testcase classname="t" name="without_cuda"/><testcase classname="t" name="d[cuda-float32]"/>'
                   '<testcase classname="t" name="e[cpu]"/></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert counts == {"passed": 4, "failed": 1, "errors": 0, "skipped": 1, "cuda_passed": 2, "failing": ["t::b"]}
    q = {"median": 2.0, "min": 1.0, "max": 3.0}
    speed = {"cases": [{"case": "small", "batches": [{"batch": 1, "ratios": {
        "nemu_w32_over_encoder": q, "relax3000_over_nemu_w32": {**q, "median": 1500.0}}}]}]}
    assert gpu_check.bench_figures("nemu_speed", speed) == "small B=1: NEM-U/encoder 2.00x, RELAX-3000/NEM-U 1,500x"
