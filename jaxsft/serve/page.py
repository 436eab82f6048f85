"""The chat page (jaxsft/static/chat.html) and the headers it is served with.

The page is one file with one inline <style> and one inline <script>. Its
Content-Security-Policy allows exactly those two, by their sha256 hashes (computed
from the file when it is first served), and nothing else: no other script, style,
image, font or frame, no fetch but to this server, no <base>, no form submission, and
no framing of the page by another site (clickjacking). An inline event handler
(onclick=...) or a style="..." attribute would be blocked: the page has none.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

PAGE = "static/chat.html"


def inline(html: str, tag: str) -> list[str]:
    """The text of each inline <tag> element (written bare: `<script>`, `<style>`), exactly as
    the browser hashes it. Read in document order, outside comments, as the browser does: a
    "<style>" inside the script or a comment is text."""
    html = re.sub(r"<!--.*?-->", "", html, flags=re.S)
    return [text for t, text in re.findall(r"<(script|style)>(.*?)</\1>", html, flags=re.S) if t == tag]


def sha256(text: str) -> str:
    """A CSP hash source: 'sha256-<base64 of the UTF-8 text's digest>'."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def csp(html: str) -> str:
    """The page's Content-Security-Policy: its inline script and style by hash, fetch to this origin only."""
    scripts = " ".join(sha256(s) for s in inline(html, "script")) or "'none'"
    styles = " ".join(sha256(s) for s in inline(html, "style")) or "'none'"
    return (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.lru_cache(maxsize=1)
def chat_page() -> tuple[str, dict]:
    """(the page's HTML, its headers), read once."""
    html = resources.files("jaxsft").joinpath(PAGE).read_text(encoding="utf-8")
    # (X-Content-Type-Options: nosniff comes with every response: access_log.py)
    return html, {"Content-Security-Policy": csp(html), "Referrer-Policy": "no-referrer",
                  "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
