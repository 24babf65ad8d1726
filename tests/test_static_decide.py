"""Issue 9: what the static handler answers is decided before anything is sent, and the
decision can be tested without an exchange (``StaticFiles.decide``).

Table-driven on a directory built here: files, dotfiles and ``/.well-known/``, symlinks
inside and out of the root, directories with and without an index, autoindex, the
fallback, precompressed ``.br``/``.gz`` siblings and Accept-Encoding, preconditions
(If-None-Match, If-Modified-Since, If-Match, If-Unmodified-Since) and ranges (single,
several, unsatisfiable, If-Range), methods, and error pages (``page=True``). Sending is
tested end to end elsewhere (test_http_static.py, test_hardening_static.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sniport.config import StaticHandler
from sniport.http.request import Request
from sniport.http.static import (
    Decision,
    Forbidden,
    Found,
    Listing,
    MethodNotAllowed,
    Missing,
    NotModified,
    PreconditionFailed,
    RangeNotSatisfiable,
    SlashRedirect,
    StaticFiles,
    listing_page,
)
from sniport.wire.httprules import http_date

MTIME = 1_700_000_000  # every file's, so that validators are known in advance
DATE = http_date(MTIME)
BEFORE, AFTER = http_date(MTIME - 60), http_date(MTIME + 60)
HELLO = b"hello world"  # a.txt: 11 bytes
ETAG = f'"{MTIME:x}-{len(HELLO):x}"'
HOME = b"<h1>home</h1>"  # index.html
HOME_ETAG = f'"{MTIME:x}-{len(HOME):x}"'


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("decide")
    root, outside = base / "root", base / "outside"
    files = {
        "a.txt": HELLO,
        "index.html": HOME,
        ".secret": b"s",
        ".well-known/acme-challenge/tok": b"t",
        "dir/.hidden/x": b"x",
        "withindex/index.html": b"<p>i</p>",
        "noindex/f.txt": b"f",
        "app.js": b"js" * 100,
        "app.js.gz": b"gz",
        "app.js.br": b"br",
        "style.css": b"css" * 10,
        "style.css.gz": b"gzcss",
        "empty.txt": b"",
        "gzidx/index.html": b"<p>gz</p>" * 20,
        "gzidx/index.html.gz": b"gz",
        "outidx/other.txt": b"o",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"outside")
    (root / "link-in.txt").symlink_to("a.txt")
    (root / "link-out.txt").symlink_to(outside / "secret.txt")
    (root / "dir-out").symlink_to(outside / "sub")
    (root / "outidx" / "index.html").symlink_to(outside / "secret.txt")
    os.mkfifo(root / "fifo")
    for path in [*root.rglob("*"), *outside.rglob("*")]:
        if not path.is_symlink() and path.is_file():
            os.utime(path, (MTIME, MTIME))
    return root


CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "autoindex": {"autoindex": True},
    "dotfiles": {"dotfiles": True},
    "spa": {"fallback": "/index.html"},
    "raw": {"precompressed": False},
    "noindex": {"index": []},
    "twoindex": {"index": ["index.html", "index.htm"]},
}


def files(tree: Path, config: str) -> StaticFiles:
    return StaticFiles(StaticHandler.model_validate({"root": str(tree), **CONFIGS[config]}))


def request(path: str, method: str = "GET", headers: dict[str, str] | None = None,
            query: str = "") -> Request:
    req = Request(0.0)
    req.method = method
    req.path = path
    req.query = query
    req.headers = [(b"host", b"static.test")] + [
        (k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return req


def summary(tree: Path, d: Decision) -> tuple[Any, ...]:
    """A decision as a short tuple: paths relative to the root."""
    if isinstance(d, Found):
        rng = None if d.byte_range is None else (d.byte_range.start, d.byte_range.end)
        return ("found", os.path.relpath(d.meta.path, tree), d.coding, d.vary, rng)
    if isinstance(d, NotModified):
        return ("304", os.path.relpath(d.meta.path, tree), d.coding, d.vary)
    if isinstance(d, PreconditionFailed):
        return ("412",)
    if isinstance(d, RangeNotSatisfiable):
        return ("416", d.size)
    if isinstance(d, Missing):
        return ("404", d.note)
    if isinstance(d, Forbidden):
        return ("403", d.note)
    if isinstance(d, SlashRedirect):
        return ("301", d.location)
    if isinstance(d, Listing):
        return ("listing", os.path.relpath(d.fs_path, tree))
    assert isinstance(d, MethodNotAllowed)
    return ("405",)


GZ = {"Accept-Encoding": "gzip"}
BR_GZ = {"Accept-Encoding": "gzip, br"}

# (config, method, request path, rest, headers) -> expected summary. The route is "/",
# so rest is the path itself unless a case says otherwise.
CASES: list[tuple[str, str, str, dict[str, str], tuple[Any, ...]]] = [
    # files
    ("plain", "GET", "/a.txt", {}, ("found", "a.txt", None, False, None)),
    ("plain", "HEAD", "/a.txt", {}, ("found", "a.txt", None, False, None)),
    ("plain", "POST", "/a.txt", {}, ("405",)),
    ("plain", "DELETE", "/nope", {}, ("405",)),
    ("plain", "GET", "/nope.txt", {}, ("404", "not_found")),
    ("plain", "GET", "/a.txt/more", {}, ("404", "not_found")),
    ("plain", "GET", "/fifo", {}, ("404", "not_found")),
    ("plain", "GET", "/empty.txt", {}, ("found", "empty.txt", None, False, None)),
    # paths that must not reach the file system
    ("plain", "GET", "/%2e%2e/x", {}, ("404", "bad_path: encoded dot, slash, backslash or NUL")),
    ("plain", "GET", "/a/../a.txt", {}, ("404", "bad_path: dot-dot segment")),
    ("plain", "GET", "/a%5cb", {}, ("404", "bad_path: encoded dot, slash, backslash or NUL")),
    # dotfiles; /.well-known/ always (RFC 8615)
    ("plain", "GET", "/.secret", {}, ("404", "dotfile")),
    ("plain", "GET", "/dir/.hidden/x", {}, ("404", "dotfile")),
    ("plain", "GET", "/.well-known/acme-challenge/tok", {},
     ("found", ".well-known/acme-challenge/tok", None, False, None)),
    ("dotfiles", "GET", "/.secret", {}, ("found", ".secret", None, False, None)),
    ("dotfiles", "GET", "/dir/.hidden/x", {}, ("found", "dir/.hidden/x", None, False, None)),
    # symlinks: inside served, out of the root never (and no fallback for them)
    ("plain", "GET", "/link-in.txt", {}, ("found", "link-in.txt", None, False, None)),
    ("plain", "GET", "/link-out.txt", {}, ("404", "not_found")),
    ("spa", "GET", "/link-out.txt", {}, ("404", "not_found")),
    ("plain", "GET", "/dir-out/", {}, ("404", "not_found")),
    ("autoindex", "GET", "/dir-out/", {}, ("404", "not_found")),
    # directories
    ("plain", "GET", "/withindex", {}, ("301", "/withindex/")),
    ("plain", "GET", "/noindex", {}, ("301", "/noindex/")),
    ("plain", "GET", "/", {}, ("found", "index.html", None, False, None)),
    ("plain", "GET", "/withindex/", {}, ("found", "withindex/index.html", None, False, None)),
    ("plain", "GET", "/noindex/", {}, ("403", "directory_without_index")),
    ("noindex", "GET", "/withindex/", {}, ("403", "directory_without_index")),
    ("autoindex", "GET", "/noindex/", {}, ("listing", "noindex")),
    ("autoindex", "GET", "/withindex/", {}, ("found", "withindex/index.html", None, False, None)),
    # an index file is answered as the named file is: conditions, ranges, siblings (issue 13)
    ("plain", "GET", "/", {"If-None-Match": HOME_ETAG}, ("304", "index.html", None, False)),
    ("plain", "GET", "/", {"If-Modified-Since": DATE}, ("304", "index.html", None, False)),
    ("plain", "GET", "/", {"If-Match": '"other"'}, ("412",)),
    ("plain", "GET", "/", {"Range": "bytes=0-3"}, ("found", "index.html", None, False, (0, 3))),
    ("plain", "GET", "/", {"Range": "bytes=99-"}, ("416", len(HOME))),
    ("plain", "GET", "/gzidx/", GZ, ("found", "gzidx/index.html.gz", "gzip", True, None)),
    ("plain", "GET", "/gzidx/", {}, ("found", "gzidx/index.html", None, True, None)),
    # an index that is a symlink out of the root is no index
    ("plain", "GET", "/outidx/", {}, ("403", "directory_without_index")),
    ("autoindex", "GET", "/outidx/", {}, ("listing", "outidx")),
    # the fallback (a single-page app) answers what names no file, with its own conditions
    ("spa", "GET", "/deep/route", {}, ("found", "index.html", None, False, None)),
    ("spa", "GET", "/a.txt", {}, ("found", "a.txt", None, False, None)),
    ("spa", "GET", "/.secret", {}, ("404", "dotfile")),
    ("spa", "GET", "/deep/route", {"If-None-Match": f'"{MTIME:x}-d"'},
     ("304", "index.html", None, False)),
    # precompressed siblings: a variant has its own validator; Vary whenever one exists
    ("plain", "GET", "/app.js", {}, ("found", "app.js", None, True, None)),
    ("plain", "GET", "/app.js", GZ, ("found", "app.js.gz", "gzip", True, None)),
    ("plain", "GET", "/app.js", BR_GZ, ("found", "app.js.br", "br", True, None)),
    ("plain", "GET", "/app.js", {"Accept-Encoding": "br;q=0, gzip"},
     ("found", "app.js.gz", "gzip", True, None)),
    ("plain", "GET", "/style.css", BR_GZ, ("found", "style.css.gz", "gzip", True, None)),
    ("plain", "GET", "/a.txt", BR_GZ, ("found", "a.txt", None, False, None)),
    ("raw", "GET", "/app.js", BR_GZ, ("found", "app.js", None, False, None)),
    ("plain", "GET", "/app.js", {**GZ, "If-None-Match": f'"{MTIME:x}-2-gz"'},
     ("304", "app.js.gz", "gzip", True)),
    ("plain", "GET", "/app.js", {"If-None-Match": f'"{MTIME:x}-2-gz"'},
     ("found", "app.js", None, True, None)),
    # preconditions, in the order of RFC 9110 section 13.2.2
    ("plain", "GET", "/a.txt", {"If-None-Match": ETAG}, ("304", "a.txt", None, False)),
    ("plain", "HEAD", "/a.txt", {"If-None-Match": ETAG}, ("304", "a.txt", None, False)),
    ("plain", "GET", "/a.txt", {"If-None-Match": f"W/{ETAG}"}, ("304", "a.txt", None, False)),
    ("plain", "GET", "/a.txt", {"If-None-Match": f'"other", {ETAG}'},
     ("304", "a.txt", None, False)),
    ("plain", "GET", "/a.txt", {"If-None-Match": "*"}, ("304", "a.txt", None, False)),
    ("plain", "GET", "/a.txt", {"If-None-Match": '"other"'},
     ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"If-Modified-Since": DATE}, ("304", "a.txt", None, False)),
    ("plain", "GET", "/a.txt", {"If-Modified-Since": AFTER}, ("304", "a.txt", None, False)),
    ("plain", "GET", "/a.txt", {"If-Modified-Since": BEFORE},
     ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"If-Modified-Since": "yesterday"},
     ("found", "a.txt", None, False, None)),
    # If-None-Match wins over If-Modified-Since (section 13.1.3)
    ("plain", "GET", "/a.txt", {"If-None-Match": '"other"', "If-Modified-Since": AFTER},
     ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"If-Match": '"other"'}, ("412",)),
    ("plain", "GET", "/a.txt", {"If-Match": ETAG}, ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"If-Unmodified-Since": BEFORE}, ("412",)),
    ("plain", "GET", "/a.txt", {"If-Unmodified-Since": DATE},
     ("found", "a.txt", None, False, None)),
    # ranges (RFC 9110 section 14): single served, several ignored, unsatisfiable 416
    ("plain", "GET", "/a.txt", {"Range": "bytes=0-4"}, ("found", "a.txt", None, False, (0, 4))),
    ("plain", "GET", "/a.txt", {"Range": "bytes=6-"}, ("found", "a.txt", None, False, (6, 10))),
    ("plain", "GET", "/a.txt", {"Range": "bytes=-3"}, ("found", "a.txt", None, False, (8, 10))),
    ("plain", "GET", "/a.txt", {"Range": "bytes=5-100"},
     ("found", "a.txt", None, False, (5, 10))),
    ("plain", "GET", "/a.txt", {"Range": "bytes=0-1,4-5"},
     ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"Range": "bytes=11-"}, ("416", 11)),
    ("plain", "GET", "/a.txt", {"Range": "bytes=-0"}, ("416", 11)),
    ("plain", "GET", "/a.txt", {"Range": "lines=1-2"}, ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/empty.txt", {"Range": "bytes=0-"}, ("416", 0)),
    ("plain", "HEAD", "/a.txt", {"Range": "bytes=0-4"}, ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"Range": "bytes=0-4", "If-Range": ETAG},
     ("found", "a.txt", None, False, (0, 4))),
    ("plain", "GET", "/a.txt", {"Range": "bytes=0-4", "If-Range": DATE},
     ("found", "a.txt", None, False, (0, 4))),
    ("plain", "GET", "/a.txt", {"Range": "bytes=0-4", "If-Range": '"old"'},
     ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"Range": "bytes=0-4", "If-Range": f"W/{ETAG}"},
     ("found", "a.txt", None, False, None)),
    ("plain", "GET", "/a.txt", {"Range": "bytes=99-", "If-None-Match": ETAG},
     ("304", "a.txt", None, False)),
    ("plain", "GET", "/app.js", {**GZ, "Range": "bytes=0-0"},
     ("found", "app.js.gz", "gzip", True, (0, 0))),
]


@pytest.mark.parametrize(("config", "method", "path", "headers", "expected"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'+'.join(c[3]) or 'none'}"
                              for c in CASES])
def test_decide(tree: Path, config: str, method: str, path: str, headers: dict[str, str],
                expected: tuple[Any, ...]) -> None:
    sf = files(tree, config)
    req = request(path, method, headers)
    assert summary(tree, sf.decide(req, path, 0.0)) == expected
    # Asked again at once, the path may come from the cache of files found: same answer.
    assert summary(tree, sf.decide(req, path, 0.5)) == expected


def test_a_route_prefix_is_not_part_of_the_file_path(tree: Path) -> None:
    """The handler gets the path after the route's prefix (nginx ``alias``); the redirect
    to the slash form is built from the request's own path, query kept."""
    sf = files(tree, "plain")
    req = request("/static/a.txt")
    assert summary(tree, sf.decide(req, "a.txt", 0.0)) == ("found", "a.txt", None, False, None)
    req = request("/static/withindex", query="x=1")
    assert summary(tree, sf.decide(req, "withindex", 0.0)) == ("301", "/static/withindex/?x=1")


@pytest.mark.parametrize(("path", "headers", "expected"), [
    # An error page is a file or nothing: no method check, no conditions, no range, no
    # fallback; a precompressed variant is still chosen.
    ("/a.txt", {}, ("found", "a.txt", None, False, None)),
    ("/a.txt", {"If-None-Match": ETAG, "Range": "bytes=0-1"},
     ("found", "a.txt", None, False, None)),
    ("/app.js", GZ, ("found", "app.js.gz", "gzip", True, None)),
    ("/nope.html", {}, ("404", "not_found")),
    ("/withindex/", {}, ("404", "not_found")),
    ("/.secret", {}, ("404", "dotfile")),
    ("/link-out.txt", {}, ("404", "not_found")),
])
def test_decide_error_page(tree: Path, path: str, headers: dict[str, str],
                           expected: tuple[Any, ...]) -> None:
    sf = files(tree, "spa")
    req = request("/api/broken", "POST", headers)
    assert summary(tree, sf.decide(req, path, 0.0, page=True)) == expected


def test_the_cache_of_files_found_expires(tree: Path) -> None:
    """A file removed is missing once the cached look is older than STAT_VALID."""
    sf = files(tree, "plain")
    target = tree / "gone.txt"
    target.write_bytes(b"soon gone")
    try:
        assert isinstance(sf.decide(request("/gone.txt"), "/gone.txt", 10.0), Found)
    finally:
        target.unlink()
    assert isinstance(sf.decide(request("/gone.txt"), "/gone.txt", 10.5), Found)
    assert summary(tree, sf.decide(request("/gone.txt"), "/gone.txt", 12.0)) == \
        ("404", "not_found")


def test_a_plain_request_allocates_no_new_decision(tree: Path) -> None:
    """The fast path: the same file asked plainly gets the same decision object."""
    sf = files(tree, "plain")
    first = sf.decide(request("/a.txt"), "/a.txt", 0.0)
    assert sf.decide(request("/a.txt"), "/a.txt", 0.1) is first
    ranged = sf.decide(request("/a.txt", headers={"Range": "bytes=0-1"}), "/a.txt", 0.2)
    assert ranged is not first and sf.decide(request("/a.txt"), "/a.txt", 0.3) is first


def test_listing_page() -> None:
    page = listing_page("/files/<x>/", [("b.txt", False), ("sub", True), (".git", True),
                                        ("a b&c", False)], dotfiles=False).decode()
    rows = [line for line in page.splitlines() if line.startswith("<a ")]
    assert rows == ['<a href="../">../</a>', '<a href="sub/">sub/</a>',
                    '<a href="a%20b%26c">a b&amp;c</a>', '<a href="b.txt">b.txt</a>']
    assert "<title>Index of /files/&lt;x&gt;/</title>" in page
    shown = listing_page("/", [(".git", True)], dotfiles=True).decode()
    assert '<a href=".git/">.git/</a>' in shown


def test_permission_denied_is_forbidden(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path the worker may not look at: 403, logged (as an error page: nothing). The
    denial is simulated, since the tests may run as root, whom no mode stops."""
    real_stat = os.stat
    locked = str(tree / "a.txt")

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    sf = files(tree, "spa")
    d = sf.decide(request("/a.txt"), "/a.txt", 0.0)
    assert summary(tree, d) == ("403", "permission_denied")
    page = sf.decide(request("/x"), "/a.txt", 0.0, page=True)
    assert summary(tree, page) == ("404", "not_found")


class _Recorder:
    """The little of an exchange that a whole small file's send uses."""

    remove_headers: frozenset[bytes] = frozenset()

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[tuple[str, str]], bytes, bytes]] = []

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                block: bytes = b"") -> None:
        self.sent.append((status, headers, body, block))


def test_a_sibling_that_appears_later_brings_vary(tmp_path: Path) -> None:
    """The plain 200's header block is encoded once per file; a precompressed sibling
    created after that must still add Vary: Accept-Encoding (RFC 9110 section 12.5.5), or a
    cache would give the gzip variant to clients that cannot take it."""
    (tmp_path / "late.txt").write_bytes(b"late" * 10)
    sf = files(tmp_path, "plain")
    ex = _Recorder()
    sf.send(ex, sf.decide(request("/late.txt"), "/late.txt", 0.0))  # type: ignore[arg-type]
    assert b"Vary" not in ex.sent[-1][3]
    (tmp_path / "late.txt.gz").write_bytes(b"gz")
    later = sf.decide(request("/late.txt"), "/late.txt", 5.0)  # past SIBLING_TTL
    assert summary(tmp_path, later) == ("found", "late.txt", None, True, None)
    sf.send(ex, later)  # type: ignore[arg-type]
    assert b"Vary: Accept-Encoding\r\n" in ex.sent[-1][3]


# --------------------------------------------------------------------------------------------
# Issue 13: a directory's index is remembered like a file found, with the same bound


@pytest.mark.parametrize("headers", [
    {}, GZ, BR_GZ, {"If-None-Match": '"x"'}, {"Range": "bytes=1-5"},
    {"Range": "bytes=1-5", "If-Range": DATE}, {"If-Modified-Since": DATE},
], ids=lambda h: "+".join(h) or "none")
@pytest.mark.parametrize("directory", ["/", "/withindex/", "/gzidx/"])
def test_an_index_is_answered_as_its_named_file(tree: Path, directory: str,
                                                headers: dict[str, str]) -> None:
    """The same decision, validators (ETag, Last-Modified) and variant for the directory as
    for its index file named, first asked and then from the cache."""
    sf = files(tree, "plain")
    named = directory + "index.html"
    for now in (0.0, 0.5):
        by_dir = sf.decide(request(directory, headers=headers), directory, now)
        by_name = sf.decide(request(named, headers=headers), named, now)
        assert summary(tree, by_dir) == summary(tree, by_name)
        assert isinstance(by_dir, Found | NotModified)
        assert isinstance(by_name, Found | NotModified)
        assert by_dir.meta.etag == by_name.meta.etag
        assert by_dir.meta.last_modified == by_name.meta.last_modified


def _state(d: Decision) -> tuple[Any, ...]:
    if isinstance(d, Found):
        return ("found", os.path.basename(d.meta.path), d.meta.etag)
    return ("none",)


@pytest.mark.parametrize("config", ["plain", "autoindex"])
def test_an_index_changed_on_disk_is_seen_as_the_named_file_is(tmp_path: Path,
                                                                config: str) -> None:
    """An index file added, changed and removed: within STAT_VALID of the change the
    directory's answer and the file's own are the old state or the new one, never anything
    else; after it, both are the new state (metadata is revalidated at most once per
    STAT_VALID per request path, the directory's as the file's)."""
    d = tmp_path / "d"
    d.mkdir()
    index = d / "index.html"
    by_dir, by_name = files(tmp_path, config), files(tmp_path, config)
    without = ("403", "directory_without_index") if config == "plain" else ("listing", "d")

    def check(now: float, *allowed: tuple[Any, ...]) -> None:
        dd = by_dir.decide(request("/d/"), "/d/", now)
        dn = by_name.decide(request("/d/index.html"), "/d/index.html", now)
        if not isinstance(dd, Found):
            assert summary(tmp_path, dd) == without
        if not isinstance(dn, Found):
            assert summary(tmp_path, dn) == ("404", "not_found")
        assert _state(dd) in allowed, now
        assert _state(dn) in allowed, now

    def write(data: bytes, mtime: int) -> tuple[Any, ...]:
        index.write_bytes(data)
        os.utime(index, (mtime, mtime))
        return ("found", "index.html", f'"{mtime:x}-{len(data):x}"')

    none = ("none",)
    check(0.0, none)
    first = write(b"first", MTIME)
    for now in (0.2, 0.7):
        check(now, none, first)
    check(1.3, first)
    second = write(b"second version", MTIME + 5)
    for now in (1.4, 2.0):
        check(now, first, second)
    check(2.4, second)
    index.unlink()
    for now in (2.5, 3.0):
        check(now, second, none)
    check(3.5, none)


def test_a_first_index_name_added_later_takes_over(tmp_path: Path) -> None:
    """With index = ["index.html", "index.htm"], the first name present wins; one added or
    removed is seen within STAT_VALID."""
    (tmp_path / "index.htm").write_bytes(b"htm")
    sf = files(tmp_path, "twoindex")
    assert summary(tmp_path, sf.decide(request("/"), "/", 0.0))[:2] == ("found", "index.htm")
    (tmp_path / "index.html").write_bytes(b"html")
    assert summary(tmp_path, sf.decide(request("/"), "/", 1.5))[:2] == ("found", "index.html")
    (tmp_path / "index.html").unlink()
    assert summary(tmp_path, sf.decide(request("/"), "/", 3.0))[:2] == ("found", "index.htm")
    (tmp_path / "index.htm").unlink()
    assert summary(tmp_path, sf.decide(request("/"), "/", 4.5)) == \
        ("403", "directory_without_index")


def test_a_remembered_index_answers_its_own_request_path_only(tree: Path) -> None:
    """The index found for a request is not what an error page or the fallback naming the
    same directory gets, nor a request for the route's prefix without its slash."""
    sf = files(tree, "plain")
    assert isinstance(sf.decide(request("/withindex/"), "/withindex/", 0.0), Found)
    page = sf.decide(request("/api", "POST"), "/withindex/", 0.1, page=True)
    assert summary(tree, page) == ("404", "not_found")
    # A route "/static": "/static/" has the rest "/", "/static" the rest "".
    assert isinstance(sf.decide(request("/"), "", 0.0), Found)
    assert summary(tree, sf.decide(request("/static"), "", 0.1)) == ("301", "/static/")
    spa = StaticFiles(StaticHandler.model_validate({"root": str(tree),
                                                     "fallback": "/withindex/"}))
    assert isinstance(spa.decide(request("/withindex/"), "/withindex/", 0.0), Found)
    missing = spa.decide(request("/deep/route"), "/deep/route", 0.1)
    assert summary(tree, missing) == ("301", "/deep/route/")
