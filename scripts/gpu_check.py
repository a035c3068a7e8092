"""One command for whoever has a GPU: ``make gpu-check`` (or ``python3 scripts/gpu_check.py``).

Checks, on the GPU that torch sees, that the repository does there what it does on a CPU. Each step runs
as a subprocess with its own time limit and prints one summary line
``gpu-check: <step> ... ok|FAILED (<seconds> s)[: detail]``; a failed step does not stop the others. A
last line counts them, ``summary.json`` in the output folder holds every step's status, seconds and
figures, and the exit status is 1 when any step failed.

- ``env``: python, torch, CUDA, cuDNN and NCCL versions, the GPUs and their memory. Always runs: this is
  where a machine without CUDA is found, which ends the check with one line and exit status 0 (2 with
  ``--require-gpu``).
- ``install``: when the interpreter lacks what ``pyproject.toml`` lists (dev tools and test oracles
  included), ``pip install -e '.[dev]'`` with a constraints file that pins the installed torch,
  torchvision (and torchaudio) to their exact versions, so a Colab runtime or a cluster image keeps its
  CUDA build; ``--wheelhouse DIR`` (or ``NEMU_WHEELHOUSE``) installs offline from wheels that
  ``make wheels`` downloaded on a machine with internet.
- ``pytest``: ``python -m pytest tests`` with CUDA visible (the ``device`` fixture adds ``cuda``).
- ``notebooks``: every ``notebooks/[0-9]*.ipynb`` through papermill in the ``smoke`` profile, one line each.
- ``torchrun-resume``: ``torchrun --standalone --nproc_per_node=N -m nemu_lib.train`` (smoke profile, a
  random encoder, fp32, 64 steps on CUDA): an uninterrupted run; a run killed with SIGKILL (torchrun and
  its workers) as soon as its first checkpoint appears; that run resumed with ``--resume``. The resumed
  run's final decoder must match the uninterrupted one exactly on a CPU. On CUDA the backward passes of
  bilinear interpolation and adaptive average pooling have no deterministic kernel, and AdamW magnifies
  their rounding, so a second uninterrupted run measures that drift on the spot and the bound is
  max(1e-4, 3 x that drift). N: two GPUs when there are two or more, else one; under torchrun
  ``nemu_lib.launch`` joins a process group even with one process (NCCL on a GPU, gloo on a CPU).
- ``benches``: every ``bench/*.py`` with ``--device`` and ``--json``, in its quick settings, on the GPU;
  each JSON is saved under ``benches/`` and one line of its key figures is printed.

Usage::

    make gpu-check                                  # everything; outputs/gpu-check/summary.json
    python3 scripts/gpu_check.py --only pytest,notebooks
    python3 scripts/gpu_check.py --skip install --out /tmp/gpu-check --require-gpu
    make wheels WHEEL_PYTHON=3.12                   # with internet: dev dependencies as wheels in .whl/
    python3 scripts/gpu_check.py --wheelhouse .whl  # then offline, on the GPU machine

``--allow-cpu`` (a diagnostic, not shown in ``--help``) runs the steps on a CPU instead (device ``cpu``,
gloo between two processes), to test this script's plumbing where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "install", "pytest", "notebooks", "torchrun-resume", "benches")
# seconds each subprocess may run (a notebook, a bench and each of the three training runs count alone)
LIMITS = {"env": 180, "install": 1800, "pytest": 2400, "notebook": 900, "train": 600, "bench": 900, "read": 120}
# the form of every summary line (the tests hold the script to it)
LINE_RE = re.compile(r"^gpu-check: (?P<step>\S+) \.\.\. (?P<status>ok|FAILED) \((?P<seconds>\d+\.\d) s\)"
                     r"(?:: (?P<detail>.+))?$")
NO_CUDA_HINT = "run this on a GPU machine (Colab: Runtime > Change runtime type > GPU)"
PINNED = ("torch", "torchvision", "torchaudio")  # kept as installed: the machine's own CUDA builds
# never in the wheelhouse: torch and the CUDA libraries come with the GPU machine's image
WHEELHOUSE_LEAVES_OUT = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# pip matches platform tags exactly: every manylinux x86_64 tag a glibc 2.39 machine (Ubuntu 24.04) accepts
WHEEL_PLATFORMS = (*(f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)), "manylinux2014_x86_64",
                   "manylinux2010_x86_64", "manylinux1_x86_64")
# the quick settings of the benches this script knows; another bench runs with --device and --json alone
BENCH_ARGS = {
    "data_speed": ["--seconds", "1"],
    "nemu_speed": ["--quick"],
    "relax_vs_reference": ["--quick"],
    "quality": ["--profile", "smoke", "--encoders", "random"],
}
PYTEST_PATHS = ["tests"]  # all of them, as `make test` runs them
BENCH_ARGS_CPU = {"nemu_speed": ["--cases", "small"], "relax_vs_reference": ["--cases", "small"]}
# max |decoder weight difference|, resumed vs uninterrupted. On CUDA the backward passes of bilinear interpolate
# and adaptive average pooling add in a varying order (no deterministic kernel exists) and AdamW magnifies such
# rounding (on a CPU, 1 vs 2 processes differ by 1e-4 after 4 steps at lr 1e-2): there the bound is also
# NOISE_FACTOR x the gap between two uninterrupted runs, measured on the spot.
RESUME_TOLERANCE = {"cuda": 1e-4, "cpu": 0.0}
NOISE_FACTOR = 3.0

ENV_PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
except Exception as err:
    info["torch_error"] = f"{type(err).__name__}: {err}"
else:
    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
    if info["cuda"]:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = [{"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"} for p in props]
        info["cudnn"] = torch.backends.cudnn.version()
        info["bf16"] = torch.cuda.is_bf16_supported()
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:
            info["nccl"] = None
print(json.dumps(info))
"""

COMPARE = r"""
import json, sys, torch
ref, resumed, at_kill, *again = (torch.load(p, map_location="cpu", weights_only=True) for p in sys.argv[1:])

def max_abs_diff(x, y):
    a, b = x["decoder"], y["decoder"]
    assert a.keys() == b.keys(), "the two decoders have different parameters"
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)

def loss_diff(x, y):
    la, lb = x["history"]["loss"], y["history"]["loss"]
    return max((abs(p - q) for p, q in zip(la, lb)), default=0.0) if len(la) == len(lb) else float("inf")

out = {"max_abs_diff": max_abs_diff(ref, resumed), "loss_max_abs_diff": loss_diff(ref, resumed),
       "tensors": len(ref["decoder"]), "step_uninterrupted": ref["step"], "step_resumed": resumed["step"],
       "step_at_kill": at_kill["step"]}
if again:
    out.update(noise_max_abs_diff=max_abs_diff(ref, again[0]), noise_loss_max_abs_diff=loss_diff(ref, again[0]))
print(json.dumps(out))
"""


@dataclass
class Result:
    """One summary line: a step (or one notebook / bench of a step), its status, time and figures."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""
    figures: dict = field(default_factory=dict)

    def line(self) -> str:
        return summary_line(self.name, self.ok, self.seconds, self.detail)


@dataclass
class Run:
    """A finished subprocess: its exit status (``None`` when killed at its time limit), time and log."""

    returncode: int | None
    seconds: float
    log: Path
    limit: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def summary_line(step: str, ok: bool, seconds: float, detail: str = "") -> str:
    """``gpu-check: <step> ... ok|FAILED (<seconds> s)[: detail]`` (one line: newlines become spaces)."""
    line = f"gpu-check: {step} ... {'ok' if ok else 'FAILED'} ({seconds:.1f} s)"
    detail = " ".join(detail.split())
    return f"{line}: {detail}" if detail else line


def final_line(results: Sequence[Result], summary: Path) -> str:
    """The last line: how many steps passed, which failed, where the summary is."""
    failed = [r.name for r in results if not r.ok]
    if not failed:
        return f"gpu-check: all {len(results)} ok; summary {summary}"
    return (f"gpu-check: {len(results) - len(failed)} of {len(results)} ok, {len(failed)} FAILED "
            f"({', '.join(failed)}); summary {summary}, logs {summary.parent / 'logs'}")


def no_cuda_line(info: Mapping) -> str:
    """The one line a machine without a usable CUDA device gets."""
    python = info.get("executable", sys.executable)
    if "torch_error" in info:
        return (f"gpu-check: torch is not importable by {python} ({info['torch_error']}): nothing to check here; "
                f"install torch (or `make setup`), then {NO_CUDA_HINT}")
    return (f"gpu-check: no CUDA device visible to {python} (torch {info.get('torch')}, CUDA build "
            f"{info.get('cuda_build') or 'none'}): nothing to check here; {NO_CUDA_HINT}")


def select_steps(only: str | None, skip: str | None) -> list[str]:
    """The steps to run, in order, from ``--only`` and ``--skip`` (comma-separated); ``env`` always runs."""

    def names(text: str | None) -> set[str]:
        chosen = {s.strip() for s in (text or "").split(",") if s.strip()}
        unknown = sorted(chosen - set(STEPS))
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(unknown)}: choose among {', '.join(STEPS)}")
        return chosen

    keep, drop = names(only), names(skip)
    if "env" in drop:
        raise ValueError("env cannot be skipped: it is where the GPU is found")
    return [s for s in STEPS if s == "env" or ((not keep or s in keep) and s not in drop)]


# ---------------------------------------------------------------------------------------------------------
# requirements, the torch constraints, wheels


def _load_pyproject(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            return _parse_pyproject_lists(path.read_text())
    with open(path, "rb") as f:
        return tomllib.load(f)


def _parse_pyproject_lists(text: str) -> dict:
    """The three requirement lists of our pyproject.toml, without a TOML parser (Python 3.10 alone)."""

    def strings(key: str) -> list[str]:
        m = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.S | re.M)
        body = re.sub(r"#[^\n]*", "", m.group(1)) if m else ""
        return re.findall(r"\"([^\"]+)\"", body)

    return {"project": {"dependencies": strings("dependencies"), "optional-dependencies": {"dev": strings("dev")}},
            "build-system": {"requires": strings("requires")}}


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's dependencies and its ``dev`` extra (tools and test oracles), as requirement strings."""
    project = _load_pyproject(pyproject)["project"]
    return [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("dev", [])]


def requirement_name(requirement: str) -> str:
    """``"relax-xai==0.0.5"`` -> ``"relax-xai"`` (extras and markers dropped)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return m.group(1)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(requirements: Iterable[str]) -> list[str]:
    """Which requirements this interpreter does not meet: ``"name (not installed)"`` or ``"name X (needs S)"``.

    Versions are compared with ``packaging`` when it is importable (else presence alone counts).
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    unmet = []
    for text in requirements:
        name = requirement_name(text)
        have = installed_version(name)
        if have is None:
            unmet.append(f"{name} (not installed)")
        elif Requirement is not None:
            req = Requirement(text)
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name} {have} (needs {req.specifier})")
    return unmet


def torch_constraints(versions: Mapping[str, str | None]) -> str:
    """A pip constraints file that pins each installed package of ``versions`` to its exact version.

    The versions are the installed distributions' (what pip compares; :func:`installed_torch_versions`), local
    labels included where they have one (``torch==2.11.0+cu126`` from the PyTorch index: PEP 440 ``==`` with
    a local label admits only that build). PyPI's own CUDA wheels record none (metadata ``2.14.1`` while
    ``torch.__version__`` says ``2.14.1+cu130``): pinning ``__version__`` there would reject the installed
    torch. Either way pip keeps the machine's build, or fails, and never swaps it for another.
    """
    return "".join(f"{name}=={version}\n" for name, version in versions.items() if version)


def installed_torch_versions() -> dict[str, str | None]:
    return {name: installed_version(name) for name in PINNED}


def wheel_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What ``make wheels`` downloads: the build back-end and every requirement but torch/torchvision."""
    data = _load_pyproject(pyproject)
    build = data.get("build-system", {}).get("requires", [])
    return [*build, *(r for r in project_requirements(pyproject)
                      if not WHEELHOUSE_LEAVES_OUT.match(canonical(requirement_name(r))))]


def _resolve(requirements: Sequence[str], tmp: Path, flags: Sequence[str] = ()) -> list[dict] | None:
    """``pip install --dry-run --report``: the distributions pip would install (``None`` when it fails)."""
    report = tmp / "report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
           str(report), "--target", str(tmp / "target"), *flags, *requirements]  # pip < 24 wants a --target
    if subprocess.run(cmd, cwd=ROOT).returncode:
        return None
    return json.loads(report.read_text())["install"]


def download_wheels(dest: Path, python_version: str, torch_version: str | None = None,
                    exclude: Sequence[str] = (), platforms: Sequence[str] = WHEEL_PLATFORMS) -> int:
    """Download the wheels an offline GPU machine needs for ``pip install -e '.[dev]'`` into ``dest``.

    1. Resolves the dev dependencies for this interpreter and builds a wheel of each that PyPI has as a
       source distribution only (``antlr4-python3-runtime`` 4.9.3, which ``lightly`` needs through hydra).
    2. Resolves them again for CPython ``python_version`` on manylinux x86_64 with those wheels at hand
       (against ``torch==torch_version`` when given: the GPU machine's torch), and downloads each resolved
       wheel, leaving out torch, torchvision, torchaudio, triton, the nvidia-* / cuda-* libraries and the
       names in ``exclude`` (packages the machine has already).
    """
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        target += ["--platform", platform]
    skip = {canonical(e) for e in exclude}
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"torch=={torch_version}\n" if torch_version else "")
        reqs = [*wheel_requirements(), "-c", str(constraints)]
        print(f"wheels: resolving {' '.join(wheel_requirements())} (this interpreter)", flush=True)
        here = _resolve(reqs, Path(tmp))
        if here is None:
            print("wheels: FAILED to resolve the dev dependencies (see pip's message above)")
            return 1
        sdists = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in here
                  if not i["download_info"]["url"].split("#")[0].endswith(".whl")]
        if sdists:
            print(f"wheels: building {', '.join(sdists)} (PyPI has no wheel)", flush=True)
            build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest), *sdists]
            if subprocess.run(build, cwd=ROOT).returncode:
                print("wheels: FAILED to build those wheels (see pip's message above)")
                return 1
        print(f"wheels: resolving again for CPython {python_version} manylinux x86_64", flush=True)
        resolved = _resolve(reqs, Path(tmp), [*target, "--find-links", str(dest)])
        if resolved is None:
            print("wheels: FAILED to resolve the dev dependencies for that platform (see pip's message above)")
            return 1
    keep, left_out = [], []
    for item in resolved:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        (left_out if WHEELHOUSE_LEAVES_OUT.match(canonical(name)) or canonical(name) in skip else keep).append(
            f"{name}=={version}")
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *target, "--find-links", str(dest),
                "-d", str(dest), *keep]
    if subprocess.run(download, cwd=ROOT).returncode:
        print("wheels: FAILED to download (see pip's message above)")
        return 1
    size = sum(f.stat().st_size for f in dest.glob("*.whl")) / 2**20
    print(f"wheels: {len(keep)} wheels in {dest} ({size:.0f} MiB) for CPython {python_version} manylinux x86_64; "
          f"left out (the GPU machine's own): {', '.join(sorted(left_out)) or 'nothing'}")
    print(f"wheels: on the GPU machine: python3 scripts/gpu_check.py --wheelhouse {dest} "
          f"(or NEMU_WHEELHOUSE={dest} make gpu-check)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# subprocesses


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            ppid = int(text[text.rindex(")") + 2:].split()[1])  # pid (comm) state ppid ...
            children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] != "Z"


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the process and every process below it, reap it; return how many processes were killed.

    Its process group is not enough: torchrun starts each worker and jupyter_client each kernel in a
    session of its own, and those would run on (and write checkpoints) after their parent died. So the
    tree is frozen with SIGSTOP (no forks, no re-parenting) until no new process shows up, then killed.
    """
    frozen: set[int] = set()
    while True:
        children, todo, tree = _children(), [proc.pid], []
        while todo:
            for child in children.get(todo.pop(), []):
                tree.append(child)
                todo.append(child)
        new = [pid for pid in [proc.pid, *tree] if pid not in frozen]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        frozen.update(new)
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in frozen - {proc.pid}) and time.monotonic() < deadline:
        time.sleep(0.05)  # orphans are reaped by init (or a subreaper): wait until they are gone
    return len(frozen)


def start(cmd: Sequence[str], log: Path, env: Mapping[str, str], stdout: Path | None = None,
          cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``cmd`` in its own process group; stderr (and stdout unless ``stdout``) go to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(f"$ {subprocess.list2cmdline(cmd)}\n")
    err = open(log, "a")  # the child keeps its own descriptors: the parent's copies close below
    out = open(stdout, "w") if stdout else err
    try:
        return subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
    finally:
        err.close()
        if stdout:
            out.close()


def wait(proc: subprocess.Popen, limit: float) -> int | None:
    """The exit status, or ``None`` after killing the process group at ``limit`` seconds."""
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return None
    except BaseException:
        _kill_tree(proc)
        raise


def run_logged(cmd: Sequence[str], log: Path, limit: float, env: Mapping[str, str], stdout: Path | None = None,
               cwd: Path = ROOT) -> Run:
    t0 = time.perf_counter()
    proc = start(cmd, log, env, stdout, cwd)
    return Run(wait(proc, limit), time.perf_counter() - t0, log, limit)


def _last_error(log: Path) -> str:
    """The most telling line at the end of a log: the last error-looking line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines[1:] if ln and "it/s]" not in ln and "%|" not in ln]
    pattern = re.compile(r"(Error|Exception|error:|FAILED|Traceback|externally-managed)")
    for ln in reversed(lines[-60:]):
        if pattern.search(ln):
            return ln[:200]
    return lines[-1][:200] if lines else ""


def failure(run: Run, what: str = "") -> str:
    """``[what: ]timed out after N s | exit status N: <last error line>; log <path>``."""
    why = f"timed out after {run.limit:.0f} s" if run.returncode is None else f"exit status {run.returncode}"
    last = _last_error(run.log)
    return f"{what + ': ' if what else ''}{why}{': ' + last if last else ''}; log {run.log}"


# ---------------------------------------------------------------------------------------------------------
# the steps


class Check:
    """Runs the selected steps on ``device`` and collects their results."""

    def __init__(self, args: argparse.Namespace, out: Path, info: dict):
        self.args, self.out, self.info = args, out, info
        self.device = "cuda" if info.get("cuda") else "cpu"
        self.python = sys.executable
        self.logs = out / "logs"
        self.results: list[Result] = []
        self.measure_noise = self.device == "cuda"  # torchrun-resume: a second uninterrupted run for the noise
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])  # papermill's kernel
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)  # this checkout
        self.env = env

    def report(self, result: Result) -> Result:
        print(result.line(), flush=True)
        self.results.append(result)
        return result

    def fresh(self, name: str) -> Path:
        """An empty folder ``out/name`` (what an earlier check left there is removed)."""
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- install ------------------------------------------------------------------------------------------
    def install(self) -> None:
        t0 = time.perf_counter()
        wanted = [*project_requirements(), "nemu"]
        unmet = unmet_requirements(wanted)
        pins = installed_torch_versions()
        kept = ", ".join(f"{k} {v}" for k, v in pins.items() if v)
        if not unmet:
            self.report(Result("install", True, time.perf_counter() - t0,
                               f"skipped: pyproject's dependencies and dev tools are installed ({kept})",
                               {"skipped": True, "kept": pins}))
            return
        constraints = self.out / "constraints.txt"
        constraints.write_text(torch_constraints(pins))
        cmd = [self.python, "-m", "pip", "install", "--quiet", "-c", str(constraints)]
        wheelhouse = self.args.wheelhouse or os.environ.get("NEMU_WHEELHOUSE")
        if wheelhouse:
            cmd += ["--no-index", "--find-links", str(Path(wheelhouse).resolve())]
        cmd += ["-e", ".[dev]"]
        run = run_logged(cmd, self.logs / "install.log", LIMITS["install"], self.env)
        figures = {"unmet_before": unmet, "constraints": torch_constraints(pins).split(), "wheelhouse": wheelhouse}
        after, still = installed_torch_versions(), unmet_requirements(wanted)
        changed = [f"{k} {pins[k]} -> {after[k]}" for k in PINNED if pins[k] and after[k] != pins[k]]
        if not run.ok:
            detail = failure(run, "pip")
            if "externally-managed" in detail:
                detail += " (a system Python: use a venv, or PIP_BREAK_SYSTEM_PACKAGES=1)"
        elif changed or still:
            detail = f"pip ended well but {'; '.join(changed) or 'still unmet: ' + ', '.join(still)}"
        else:
            detail = (f"installed {len(unmet)} missing ({', '.join(u.split()[0] for u in unmet[:6])}"
                      f"{', ...' if len(unmet) > 6 else ''}){' offline from ' + wheelhouse if wheelhouse else ''}; "
                      f"kept {kept}")
        ok = run.ok and not changed and not still
        self.report(Result("install", ok, run.seconds, detail, {**figures, "unmet_after": still}))

    # -- pytest -------------------------------------------------------------------------------------------
    def pytest(self) -> None:
        xml = self.out / "pytest.xml"
        xml.unlink(missing_ok=True)
        cmd = [self.python, "-m", "pytest", *PYTEST_PATHS, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        run = run_logged(cmd, self.logs / "pytest.log", LIMITS["pytest"], self.env)
        counts = junit_counts(xml) if xml.exists() else {}
        if counts:
            detail = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped ({counts['cuda_passed']} cuda-parametrised passed)")
            if counts["failing"]:
                detail += f"; failing: {', '.join(counts['failing'][:3])}{' ...' if len(counts['failing']) > 3 else ''}"
            if not run.ok:
                detail += f"; log {run.log}"
        else:
            detail = failure(run, "no test report")
        self.report(Result("pytest", run.ok and bool(counts), run.seconds, detail, counts))

    # -- notebooks ----------------------------------------------------------------------------------------
    def notebooks(self) -> None:
        folder = self.fresh("notebooks")
        env = {**self.env, "NEMU_PROFILE": "smoke", "NEMU_OUTPUTS": str(folder / "outputs"), "NEMU_BATCH": "1"}
        books = notebook_paths()
        if not books:
            self.report(Result("notebooks", False, 0.0, "no notebooks/[0-9]*.ipynb found"))
        for nb in books:
            cmd = [self.python, "-m", "papermill", "--kernel", "python3", "--cwd", str(ROOT / "notebooks"),
                   "--no-progress-bar", str(nb), str(folder / nb.name)]
            run = run_logged(cmd, self.logs / f"notebook-{nb.stem}.log", LIMITS["notebook"], env)
            detail = f"smoke profile -> {folder / nb.name}" if run.ok else failure(run)
            self.report(Result(f"notebooks/{nb.stem}", run.ok, run.seconds, detail))

    # -- torchrun, killed and resumed -----------------------------------------------------------------------
    def _train_cmd(self, out: Path, steps: int, every: int, extra: Sequence[str]) -> list[str]:
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
               "-m", "nemu_lib.train", "--encoder", "random", "--profile", "smoke", "--steps", str(steps),
               "--ckpt-every", str(every), "--val-every", str(steps), "--device", self.device, "--no-progress",
               "--out", str(out), *extra]
        return cmd + (["--no-amp"] if self.device == "cuda" else [])

    @property
    def nproc(self) -> int:
        if self.args.nproc:
            return self.args.nproc
        return min(2, len(self.info.get("gpus", []))) if self.device == "cuda" else 2

    def torchrun_resume(self) -> None:
        t0 = time.perf_counter()
        folder = self.fresh("torchrun")
        env = {**self.env, "NEMU_PROFILE": "smoke", "NEMU_OUTPUTS": str(folder / "outputs")}
        steps = 64 if self.device == "cuda" else 40  # short: AdamW makes rounding noise grow with the steps
        every = steps // 8
        ref, cut = folder / "uninterrupted", folder / "killed"
        backend = "nccl" if self.device == "cuda" else "gloo"
        figures: dict = {"nproc": self.nproc, "backend": backend, "steps": steps, "ckpt_every": every,
                         "tolerance": RESUME_TOLERANCE[self.device], "amp": False}

        def fail(detail: str) -> None:
            self.report(Result("torchrun-resume", False, time.perf_counter() - t0, detail, figures))

        run = run_logged(self._train_cmd(ref, steps, every, ["--overwrite"]), self.logs / "torchrun-uninterrupted.log",
                         LIMITS["train"], env)
        if not run.ok:
            return fail(failure(run, "uninterrupted run"))
        again = folder / "uninterrupted-again"
        if self.measure_noise:  # the same run once more: how far two uninterrupted runs drift apart here
            run = run_logged(self._train_cmd(again, steps, every, ["--overwrite"]),
                             self.logs / "torchrun-uninterrupted-again.log", LIMITS["train"], env)
            if not run.ok:
                return fail(failure(run, "second uninterrupted run"))
        # the run to kill: SIGKILL to torchrun and its workers as soon as the first checkpoint is in place
        log = self.logs / "torchrun-killed.log"
        proc, t1, how = start(self._train_cmd(cut, steps, every, ["--overwrite"]), log, env), time.perf_counter(), ""
        ckpt = cut / "checkpoint.pt"
        try:
            while proc.poll() is None and time.perf_counter() - t1 < LIMITS["train"]:
                if ckpt.exists():
                    killed = _kill_tree(proc)
                    how = f"SIGKILL to {killed} processes (torchrun and its workers)"
                    figures["killed_processes"] = killed
                    break
                time.sleep(0.01)
            else:
                if proc.poll() is None:
                    _kill_tree(proc)
                    return fail(failure(Run(None, time.perf_counter() - t1, log, LIMITS["train"]), "run to kill"))
        except BaseException:
            _kill_tree(proc)
            raise
        if not how:  # it ended before the kill: fall back to train()'s stop_at
            if proc.returncode != 0:
                return fail(failure(Run(proc.returncode, 0, log, LIMITS["train"]), "run to kill"))
            how = f"--stop-at {steps // 2} (the run ended before it could be killed)"
            run = run_logged(self._train_cmd(cut, steps, every, ["--overwrite", "--stop-at", str(steps // 2)]),
                             log, LIMITS["train"], env)
            if not run.ok:
                return fail(failure(run, "stopped run"))
        at_kill = folder / "checkpoint-at-kill.pt"
        shutil.copyfile(ckpt, at_kill)
        run = run_logged(self._train_cmd(cut, steps, every, ["--resume"]), self.logs / "torchrun-resumed.log",
                         LIMITS["train"], env)
        if not run.ok:
            return fail(failure(run, "resumed run"))
        cmp_out = folder / "compare.json"
        paths = [ref / "checkpoint.pt", ckpt, at_kill, *([again / "checkpoint.pt"] if self.measure_noise else [])]
        run = run_logged([self.python, "-c", COMPARE, *map(str, paths)], self.logs / "torchrun-compare.log",
                         LIMITS["read"], env, stdout=cmp_out)
        if not run.ok:
            return fail(failure(run, "comparing the checkpoints"))
        cmp = json.loads(cmp_out.read_text())
        figures.update(cmp, stopped_by=how)
        tol = RESUME_TOLERANCE[self.device]
        bound = f"{tol:g}"
        if "noise_max_abs_diff" in cmp:
            tol = max(tol, NOISE_FACTOR * cmp["noise_max_abs_diff"])
            bound = (f"max({RESUME_TOLERANCE[self.device]:g}, {NOISE_FACTOR:g} x {cmp['noise_max_abs_diff']:.1e}, "
                     f"the gap between two uninterrupted runs) = {tol:.1e}")
        figures["tolerance"] = tol
        ok = (cmp["max_abs_diff"] <= tol and cmp["step_resumed"] == cmp["step_uninterrupted"] == steps
              and cmp["step_at_kill"] < steps)
        where = f"{backend}, {self.nproc} process{'es' if self.nproc > 1 else ''}"
        stopped = how if how.startswith("SIGKILL") else how.split(" (")[0]
        detail = (f"{stopped} at checkpoint step {cmp['step_at_kill']}/{steps}, resumed to "
                  f"{cmp['step_resumed']}: decoder max |d| {cmp['max_abs_diff']:.2e} vs uninterrupted "
                  f"(tolerance {bound}{', fp32' if self.device == 'cuda' else ''}), loss max |d| "
                  f"{cmp['loss_max_abs_diff']:.2e}; {self.nproc} x {self.device}, {where}")
        if "ended before" in how:
            detail += "; stop_at used: the run ended before it could be killed"
        self.report(Result("torchrun-resume", ok, time.perf_counter() - t0, detail, figures))

    # -- benches ------------------------------------------------------------------------------------------
    def benches(self) -> None:
        folder = self.fresh("benches")
        env = {**self.env, "NEMU_OUTPUTS": str(folder / "outputs")}
        for script in sorted((ROOT / "bench").glob("[!_]*.py")):
            name, src = script.stem, script.read_text()
            if '"--json"' not in src or ('"--device"' not in src and "add_device_arguments" not in src):
                self.report(Result(f"benches/{name}", True, 0.0, "skipped: no --device / --json options"))
                continue
            args = [*BENCH_ARGS.get(name, []), *(BENCH_ARGS_CPU.get(name, []) if self.device == "cpu" else [])]
            cmd = [self.python, str(script), *args, "--device", self.device, "--json"]
            dest = folder / f"{name}.json"
            run = run_logged(cmd, self.logs / f"bench-{name}.log", LIMITS["bench"], env, stdout=dest)
            if not run.ok:
                self.report(Result(f"benches/{name}", False, run.seconds, failure(run)))
                continue
            try:
                data = json.loads(dest.read_text())
            except ValueError as err:
                self.report(Result(f"benches/{name}", False, run.seconds, f"no JSON on stdout ({err}); {dest}"))
                continue
            try:
                figures = bench_figures(name, data)
            except (KeyError, TypeError, IndexError, ValueError, StopIteration) as err:
                figures = f"figures not read ({type(err).__name__}: {err})"
            self.report(Result(f"benches/{name}", True, run.seconds, f"{figures}; {dest}", {"json": str(dest)}))


def notebook_paths() -> list[Path]:
    """The notebook series, ``notebooks/[0-9]*.ipynb`` in order (as ``make test`` runs it)."""
    return sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def junit_counts(xml: Path) -> dict:
    """Passed, failed, errors, skipped and the cuda-parametrised passes from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cuda_passed": 0, "failing": []}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
        counts[outcome] += 1
        name = case.get("name", "")
        params = re.search(r"\[(.*)\]$", name)  # test_x[cuda], test_y[cuda-float32]: the device fixture's id
        if outcome == "passed" and params and any(p == "cuda" or p.startswith("cuda:")
                                                  for p in re.split(r"[-,]", params.group(1))):
            counts["cuda_passed"] += 1
        if outcome in ("failed", "errors"):
            counts["failing"].append(f"{case.get('classname', '')}::{name}")
    return counts


def _median(q: Mapping) -> float:
    return q["median"] if isinstance(q, Mapping) else float(q)


def bench_figures(name: str, data: Mapping) -> str:
    """One line of key figures from a bench's JSON (the bench's own names; unknown benches: their keys)."""
    if name == "data_speed":
        g64 = next(g for g in data["generation"] if g["image_size"] == 64)["scenes_per_s"]
        line = (f"generation {g64:.0f} scenes/s at 64 px, training {data['training']['images_per_s']:.0f} img/s, "
                f"ratio {data['ratio_generation_over_training_64px']:.2f}")
        split = data.get("split")
        if split:
            line += f", split cache load {split['cache_load']['scenes_per_s']:.0f} scenes/s"
        return line
    if name == "nemu_speed":
        parts = []
        for case in data["cases"]:
            for b in case["batches"]:
                ratios = b["ratios"]
                nemu = next(k for k in ratios if re.fullmatch(r"nemu_w\d+_over_encoder", k))
                text = f"{case['case']} B={b['batch']}: NEM-U/encoder {_median(ratios[nemu]):.2f}x"
                relax = next((k for k in ratios if re.fullmatch(r"relax\d+_over_nemu_w\d+", k)), None)
                if relax:
                    text += f", RELAX-{relax[5:].split('_')[0]}/NEM-U {_median(ratios[relax]):,.0f}x"
                parts.append(text)
        return "; ".join(parts)
    if name == "relax_vs_reference":
        return "; ".join(
            f"{c['case']}: ours/floor {_median(c['ratios']['ours_over_floor']):.2f}x, speed-up vs relax-xai "
            f"{_median(c['ratios']['speedup_ours_vs_reference']):.2f}x, importance max |d| "
            f"{c['agreement']['importance_max_abs_diff']:.1e}" for c in data["cases"])
    if name == "quality":
        return "; ".join(
            f"{kind}: NEM-U {r['speedup_nemu_vs_relax']:,.0f}x faster than RELAX, RELAX noise ceiling "
            f"{r['relax_noise_ceiling_pearson']:.2f}" for kind, r in data["encoders"].items()
        ) + f" ({data['info']['images']} scenes, profile {data['info']['profile']})"
    return f"keys: {', '.join(list(data)[:8])}"


def env_detail(info: Mapping, device: str) -> str:
    line = f"python {info['python']}, torch {info['torch']}"
    if device == "cuda":
        gpus = info["gpus"]
        names = ", ".join(f"{g['name']} ({g['memory_gib']:.1f} GiB, sm {g['capability']})" for g in gpus)
        return (f"{line} (CUDA {info['cuda_build']}, cuDNN {info.get('cudnn')}, NCCL {info.get('nccl')}), "
                f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: {names}")
    return f"{line} (CUDA build {info.get('cuda_build') or 'none'}), no CUDA device: --allow-cpu, steps on the CPU"


def probe_env(env: Mapping[str, str]) -> tuple[dict | None, Result]:
    """Run :data:`ENV_PROBE` in a subprocess: the versions and GPUs, or ``None`` when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        log, stdout = Path(tmp) / "env.log", Path(tmp) / "env.json"
        run = run_logged([sys.executable, "-c", ENV_PROBE], log, LIMITS["env"], env, stdout=stdout)
        if not run.ok:
            why = f"timed out after {run.limit:.0f} s" if run.returncode is None else f"exit status {run.returncode}"
            return None, Result("env", False, run.seconds, f"probing torch with {sys.executable}: {why}: "
                                                              f"{_last_error(log)}")
        info = json.loads(stdout.read_text())
    return info, Result("env", True, run.seconds, "", info)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description="pytest, the notebooks (smoke), a torchrun kill-and-resume and the "
        "benches on the GPU; one summary line per step (see the module docstring).")
    parser.add_argument("--only", metavar="STEP[,STEP]", help=f"run only these steps, among {', '.join(STEPS)}")
    parser.add_argument("--skip", metavar="STEP[,STEP]", help="run all steps but these")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu-check"),
                        help="output folder: summary.json, logs/, executed notebooks, bench JSON "
                             "(default: outputs/gpu-check)")
    parser.add_argument("--require-gpu", action="store_true", help="exit with status 2 when no CUDA device is seen")
    parser.add_argument("--wheelhouse", metavar="DIR", default=None,
                        help="install offline from wheels in DIR (pip --no-index --find-links DIR); "
                             "default: $NEMU_WHEELHOUSE, else from the package index")
    parser.add_argument("--nproc", type=int, default=None,
                        help="torchrun processes (default: 2 with two or more GPUs, else 1; 2 with --allow-cpu)")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--download-wheels", metavar="DIR", default=None,
                        help="instead of checking: download the dev dependencies as wheels into DIR (make wheels)")
    parser.add_argument("--wheel-python", default="3.12", help="--download-wheels: CPython version (default 3.12)")
    parser.add_argument("--wheel-torch", default=None,
                        help="--download-wheels: the GPU machine's torch version, to resolve against")
    parser.add_argument("--wheel-exclude", default="",
                        help="--download-wheels: packages the GPU machine has already (space or comma separated)")
    args = parser.parse_args(argv)
    try:
        args.steps = select_steps(args.only, args.skip)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels), args.wheel_python, args.wheel_torch,
                               re.split(r"[,\s]+", args.wheel_exclude.strip()) if args.wheel_exclude.strip() else ())
    out = Path(args.out).resolve()
    info, env_result = probe_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    if info is None:
        print(env_result.line(), flush=True)
        return 1
    if "torch_error" in info or not info.get("cuda"):
        if args.require_gpu or not args.allow_cpu or "torch_error" in info:
            print(no_cuda_line(info), flush=True)
            return 2 if args.require_gpu else 0
    out.mkdir(parents=True, exist_ok=True)
    check = Check(args, out, info)
    env_result.detail = env_detail(info, check.device)
    check.report(env_result)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    steps = {"install": check.install, "pytest": check.pytest, "notebooks": check.notebooks,
             "torchrun-resume": check.torchrun_resume, "benches": check.benches}
    for step in args.steps:
        if step == "env":
            continue
        t0 = time.perf_counter()
        try:
            steps[step]()
        except Exception as err:  # a fault of this script: say so, and go on with the next step
            check.report(Result(step, False, time.perf_counter() - t0, f"gpu_check.py: {type(err).__name__}: {err}"))
    summary = out / "summary.json"
    record = {"started": started, "device": check.device, "python": sys.executable, "steps": args.steps,
              "ok": all(r.ok for r in check.results), "results": [asdict(r) for r in check.results]}
    summary.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(final_line(check.results, summary), flush=True)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
