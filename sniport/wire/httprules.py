"""HTTP semantics that are pure: request paths, redirects, preconditions, ranges, content
negotiation.

Job: the decisions sniport makes from a request target and header values, as functions of
strings and numbers, so they can be table-tested without a socket: the one normal form of a
request path that routes are matched on and upstreams receive, the Location of a redirect,
and what a static file server answers.

Rules: every rule cites RFC 9110 (HTTP semantics) or RFC 3986 (URIs). A header value that
cannot be parsed is ignored where the RFC says so (dates, ranges), never guessed at. No I/O.
"""

from __future__ import annotations

import calendar
import datetime
import email.utils
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

# ------------------------------------------------------------------------------------------
# Request paths


class BadPath(Exception):
    """A path that must not reach the file system; the static handler answers 404."""


_FORBIDDEN_ENCODED = ("%2f", "%5c", "%00", "%2e")  # encoded "/", "\", NUL, "."


def path_segments(raw_path: str) -> list[str]:
    """The decoded, normalised segments of a request path, or BadPath.

    RFC 3986 section 6.2.2: percent-decoding, then dot-segment handling. Anything that could
    step out of the document root or mean two things to two layers is refused outright
    instead of resolved: ``..`` (plain or encoded), encoded dots, slashes and backslashes,
    backslashes, NUL and other control characters.
    """
    if not raw_path.startswith("/"):
        raise BadPath("not an absolute path")
    lowered = raw_path.lower()
    if any(code in lowered for code in _FORBIDDEN_ENCODED):
        raise BadPath("encoded dot, slash, backslash or NUL")
    try:
        decoded = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("not UTF-8 after percent-decoding") from None
    # C0, DEL and C1 controls (U+0080-U+009F: line breaks and terminal escapes among them).
    if "\\" in decoded or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in decoded):
        raise BadPath("backslash or control character")
    segments: list[str] = []
    for seg in decoded.split("/"):
        if seg in ("", "."):
            continue  # "//" and "/./" mean the same as "/"
        if seg == "..":
            raise BadPath("dot-dot segment")
        segments.append(seg)
    return segments


# RFC 3986 section 2.3: unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~".
_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Section 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@", and "/" between
# segments. Sub-delims (section 2.2) are "!" / "$" / "&" / "'" / "(" / ")" / "*" / "+" / ","
# / ";" / "=". Any other character is percent-encoded in a normalised path.
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
# The fast path of normalize_path: segments of path characters, none empty and none starting
# with "." (so no "//", no dot segment, no "/.well-known" either: those take the slow path),
# and no "%". Such a path is already in normal form.
_SEG = r"[A-Za-z0-9_~!$&'()*+,;=:@-][A-Za-z0-9._~!$&'()*+,;=:@-]*"
_NORMAL_FAST = re.compile(rf"/(?:{_SEG}(?:/{_SEG})*/?)?").fullmatch


def normalize_path(raw: str) -> str:
    """The normal form of the path of an origin-form request target, or BadPath.

    ``raw`` is the path (no query) as the request line carried it, decoded as latin-1, so
    that a byte >= 0x80 is the character U+0080-U+00FF of the same number. The result is
    what routes are matched on and what upstreams receive, so that sniport and the
    application behind it read one path the same way:

    - RFC 3986 section 6.2.2.2: escapes of unreserved characters are decoded; section
      6.2.2.1: every other escape keeps its encoding, with upper-case hex digits.
    - Characters not allowed in a path (section 3.3), bytes >= 0x80 among them, are
      percent-encoded: the result is ASCII and a valid path.
    - Repeated slashes are merged (as nginx's ``merge_slashes``), then dot segments removed
      (section 5.2.4, also those spelt ``%2E``); ``..`` above the root is dropped.

    Refused: a path not starting with "/"; an encoded slash or backslash (a path meaning one
    thing here and another to an application that decodes them is how route rules are
    bypassed); escapes of control characters, malformed escapes; raw control characters and
    raw backslashes (some applications read "\\" as "/"); a dot segment carrying a ``;``
    parameter, which Tomcat and other servlet containers resolve as a dot segment; and
    characters beyond U+00FF, which a latin-1-decoded request line cannot hold.
    """
    if _NORMAL_FAST(raw) is not None:
        return raw  # the common case: already normal, and no new string built
    if not raw.startswith("/"):
        raise BadPath("not an absolute path")
    return _remove_dot_segments(_normalize_escapes(raw))


# Raw characters normalize_path refuses: C0 controls, DEL, and "\" (read as "/" by some).
_RAW_REFUSED = re.compile(r"[\x00-\x1f\x7f\\]")
# The two hex digits of every escape a path may hold -> what the escape becomes: the
# character if it is unreserved (section 6.2.2.2), else the escape with upper-case digits
# (section 6.2.2.1). Escapes of "/", "\", C0 controls and DEL are missing: refused.
_ESCAPES = {x + y: (chr(int(x + y, 16)) if chr(int(x + y, 16)) in _UNRESERVED
                    else f"%{(x + y).upper()}")
            for x in "0123456789abcdefABCDEF" for y in "0123456789abcdefABCDEF"
            if int(x + y, 16) >= 0x20 and int(x + y, 16) not in (0x2F, 0x5C, 0x7F)}
# Raw characters not allowed in a path, up to U+00FF, and their escapes (section 2.1).
_ENCODE_RAW = {c: f"%{c:02X}" for c in range(0x20, 0x100)
               if chr(c) not in _PATH_CHARS and chr(c) not in "%\\\x7f"}


def _normalize_escapes(raw: str) -> str:
    """Section 6.2.2.1 and 6.2.2.2 over the whole path, with the refusals of normalize_path.

    Built from C-speed string operations and one comprehension over the escapes, not a loop
    over characters: a path of 8 KiB of escapes is a client's choice."""
    refused = _RAW_REFUSED.search(raw)
    if refused is not None:
        raise BadPath("backslash" if refused.group() == "\\" else "control character")
    text = raw
    if "%" in raw:
        head, *escaped = raw.split("%")
        try:
            text = "".join([head, *[_ESCAPES[part[:2]] + part[2:] for part in escaped]])
        except KeyError:
            raise BadPath(_bad_escape(escaped)) from None
    if not text.isascii() and max(text) > "\xff":
        raise BadPath("character beyond U+00FF: not a latin-1-decoded request line")
    # The escapes made above are left alone: "%" is not in the table.
    return text.translate(_ENCODE_RAW)


def _bad_escape(escaped: list[str]) -> str:
    """Why the first escape that _ESCAPES does not know is refused."""
    for part in escaped:
        digits = part[:2]
        if digits in _ESCAPES:
            continue
        if len(digits) < 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            return "malformed percent-escape"
        byte = int(digits, 16)
        if byte == 0x2F:
            return "encoded slash"
        return "encoded backslash" if byte == 0x5C else "encoded control character"
    raise AssertionError("no bad escape")  # pragma: no cover: only called after a KeyError


def _remove_dot_segments(path: str) -> str:
    """Merge slashes, then RFC 3986 section 5.2.4 for an absolute path (segment by segment,
    which for a path starting with "/" gives the same result as the string algorithm)."""
    parts = path.split("/")[1:]
    # A trailing slash stays; so does the directory that a final "." or ".." names
    # (section 5.2.4: "/a/." -> "/a/", "/a/b/.." -> "/a/").
    trailing = parts[-1] in ("", ".", "..")
    stack: list[str] = []
    for seg in parts:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if stack:
                stack.pop()
            continue
        if ";" in seg and seg.partition(";")[0] in (".", ".."):
            # "/..;/": an ordinary segment to RFC 3986, "/../" to servlet containers.
            raise BadPath("dot segment with a parameter")
        stack.append(seg)
    if not stack:
        return "/"
    return "/" + "/".join(stack) + ("/" if trailing else "")


# ------------------------------------------------------------------------------------------
# Redirects (RFC 9110 section 10.2.2, Location; RFC 3986 section 5 for references)

# RFC 3986 section 3.4: query = *( pchar / "/" / "?" ).
_QUERY_CHARS = _PATH_CHARS | frozenset("?")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _encode(text: str, allowed: frozenset[str]) -> str:
    """``text`` with every character outside ``allowed`` percent-encoded (upper-case hex),
    and a "%" that does not start an escape encoded as "%25"; valid escapes are kept.

    A character up to U+00FF stands for the byte of that number (the request line is decoded
    as latin-1, so this gives back the bytes the client sent); one beyond, which only a
    caller's own text can hold, is encoded as UTF-8 (RFC 3986 section 2.5)."""
    if allowed.issuperset(text) and "%" not in text:
        return text
    text = _BAD_ESCAPE.sub("%25", text)
    out: list[str] = []
    for c in text:
        if c in allowed or c == "%":
            out.append(c)
        elif c <= "\xff":
            out.append(f"%{ord(c):02X}")
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
    return "".join(out)


def redirect_target(to: str, rest: str, query: str, keep_path: bool) -> str:
    """The Location of a ``redirect = { to, keep_path }`` route.

    ``rest`` is the normalised request path after the route's prefix, ``query`` the request's
    raw query ("" for none). With ``keep_path`` the rest goes under ``to``'s path taken as a
    directory (an empty path counting as "/"), joined by exactly one "/", and the queries
    are joined with "&"; ``to``'s fragment is kept.

    The URL is built from its parts (RFC 3986 section 5.3), never by concatenating strings:
    whatever ``rest`` and ``query`` hold, they cannot change the scheme or the authority of
    an absolute ``to`` (``"https://a.example" + "@evil.com/"`` would), nor make an
    absolute-path ``to`` a network-path reference ("//evil", section 4.2). "?", "#", "\\" and
    any other character not allowed in a path are percent-encoded in ``rest``; characters
    not allowed in a query, "#" among them, in ``query``.
    """
    if not keep_path:
        return to
    scheme, netloc, path, to_query, fragment = urlsplit(to)
    if rest:
        # A rest of "/" still adds the slash: "/old/" -> "/new/" for a route "/old".
        path = (path or "/").rstrip("/") + "/" + _encode(rest.lstrip("/"), _PATH_CHARS)
    elif not path and (scheme or netloc):
        path = "/"  # RFC 9110 section 4.2.3: an empty path of an http(s) URI means "/"
    query = _encode(query, _QUERY_CHARS)
    joined = f"{to_query}&{query}" if to_query and query else to_query or query
    return urlunsplit((scheme, netloc, path, joined, fragment))


def redirect_warnings(to: str) -> list[str]:
    """What ``sniport check`` says about a redirect target that works, but maybe not as
    meant: an absolute URL without a path ("/" is used), and a target that is neither an
    absolute http(s) URL nor an absolute path (a relative reference is resolved by the
    browser against the request's URL, RFC 3986 section 5.2)."""
    warnings: list[str] = []
    if to != to.strip() or any(c <= " " or c == "\x7f" for c in to):
        warnings.append(f"{to!r} contains whitespace or control characters")
    try:
        parts = urlsplit(to)
    except ValueError as exc:  # "https://[::1", say: redirect_target would fail as well
        return [*warnings, f"{to!r} is not a valid URL: {exc}"]
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and parts.netloc:
        if "@" in parts.netloc:
            # RFC 9110 section 4.2.4: userinfo in an http(s) URI is deprecated; it is how
            # "https://trusted.example@evil.example/" misleads a reader.
            warnings.append(f"{to!r} has a user name in its authority: browsers warn or refuse")
        if not parts.path:
            warnings.append(f'{to!r} has no path: "/" is used as its path')
        return warnings
    if to.startswith("/") and not to.startswith(("//", "/\\")):
        return warnings  # an absolute path: same scheme and host as the request
    if scheme in ("http", "https"):
        why = "an http(s) URL without a host"
    elif scheme:
        why = f"a {scheme}: URL"
    elif to.startswith(("//", "/\\", "\\")):
        why = "a scheme-relative reference: its first segment is taken as a host"
    else:
        why = "a relative reference, resolved against the request's URL"
    warnings.append(
        f"{to!r} is neither an absolute http(s) URL nor an absolute path (\"/...\"): {why}")
    return warnings


# ------------------------------------------------------------------------------------------
# Dates and entity tags (RFC 9110 sections 5.6.7 and 8.8.3)


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_IMF_FIXDATE = re.compile(
    r"[A-Za-z]{3}, (\d{2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT\Z")
_RFC850 = re.compile(
    r"[A-Za-z]+, (\d{2})-([A-Za-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT\Z")
_ASCTIME = re.compile(
    r"[A-Za-z]{3} ([A-Za-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})\Z")


def parse_http_date(value: str) -> int | None:
    """Seconds since the epoch, or None for a value that is not an HTTP-date.

    RFC 9110 section 5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms, all in
    GMT; an RFC 850 two-digit year is the most recent past year with those digits unless
    that is more than 50 years away, then the year in the future."""
    value = value.strip()
    if m := _IMF_FIXDATE.match(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.match(value):
        day, mon, yy, hh, mm, ss = m.groups()
        now_year = datetime.datetime.now(datetime.UTC).year
        full = now_year - now_year % 100 + int(yy)
        if full > now_year + 50:
            full -= 100
        year = str(full)
    elif m := _ASCTIME.match(value):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    month = _MONTHS.get(mon.capitalize())
    if month is None:
        return None
    try:
        parsed = datetime.datetime(int(year), month, int(day), int(hh), int(mm), int(ss),
                                   tzinfo=datetime.UTC)
    except ValueError:
        return None  # 31 Feb, 25:00 and the like
    return calendar.timegm(parsed.utctimetuple())


def _tags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def strong_match(header: str, etag: str) -> bool:
    """If-Match (RFC 9110 section 13.1.1): strong comparison, "*" matches any."""
    if header.strip() == "*":
        return True
    if etag.startswith("W/"):
        return False
    return any(not t.startswith("W/") and t == etag for t in _tags(header))


def weak_match(header: str, etag: str) -> bool:
    """If-None-Match (RFC 9110 section 13.1.2): weak comparison, "*" matches any."""
    if header.strip() == "*":
        return True
    current = _opaque(etag)
    return any(_opaque(t) == current for t in _tags(header))


@dataclass(frozen=True, slots=True)
class Validators:
    etag: str
    mtime: int  # whole seconds: HTTP-dates have no finer resolution


def preconditions(method: str, validators: Validators, if_match: str | None,
                  if_unmodified_since: str | None, if_none_match: str | None,
                  if_modified_since: str | None) -> int | None:
    """304, 412, or None to go on: RFC 9110 section 13.2.2, steps 1 to 4, in that order."""
    if if_match is not None:
        if not strong_match(if_match, validators.etag):
            return 412
    elif if_unmodified_since is not None:
        date = parse_http_date(if_unmodified_since)
        if date is not None and validators.mtime > date:
            return 412
    if if_none_match is not None:
        if weak_match(if_none_match, validators.etag):
            return 304 if method in ("GET", "HEAD") else 412
    elif if_modified_since is not None and method in ("GET", "HEAD"):
        date = parse_http_date(if_modified_since)
        if date is not None and validators.mtime <= date:
            return 304
    return None


def if_range_holds(if_range: str, validators: Validators) -> bool:
    """RFC 9110 section 13.1.5: an entity tag must match strongly, a date exactly."""
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return not value.startswith("W/") and value == validators.etag
    date = parse_http_date(value)
    return date is not None and date == validators.mtime


# ------------------------------------------------------------------------------------------
# Ranges (RFC 9110 section 14)


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable:
    """416: no range of the header overlaps the representation (RFC 9110 section 15.5.17)."""


UNSATISFIABLE = Unsatisfiable()


_DIGITS = re.compile(r"[0-9]+\Z")  # RFC 9110 section 14.1.2: 1*DIGIT, ASCII digits only
_BIG = 10**19  # larger than any file: longer numbers need not be converted exactly


def _number(text: str) -> int:
    return int(text) if len(text) <= 19 else _BIG


def _digits_less(a: str, b: str) -> bool:
    """``int(a) < int(b)`` for decimal digit strings of any length, without building huge
    ints (``_number`` caps them, which would make two different huge values equal)."""
    a, b = a.lstrip("0") or "0", b.lstrip("0") or "0"
    return (len(a), a) < (len(b), b)


def parse_range(value: str, size: int) -> ByteRange | Unsatisfiable | None:
    """One byte range, UNSATISFIABLE, or None to send the whole representation.

    Only a single range is served; a list of several is ignored (a server MAY ignore Range,
    RFC 9110 section 14.2), as is a header that does not parse or another unit.
    """
    unit, sep, spec = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not _DIGITS.match(first)) or (last and not _DIGITS.match(last)):
        return None
    if not first:
        if not last:
            return None
        suffix = _number(last)  # "bytes=-N": the last N bytes
        if suffix == 0:
            return UNSATISFIABLE
        if size == 0:
            return None  # an empty representation: send it whole (RFC 9110 section 14.1.2)
        return ByteRange(max(0, size - suffix), size - 1)
    if last and _digits_less(last, first):
        return None  # invalid, so ignored (RFC 9110 section 14.1.1)
    start = _number(first)
    end = _number(last) if last else size - 1
    if start >= size:
        return UNSATISFIABLE
    return ByteRange(start, min(end, size - 1))


# ------------------------------------------------------------------------------------------
# Content negotiation (RFC 9110 section 12.5.3)


def accepts_encoding(header: str | None, coding: str) -> bool:
    """Whether Accept-Encoding allows ``coding``: listed with q > 0, or "*" with q > 0 and
    the coding not listed with q=0."""
    if not header:
        return False
    star: bool | None = None
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if name == coding:
            return q > 0
        if name == "*":
            star = q > 0
    return bool(star)
