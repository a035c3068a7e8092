"""Check the course website in a real browser: headless Chromium loads pages of ``outputs/site`` over HTTP.

For each page it waits for MathJax to typeset (``MathJax.startup.promise``), then reads from the rendered page:
the MathJax containers (``mjx-container``) against the maths the page holds, every image's ``naturalWidth``
(a local image that did not load is a failure), where MathJax was loaded from (it must be the site's own copy),
and which resources came from other hosts. A screenshot of each page is saved as
``outputs/site-check/<page>.png`` and the findings as ``outputs/site-check/summary.json``.

The site is served on 127.0.0.1 by Python's ``http.server`` (in a thread of this process), with one extra
in-memory page, ``/__site_check__.html``, that loads the checked page in a same-origin frame and writes what it
finds into its own DOM, which Chromium prints (``--dump-dom``): no browser driver is needed.

Needs Chromium: ``apt-get install -y chromium`` (Debian/Ubuntu), or ``CHROMIUM=/path/to/chrome``. ``make site-check``
runs it after ``make site``; it is not part of ``make test`` (CI may not be able to install a browser).

Usage::

    python docs/site_check.py                                   # outputs/site, notebook 02's page
    python docs/site_check.py --site outputs/site --pages notebooks/02_relax.html,index.html
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHECK_PAGE = "/__site_check__.html"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio"]

# Loads the page in a frame, waits for MathJax and the images, and writes the findings as JSON into #result.
CHECK_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>site check</title></head><body>
<pre id="result">pending</pre>
<iframe id="frame" style="width:1280px;height:2000px" src="{src}"></iframe>
<script>
const frame = document.getElementById("frame");
frame.addEventListener("load", async () => {{
  const w = frame.contentWindow, d = frame.contentDocument, res = {{page: {page}, title: d.title}};
  try {{
    if (w.MathJax && w.MathJax.startup) {{ await w.MathJax.startup.promise; }}
    res.mathjax_version = w.MathJax ? (w.MathJax.version || "loaded") : null;
  }} catch (e) {{ res.mathjax_error = String(e); }}
  const imgs = Array.from(d.images);
  imgs.forEach(i => {{ i.loading = "eager"; }});
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const local = i => new URL(i.src, w.location.href).origin === w.location.origin;
  res.images = imgs.filter(local).length;
  res.images_loaded = imgs.filter(i => local(i) && i.complete && i.naturalWidth > 0).length;
  res.broken_images = imgs.filter(i => local(i) && !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  res.external_images = imgs.filter(i => !local(i)).map(i => i.src);
  res.math_nodes = d.querySelectorAll(".math").length;
  res.mjx_containers = d.querySelectorAll("mjx-container").length;
  res.mathjax_errors = d.querySelectorAll("mjx-merror").length;
  res.mathjax_scripts = Array.from(d.scripts).map(s => s.src).filter(s => /mathjax/i.test(s));
  res.external_requests = w.performance.getEntriesByType("resource").map(e => e.name)
    .filter(n => !n.startsWith(w.location.origin));
  document.getElementById("result").textContent = JSON.stringify(res);
}});
</script></body></html>"""


def find_browser() -> str | None:
    """The Chromium (or Chrome) executable: ``$CHROMIUM``, else the first of :data:`BROWSERS` on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site folder, plus :data:`CHECK_PAGE` (``?page=notebooks/02_relax.html``) from memory."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        if url.path != CHECK_PAGE:
            return super().do_GET()
        page = parse_qs(url.query).get("page", ["index.html"])[0]
        body = CHECK_HTML.format(src=html.escape("/" + quote(page)), page=json.dumps(page)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``site`` on 127.0.0.1 (a free port) in a daemon thread; returns the server and its base URL."""
    handler = functools.partial(SiteHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def chromium(browser: str, profile: Path, *args: str, budget_ms: int, timeout: float) -> str:
    """Run headless Chromium with ``args`` (a URL last), virtual time ``budget_ms``; returns its stdout."""
    cmd = [browser, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{Path(browser).name} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def check_page(browser: str, base: str, page: str, out: Path, budget_ms: int, timeout: float,
               height: int = 2000) -> dict:
    """Load ``page`` (relative to the site) in Chromium: the findings (a dict) and a screenshot in ``out``."""
    with tempfile.TemporaryDirectory(prefix="nemu-site-check-") as profile:
        dom = chromium(browser, Path(profile), "--dump-dom", f"{base}{CHECK_PAGE}?page={quote(page)}",
                       budget_ms=budget_ms, timeout=timeout)
    start, end = dom.find('<pre id="result">'), dom.find("</pre>")
    text = html.unescape(dom[start + len('<pre id="result">'):end]) if start >= 0 else ""
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        found = {"page": page, "error": f"the check page did not report (result: {text[:200]!r})"}
    shot = out / (page.replace("/", "_").removesuffix(".html") + ".png")
    with tempfile.TemporaryDirectory(prefix="nemu-site-check-") as profile:
        chromium(browser, Path(profile), f"--screenshot={shot}", f"--window-size=1280,{height}",
                 f"{base}/{quote(page)}", budget_ms=budget_ms, timeout=timeout)
    found["screenshot"] = str(shot.relative_to(REPO) if shot.is_relative_to(REPO) else shot)
    found["problems"] = problems(found, base)
    return found


def problems(found: dict, base: str) -> list[str]:
    """What is wrong with a page, from the findings of :data:`CHECK_HTML` (empty when nothing is)."""
    if "error" in found:
        return [found["error"]]
    out = []
    if found.get("mathjax_error"):
        out.append(f"MathJax failed: {found['mathjax_error']}")
    if found["math_nodes"] and not found["mjx_containers"]:
        out.append(f"{found['math_nodes']} maths nodes but no mjx-container: MathJax did not typeset")
    if found["mathjax_errors"]:
        out.append(f"{found['mathjax_errors']} MathJax errors (mjx-merror)")
    if found["math_nodes"] and not any(s.startswith(base) for s in found["mathjax_scripts"]):
        out.append(f"MathJax not loaded from the site: {found['mathjax_scripts']}")
    if found["broken_images"]:
        out.append(f"images that did not load: {found['broken_images']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=REPO / "outputs" / "site", help="the built site")
    parser.add_argument("--pages", default="notebooks/02_relax.html",
                        help="comma-separated pages to check, relative to the site (default notebooks/02_relax.html)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "site-check", help="screenshots and summary")
    parser.add_argument("--budget-ms", type=int, default=10000, help="Chromium's virtual time budget per page")
    parser.add_argument("--height", type=int, default=2000, help="the screenshot's height in pixels (width 1280)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds before a Chromium run is abandoned")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("site-check: no Chromium found. Install it (Debian/Ubuntu, as root): apt-get install -y chromium; "
              "or point CHROMIUM at a Chrome/Chromium executable.", file=sys.stderr)
        return 2
    pages = [p.strip() for p in args.pages.split(",") if p.strip()]
    missing = [p for p in pages if not (args.site / p).is_file()]
    if missing:
        print(f"site-check: {', '.join(missing)} not in {args.site}: run `make site` first.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    server, base = serve(args.site.resolve())
    results, failed = [], 0
    try:
        for page in pages:
            start = time.perf_counter()
            found = check_page(browser, base, page, args.out, args.budget_ms, args.timeout, args.height)
            found["seconds"] = round(time.perf_counter() - start, 1)
            results.append(found)
            failed += bool(found["problems"])
            status = "FAILED: " + "; ".join(found["problems"]) if found["problems"] else "ok"
            print(f"site-check: {page}: {status} ({found.get('mjx_containers', 0)} typeset maths of "
                  f"{found.get('math_nodes', 0)}, {found.get('images_loaded', 0)}/{found.get('images', 0)} images "
                  f"loaded; {found['seconds']} s) -> {found['screenshot']}")
    finally:
        server.shutdown()
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
