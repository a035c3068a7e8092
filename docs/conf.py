"""Sphinx configuration of the course website (built by ``docs/build.py``, not by hand).

``docs/build.py`` stages the sources (README as the landing page, the notebooks with Colab badges, run-time
tables and collapsed solutions, ``results.md``, the pages in ``docs/``) in ``outputs/site-build/src`` and runs
``sphinx-build -c docs outputs/site-build/src ...``: this file is the configuration, the staged folder the source.
Notebooks are rendered as they are (executed copies with their outputs, or the committed ones without),
never executed here. Maths is typeset by a MathJax bundled into the site (``sphinx-mathjax-offline``),
so the site works offline.
"""

from __future__ import annotations

import re

project = "nemu"
author = "the nemu authors"
copyright = "the nemu authors, MIT licence"

extensions = [
    "myst_nb",  # notebooks and Markdown (it brings myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax; mathjax_path points at it
]

root_doc = "index"
exclude_patterns = ["_build", ".doctrees", "_*.md", "**.ipynb_checkpoints"]  # _*.md: included pages

# Notebooks: rendered from their stored outputs, never run by the build.
nb_execution_mode = "off"
nb_merge_streams = True  # tqdm and print output in one block
# No CDN for ipywidgets: a widget's view is left out, its text/plain form shown instead (the site works offline).
nb_ipywidgets_js: dict[str, dict[str, str]] = {}
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # README's "[Profiles](#profiles)" resolves
myst_dmath_double_inline = True  # "$$ ... $$" inside a paragraph is display maths too

# API reference: one page per module of nemu_lib (docs/build.py writes api/<module>.rst with automodule).
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "nemu: explaining representations"
html_theme_options = {
    "repository_url": "https://github.com/nemu-xai/nemu",
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []
html_last_updated_fmt = ""


# nemu_lib's docstrings are plain text with ``literals`` and roles, not full reST: "|a|" is an absolute value,
# an indented block is an aligned equation or a shell session. They are made reST-safe before napoleon reads them.
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters|Returns?|Yields?|"
                      r"Raises|Warns|Attributes|Methods|Examples?|Notes?|References|See Also|Todo|Warnings?)\s*:\s*$")
_LIST_ITEM = re.compile(r"^([-*+]|\d+[.)]|#\.|:[^:]+:)\s")
_CODE_SPAN = re.compile(r"(``.+?``|`[^`]+`)")


def _escape_bars(line: str) -> str:
    """``line`` with each ``|`` outside backquoted spans escaped (reST would read ``|a|`` as a substitution)."""
    parts = _CODE_SPAN.split(line)
    return "".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def rst_safe(lines: list[str]) -> list[str]:
    """Docstring ``lines`` made reST-safe: ``|`` escaped in text; an indented block that is not a Google section's
    body, a directive's, a list item's or a doctest becomes a literal block (as if its paragraph ended in ``::``).
    """
    out: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, kind) of the lines that enclose the current one
    prev_blank, doctest = True, False
    for line in lines:
        text = line.strip()
        if not text:
            out.append(line)
            prev_blank, doctest = True, False
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        kinds = {kind for _, kind in stack}
        if "literal" in kinds or "directive" in kinds:
            out.append(line)
        elif doctest or text.startswith(">>>"):
            doctest = True
            out.append(line)
        else:
            if stack and stack[-1][1] == "text" and "section" not in kinds:  # an unexpected indented block
                parent = stack.pop()[0]
                if not prev_blank:
                    out.append("")
                out += [" " * parent + "::", ""]
                stack.append((parent, "literal"))
                out.append(line)
                prev_blank = False
                continue
            kind = ("section" if _SECTION.match(text) else "directive" if text.startswith(".. ")
                    else "literal" if text.endswith("::") else "list" if _LIST_ITEM.match(text) else "text")
            stack.append((indent, kind))
            out.append(_escape_bars(line))
        prev_blank = False
    return out


def _rst_safe_docstring(app: object, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    lines[:] = rst_safe(lines)


def setup(app: object) -> None:
    app.connect("autodoc-process-docstring", _rst_safe_docstring, priority=400)  # before napoleon (500)
