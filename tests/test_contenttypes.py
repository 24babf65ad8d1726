"""Tests for sniport.wire.contenttypes: the same content types on every machine.

DESIGN.md "Pinned behaviours": the stdlib ``mimetypes`` default table without the machine's
/etc/mime.types, plus a pinned table of modern types; ``charset=utf-8`` on text types.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sniport.wire import contenttypes
from sniport.wire.contenttypes import DEFAULT, content_type

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        # the pinned table (DESIGN.md); text/javascript per RFC 9239 section 6
        ("app.js", "text/javascript; charset=utf-8"),
        ("mod.mjs", "text/javascript; charset=utf-8"),
        ("code.wasm", "application/wasm"),
        ("photo.webp", "image/webp"),
        ("photo.avif", "image/avif"),
        ("font.woff2", "font/woff2"),
        ("data.json", "application/json"),  # RFC 8259 section 11: no charset parameter
        ("logo.svg", "image/svg+xml; charset=utf-8"),
        # common types from the stdlib defaults; charset=utf-8 on text types
        ("index.html", "text/html; charset=utf-8"),
        ("page.htm", "text/html; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("notes.txt", "text/plain; charset=utf-8"),
        ("table.csv", "text/csv; charset=utf-8"),
        ("feed.xml", "text/xml; charset=utf-8"),
        ("image.png", "image/png"),
        ("anim.gif", "image/gif"),
        ("doc.pdf", "application/pdf"),
        ("clip.mp4", "video/mp4"),
        ("archive.zip", "application/zip"),
        ("photo.jpeg", "image/jpeg"),
        ("photo.jpg", "image/jpeg"),  # the registered type, as the stdlib's strict table has it
        ("photo.JPG", "image/jpeg"),
        # extensions are case-insensitive
        ("INDEX.HTML", "text/html; charset=utf-8"),
        ("App.Js", "text/javascript; charset=utf-8"),
        ("LOGO.SVG", "image/svg+xml; charset=utf-8"),
        ("Data.JSON", "application/json"),
        ("FONT.WOFF2", "font/woff2"),
        ("Code.WASM", "application/wasm"),
        # only the last extension counts
        ("bundle.min.js", "text/javascript; charset=utf-8"),
        ("report.2024.pdf", "application/pdf"),
        ("a.json.txt", "text/plain; charset=utf-8"),
        # unknown or none: application/octet-stream
        ("file.unknownext", "application/octet-stream"),
        ("file.xyz123", "application/octet-stream"),
        ("Makefile", "application/octet-stream"),
        ("README", "application/octet-stream"),
        ("", "application/octet-stream"),
        ("trailingdot.", "application/octet-stream"),
        ("noext", "application/octet-stream"),
    ],
)
def test_content_type(filename: str, expected: str) -> None:
    assert content_type(filename) == expected


def test_default_is_octet_stream() -> None:
    assert DEFAULT == "application/octet-stream"


def test_charset_exactly_on_text_types() -> None:
    # text/* and the few textual application/image types get charset=utf-8; nothing else.
    textual = ("application/javascript", "application/xml", "image/svg+xml",
               "application/manifest+json")
    for ext, ctype in contenttypes.TABLE.items():
        base, _, param = ctype.partition("; ")
        if base.startswith("text/") or base in textual:
            assert param == "charset=utf-8", ext
        else:
            assert param == "", ext


def test_table_keys_are_lower_case_extensions() -> None:
    for ext in contenttypes.TABLE:
        assert ext.startswith("."), ext
        assert ext == ext.lower(), ext


_PROBE = r"""
import json, mimetypes, sys
mimetypes.knownfiles = sys.argv[1:]   # what init() reads: this machine's files, or ours
from sniport.wire import contenttypes
mimetypes.init()
print(json.dumps({
    "control": mimetypes.guess_type("x.html")[0],
    "table": contenttypes.TABLE,
    "html": contenttypes.content_type("index.html"),
    "css": contenttypes.content_type("style.css"),
    "png": contenttypes.content_type("image.png"),
    "js": contenttypes.content_type("app.js"),
    "odd": contenttypes.content_type("thing.oddext"),
}))
"""


def _probe(*knownfiles: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *knownfiles], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_result_does_not_depend_on_the_machines_mime_types(tmp_path: Path) -> None:
    odd = tmp_path / "mime.types"
    odd.write_text(
        "application/x-odd-html\thtml htm\n"
        "application/x-odd-css\tcss\n"
        "application/x-odd-png\tpng\n"
        "application/x-odd-js\tjs\n"
        "application/x-odd\toddext\n"
    )
    with_odd = _probe(str(odd))
    # The control shows that the stdlib really did read the odd file in that process...
    assert with_odd["control"] == "application/x-odd-html"
    # ...and sniport's answers ignored it.
    assert with_odd["html"] == "text/html; charset=utf-8"
    assert with_odd["css"] == "text/css; charset=utf-8"
    assert with_odd["png"] == "image/png"
    assert with_odd["js"] == "text/javascript; charset=utf-8"
    assert with_odd["odd"] == "application/octet-stream"
    # The whole table is the same with the odd file, with no file at all, and in this
    # process (which may have read the machine's own /etc/mime.types).
    without_files = _probe()
    assert with_odd["table"] == without_files["table"] == contenttypes.TABLE
