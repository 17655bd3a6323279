"""The book builds at smoke scale with warnings as errors, and headless Chromium renders it correctly.

The book is built once per module into a temporary folder (the real ``_build`` is left alone), served on
127.0.0.1, and each page is rendered with every other host unreachable: math typeset by the local MathJax,
figures present, no error output. A screenshot of each page is saved for a human to look at.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from bs4 import BeautifulSoup

from onestep.notebooks import ROOT, chapters

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
    "--virtual-time-budget=5000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
CHAPTERS = [path.relative_to(ROOT).with_suffix(".html").as_posix() for path in chapters()]
PAGES = ["book/intro.html", "book/conventions.html", *CHAPTERS]


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The book built with ``jupyter-book build -W`` at smoke scale; its HTML folder."""
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([jupyter_book, "build", ROOT, "--path-output", out, "-W", "--keep-going"],
                          env={**os.environ, "ONESTEP_SCALE": "smoke"}, check=False, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-8000:]}"
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def site(html):
    """Base URL of an HTTP server for the built book."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=html))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def chromium(*args: str) -> str:
    """Run headless Chromium with a fresh profile; its stdout."""
    exe = shutil.which(CHROMIUM)
    assert exe, f"{CHROMIUM!r} not found: `make test` installs Chromium (or set CHROMIUM to a Chrome binary)"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_no_remote_assets(html):
    """No page loads a script, style sheet, font or image from another host; MathJax comes from _static."""
    loaded = {"stylesheet", "preload", "modulepreload", "icon"}
    for page in html.rglob("*.html"):
        soup = BeautifulSoup(page.read_text(), "html.parser")
        assets = [tag.get("src", "") for tag in soup.find_all(["script", "img", "iframe"])]
        assets += [tag.get("href", "") for tag in soup.find_all("link") if loaded & set(tag.get("rel", ()))]
        remote = [url for url in assets if urlparse(url).netloc]
        assert not remote, f"{page.relative_to(html)} loads remote assets: {remote}"
    assert (html / "_static/mathjax/tex-chtml.js").is_file()


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(page, html, site, capsys):
    """Math typeset, no error output, chapters' figures present; then a screenshot for a human."""
    dom = BeautifulSoup(chromium("--dump-dom", site + page), "html.parser")
    article = dom.find("article")
    assert article is not None, f"{page}: no article in the rendered page"

    math = article.select(".math")
    assert math, f"{page}: no math on the page"
    untypeset = [node.get_text()[:80] for node in math if node.find("mjx-container") is None]
    assert not untypeset, f"{page}: MathJax left math untypeset: {untypeset}"
    prose = copy.copy(article)
    for code in prose.find_all(["pre", "code"]):
        code.decompose()
    assert "$$" not in prose.get_text(), f"{page}: raw $$ left in the text"

    tracebacks = [node.get_text()[:300] for node in article.select(".traceback")]
    assert not tracebacks, f"{page}: a cell shows a traceback: {tracebacks}"
    assert "Traceback (most recent call last)" not in article.get_text(), f"{page}: a traceback in the text"
    stderr = [node.get_text() for node in article.select(".output.stderr")]
    errors = [text[:300] for text in stderr if "Error" in text]
    assert not errors, f"{page}: error output on stderr: {errors}"

    if page in CHAPTERS:
        figures = [img["src"] for img in article.find_all("img", src=True)
                   if not img["src"].startswith("data:")]
        assert figures, f"{page}: no figure"
        missing = [src for src in figures if not (html / page).parent.joinpath(src).resolve().is_file()]
        assert not missing, f"{page}: images missing from the build: {missing}"

    shot = html.parent / "screenshots" / page.replace("/", "-").replace(".html", ".png")
    shot.parent.mkdir(exist_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1280,16000", site + page)
    assert shot.stat().st_size > 0
    with capsys.disabled():
        print(f"\n  screenshot: {shot}")
