"""The documentation cannot rot: the site builds strictly and its code runs.

- ``mkdocs build --strict`` into a temporary folder: a broken link, a missing page or
  an API page whose object no longer exists fails the build.
- Every ``python`` block of the pages in ``RUN`` is executed, each in a fresh
  namespace, in one subprocess per page (as a user would paste it). A block that
  needs a framework not selected by ``FASTRPB_BACKENDS`` (or a GPU that is not
  there) is skipped for the reason.
- A ``python`` block followed directly by a ``text`` block that starts with
  ``SomeError: message`` must raise exactly that: the troubleshooting page shows the
  real messages. Any other ``text`` block right after a ``python`` block is what the
  code prints, and it must print exactly that (trailing spaces aside): the README and
  the home page show real output.
- The built site works offline: formulas are MathML made at build time, nothing is
  loaded from another host, and headless Chromium (when installed) renders every
  page from 127.0.0.1 without a request elsewhere.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backends_tests.backends import load, requested

# the site build, Chromium and one interpreter per page: out of the inner loop (-m "not slow")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN = ["index.md", "quickstart.md", "cookbook.md", "troubleshooting.md", "deploy.md", "../README.md"]

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    flags=re.M | re.S,
)
ERROR_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>.*)$")


def _require(modules: tuple[str, ...], why: str) -> None:
    """Import ``modules`` or skip (FASTRPB_BACKENDS narrowed) / fail (full run) with the reason."""
    try:
        for name in modules:
            __import__(name)
    except ImportError as exc:
        _names, explicit = requested()
        if explicit:
            pytest.skip(f"{why} is not installed ({exc}) and FASTRPB_BACKENDS is narrowed")
        raise RuntimeError(f"{why} is part of the suite but is missing ({exc}): pip install -e '.[docs]'") from exc


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once per test session with ``mkdocs build --strict``."""
    _require(("mkdocs", "mkdocstrings", "latex2mathml"), "the docs build (mkdocs, mkdocstrings, latex2mathml)")
    out = tmp_path_factory.mktemp("site") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_mkdocs_build_strict(site):
    assert (site / "api" / "attention" / "index.html").exists()
    assert (site / "design" / "index.html").exists()


# --------------------------------------------------------------------------- offline site
REMOTE = re.compile(r"^(?:https?:)?//", flags=re.I)
# what makes a browser fetch on load: script, stylesheet/icon/preload links, images,
# frames, media; and url()/@import in stylesheets
LOADING_TAG = re.compile(
    r"<(?P<tag>script|link|img|iframe|source|video|audio|embed)\b(?P<attrs>[^>]*)>", flags=re.I | re.S
)
ATTR = re.compile(r"\b(?P<name>src|href|srcset|data)\s*=\s*(?P<q>[\"']?)(?P<value>[^\"'\s>]*)(?P=q)", flags=re.I)
CSS_URL = re.compile(r"""(?:url\(\s*|@import\s+)(?P<q>["']?)(?P<value>[^"')\s;]+)(?P=q)""", flags=re.I)


def test_site_loads_nothing_remote(site):
    """No page, stylesheet or script of the built site makes the browser fetch from another host.

    Links a reader may follow (``<a href="https://...">``) are fine; what loads with
    the page (scripts, stylesheets, fonts, images, frames) must come from the site.
    """
    remote = []
    for path in sorted(site.rglob("*")):
        if path.suffix == ".html":
            for tag in LOADING_TAG.finditer(path.read_text(encoding="utf-8")):
                is_link = tag.group("tag").lower() == "link"
                rel = re.search(r"\brel\s*=\s*[\"']?([^\"'>]*)", tag.group("attrs"), flags=re.I)
                if (
                    is_link
                    and rel
                    and not re.search(
                        r"stylesheet|icon|preload|prefetch|modulepreload|manifest|preconnect|dns-prefetch", rel.group(1)
                    )
                ):
                    continue  # e.g. rel="canonical", rel="prev"/"next": not fetched
                for attr in ATTR.finditer(tag.group("attrs")):
                    if REMOTE.match(attr.group("value")):
                        remote.append(
                            f"{path.relative_to(site)}: <{tag.group('tag')} {attr.group('name')}={attr.group('value')}>"
                        )
        elif path.suffix == ".css":
            for m in CSS_URL.finditer(path.read_text(encoding="utf-8")):
                if REMOTE.match(m.group("value")):
                    remote.append(f"{path.relative_to(site)}: {m.group(0)}")
    assert not remote, "the site loads resources from other hosts:\n" + "\n".join(remote)


def test_site_has_no_raw_tex(site):
    """Every formula of every page (docstrings included) became MathML at build time."""
    pages = {p.relative_to(site).as_posix(): p.read_text(encoding="utf-8") for p in site.rglob("*.html")}
    maths = {name: len(re.findall(r'class="arithmatex"><math ', text)) for name, text in pages.items()}
    assert maths["mathematics/index.html"] >= 50, maths
    assert maths["api/attention/index.html"] >= 3, maths
    for name, text in pages.items():
        raw = re.findall(r'class="arithmatex">(?!<math )(.{0,60})', text, flags=re.S)
        assert not raw, f"{name}: formulas left as TeX: {raw[:3]}"


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``.

    Chromium reads JSON commands on its fd 3 and writes responses and events on its
    fd 4, each message ended by a NUL byte. Sessions are "flat" (``sessionId`` on
    every message), so one pipe serves the page and its workers.
    """

    def __init__(self, executable: str, profile: Path, log: Path):
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # the child's ends must not be 3 or 4 themselves, or one redirection undoes the other
        to_browser_r, from_browser_w = (self._above_4(fd) for fd in (to_browser_r, from_browser_w))
        # the shell moves the pipe ends onto fds 3 and 4, where chromium expects them
        command = " ".join(
            [
                'exec "$0"',
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "about:blank",
                f"3<&{to_browser_r}",
                f"4>&{from_browser_w}",
                f"{to_browser_r}<&-",
                f"{from_browser_w}>&-",
            ]
        )
        self.log = log
        with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                ["bash", "-c", command, executable],
                pass_fds=(to_browser_r, from_browser_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next = 0
        self._responses: dict[int, dict] = {}
        self.events: list[dict] = []

    @staticmethod
    def _above_4(fd: int) -> int:
        if fd > 4:
            return fd
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._w)
            os.close(self._r)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        return self._next

    def pump(self, timeout: float) -> bool:
        """Read what chromium sent within ``timeout`` seconds; False when nothing came."""
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self._r, 1 << 20)
        if not chunk:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"chromium closed the DevTools pipe (exit code {self.proc.poll()}); its log ends:\n{tail}"
            )
        self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        for raw in messages:
            message = json.loads(raw)
            if "id" in message:
                self._responses[message["id"]] = message
            else:
                self.events.append(message)
                self.on_event(message)
        return True

    def on_event(self, message: dict) -> None:
        # a worker (the search worker) or frame attached to the page: watch its network too
        if message["method"] == "Target.attachedToTarget":
            child = message["params"]["sessionId"]
            self.send("Network.enable", session=child)
            self.send("Runtime.runIfWaitingForDebugger", session=child)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        key = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while key not in self._responses:
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium did not answer {method} within {timeout} s")
            self.pump(0.5)
        response = self._responses.pop(key)
        if "error" in response:
            raise RuntimeError(f"{method} failed: {response['error']}")
        return response.get("result", {})

    def settle(self, quiet: float, limit: float) -> None:
        """Read what chromium sends until ``quiet`` seconds pass without a message (at
        most ``limit`` seconds in all)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self.pump(min(quiet, max(0.0, deadline - time.monotonic()))):
            pass

    def wait_event(self, method: str, session: str, since: int, timeout: float = 30) -> None:
        """Wait for ``method`` on ``session`` among the events from index ``since`` on."""
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method and e.get("sessionId") == session for e in self.events[since:]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.pump(0.5)


# Runs in each page: the formulas as the browser laid them out, and TeX left in visible text.
INSPECT = r"""JSON.stringify((() => {
  const maths = [...document.querySelectorAll('.arithmatex > math')];
  const visible = maths.filter(m => m.checkVisibility());
  const sized = visible.filter(m => { const r = m.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  // MathML layout, not inline text: a fraction's numerator sits above its denominator
  const fracs = [...document.querySelectorAll('.arithmatex mfrac')].filter(f => f.checkVisibility());
  const stacked = fracs.filter(f => f.children.length === 2 &&
    f.children[0].getBoundingClientRect().bottom <= f.children[1].getBoundingClientRect().top + 1);
  const tex = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode());) {
    const parent = node.parentElement;
    if (!parent || parent.closest('pre, code, script, style, math, textarea') || !parent.checkVisibility()) continue;
    if (/\\[\(\[]|\\[A-Za-z]{2,}|\$\$/.test(node.data)) tex.push(node.data.trim().slice(0, 80));
  }
  return {maths: maths.length, mathml: maths.filter(m => m instanceof MathMLElement).length,
          visible: visible.length, sized: sized.length, fracs: fracs.length, stacked: stacked.length, tex};
})())"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test reports what matters
        pass


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_site_renders_offline_in_chromium(site, tmp_path):
    """Every page, opened in headless Chromium from 127.0.0.1: the formulas are laid out
    as MathML, no raw TeX is visible, and no request goes to another host."""
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "headless Chromium is not installed (Debian: apt-get install -y chromium); "
            "test_site_loads_nothing_remote and test_site_has_no_raw_tex still check the built files"
        )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("index.html"))
    assert "mathematics/index.html" in pages
    browser = DevTools(executable, tmp_path / "profile", tmp_path / "chromium.log")
    problems, requested_urls, totals = [], set(), {"maths": 0, "stacked": 0}
    try:
        for page in pages:
            url = base + page.removesuffix("index.html")
            expected = (site / page).read_text(encoding="utf-8").count('class="arithmatex"')
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            browser.call("Network.enable", session=session)
            browser.call("Page.enable", session=session)
            browser.call(
                "Target.setAutoAttach",
                {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True},
                session=session,
            )
            since = len(browser.events)
            browser.call("Page.navigate", {"url": url}, session=session)
            browser.wait_event("Page.loadEventFired", session, since)
            browser.settle(quiet=0.3, limit=2.0)  # let late requests (the search worker) show up
            result = browser.call("Runtime.evaluate", {"expression": INSPECT, "returnByValue": True}, session=session)
            seen = json.loads(result["result"]["value"])
            browser.call("Target.closeTarget", {"targetId": target})
            totals["maths"] += seen["maths"]
            totals["stacked"] += seen["stacked"]
            if seen["maths"] != expected or seen["mathml"] != expected:
                problems.append(
                    f"{page}: {expected} formulas in the HTML, {seen['maths']} in the page, {seen['mathml']} of them MathML"
                )
            if seen["sized"] != seen["visible"]:
                problems.append(
                    f"{page}: {seen['visible'] - seen['sized']} of {seen['visible']} visible formulas have no size"
                )
            if seen["stacked"] != seen["fracs"]:
                problems.append(
                    f"{page}: {seen['fracs'] - seen['stacked']} of {seen['fracs']} fractions are not laid out as MathML"
                )
            if seen["tex"]:
                problems.append(f"{page}: raw TeX is visible: {seen['tex'][:3]}")
        for event in browser.events:
            if event["method"] == "Network.requestWillBeSent":
                requested_urls.add(event["params"]["request"]["url"])
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    remote = sorted(u for u in requested_urls if not u.startswith((base, "data:", "blob:", "about:")))
    assert not remote, "pages requested other hosts:\n" + "\n".join(remote)
    assert not problems, "\n".join(problems)
    assert any(u.endswith(".css") for u in requested_urls), "the network log is empty: the check saw nothing"
    assert totals["maths"] >= 100, totals
    assert totals["stacked"] >= 10, totals


def code_blocks(page: str) -> list[dict]:
    """The fenced blocks of a page: language, first line number, dedented code."""
    text = (DOCS / page).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        body = "".join(line[indent:] for line in m.group("body").splitlines(keepends=True))
        blocks.append(
            dict(
                lang=m.group("lang"),
                line=text.count("\n", 0, m.start()) + 1,
                code=textwrap.dedent(body),
                start=m.start(),
                end=m.end(),
            )
        )
    return blocks


def runnable(page: str) -> list[dict]:
    """Python blocks to execute, each with the error it must raise (or None)."""
    text = (DOCS / page).read_text()
    blocks = code_blocks(page)
    out = []
    for n, block in enumerate(blocks):
        if block["lang"] != "python" or block["code"].lstrip().startswith("--8<--"):
            continue
        expect = None
        following = blocks[n + 1] if n + 1 < len(blocks) else None
        if (
            following is not None
            and following["lang"] == "text"
            and not text[block["end"] : following["start"]].strip()
        ):
            shown = following["code"].strip()
            m = ERROR_LINE.match(shown.splitlines()[0]) if shown else None
            if m:
                expect = dict(type=m.group("type").rsplit(".", 1)[-1], message=m.group("message"))
            else:
                expect = dict(output=shown)
        out.append(dict(line=block["line"], code=block["code"], expect=expect, needs=sorted(_needs(block["code"]))))
    return out


def _needs(code: str) -> set[str]:
    needs = set()
    if re.search(r"^\s*(import|from)\s+torch\b|fastrpb\.torch", code, flags=re.M):
        needs.add("torch")
    if re.search(r"^\s*(import|from)\s+(jax|flax|optax)\b|fastrpb\.flax", code, flags=re.M):
        needs.add("jax")
    if re.search(r"^\s*(import|from)\s+cupy\b", code, flags=re.M):
        needs.add("cupy")
    return needs


def _unavailable(name: str) -> str | None:
    names, explicit = requested()
    if name not in names:
        return f"{name} is not in FASTRPB_BACKENDS"
    _, reason = load(name, explicit)
    return reason


DRIVER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(open(sys.argv[1]))
failures = []
def lines(text):
    return [line.rstrip() for line in text.strip().splitlines()]
for b in blocks:
    where = f"{sys.argv[2]}, block at line {b['line']}"
    expect = b["expect"] or {}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(b["code"], where, "exec"), {"__name__": "__main__"})
    except Exception as exc:
        if "type" not in expect:
            failures.append(f"{where} raised:\n{traceback.format_exc()}")
        elif type(exc).__name__ != expect["type"] or " ".join(str(exc).split()) != " ".join(expect["message"].split()):
            failures.append(f"{where}: the page shows\n  {expect['type']}: {expect['message']}\nbut the code raises\n  {type(exc).__name__}: {exc}")
    else:
        if "type" in expect:
            failures.append(f"{where} should raise {expect['type']} but ran")
        elif "output" in expect and lines(printed.getvalue()) != lines(expect["output"]):
            failures.append(f"{where}: the page shows the output\n{expect['output']}\nbut the code prints\n{printed.getvalue()}")
if failures:
    sys.exit("\n\n".join(failures))
"""


@pytest.mark.parametrize("page", RUN)
def test_page_code_runs(page, tmp_path):
    blocks = runnable(page)
    assert blocks, f"{page} has no python block"
    skipped = {}
    todo = []
    for block in blocks:
        reasons = [r for r in map(_unavailable, block["needs"]) if r]
        if reasons:
            skipped[block["line"]] = reasons[0]
        else:
            todo.append(block)
    if todo:
        (tmp_path / "blocks.json").write_text(json.dumps(todo))
        (tmp_path / "driver.py").write_text(DRIVER)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.run(
            [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json"), f"docs/{page}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"code in docs/{page} failed:\n{proc.stderr[-6000:]}"
    if not todo:
        pytest.skip("no block can run here: " + "; ".join(f"line {k}: {v}" for k, v in skipped.items()))
    for line, reason in skipped.items():  # shown with -rA / -s; the rest of the page ran
        print(f"docs/{page}: skipped the block at line {line}: {reason}")


def test_figures_script_runs(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        _names, explicit = requested()
        if explicit:
            pytest.skip(f"matplotlib is not installed ({exc}) and FASTRPB_BACKENDS is narrowed")
        raise RuntimeError(
            f"the figure script is part of the suite but matplotlib is missing ({exc}): pip install -e '.[docs]'"
        ) from exc
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
    }
    subprocess.run(
        [sys.executable, str(DOCS / "figures" / "make_figures.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (tmp_path / "fastrpb_bias.png").stat().st_size > 10_000
    assert (DOCS / "figures" / "fastrpb_bias.png").exists(), (
        "the committed figure is missing: run docs/figures/make_figures.py"
    )
