"""Build the course website: stage its sources under ``outputs/``, run Sphinx (``docs/conf.py``) on them.

The site is README.md (the landing page), one page per notebook, the results summary and an API reference
generated from ``nemu_lib``'s docstrings (one page per module). The sources are staged, never edited in place:

- notebooks: the executed copy of the last ``make run`` (``outputs/notebooks/<name>.ipynb``, with its outputs
  and figures) where there is one, else the committed notebook (no outputs). Each staged copy gets an
  "Open in Colab" badge (when it lacks one), a table of its expected run time per profile
  (``nemu_lib.budget.MEASURED``, every profile found there) and myst-nb's ``hide-cell`` tag on the worked
  solutions (cells tagged ``solution``), which the page then shows collapsed;
- README.md and ``outputs/results.md``: relative links to staged pages are kept, links to files that are not
  on the site (``data/README.md``) point at the repository on GitHub;
- ``docs/*.md``: the index (README plus the tables of contents) and the API page, with a generated page per
  module of ``nemu_lib`` (``automodule``) and a table of them.

Everything but the site itself lives in a working folder beside it (``outputs/site-build``: the staged sources
in ``src/``, Sphinx's caches, its output, which is copied to ``--out`` when the build succeeds), so a second
build redoes only what changed.

Notebooks are never executed by the build (``nb_execution_mode = "off"``). MathJax is bundled into the site,
so equations render offline. Warnings are errors unless ``--no-strict``.

Usage::

    python docs/build.py                                            # make site: outputs/site
    python docs/build.py --notebooks notebooks --out outputs/smoke/site --no-results   # as committed (CI)
    python -m http.server -d outputs/site                           # then open http://localhost:8000
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GITHUB_BLOB = "https://github.com/nemu-xai/nemu/blob/main/"
COLAB_URL = "https://colab.research.google.com/github/nemu-xai/nemu/blob/main/notebooks/{name}.ipynb"
COLAB_BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
SOLUTION_TAG = "solution"  # how the notebooks tag an exercise's worked solution
HIDE_TAG = "hide-cell"  # myst-nb: input and output collapsed behind a "show" toggle
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
# [text](target) and ![alt](target "title"); the target has no spaces or parentheses.
LINK = re.compile(r"(!?\[[^\]\n]*\])\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def source_text(cell: Mapping) -> str:
    """A notebook cell's source as one string (nbformat stores a string or a list of lines)."""
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def markdown_cell(text: str) -> dict:
    """A new markdown cell holding ``text``."""
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def times_table(name: str, measured: Mapping[str, Mapping[str, str]]) -> str:
    """Markdown table of ``name``'s expected run time per profile, from ``measured`` (``budget.MEASURED``).

    The columns are every profile found in ``measured`` (in first-seen order), so a profile added there
    shows up here without a change to this script.
    """
    profiles: list[str] = []
    for per_profile in measured.values():
        profiles += [p for p in per_profile if p not in profiles]
    times = measured.get(name)
    if not times:
        return "*Expected run time: not measured yet (`nemu_lib.budget.MEASURED` has no entry for this notebook).*"
    rows = "\n".join("| `{}` | {} |".format(p, times.get(p, "not measured").replace("|", "\\|")) for p in profiles)
    return f"| profile | expected run time (first run, `nemu_lib.budget.MEASURED`) |\n|---|---|\n{rows}"


def isolate_display_math(text: str) -> str:
    """Markdown ``text`` with a blank line around each display-maths block whose ``$$`` stand on their own lines.

    Jupyter cuts the maths out before it reads the Markdown; myst reads a ``$$`` block inside a paragraph as
    inline text, where a line starting with ``+ `` or ``- `` would begin a list and break the equation. As a block
    of its own, the equation is safe. Fenced code is left alone.
    """
    lines, out, fenced, in_math = text.split("\n"), [], False, False
    for i, line in enumerate(lines):
        bare = line.strip()
        if bare.startswith(("```", "~~~")) and not in_math:
            fenced = not fenced
        if not fenced and bare == "$$" and len(line) - len(line.lstrip()) < 4:
            if not in_math and out and out[-1].strip():
                out.append("")
            out.append(line)
            if in_math and i + 1 < len(lines) and lines[i + 1].strip():
                out.append("")
            in_math = not in_math
            continue
        out.append(line)
    return "\n".join(out)


def prepare_notebook(nb: dict, name: str, measured: Mapping[str, Mapping[str, str]], executed: bool) -> dict:
    """The staged copy of notebook ``name``: Colab badge, run-time table, collapsed solutions, display maths
    as blocks (:func:`isolate_display_math`), no widget outputs.

    ``nb`` (nbformat JSON) is not modified. The badge and the table go into the first markdown cell,
    right below the badge (below the title when the badge had to be added); a notebook without a markdown
    cell gets one at the top.
    """
    nb = copy.deepcopy(nb)
    cells = nb.setdefault("cells", [])
    url = COLAB_URL.format(name=name)
    origin = ("*The outputs on this page come from an executed run of the notebook (`make run`).*" if executed
              else "*This page shows the notebook as committed, without outputs: `make run` executes it.*")
    note = times_table(name, measured) + "\n\n" + origin
    first = next((c for c in cells if c.get("cell_type") == "markdown"), None)
    if first is None:
        first = markdown_cell(f"# {name}")
        cells.insert(0, first)
    lines = source_text(first).splitlines()
    at = next((i for i, line in enumerate(lines) if url in line), None)
    if at is None:  # add the badge below the title (or at the top when there is no title)
        at = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1) + 1
        lines[at:at] = ["", COLAB_BADGE.format(url=url)]
        at += 1
    lines[at + 1:at + 1] = ["", note, ""]
    first["source"] = "\n".join(lines).rstrip("\n") + "\n"
    nb.get("metadata", {}).pop("widgets", None)
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            cell["source"] = isolate_display_math(source_text(cell))
        if cell.get("outputs"):  # a widget (tqdm's bar) cannot work on a static page; its text is its first frame
            cell["outputs"] = [o for o in cell["outputs"] if WIDGET_VIEW not in o.get("data", {})]
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if SOLUTION_TAG in tags and cell.get("cell_type") == "code" and HIDE_TAG not in tags:
            tags.append(HIDE_TAG)
    return nb


def rewrite_links(text: str, base: Path, stage: Path, assets: Path | None = None) -> str:
    """Markdown ``text`` (from a file in ``base``) with relative links fixed for a page at ``stage``'s root.

    A link to a file that the site stages (``notebooks/02_relax.ipynb``) is kept; a local image is copied
    into ``assets`` (when given) and linked there; anything else relative points at the file on GitHub.
    Absolute URLs and ``#anchors`` are left alone, and so are fenced code blocks.
    """
    out, fenced = [], False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if fenced:
            out.append(line)
            continue

        def fix(m: re.Match[str]) -> str:
            label, target, title = m.groups()
            if SCHEME.match(target) or target.startswith("#"):
                return m.group(0)
            path, _, anchor = target.partition("#")
            if (stage / path).is_file():
                return m.group(0)
            local = (base / path).resolve()
            if assets is not None and local.is_file() and local.suffix.lower() in IMAGE_SUFFIXES:
                assets.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, assets / local.name)
                target = f"{assets.relative_to(stage).as_posix()}/{local.name}"
            else:
                try:
                    rel = local.relative_to(REPO).as_posix()
                except ValueError:  # outside the repository: nothing to point at
                    return label[1:-1] if not label.startswith("!") else ""
                target = GITHUB_BLOB + rel + (f"#{anchor}" if anchor else "")
            return f"{label}({target}{title})"

        out.append(LINK.sub(fix, line))
    return "".join(out)


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless it holds it already (Sphinx then rebuilds only what changed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring, as Markdown (reST roles and ````literals```` as code, ``|`` escaped)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    masked = re.sub(r"``.+?``|`[^`]*`", lambda m: "x" * len(m.group(0)), para)  # no sentence ends in code
    end = re.search(r"(?<! al)(?<!e\.g)(?<!i\.e)\.(\s|$)", masked)  # "Zhang et al. 2018" goes on
    text = para[:end.start() + 1] if end else para
    text = re.sub(r":[a-z:]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return text.replace("|", "\\|")


def api_pages(stage: Path, package: str = "nemu_lib") -> list[str]:
    """Write ``stage/api/<module>.rst`` (autodoc) for every public module of ``package``, and the table of them
    (``stage/_api_modules.md``, included by ``api.md``); returns the modules' names. Pages of modules that are
    gone are removed."""
    folder = REPO / package
    modules = [package] + sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if not p.stem.startswith("_"))
    api = stage / "api"
    api.mkdir(parents=True, exist_ok=True)
    for old in api.glob("*.rst"):
        if old.stem not in modules:
            old.unlink()
    rows = []
    for module in modules:
        path = folder / "__init__.py" if module == package else folder / f"{module.split('.')[-1]}.py"
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        write_if_changed(api / f"{module}.rst", f"{module}\n{'=' * len(module)}\n\n.. automodule:: {module}\n")
        rows.append(f"| {{py:mod}}`{module}` | {first_sentence(doc)} |")
    write_if_changed(stage / "_api_modules.md", "| module | what it holds |\n|---|---|\n" + "\n".join(rows) + "\n")
    return modules


REFERENCE_ROW = "cpu, reference models"  # the cpu profile when the shipped reference models are loaded


def measured_times() -> dict[str, dict[str, str]]:
    """``nemu_lib.budget.MEASURED``: notebook -> {profile: expected run time}, with the cpu profile's time when the
    reference models are used (``budget.MEASURED_WITH_REFERENCE``) as one more row."""
    sys.path.insert(0, str(REPO))
    from nemu_lib.budget import MEASURED, MEASURED_WITH_REFERENCE

    return {k: {**v, **({REFERENCE_ROW: MEASURED_WITH_REFERENCE[k]} if k in MEASURED_WITH_REFERENCE else {})}
            for k, v in MEASURED.items()}


def stage_sources(stage: Path, notebooks: Path, only: list[str] | None, results: Path | None, api: bool) -> list[str]:
    """Write the site's sources into ``stage``; returns the staged notebooks' names.

    Every committed notebook (``notebooks/[0-9]*.ipynb``, or those in ``only``) is taken from ``notebooks``
    when that folder holds a copy (an executed one, from ``make run``), else as committed.
    """
    names = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9]*.ipynb"))
    if only:  # may name notebooks that only the --notebooks folder holds
        names += sorted(p.stem for p in notebooks.glob("*.ipynb") if p.stem not in names)
        missing = [n for n in only if n not in names]
        if missing:
            raise SystemExit(f"build.py: no notebook named {', '.join(missing)} in {notebooks} or notebooks/")
        names = [n for n in names if n in only]
    measured = measured_times()
    staged = stage / "notebooks"
    staged.mkdir(parents=True, exist_ok=True)
    for old in staged.glob("*.ipynb"):
        if old.stem not in names:
            old.unlink()
    for name in names:
        src = notebooks / f"{name}.ipynb"
        if not src.is_file():
            src = REPO / "notebooks" / f"{name}.ipynb"
        nb = json.loads(src.read_text(encoding="utf-8"))
        executed = any(c.get("outputs") for c in nb.get("cells", []) if c.get("cell_type") == "code")
        nb = prepare_notebook(nb, name, measured, executed)
        write_if_changed(staged / f"{name}.ipynb", json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"site: {name}: {src.relative_to(REPO) if src.is_relative_to(REPO) else src}"
              f"{'' if executed else ' (no outputs)'}")
    for page in DOCS.glob("*.md"):
        write_if_changed(stage / page.name, page.read_text(encoding="utf-8"))
    if api:
        api_pages(stage)
    else:
        shutil.rmtree(stage / "api", ignore_errors=True)
        write_if_changed(stage / "api.md", "# API reference\n\nNot built (`docs/build.py --no-api`).\n")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    write_if_changed(stage / "_readme.md", rewrite_links(readme, REPO, stage))
    if results is not None and results.is_file():
        text = rewrite_links(results.read_text(encoding="utf-8"), results.parent, stage, stage / "_results")
    else:
        text = ("# Results\n\nNo results yet: `make run` executes the notebooks and writes `outputs/results.md`, "
                "which `make site` then shows here.\n")
    write_if_changed(stage / "results.md", text)
    return names


def mirror(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src``: new and changed files copied (size or mtime differ), the rest removed."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        t = dst / f.relative_to(src)
        if f.is_dir():
            t.mkdir(parents=True, exist_ok=True)
        elif not t.is_file() or (t.stat().st_size, t.stat().st_mtime_ns) != (f.stat().st_size, f.stat().st_mtime_ns):
            shutil.copy2(f, t)
    for t in sorted(dst.rglob("*"), reverse=True):  # children before their folders
        if not (src / t.relative_to(dst)).exists():
            t.rmdir() if t.is_dir() and not t.is_symlink() else t.unlink()


def build(out: Path, work: Path, strict: bool = True, quiet: bool = True) -> int:
    """Run ``sphinx-build`` on the sources staged in ``work/src`` (``docs/conf.py``), the site into ``out``;
    returns its exit status.

    Sphinx writes into ``work/html`` (and myst-nb its scratch into ``work/jupyter_execute``, beside it); the
    result is mirrored to ``out`` only when the build succeeds, so a failed build leaves the last good site."""
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(DOCS), "-d", str(work / ".doctrees")]
    cmd += (["-W", "--keep-going"] if strict else []) + (["-q"] if quiet else [])
    rc = subprocess.call([*cmd, str(work / "src"), str(work / "html")], cwd=REPO)
    if rc == 0:
        mirror(work / "html", out)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "site", help="the site (default outputs/site)")
    parser.add_argument("--notebooks", type=Path, default=REPO / "outputs" / "notebooks",
                        help="where to take each notebook from when it is there (default outputs/notebooks: the "
                             "executed copies of `make run`); missing ones come from notebooks/ as committed")
    parser.add_argument("--only", default="",
                        help="comma-separated notebook names to put on the site (default: every committed one); "
                             "may name notebooks that exist only in --notebooks")
    parser.add_argument("--results", type=Path, default=REPO / "outputs" / "results.md",
                        help="the results summary to show (default outputs/results.md, when present)")
    parser.add_argument("--no-results", action="store_true", help="show the 'no results yet' page")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder: the staged sources (src/), Sphinx's output and caches (default: "
                             "<out>-build beside --out; keep it under outputs/ or /tmp)")
    parser.add_argument("--no-api", action="store_true", help="leave out the API reference (quicker)")
    parser.add_argument("--no-strict", action="store_true", help="warnings are not errors")
    parser.add_argument("--clean", action="store_true", help="remove --out and the working folder first")
    parser.add_argument("--verbose", action="store_true", help="Sphinx's progress output")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    work = (args.work or out.with_name(out.name + "-build")).resolve()
    if args.clean:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    only = [n.strip().removesuffix(".ipynb") for n in args.only.split(",") if n.strip()] or None
    results = None if args.no_results else args.results.resolve()
    names = stage_sources(work / "src", args.notebooks.resolve(), only, results, api=not args.no_api)
    rc = build(out, work, strict=not args.no_strict, quiet=not args.verbose)
    seconds = time.perf_counter() - start
    if rc:
        print(f"site: sphinx-build failed (exit {rc}) after {seconds:.0f} s; sources staged in {work / 'src'}")
        return rc
    pages = sum("_static" not in p.relative_to(out).parts for p in out.rglob("*.html"))
    print(f"site: {pages} pages ({len(names)} notebooks) in {out} ({seconds:.0f} s); "
          f"view it with: python -m http.server -d {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
