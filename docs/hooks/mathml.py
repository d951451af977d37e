"""MkDocs hook: typeset the maths at build time, as MathML, so no page needs a script.

``pymdownx.arithmatex`` (generic mode) leaves every formula as TeX in
``<span class="arithmatex">\\(...\\)</span>`` (inline) or
``<div class="arithmatex">\\[...\\]</div>`` (display), for a JavaScript renderer to
typeset in the reader's browser. This hook converts each one to MathML with
`latex2mathml <https://pypi.org/project/latex2mathml/>`_ (pure Python, in the
``docs`` extra) while the site is built; browsers render MathML natively, so the
formulas show without network and without JavaScript. The TeX is kept as the
``alttext`` of each ``<math>`` element (screen readers, copy and paste).

A formula that cannot be converted, or that leaves a TeX command unconverted (a
command latex2mathml does not know stays as literal ``\\name`` text), fails the
build with the page and the formula, so a strict build never ships raw TeX.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

_ARITHMATEX = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', flags=re.S)
# text of a MathML token element that still holds a TeX command, e.g. <mi>\foo</mi>
_LEFTOVER = re.compile(r">[^<]*\\[A-Za-z]+[^<]*<")
_DELIMITERS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}


def tex_to_mathml(tex: str, *, display: bool) -> str:
    """The MathML ``<math>`` element of one TeX formula (without delimiters).

    Raises
    ------
    ValueError
        If latex2mathml cannot parse ``tex`` or leaves a TeX command in its output.
    """
    try:
        mathml = convert(tex, display="block" if display else "inline")
    except Exception as exc:  # latex2mathml raises its own exception types
        raise ValueError(f"latex2mathml cannot convert {tex!r}: {type(exc).__name__}: {exc}") from exc
    leftover = _LEFTOVER.search(mathml)
    if leftover:
        raise ValueError(f"latex2mathml left the TeX command {leftover.group(0)[1:-1]!r} unconverted in {tex!r}")
    alt = html.escape(" ".join(tex.split()), quote=True)
    return mathml.replace("<math ", f'<math alttext="{alt}" ', 1)


def _replace(match: re.Match[str], where: str) -> str:
    tag = match.group("tag")
    source = html.unescape(match.group("tex")).strip()
    opening, closing = _DELIMITERS[tag]
    if not (source.startswith(opening) and source.endswith(closing)):
        raise PluginError(f"{where}: an arithmatex {tag} without {opening} ... {closing}: {source[:80]!r}")
    try:
        mathml = tex_to_mathml(source[len(opening) : -len(closing)].strip(), display=tag == "div")
    except ValueError as exc:
        raise PluginError(f"{where}: {exc}") from exc
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'


def on_page_content(html_text: str, page, **kwargs) -> str:
    """Replace every arithmatex formula of a page (API docstrings included) by MathML."""
    where = page.file.src_uri
    return _ARITHMATEX.sub(lambda m: _replace(m, where), html_text)
