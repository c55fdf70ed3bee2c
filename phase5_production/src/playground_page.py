"""The playground page the server answers at `/`: plain HTML, CSS and JavaScript from src/playground/.

No build step and nothing from the internet: the page's Content-Security-Policy lets it load and
call only this server (connect-src 'self'), so a page that tried to reach elsewhere would fail in
the browser test. The page calls POST /v1/completions with "stream": true and "return_routing": true.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PAGE_FOLDER", "PAGE_FILES", "playground_file"]

PAGE_FOLDER = Path(__file__).resolve().parent / "playground"
# URL path -> (file in PAGE_FOLDER, Content-Type). Only these are served: no path is ever joined
# with what a client sent, so no request can read another file.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/style.css": ("style.css", "text/css; charset=utf-8"),
}
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"


def playground_file(url_path: str) -> tuple[bytes, dict[str, str]] | None:
    """(body, headers) for one of the page's files, or None when `url_path` is not one of them."""
    if url_path not in PAGE_FILES:
        return None
    name, content_type = PAGE_FILES[url_path]
    headers = {
        "Content-Type": content_type,
        "Cache-Control": "no-cache",  # a restarted server may serve a newer page
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
    }
    return (PAGE_FOLDER / name).read_bytes(), headers
