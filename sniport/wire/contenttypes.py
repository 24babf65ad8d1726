"""Content types by file extension, the same on every machine (sans-IO).

Rules (DESIGN.md "Pinned behaviours"): the stdlib ``mimetypes`` default table, without
reading the machine's /etc/mime.types, plus a small pinned table of modern types that the
stdlib lacks or gets wrong; ``charset=utf-8`` on text types.
"""

from __future__ import annotations

import mimetypes

# The pinned table wins over the stdlib's. text/javascript: RFC 9239 section 6.
PINNED = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".md": "text/markdown",
    ".webmanifest": "application/manifest+json",
}
DEFAULT = "application/octet-stream"
_CHARSET_TYPES = ("application/javascript", "application/xml", "image/svg+xml",
                  "application/manifest+json")


def _table() -> dict[str, str]:
    # A private database built from the stdlib defaults only (no files are read).
    db = mimetypes.MimeTypes(filenames=(), strict=False)
    # The strict (IANA-registered) types win over the common non-strict ones: .jpg is
    # image/jpeg, not image/jpg.
    table = dict(db.types_map[False])
    table.update(db.types_map[True])
    table.update(PINNED)
    return {ext: _with_charset(t) for ext, t in table.items()}


def _with_charset(ctype: str) -> str:
    if ctype.startswith("text/") or ctype in _CHARSET_TYPES:
        return f"{ctype}; charset=utf-8"
    return ctype


TABLE = _table()


def content_type(filename: str) -> str:
    dot = filename.rfind(".")
    if dot < 0:
        return DEFAULT
    return TABLE.get(filename[dot:].lower(), DEFAULT)
