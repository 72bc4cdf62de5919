"""The web chat page the Gateway serves at its route prefix: one HTML page, a script and a style
sheet (package data under ``static/``), with no build step and no third-party code.

The page calls the same OpenAI-compatible API as any other client (``/v1/models`` for the model
name, ``/v1/chat/completions`` with ``stream: true``), from the same origin, so it works wherever the
application is deployed and goes through the same API key check, limits and validation.
"""

from __future__ import annotations

import html
from functools import lru_cache
from importlib import resources

ASSETS = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}

# Only this origin's script, styles and API; images the user picks arrive as data: URLs.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return resources.files("llava_platform.serve").joinpath("static", name).read_text(encoding="utf-8")


def page(root_path: str) -> str:
    """The chat page for an application mounted at ``root_path`` (Serve's route prefix, "" for "/"):
    the page's links and API calls are absolute paths under it, so ``/demo`` and ``/demo/`` both work."""
    root = html.escape(root_path.rstrip("/"), quote=True)
    return _read("chat.html").replace("{root}", root)


def asset(name: str) -> tuple[str, str] | None:
    """(text, media type) of a static file of the page; None for a name that is not one."""
    media_type = ASSETS.get(name)
    return (_read(name), media_type) if media_type else None
