"""normalize_path (sniport.wire.httprules): the one normal form of a request path that site
routes are matched on and upstreams receive.

Tables name the rule of each row (RFC 3986 sections 2.3, 3.3, 5.2.4, 6.2.2); the properties
hold for any input: the result is idempotent, ASCII, a valid path without empty or dot
segments, and agrees with a plain transcription of RFC 3986 and with ``path_segments``.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sniport.wire.httprules import BadPath, normalize_path, path_segments

# No deadline: the machine is shared, and timing is not what these properties are about.
PROPS = settings(deadline=None, max_examples=200)


# ------------------------------------------------------------------------------------------
# Tables


@pytest.mark.parametrize(
    "raw",
    [
        # The review's bypasses of an "/admin/" route: all are that route's path.
        "/x/../admin/secret",  # section 5.2.4: ".." removes the segment before it
        "/%61dmin/secret",  # section 6.2.2.2: "%61" is the unreserved "a"
        "//admin/secret",  # repeated slashes merged (nginx merge_slashes)
        "/./admin/secret",  # section 5.2.4: "." removed
        "/admin/secret",
        "/admin//secret",
        "/admin/./secret",
        "/../admin/secret",  # ".." above the root dropped
        "/../../../admin/secret",
        "/x/y/../../admin/secret",
        "/%2e%2e/admin/secret",  # dot segments spelt with escapes, any case
        "/%2E%2E/admin/secret",
        "/%2E./admin/secret",
        "/.%2e/admin/secret",
        "/%2e%2E/admin/secret",
        "/%2e/admin/secret",
        "/x/%2e%2e/admin/secret",
        "/%41%44%4d%49%4e/../admin/secret",
        "/%61%64%6D%69%6E/%73%65%63%72%65%74",
    ],
)
def test_route_bypasses_normalise_to_the_route(raw: str) -> None:
    assert normalize_path(raw) == "/admin/secret"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # already normal: returned as is
        ("/", "/"),
        ("/index.html", "/index.html"),
        ("/a/b/", "/a/b/"),
        ("/a..b/..c/d..", "/a..b/..c/d.."),  # only whole "." and ".." segments are dots
        ("/...", "/..."),
        ("/.well-known/acme-challenge/x", "/.well-known/acme-challenge/x"),
        ("/.hidden", "/.hidden"),
        ("/a;b=c,d!$&'()*+:@~_-.", "/a;b=c,d!$&'()*+:@~_-."),  # pchar (section 3.3) as is
        # section 5.2.4, with the trailing slash of the last "." or ".."
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/../", "/a/"),
        ("/a/b/../c", "/a/c"),
        ("/a/./b/./", "/a/b/"),
        ("/.", "/"),
        ("/..", "/"),
        ("/../", "/"),
        ("/../..", "/"),
        ("/./.", "/"),
        ("/a/../../b", "/b"),
        # merged slashes, before dot segments (as nginx: "/a//.." is "/a/.." is "/")
        ("//", "/"),
        ("///", "/"),
        ("/a//b", "/a/b"),
        ("/a//", "/a/"),
        ("/a//..", "/"),
        ("/a/.//b", "/a/b"),
        # section 6.2.2.2: unreserved escapes decoded
        ("/%7e%41%5a%30%2d%5f", "/~AZ0-_"),
        ("/%7Euser", "/~user"),
        ("/a%2Eb", "/a.b"),
        ("/%2e%2e%2e", "/..."),
        ("/%2ewell-known/x", "/.well-known/x"),
        # section 6.2.2.1: other escapes kept, hex digits upper-cased
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/a%3bb", "/a%3Bb"),  # an encoded ";" is not a parameter delimiter: kept encoded
        ("/a%3Fb%23c", "/a%3Fb%23c"),
        ("/%25", "/%25"),
        ("/100%25", "/100%25"),
        # decoded once only: "%25" is "%", and what follows it is text
        ("/%252e", "/%252e"),
        ("/%252E%252E/admin", "/%252E%252E/admin"),
        ("/%252f", "/%252f"),
        ("/%255c", "/%255c"),
        # raw characters not allowed in a path are encoded (section 3.3), upper-case hex
        ("/a b", "/a%20b"),
        ('/"<>^`{|}', "/%22%3C%3E%5E%60%7B%7C%7D"),
        ("/a[b]", "/a%5Bb%5D"),
        ("/a#b", "/a%23b"),
        ("/caf\xe9", "/caf%E9"),  # the byte 0xE9, decoded as latin-1
        ("/caf\xc3\xa9", "/caf%C3%A9"),  # raw UTF-8 bytes: the same as the encoded form
        ("/\x80\xff", "/%80%FF"),
        ("/\x85", "/%85"),  # bytes 0x80-0x9F are not control characters on their own
        # encoded and raw forms mixed
        ("/x/%2E%2E/a%20b/../c%c3%a9/./", "/c%C3%A9/"),
        ("/a/%2E%2E/b", "/b"),
        ("/a b/../%7Ex/./y\xe9", "/~x/y%E9"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # not an absolute path
        ("", "not an absolute path"),
        ("a/b", "not an absolute path"),
        ("*", "not an absolute path"),
        ("http://example.com/a", "not an absolute path"),
        ("%2Fa", "not an absolute path"),
        ("\\a", "not an absolute path"),
        # encoded slash and backslash: one path for sniport, another for the application
        ("/admin%2fsecret", "encoded slash"),
        ("/admin%2Fsecret", "encoded slash"),
        ("/%2f", "encoded slash"),
        ("/..%2f..%2fetc/passwd", "encoded slash"),
        ("/%2e%2e%2fadmin", "encoded slash"),
        ("/a%5cb", "encoded backslash"),
        ("/a%5Cb", "encoded backslash"),
        ("/..%5c..%5cwin.ini", "encoded backslash"),
        # raw backslash: some applications read it as "/"
        ("/a\\b", "backslash"),
        ("/..\\admin", "backslash"),
        ("/\\", "backslash"),
        # escapes of control characters (C0 and DEL)
        ("/a%00", "encoded control character"),
        ("/a%00.html", "encoded control character"),
        ("/a%0d%0aSet-Cookie:x", "encoded control character"),
        ("/a%09", "encoded control character"),
        ("/a%1f", "encoded control character"),
        ("/a%1F", "encoded control character"),
        ("/a%7f", "encoded control character"),
        ("/a%7F", "encoded control character"),
        # raw control characters
        ("/a\x00b", "control character"),
        ("/a\tb", "control character"),
        ("/a\r\nb", "control character"),
        ("/a\x1fb", "control character"),
        ("/a\x7fb", "control character"),
        # malformed escapes (int() would accept some of these: "+1", " 1")
        ("/%", "malformed percent-escape"),
        ("/a%", "malformed percent-escape"),
        ("/%4", "malformed percent-escape"),
        ("/%zz", "malformed percent-escape"),
        ("/%g0", "malformed percent-escape"),
        ("/%+1", "malformed percent-escape"),
        ("/%-1", "malformed percent-escape"),
        ("/% 1", "malformed percent-escape"),
        ("/%_1", "malformed percent-escape"),
        ("/%%41", "malformed percent-escape"),
        ("/%\u0661\u0662", "malformed percent-escape"),  # Arabic-Indic digits are not hex
        # a dot segment with a parameter: "../" to Tomcat and other servlet containers
        ("/..;/admin/secret", "dot segment with a parameter"),
        ("/.;/admin/secret", "dot segment with a parameter"),
        ("/..;jsessionid=1/admin", "dot segment with a parameter"),
        ("/%2e%2e;/admin", "dot segment with a parameter"),
        ("/%2E.;x=1/admin", "dot segment with a parameter"),
        ("/a/..;", "dot segment with a parameter"),
        # not from a latin-1-decoded request line
        ("/\u0100", "beyond U+00FF"),
        ("/\u65e5\u672c", "beyond U+00FF"),
    ],
)
def test_normalize_path_refuses(raw: str, reason: str) -> None:
    with pytest.raises(BadPath, match=re.escape(reason)):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["/a;b/c", "/..a;b/", "/;/x", "/x;../y", "/a;b=../c"])
def test_parameters_of_other_segments_are_kept(raw: str) -> None:
    # Only a "." or ".." before the ";" is refused: matrix parameters are ordinary pchars.
    assert normalize_path(raw) == raw


def test_fast_path_returns_the_same_object() -> None:
    # The common case allocates nothing: the argument itself comes back.
    for raw in ("/", "/index.html", "/static/js/app.3f9a1c.min.js", "/a/b/", "/a-b_c~d/e"):
        assert normalize_path(raw) is raw


# ------------------------------------------------------------------------------------------
# Properties

_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCHAR_OR_SLASH = _UNRESERVED | set("!$&'()*+,;=:@/")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")

_PIECES = st.sampled_from([
    "/", "//", "/./", "/../", ".", "..", "%2e", "%2E", "%2e%2e", "%2f", "%5c", "%00", "%1f",
    "%7F", "%", "%4", "%zz", "\\", "a", "B", "z9", "%41", "%7e", "%7E", "%c3", "%A9", "%25",
    "%252e", "%20", " ", ";", "..;", "=", "@", ":", "~", "#", "?", "[", "\xe9", "\xc3\xa9",
    "\x80", "\x00", "\x1f", "\x7f", "\t",
])
_LATIN1 = st.characters(max_codepoint=0xFF)
ANY_PATH = st.one_of(
    st.lists(_PIECES, max_size=16).map(lambda p: "/" + "".join(p)),
    st.text(_LATIN1, max_size=40).map(lambda s: "/" + s),
    st.text(_LATIN1, max_size=20),
    st.text(max_size=20),
)


@PROPS
@given(ANY_PATH)
@example("/x/../admin/secret")
@example("/%2e%2e/%2E./.%2e/a")
def test_normalised_paths_are_normal(raw: str) -> None:
    try:
        out = normalize_path(raw)
    except BadPath:
        return
    assert normalize_path(out) == out  # idempotent
    assert out.startswith("/")
    assert "//" not in out
    assert out.isascii()
    segments = out.split("/")[1:]
    assert "." not in segments and ".." not in segments
    # Only path characters and escapes, each of two upper-case hex digits (section 6.2.2.1)
    # and none of an unreserved character (section 6.2.2.2), "/", "\" or a control.
    assert set(_ESCAPE.sub("", out)) <= _PCHAR_OR_SLASH
    for hexdigits in _ESCAPE.findall(out):
        assert hexdigits == hexdigits.upper()
        byte = int(hexdigits, 16)
        assert chr(byte) not in _UNRESERVED
        assert byte not in (0x2F, 0x5C) and byte >= 0x20 and byte != 0x7F


def _rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 as written, step by step (the reference model)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = "/" + inp[4:]
            out = out[: max(out.rfind("/"), 0)]
        elif inp == "/..":
            inp = "/"
            out = out[: max(out.rfind("/"), 0)]
        elif inp in (".", ".."):
            inp = ""
        else:
            cut = inp.find("/", 1)
            cut = len(inp) if cut < 0 else cut
            out, inp = out + inp[:cut], inp[cut:]
    return out


def _reference(raw: str) -> str:
    """Section 6.2.2.1 and 6.2.2.2 with regular expressions, nginx's merge_slashes, then
    section 5.2.4: for inputs of path characters and valid, allowed escapes only."""
    text = _ESCAPE.sub(
        lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in _UNRESERVED else m[0].upper(),
        raw)
    return _rfc3986_remove_dot_segments(re.sub("/{2,}", "/", text))


_CLEAN_PIECES = st.sampled_from([
    "/", "//", "/./", "/../", ".", "..", "%2e", "%2E", "%41", "%7e", "%c3%a9", "%25", "%3b",
    "%20", "a", "b", "~", ";x", "=", "@", ":",
])


@PROPS
@given(st.lists(_CLEAN_PIECES, max_size=16).map(lambda p: "/" + "".join(p)))
def test_agrees_with_rfc3986_transcription(raw: str) -> None:
    try:
        out = normalize_path(raw)
    except BadPath as exc:
        assert "parameter" in str(exc)  # ".;x" or "..;x": the one refusal these can meet
        return
    assert out == _reference(raw)


# path_segments (the static handler's decoding) on a normalised path ---------------------

_SAFE_SEGMENT = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="/\\"),
    min_size=1,
).filter(lambda s: s not in (".", ".."))


@PROPS
@given(st.lists(_SAFE_SEGMENT, max_size=6))
def test_path_segments_of_a_normalised_path(segments: list[str]) -> None:
    # A path as a browser encodes it, and the same with its UTF-8 bytes raw on the request
    # line (read as latin-1): normalize_path gives path_segments the same names both ways.
    # (A raw "%" starts an escape, so the raw form is tried only for names without one.)
    raws = ["/" + "/".join(quote(s) for s in segments)]
    if not any("%" in s for s in segments):
        raws.append(("/" + "/".join(segments)).encode("utf-8").decode("latin-1"))
    for raw in raws:
        try:
            normal = normalize_path(raw)
        except BadPath as exc:
            # Only a segment such as ".;x" is refused (see the table above).
            assert "parameter" in str(exc)
            continue
        assert path_segments(normal) == segments


_SAFE_PIECES = st.one_of(
    st.sampled_from(["/", "//", "/./", "/../", ".", "..", "%2e", "%2E"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E,
                          exclude_characters="\\%"), max_size=4),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E,
                  exclude_characters="/\\").map(lambda c: f"%{ord(c):02x}"),
    _SAFE_SEGMENT.map(quote),
)


@PROPS
@given(st.lists(_SAFE_PIECES, max_size=10).map(lambda p: "/" + "".join(p)))
def test_path_segments_never_raises_for_a_normalised_safe_path(raw: str) -> None:
    try:
        normal = normalize_path(raw)
    except BadPath as exc:
        assert "parameter" in str(exc)
        return
    segments = path_segments(normal)
    assert all(s not in ("", ".", "..") for s in segments)
