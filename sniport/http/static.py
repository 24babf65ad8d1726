"""Static files: a route's ``static = { root = ... }``.

Job: map the request path (after the route's prefix, like nginx ``alias``) to a file under
the root and send it, at the standard nginx sets: validators, conditional requests, single
ranges, precompressed siblings, index files, directory listings, a fallback file.

Two steps: ``decide`` looks (the path, the file system, the request's headers) and returns a
typed ``Decision`` (``Found`` with its variant and range, ``NotModified``,
``SlashRedirect``, ``Listing``, ``Missing``, ``Forbidden``...), without an exchange, so
that every answer can be table-tested on a directory; ``send`` acts on it through the exchange,
and is the only place that opens and reads files. What can still go wrong while sending
(the file swapped or changed since it was looked at, a read error) is answered there.

Rules:
- The path is percent-decoded and normalised once (``wire.httprules.path_segments``);
  ``..``, encoded dots and slashes, backslashes and NUL are refused with 404, and so is a
  symlink whose target is outside the root: no byte from outside the root, ever.
- What is opened is checked, not what was looked at: every open is non-blocking (a FIFO
  swapped in does not stall the worker), then ``fstat`` must say a regular file with the
  identity that was checked, and the kernel's own path of the open file
  (``/proc/self/fd``) must be under the root. A symlink or FIFO swapped in between the
  cached look and the open is refused.
- Dotfiles answer 404 unless ``dotfiles = true``; ``/.well-known/`` (RFC 8615) is always
  served, since ACME and security.txt live there.
- Preconditions in the order of RFC 9110 section 13.2.2, then Range (RFC 9110 section 14).
- Metadata is cached per path and revalidated with one ``stat`` (inode, size, mtime) at most
  once per ``STAT_VALID`` per request path, a directory's index file alike; files up to
  ``SMALL_FILE`` bytes are served from memory; larger ones stream from the file with
  backpressure, in bounded memory.
"""

from __future__ import annotations

import html
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import quote

from sniport.config import StaticHandler
from sniport.logs import diag
from sniport.wire.contenttypes import content_type
from sniport.wire.httprules import (
    UNSATISFIABLE,
    BadPath,
    ByteRange,
    Validators,
    accepts_encoding,
    http_date,
    if_range_holds,
    parse_range,
    path_segments,
    preconditions,
)

if TYPE_CHECKING:
    from sniport.http.contract import Exchange
    from sniport.http.request import Request

SMALL_FILE = 256 * 1024  # served from memory
MEMORY_BUDGET = 32 * 1024 * 1024  # per worker, for the contents of small files
META_ENTRIES = 4096
CHUNK = 32 * 1024  # per write of a large file: with WRITE_HIGH_WATER, what a stalled reader holds
SIBLING_TTL = 1.0  # seconds a precompressed sibling's absence is remembered
STAT_VALID = 1.0  # seconds a path's file is served without a new stat (nginx: open_file_cache)
HITS = 1024  # paths remembered per static route
# Request headers that take a response off the plain 200 path.
_NOT_PLAIN = frozenset({b"if-match", b"if-unmodified-since", b"if-none-match",
                        b"if-modified-since", b"range"})
ENCODINGS = (("br", ".br"), ("gzip", ".gz"))


@dataclass(slots=True)
class FileMeta:
    """What we know about one file, valid while (dev, ino, size, mtime) stay the same."""

    key: tuple[int, int, int, int]
    path: str
    size: int
    etag: str
    last_modified: str
    validators: Validators
    ctype: str
    inside: bool  # the real path is under the root
    data: bytes | None = None  # the contents, for small files
    siblings: dict[str, FileMeta | None] | None = None  # encoding -> precompressed file
    siblings_at: float = 0.0
    block: bytes = b""  # the header lines of a plain 200, encoded once (see _plain_block)
    whole: Found | None = None  # the decision to send it whole, made once (_decide_file)


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _MemoryCache:
    """Contents of small files, bounded in bytes, oldest out first."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._items: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()

    def get(self, key: tuple[int, int, int, int]) -> bytes | None:
        return self._items.get(key)

    def put(self, key: tuple[int, int, int, int], data: bytes) -> None:
        if len(data) > self._budget:
            return
        self._items[key] = data
        self._used += len(data)
        while self._used > self._budget:
            _, old = self._items.popitem(last=False)
            self._used -= len(old)


_memory = _MemoryCache(MEMORY_BUDGET)


# ------------------------------------------------------------------------------------------
# Decisions: what a request gets, before anything is sent


@dataclass(frozen=True, slots=True)
class Found:
    """Send ``meta``'s file: the representation chosen (a precompressed sibling when
    ``coding``; ``vary`` when the choice depended on Accept-Encoding), whole or
    ``byte_range`` (206)."""

    meta: FileMeta
    coding: str | None = None
    vary: bool = False
    byte_range: ByteRange | None = None


@dataclass(slots=True)
class NotModified:
    """304 (RFC 9110 section 15.4.5): the validators and Vary of what would have been sent."""

    meta: FileMeta
    coding: str | None = None
    vary: bool = False


@dataclass(frozen=True, slots=True)
class PreconditionFailed:
    """412 (RFC 9110 section 13.2.2, If-Match / If-Unmodified-Since)."""


@dataclass(frozen=True, slots=True)
class RangeNotSatisfiable:
    """416 (RFC 9110 section 15.5.17): no range overlaps the ``size`` bytes."""

    size: int


@dataclass(frozen=True, slots=True)
class Missing:
    """404; ``note`` says why for the log (not found, dotfile, bad path, outside the root)."""

    note: str


@dataclass(frozen=True, slots=True)
class Forbidden:
    """403: permission denied, or a directory without an index and without autoindex."""

    note: str


@dataclass(frozen=True, slots=True)
class SlashRedirect:
    """301 to the slash form of a directory, so that relative links inside it resolve."""

    location: str


@dataclass(frozen=True, slots=True)
class Listing:
    """An autoindex page of the directory at ``fs_path`` (read when sent)."""

    fs_path: str


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    """405: static files answer GET and HEAD only (RFC 9110 section 15.5.6)."""


Decision: TypeAlias = (Found | NotModified | PreconditionFailed | RangeNotSatisfiable | Missing
                       | Forbidden | SlashRedirect | Listing | MethodNotAllowed)

NOT_FOUND = Missing("not_found")
PRECONDITION_FAILED = PreconditionFailed()
METHOD_NOT_ALLOWED = MethodNotAllowed()


class StaticFiles:
    reads_body = False

    def __init__(self, cfg: StaticHandler) -> None:
        self.cfg = cfg
        self.root = os.path.realpath(cfg.root)
        self._root_prefix = self.root.rstrip("/") + "/"
        self._meta: OrderedDict[str, FileMeta] = OrderedDict()
        self._index = list(cfg.index)
        # Request path -> (its file, when it was stat'ed): a path asked again within
        # STAT_VALID skips decoding, checks and stat. Only files found are remembered.
        self._hits: dict[str, tuple[FileMeta, float]] = {}
        # The same for directories asked with their slash: the index file found in them
        # (issue 13: "/" cost five stat calls and a realpath per request without it). Apart
        # from _hits, as only a request's own path may use it: a fallback or an error page
        # that names a directory is not answered with its index (see _directory, decide).
        self._index_hits: dict[str, tuple[FileMeta, float]] = {}

    # -- entry points ---------------------------------------------------------------------

    def handle(self, ex: Exchange, rest: str) -> None:
        self.send(ex, self.decide(ex.request, rest, ex.loop.time()))

    def serve_path(self, ex: Exchange, rest: str, status: int) -> bool:
        """Serve ``rest`` as the error page of ``status``; False (and nothing sent) when it
        names no file, so that the plain error answers instead."""
        decision = self.decide(ex.request, rest, ex.loop.time(), page=True)
        if type(decision) is not Found:
            return False
        self.send(ex, decision, status)
        return True

    # -- deciding -------------------------------------------------------------------------

    def decide(self, req: Request, rest: str, now: float, *, page: bool = False) -> Decision:
        """What ``req`` gets for ``rest`` (the path after the route's prefix) at loop time
        ``now``. With ``page`` (an error page) the status is the error's: no method check, no
        fallback, no conditions or ranges, and anything but a file is ``Missing``."""
        if not page and req.method not in ("GET", "HEAD"):
            return METHOD_NOT_ALLOWED
        hit = self._hits.get(rest)  # the fast path, before a call more
        if hit is not None and now - hit[1] < STAT_VALID:
            return self._decide_file(req, hit[0], now, page)
        if not page:
            hit = self._index_hits.get(rest)
            # The slash is checked again as the key is the path after the route's prefix,
            # which for the prefix itself is "" whether or not the request's path has it.
            if hit is not None and now - hit[1] < STAT_VALID and req.path.endswith("/"):
                return self._decide_file(req, hit[0], now, False)
        return self._decide_path(req, rest, now, page, not page)

    def _decide_path(self, req: Request, rest: str, now: float, page: bool,
                     use_fallback: bool) -> Decision:
        hit = self._hits.get(rest)
        if hit is not None and now - hit[1] < STAT_VALID:
            return self._decide_file(req, hit[0], now, page)
        try:
            segments = path_segments(rest if rest.startswith("/") else "/" + rest)
        except BadPath as exc:
            return Missing(f"bad_path: {exc}")
        if not self.cfg.dotfiles and any(
            s.startswith(".") and not (i == 0 and s == ".well-known")
            for i, s in enumerate(segments)
        ):
            return Missing("dotfile")
        fs_path = os.path.join(self.root, *segments)
        try:
            st = os.stat(fs_path)
        except (FileNotFoundError, NotADirectoryError):
            return self._missing(req, now, page, use_fallback)
        except PermissionError:
            if page:
                return NOT_FOUND
            diag.warning("static: permission denied: %s", fs_path)
            return Forbidden("permission_denied")
        except OSError as exc:
            if not page:
                diag.warning("static: %s: %s", fs_path, exc.strerror)
            return Missing(f"stat_error: {exc.strerror}")
        if stat.S_ISDIR(st.st_mode):
            if page:
                return NOT_FOUND
            if not self._inside(fs_path):
                diag.warning("static: %s leads outside the root %s", fs_path, self.root)
                return NOT_FOUND
            return self._directory(req, rest if use_fallback else None, fs_path, now)
        if not stat.S_ISREG(st.st_mode):
            return self._missing(req, now, page, use_fallback)
        meta = self._lookup(fs_path, st)
        if not meta.inside:
            diag.warning("static: %s leads outside the root %s", fs_path, self.root)
            return NOT_FOUND
        if len(self._hits) >= HITS:
            self._hits.clear()
        self._hits[rest] = (meta, now)
        return self._decide_file(req, meta, now, page)

    def _missing(self, req: Request, now: float, page: bool, use_fallback: bool) -> Decision:
        if use_fallback and self.cfg.fallback and not page:
            # A single-page app: the fallback answers every path that names no file (or 404
            # if it is missing itself).
            return self._decide_path(req, self.cfg.fallback, now, False, False)
        return NOT_FOUND

    def _directory(self, req: Request, rest: str | None, fs_path: str,
                   now: float) -> Decision:
        """A directory's answer; its index file is remembered for ``rest`` (the request's
        own path, None for the fallback's) as a file found is, for STAT_VALID: an index
        added, changed or removed is seen as late as a named file's change, and no later."""
        if not req.path.endswith("/"):
            # The slash form, so that relative links inside the page resolve (nginx: 301).
            return SlashRedirect(req.path + "/" + (f"?{req.query}" if req.query else ""))
        for name in self._index:
            candidate = os.path.join(fs_path, name)
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                meta = self._lookup(candidate, st)
                if meta.inside:
                    if rest is not None:
                        if len(self._index_hits) >= HITS:
                            self._index_hits.clear()
                        self._index_hits[rest] = (meta, now)
                    return self._decide_file(req, meta, now, False)
        if self.cfg.autoindex and self._inside(fs_path):
            return Listing(fs_path)
        return Forbidden("directory_without_index")

    def _decide_file(self, req: Request, meta: FileMeta, now: float, page: bool) -> Decision:
        meta, coding, vary = self._variant(req, meta, now)
        for name, _ in req.headers:
            if name in _NOT_PLAIN and not page:
                break
        else:
            # The common case: no conditions, no range (or an error page, which has none).
            # The same decision every time for this file: made once. (A sibling's meta is
            # always sent with its coding; the original's Vary changes with its siblings.)
            whole = meta.whole
            if whole is None or whole.vary != vary:
                whole = meta.whole = Found(meta, coding, vary)
            return whole
        h = req.header
        verdict = preconditions(req.method, meta.validators, h(b"if-match"),
                                h(b"if-unmodified-since"), h(b"if-none-match"),
                                h(b"if-modified-since"))
        if verdict == 304:
            return NotModified(meta, coding, vary)
        if verdict == 412:
            return PRECONDITION_FAILED
        # RFC 9110 section 14.2: Range is for GET only.
        range_header = h(b"range") if req.method == "GET" else None
        if range_header is not None:
            if_range = h(b"if-range")
            if if_range is None or if_range_holds(if_range, meta.validators):
                parsed = parse_range(range_header, meta.size)
                if parsed is UNSATISFIABLE:
                    return RangeNotSatisfiable(meta.size)
                if isinstance(parsed, ByteRange):
                    return Found(meta, coding, vary, parsed)
        return Found(meta, coding, vary)

    # -- sending --------------------------------------------------------------------------

    def send(self, ex: Exchange, decision: Decision, status: int = 200) -> None:
        """Answer ``decision`` through ``ex``; ``status`` is an error page's (``Found``
        only)."""
        if type(decision) is Found:
            self._send_found(ex, decision, status)
        elif isinstance(decision, NotModified):
            headers = _file_headers(decision.meta, decision.coding, decision.vary)
            # RFC 9110 section 15.4.5: the validators and Vary a 200 would have carried.
            ex.respond(304, [*headers[1:], ("Accept-Ranges", "bytes")])
        elif isinstance(decision, Missing):
            ex.fail(404, decision.note)
        elif isinstance(decision, Forbidden):
            ex.fail(403, decision.note)
        elif isinstance(decision, SlashRedirect):
            ex.respond(301, [("Location", decision.location), ("Content-Type", "text/plain")],
                       b"301 Moved Permanently\n")
        elif isinstance(decision, Listing):
            self._listing(ex, decision.fs_path)
        elif isinstance(decision, RangeNotSatisfiable):
            ex.respond(416, [("Content-Range", f"bytes */{decision.size}"),
                             ("Content-Type", "text/plain")],
                       b"416 Range Not Satisfiable\n")
        elif isinstance(decision, PreconditionFailed):
            ex.fail(412, "precondition_failed")
        else:
            assert isinstance(decision, MethodNotAllowed)
            ex.respond(405, [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")],
                       b"405 Method Not Allowed\n")

    def _send_found(self, ex: Exchange, found: Found, status: int) -> None:
        meta = found.meta
        if (status == 200 and found.byte_range is None and meta.size <= SMALL_FILE
                and not ex.remove_headers):
            # The common case: a whole small file. Headers encoded once.
            data = self._contents(ex, meta)
            if data is not None:
                # The kept block has no Vary: not for a file that has gained a sibling since.
                block = (meta.block if meta.block and not found.vary
                         else self._plain_block(meta, found.coding, found.vary))
                ex.respond(200, [], data, block)
            return
        headers = _file_headers(meta, found.coding, found.vary)
        if status != 200:  # an error page: the status is the error's, no validators apply
            self._body(ex, meta, status, headers[:1] + headers[3:], None)
            return
        headers.append(("Accept-Ranges", "bytes"))
        self._body(ex, meta, 200, headers, found.byte_range)

    def _listing(self, ex: Exchange, fs_path: str) -> None:
        try:
            with os.scandir(fs_path) as it:
                entries = [(e.name, e.is_dir()) for e in it]
        except OSError as exc:
            diag.warning("static: cannot list %s: %s", fs_path, exc.strerror)
            ex.fail(403, "permission_denied")
            return
        page = listing_page(ex.request.path, entries, self.cfg.dotfiles)
        ex.respond(200, [("Content-Type", "text/html; charset=utf-8")], page)

    # -- metadata -------------------------------------------------------------------------

    def _inside(self, fs_path: str) -> bool:
        real = os.path.realpath(fs_path)
        return real == self.root or real.startswith(self._root_prefix)

    def _lookup(self, fs_path: str, st: os.stat_result) -> FileMeta:
        key = _stat_key(st)
        meta = self._meta.get(fs_path)
        if meta is not None and meta.key == key:
            return meta
        mtime = int(st.st_mtime)
        # nginx's form: hex mtime and hex size; it changes whenever either does.
        etag = f'"{mtime:x}-{st.st_size:x}"'
        meta = FileMeta(key, fs_path, st.st_size, etag, http_date(mtime),
                        Validators(etag, mtime), content_type(os.path.basename(fs_path)),
                        self._inside(fs_path))
        self._meta[fs_path] = meta
        if len(self._meta) > META_ENTRIES:
            self._meta.popitem(last=False)
        return meta

    def _variant(self, req: Request, meta: FileMeta,
                 now: float) -> tuple[FileMeta, str | None, bool]:
        """The file to send: a precompressed sibling if the client takes it.
        Returns (file, content-encoding, whether any sibling exists: Vary)."""
        if not self.cfg.precompressed:
            return meta, None, False
        if meta.siblings is None or now - meta.siblings_at > SIBLING_TTL:
            siblings: dict[str, FileMeta | None] = {}
            for coding, ext in ENCODINGS:
                try:
                    st = os.stat(meta.path + ext)
                except OSError:
                    siblings[coding] = None
                    continue
                if stat.S_ISREG(st.st_mode):
                    sib = self._lookup(meta.path + ext, st)
                    # A variant has its own validator (RFC 9110 section 8.8.3).
                    sib_etag = sib.etag[:-1] + f'-{ext[1:]}"'
                    siblings[coding] = FileMeta(
                        sib.key, sib.path, sib.size, sib_etag, sib.last_modified,
                        Validators(sib_etag, sib.validators.mtime), meta.ctype, sib.inside)
                else:
                    siblings[coding] = None
            meta.siblings, meta.siblings_at = siblings, now
        if not any(meta.siblings.values()):
            return meta, None, False
        accept = req.header(b"accept-encoding")
        for coding, _ in ENCODINGS:
            variant = meta.siblings.get(coding)
            if variant is not None and variant.inside and accepts_encoding(accept, coding):
                return variant, coding, True
        return meta, None, True

    # -- reading files --------------------------------------------------------------------

    def _body(self, ex: Exchange, meta: FileMeta, status: int,
              headers: list[tuple[str, str]], byte_range: ByteRange | None) -> None:
        start, length = 0, meta.size
        if byte_range is not None:
            status = 206
            start, length = byte_range.start, byte_range.length
            headers.append(("Content-Range",
                            f"bytes {byte_range.start}-{byte_range.end}/{meta.size}"))
        if meta.size <= SMALL_FILE:
            data = self._contents(ex, meta)
            if data is not None:
                ex.respond(status, headers, data[start : start + length])
            return
        fd = self._open(ex, meta)
        if fd < 0:
            return
        ex.start(status, headers, length)
        if ex.is_head:
            os.close(fd)
            ex.end()
            return
        _FileSender(ex, fd, start, length).pump()

    def _contents(self, ex: Exchange, meta: FileMeta) -> bytes | None:
        """A small file's bytes, from memory when they are there; None if an error was
        answered instead."""
        data = _memory.get(meta.key)
        if data is not None:
            return data
        fd = self._open(ex, meta)
        if fd < 0:
            return None
        try:
            data = os.read(fd, SMALL_FILE + 1)
        except OSError as exc:
            self._unreadable(ex, meta, exc)
            return None
        finally:
            os.close(fd)
        if len(data) != meta.size:  # changed under us: serve what stat says next time
            self._forget(meta)
            ex.error(503, "file_changed")
            return None
        _memory.put(meta.key, data)
        return data

    def _forget(self, meta: FileMeta) -> None:
        self._meta.pop(meta.path, None)
        self._hits.clear()
        self._index_hits.clear()

    def _open(self, ex: Exchange, meta: FileMeta) -> int:
        """``meta``'s file opened for reading, verified to be what was checked (see the
        module's rules); -1 when an error was answered instead."""
        try:
            fd = os.open(meta.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            self._unreadable(ex, meta, exc)
            return -1
        try:
            st = os.fstat(fd)
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            os.close(fd)
            self._unreadable(ex, meta, exc)
            return -1
        if not stat.S_ISREG(st.st_mode) or not (real == self.root
                                                 or real.startswith(self._root_prefix)):
            os.close(fd)
            self._forget(meta)
            diag.warning("static: %s changed into %s since it was checked; refused",
                         meta.path, "a path outside the root" if stat.S_ISREG(st.st_mode)
                         else "something that is not a regular file")
            ex.error(404, "swapped_under_us")
            return -1
        if _stat_key(st) != meta.key:
            os.close(fd)
            self._forget(meta)
            ex.error(503, "file_changed")
            return -1
        return fd

    @staticmethod
    def _plain_block(meta: FileMeta, coding: str | None, vary: bool) -> bytes:
        lines = [f"Content-Type: {meta.ctype}", f"Last-Modified: {meta.last_modified}",
                 f"ETag: {meta.etag}"]
        if vary:
            lines.append("Vary: Accept-Encoding")
        if coding:
            lines.append(f"Content-Encoding: {coding}")
        lines.append("Accept-Ranges: bytes")
        block = "".join(line + "\r\n" for line in lines).encode("latin-1")
        if not vary:  # with siblings the block depends on the request: not kept
            meta.block = block
        return block

    def _unreadable(self, ex: Exchange, meta: FileMeta, exc: OSError) -> None:
        diag.warning("static: cannot read %s: %s", meta.path, exc.strerror)
        ex.error(403 if isinstance(exc, PermissionError) else 404,
                 f"unreadable: {exc.strerror}")


def _file_headers(meta: FileMeta, coding: str | None, vary: bool) -> list[tuple[str, str]]:
    """The representation's header fields, Content-Type first and the validators next
    (callers slice them off for error pages and 304)."""
    headers = [("Content-Type", meta.ctype), ("Last-Modified", meta.last_modified),
               ("ETag", meta.etag)]
    if vary:
        headers.append(("Vary", "Accept-Encoding"))
    if coding:
        headers.append(("Content-Encoding", coding))
    return headers


def listing_page(path: str, entries: list[tuple[str, bool]], dotfiles: bool) -> bytes:
    """The autoindex page of the directory at request path ``path``: ``entries`` are
    (name, is a directory), shown directories first, by name; dotfiles only if served."""
    title = html.escape(path)
    rows = ['<a href="../">../</a>']
    for name, is_dir in sorted(entries, key=lambda e: (not e[1], e[0])):
        if name.startswith(".") and not dotfiles:
            continue
        suffix = "/" if is_dir else ""
        href = quote(name) + suffix
        rows.append(f'<a href="{html.escape(href)}">{html.escape(name)}{suffix}</a>')
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}"
            f"</title></head>\n<body><h1>Index of {title}</h1><hr><pre>\n"
            + "\n".join(rows) + "\n</pre><hr></body></html>\n").encode()


PUMP_BUDGET = 8  # chunks per turn of the event loop, so that one big file does not hog it


class _FileSender:
    """Streams part of a file to the client as fast as the client reads it, and no faster:
    bounded memory whatever the file's size. It writes a few chunks per turn of the loop,
    so that other connections, and news of this client's departure, get their turn."""

    __slots__ = ("_ex", "_fd", "_left", "_offset", "_scheduled")

    def __init__(self, ex: Exchange, fd: int, offset: int, length: int) -> None:
        self._ex = ex
        self._fd = fd
        self._offset = offset
        self._left = length
        self._scheduled = False
        ex.on_resume = self.pump
        ex.on_abort = self._close

    def _turn(self) -> None:
        self._scheduled = False
        self.pump()

    def pump(self) -> None:
        ex = self._ex
        budget = PUMP_BUDGET
        while self._left > 0:
            if ex.finished:
                self._close()
                return
            if not ex.writable:
                return  # on_resume calls us again
            if budget == 0:
                if not self._scheduled:
                    self._scheduled = True
                    ex.loop.call_soon(self._turn)
                return
            budget -= 1
            try:
                chunk = os.pread(self._fd, min(CHUNK, self._left), self._offset)
            except OSError as exc:
                diag.warning("static: read error: %s", exc.strerror)
                chunk = b""
            if not chunk:  # truncated under us or unreadable: the head is out, so close
                self._close()
                ex.note = "file_truncated"
                ex.abort()
                return
            self._offset += len(chunk)
            self._left -= len(chunk)
            ex.send(chunk)
        self._close()
        ex.end()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._ex.on_resume = None
        self._ex.on_abort = None
