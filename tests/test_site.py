"""The course website (``docs/build.py``, ``make site``): built and checked as HTML.

Two builds per session, each with warnings as errors (``-W --keep-going``): the whole site from the notebooks as
committed (no outputs), as a fresh clone has them, and a small one from a fake *executed* notebook (an image
output, display maths, a solution), so the checks on figures and maths run on real outputs. The HTML checks:
every notebook page and every API page exists; internal links and anchors resolve; every image and script a
page references is in the site; no ``$$`` is left unrendered; the Colab badge, the run-time table and the
collapsed solutions are on each notebook page; MathJax is the site's own copy, not a CDN's.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from nemu_lib.budget import MEASURED, MEASURED_WITH_REFERENCE

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "docs" / "build.py"
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9]*.ipynb"))
MODULES = ["nemu_lib"] + sorted(f"nemu_lib.{p.stem}" for p in (REPO / "nemu_lib").glob("*.py")
                                if not p.stem.startswith("_"))
SMART_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
COLAB = "https://colab.research.google.com/github/nemu-xai/nemu/blob/main/notebooks/{}.ipynb"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load("nemu_docs_build", BUILD)
conf = _load("nemu_docs_conf", REPO / "docs" / "conf.py")


class Page(HTMLParser):
    """What the checks need from one HTML page: ids, links, images, scripts, maths and the text outside code."""

    SKIP_TEXT = {"pre", "script", "style", "code", "textarea"}

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.path = path
        self.ids: set[str] = set()
        self.links: list[str] = []  # <a href>
        self.images: list[str] = []  # <img src>
        self.assets: list[str] = []  # <script src>, <link href>
        self.scripts: list[str] = []
        self.math = 0  # elements of class "math" (myst's dollar maths, rendered for MathJax)
        self.text: list[str] = []
        self._skip = 0
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
            self.assets.append(a["src"])
        if tag == "link" and a.get("rel") in ("stylesheet", "preload") and a.get("href"):
            self.assets.append(a["href"])
        if "math" in a.get("class", "").split():
            self.math += 1
        if tag in self.SKIP_TEXT:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP_TEXT and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def local(url: str) -> bool:
    """A URL inside the site (not another host, not ``mailto:``/``javascript:``/``data:``)."""
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc


def target(page: Path, url: str) -> tuple[Path, str]:
    """The file and the anchor that ``url`` on ``page`` points at."""
    parts = urlsplit(url)
    path = (page.parent / unquote(parts.path)).resolve() if parts.path else page.resolve()
    return path, unquote(parts.fragment)


def run_build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILD), "--no-results", *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The whole site from the committed notebooks, warnings as errors (what CI builds)."""
    out = tmp_path_factory.mktemp("site") / "site"
    proc = run_build("--notebooks", str(REPO / "notebooks"), "--out", str(out))
    assert proc.returncode == 0, f"the site build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def pages(site) -> dict[Path, Page]:
    return {p: Page(p) for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts}


def fake_executed_notebook() -> dict:
    """An executed notebook: display maths, an inline equation, a figure output and a worked solution."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    figure = {"output_type": "display_data", "metadata": {},
              "data": {"image/png": png, "text/plain": "<Figure size 8x6 with 1 Axes>"}}
    progress = {"output_type": "display_data", "metadata": {},  # tqdm's widget: left out of the page
                "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2,
                                                                      "version_minor": 0},
                         "text/plain": "Drawing:   0%|          | 0/10"}}
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python"}},
        "cells": [
            {"cell_type": "markdown", "id": "a", "metadata": {},
             "source": "# 99 · A fake executed notebook\n\nA square, $y = x^2$, on display:\n\n$$x^2$$\n"},
            {"cell_type": "code", "id": "b", "metadata": {}, "execution_count": 1, "source": "draw()",
             "outputs": [figure, {"output_type": "stream", "name": "stdout", "text": "drawn\n"}, progress]},
            {"cell_type": "markdown", "id": "c", "metadata": {}, "source": "## Exercise\n\nDraw it again."},
            {"cell_type": "code", "id": "d", "metadata": {"tags": ["solution"]}, "execution_count": 2,
             "source": "answer = draw()", "outputs": [figure]},
        ],
    }


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    """A site of one fake executed notebook (no API pages), warnings as errors."""
    root = tmp_path_factory.mktemp("fake-site")
    (root / "executed").mkdir()
    (root / "executed" / "99_fake.ipynb").write_text(json.dumps(fake_executed_notebook()))
    proc = run_build("--notebooks", str(root / "executed"), "--only", "99_fake", "--no-api", "--out",
                     str(root / "site"))
    assert proc.returncode == 0, f"the site build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return root / "site"


# -- the staging step, without Sphinx --------------------------------------------------------------------------

def test_prepare_notebook_adds_badge_times_and_hides_solutions():
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# 42 · Title\n", "\n", "Intro."]},
                    {"cell_type": "code", "metadata": {"tags": ["solution"]}, "source": "x = 1", "outputs": []},
                    {"cell_type": "code", "metadata": {}, "source": "y = 2", "outputs": []}]}
    measured = {"42_t": {"smoke": "~1 s", "cpu": "~2 min"}, "43_u": {"tpu": "~3 s"}}
    out = build.prepare_notebook(nb, "42_t", measured, executed=False)
    first = out["cells"][0]["source"]
    assert first.startswith("# 42 · Title\n") and COLAB.format("42_t") in first
    for row in ("| `smoke` | ~1 s |", "| `cpu` | ~2 min |", "| `tpu` | not measured |"):  # every profile in MEASURED
        assert row in first
    assert first.index(COLAB.format("42_t")) < first.index("| `smoke`") < first.index("Intro.")
    assert out["cells"][1]["metadata"]["tags"] == ["solution", "hide-cell"]
    assert out["cells"][2]["metadata"]["tags"] == []
    assert nb["cells"][1]["metadata"]["tags"] == ["solution"], "the source notebook must not change"
    again = build.prepare_notebook(out, "42_t", measured, executed=False)  # an existing badge is not repeated
    assert again["cells"][0]["source"].count(COLAB.format("42_t")) == 1
    assert "not measured yet" in build.times_table("44_none", measured)


def test_display_maths_becomes_a_block():
    """A "+" starting a line of a $$ block inside a paragraph would open a Markdown list and break the equation."""
    text = "The loss\n$$\nL = a\n  + b\n$$\nasks for\n```\n$$\n```"
    assert build.isolate_display_math(text) == "The loss\n\n$$\nL = a\n  + b\n$$\n\nasks for\n```\n$$\n```"


def test_rewrite_links_keeps_staged_pages_and_points_the_rest_at_github(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "02_relax.ipynb").write_text("{}")
    text = ("[02](notebooks/02_relax.ipynb) [data](data/README.md) [p](#profiles) [w](https://x.org/a)\n"
            "```\n[not a link](data/x)\n```\n")
    out = build.rewrite_links(text, REPO, tmp_path)
    assert "[02](notebooks/02_relax.ipynb)" in out and "[p](#profiles)" in out and "(https://x.org/a)" in out
    assert "[data](https://github.com/nemu-xai/nemu/blob/main/data/README.md)" in out
    assert "[not a link](data/x)" in out


def test_docstrings_are_made_rest_safe():
    lines = ["Absolute values |a| and ``|b|`` stay.", "", "    aligned = |x|   # an equation", "",
             "Args:", "    x: the |input|.", "        More about x.", "", ">>> abs(-1) | 0", "1"]
    out = conf.rst_safe(lines)
    assert out[0] == r"Absolute values \|a\| and ``|b|`` stay."
    assert out[2:5] == ["::", "", "    aligned = |x|   # an equation"]  # a literal block: nothing escaped
    assert r"    x: the \|input\|." in out and "        More about x." in out and ">>> abs(-1) | 0" in out


# -- the site from the committed notebooks ----------------------------------------------------------------------

def test_every_notebook_and_api_page_exists(site):
    missing = [f"notebooks/{n}.html" for n in NOTEBOOKS if not (site / "notebooks" / f"{n}.html").is_file()]
    missing += [f"api/{m}.html" for m in MODULES if not (site / "api" / f"{m}.html").is_file()]
    missing += [p for p in ("index.html", "api.html", "results.html") if not (site / p).is_file()]
    assert not missing
    for m in MODULES:  # each API page documents its module (automodule's target)
        assert f'id="module-{m}"' in (site / "api" / f"{m}.html").read_text(encoding="utf-8"), m


def test_internal_links_and_anchors_resolve(site, pages):
    broken = []
    for path, page in pages.items():
        for url in page.links:
            if not local(url) or url in ("", "#"):
                continue
            file, anchor = target(path, url)
            if not file.is_file():
                broken.append(f"{path.relative_to(site)}: {url} (no file)")
            elif anchor and file.suffix == ".html" and anchor not in (pages[file] if file in pages else Page(file)).ids:
                broken.append(f"{path.relative_to(site)}: {url} (no anchor)")
    assert not broken, "\n".join(broken[:30])
    readme = pages[site / "index.html"]  # README's relative links lead to the notebook pages
    for name in NOTEBOOKS:
        assert any(target(site / "index.html", u)[0] == (site / "notebooks" / f"{name}.html").resolve()
                   for u in readme.links if local(u)), name


def test_images_and_scripts_exist_and_mathjax_is_local(site, pages):
    missing = [f"{p.relative_to(site)}: {u}" for p, page in pages.items() for u in page.images + page.assets
               if local(u) and u and not target(p, u)[0].is_file()]
    assert not missing, "\n".join(missing[:30])
    remote = [f"{p.relative_to(site)}: {s}" for p, page in pages.items() for s in page.scripts if not local(s)]
    assert not remote, f"scripts from other hosts (the site must work offline): {remote[:5]}"
    for name in NOTEBOOKS:
        path = site / "notebooks" / f"{name}.html"
        mathjax = [s for s in pages[path].scripts if "mathjax" in s.lower()]
        assert mathjax and all(local(s) and target(path, s)[0].is_file() for s in mathjax), (name, mathjax)
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_notebook_pages_badge_times_solutions_and_maths(site, pages):
    for name in NOTEBOOKS:
        path = site / "notebooks" / f"{name}.html"
        page, text = pages[path], path.read_text(encoding="utf-8")
        assert COLAB.format(name) in page.links, f"{name}: no Open in Colab badge"
        table = re.search(r"expected run time \(first run.*?</table>", text, re.S)
        assert table, f"{name}: no run-time table"
        table_text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", table.group(0))).split())
        table_text = table_text.translate(SMART_QUOTES)  # docutils' smart quotes: ’ for '
        expected = {**MEASURED.get(name, {}), "cpu, reference models": MEASURED_WITH_REFERENCE[name]}
        for profile, when in expected.items():
            assert f"{profile} {' '.join(when.split())}" in table_text, f"{name}: no run time for {profile}"
        assert "$$" not in page.plain, f"{name}: unrendered display maths"
        source = "".join("".join(c["source"]) for c in json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
                         ["cells"] if c["cell_type"] == "markdown")
        if "$" in source:
            assert page.math > 0, f"{name}: maths in the notebook, none on the page"
        solutions = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        n_solutions = sum("solution" in c.get("metadata", {}).get("tags", []) for c in solutions
                          if c["cell_type"] == "code")
        cells = re.findall(r'<div class="cell([^"]*)"[^>]*>\s*<details class="([^"]*)"', text)
        hidden = [c for c, d in cells if "tag_solution" in c and "tag_hide-cell" in c and "hide" in d.split()]
        assert len(hidden) == n_solutions, f"{name}: {len(hidden)} of {n_solutions} solutions collapsed"


# -- a fake executed notebook: figures and maths on real outputs ----------------------------------------------

def test_executed_notebook_page_has_its_figures_and_typeset_maths(fake_site):
    path = fake_site / "notebooks" / "99_fake.html"
    page = Page(path)
    images = [u for u in page.images if local(u)]
    assert len(images) >= 2, "the figure outputs are not on the page"
    assert all(target(path, u)[0].is_file() and target(path, u)[0].stat().st_size > 0 for u in images)
    assert "$$" not in page.plain
    text = path.read_text(encoding="utf-8")
    assert re.search(r'<div class="math[^"]*"[^>]*>\s*\\\[x\^2\\\]\s*</div>', text), "display maths not for MathJax"
    assert re.search(r'<span class="math[^"]*">\\\(y = x\^2\\\)</span>', text), "inline maths not for MathJax"
    assert COLAB.format("99_fake") in page.links
    assert "not measured yet" in page.plain and "executed run" in page.plain
    assert re.search(r'tag_solution tag_hide-cell[^"]*"[^>]*>\s*<details class="[^"]*hide', text)
    assert "drawn" in text and "Drawing:" not in text  # the stream output is there, the progress widget is not
    assert any("mathjax" in s and local(s) for s in page.scripts)


def test_warnings_fail_the_build(tmp_path):
    """The build is strict: a notebook linking to a page that does not exist fails it, and says where."""
    nb = fake_executed_notebook()
    nb["cells"][2]["source"] += "\n\nSee [the missing notebook](98_missing.ipynb)."
    (tmp_path / "executed").mkdir()
    (tmp_path / "executed" / "99_fake.ipynb").write_text(json.dumps(nb))
    proc = run_build("--notebooks", str(tmp_path / "executed"), "--only", "99_fake", "--no-api", "--out",
                     str(tmp_path / "site"))
    assert proc.returncode != 0
    assert "98_missing" in proc.stdout + proc.stderr
