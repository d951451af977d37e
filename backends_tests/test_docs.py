"""The documentation cannot rot: the site builds strictly and its code runs.

- ``mkdocs build --strict`` into a temporary folder: a broken link, a missing page or
  an API page whose object no longer exists fails the build.
- Every ``python`` block of the pages in ``RUN`` is executed, each in a fresh
  namespace, in one subprocess per page (as a user would paste it). A block that
  needs a framework not selected by ``FASTRPB_BACKENDS`` (or a GPU that is not
  there) is skipped for the reason.
- A ``python`` block followed directly by a ``text`` block that starts with
  ``SomeError: message`` must raise exactly that: the troubleshooting page shows the
  real messages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backends import load, requested

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN = ["quickstart.md", "cookbook.md", "troubleshooting.md", "../README.md"]

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    flags=re.M | re.S,
)
ERROR_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>.*)$")


def test_mkdocs_build_strict(tmp_path):
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:
        names, explicit = requested()
        if explicit:
            pytest.skip(f"mkdocs is not installed ({exc}) and FASTRPB_BACKENDS is narrowed")
        raise RuntimeError(f"the docs build is part of the suite but mkdocs is missing ({exc}): pip install -e '.[docs]'") from exc
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "api" / "attention" / "index.html").exists()


def code_blocks(page: str) -> list[dict]:
    """The fenced blocks of a page: language, first line number, dedented code."""
    text = (DOCS / page).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        body = "".join(line[indent:] for line in m.group("body").splitlines(keepends=True))
        blocks.append(dict(lang=m.group("lang"), line=text.count("\n", 0, m.start()) + 1, code=textwrap.dedent(body), start=m.start(), end=m.end()))
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
        if following is not None and following["lang"] == "text" and not text[block["end"] : following["start"]].strip():
            m = ERROR_LINE.match(following["code"].strip().splitlines()[0])
            if m:
                expect = dict(type=m.group("type").rsplit(".", 1)[-1], message=m.group("message"))
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
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
failures = []
for b in blocks:
    where = f"{sys.argv[2]}, block at line {b['line']}"
    try:
        exec(compile(b["code"], where, "exec"), {"__name__": "__main__"})
    except Exception as exc:
        if b["expect"] is None:
            failures.append(f"{where} raised:\n{traceback.format_exc()}")
        elif type(exc).__name__ != b["expect"]["type"] or " ".join(str(exc).split()) != " ".join(b["expect"]["message"].split()):
            failures.append(f"{where}: the page shows\n  {b['expect']['type']}: {b['expect']['message']}\nbut the code raises\n  {type(exc).__name__}: {exc}")
    else:
        if b["expect"] is not None:
            failures.append(f"{where} should raise {b['expect']['type']} but ran")
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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(
            [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json"), f"docs/{page}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
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
        names, explicit = requested()
        if explicit:
            pytest.skip(f"matplotlib is not installed ({exc}) and FASTRPB_BACKENDS is narrowed")
        raise RuntimeError(f"the figure script is part of the suite but matplotlib is missing ({exc}): pip install -e '.[docs]'") from exc
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])), "MPLBACKEND": "Agg"}
    subprocess.run(
        [sys.executable, str(DOCS / "figures" / "make_figures.py"), "--out", str(tmp_path)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=300,
    )
    assert (tmp_path / "fastrpb_bias.png").stat().st_size > 10_000
    assert (DOCS / "figures" / "fastrpb_bias.png").exists(), "the committed figure is missing: run docs/figures/make_figures.py"
