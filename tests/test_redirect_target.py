"""redirect_target and redirect_warnings (sniport.wire.httprules): the Location of a
``redirect = { to, keep_path }`` route, built with URL semantics (RFC 3986 section 5.3).

The table pins the joins; the properties are the security ones: whatever the request's path
and query hold, an absolute ``to`` keeps its scheme, host and fragment, and an absolute-path
``to`` stays a path on the same host (never "//host" nor "/\\host").
"""

from __future__ import annotations

from urllib.parse import unquote, urljoin, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sniport.wire.httprules import redirect_target, redirect_warnings

# No deadline: the machine is shared, and timing is not what these properties are about.
PROPS = settings(deadline=None, max_examples=200)


@pytest.mark.parametrize(
    ("to", "rest", "query", "expected"),
    [
        # The review's cases: string concatenation made these "https://www.example.comabout"
        # and "https://www.example.com@evil.com/" (an open redirect to evil.com).
        ("https://www.example.com", "about", "", "https://www.example.com/about"),
        ("https://www.example.com", "/about", "", "https://www.example.com/about"),
        ("https://www.example.com", "/@evil.com/", "", "https://www.example.com/@evil.com/"),
        ("https://www.example.com", "@evil.com/", "", "https://www.example.com/@evil.com/"),
        ("https://www.example.com", ":443@evil", "", "https://www.example.com/:443@evil"),
        # to's path is a directory: exactly one "/" between it and the rest
        ("https://example.com/new/", "a/b", "", "https://example.com/new/a/b"),
        ("https://example.com/new/", "/a/b", "", "https://example.com/new/a/b"),
        ("https://example.com/new", "a/b", "", "https://example.com/new/a/b"),
        ("https://example.com/new", "///a", "", "https://example.com/new/a"),
        ("https://example.com/new//", "a", "", "https://example.com/new/a"),
        ("https://example.com:8443", "a", "", "https://example.com:8443/a"),
        ("http://[::1]:8080/x", "y", "", "http://[::1]:8080/x/y"),
        # an empty rest leaves to's path as it is; an empty path is "/" (RFC 9110 4.2.3)
        ("https://x.example", "", "", "https://x.example/"),
        ("https://x.example/", "", "", "https://x.example/"),
        ("https://x.example/new", "", "", "https://x.example/new"),
        ("https://x.example/new/", "", "", "https://x.example/new/"),
        # a rest of "/" (route "/old", request "/old/") keeps its slash
        ("https://x.example/new", "/", "", "https://x.example/new/"),
        ("https://x.example", "/", "", "https://x.example/"),
        # absolute-path targets (RFC 3986 section 4.2)
        ("/new", "x", "", "/new/x"),
        ("/new/", "x", "", "/new/x"),
        ("/new", "", "", "/new"),
        ("/", "", "", "/"),
        ("/", "x/y/", "", "/x/y/"),
        ("/", "//evil", "", "/evil"),
        ("/new/", "//evil", "", "/new/evil"),
        ("/", "\\\\evil", "", "/%5C%5Cevil"),
        ("/", "/\\evil", "", "/%5Cevil"),
        # queries: to's, then the request's, joined with "&"; to's fragment kept
        ("https://x.example/n", "a", "b=2", "https://x.example/n/a?b=2"),
        ("https://x.example/n?a=1", "x", "", "https://x.example/n/x?a=1"),
        ("https://x.example/n?a=1", "x", "b=2", "https://x.example/n/x?a=1&b=2"),
        ("https://x.example/n?a=1#top", "x", "b", "https://x.example/n/x?a=1&b#top"),
        ("https://x.example/n#top", "", "q", "https://x.example/n?q#top"),
        ("/n?a=1", "x", "b=2", "/n/x?a=1&b=2"),
        ("https://x.example", "", "a=1&b=/c?d", "https://x.example/?a=1&b=/c?d"),
        # "?" and "#" of the rest are encoded: they cannot start a query or a fragment
        ("https://x.example", "?x#y", "", "https://x.example/%3Fx%23y"),
        ("https://x.example/n#f", "a?b=1", "", "https://x.example/n/a%3Fb=1#f"),
        # characters not allowed in a path or a query (section 3.3, 3.4) are encoded
        ("https://x.example", "a b", "c d", "https://x.example/a%20b?c%20d"),
        ("https://x.example", "x", "a#b", "https://x.example/x?a%23b"),
        ("https://x.example", 'a"<>', "", "https://x.example/a%22%3C%3E"),
        ("https://x.example", "a\r\nb", "c\x00", "https://x.example/a%0D%0Ab?c%00"),
        # escapes already there are kept; a "%" that starts none is encoded
        ("https://x.example", "a%20b", "q=%41", "https://x.example/a%20b?q=%41"),
        ("https://x.example", "%2F%2Fevil", "", "https://x.example/%2F%2Fevil"),
        ("https://x.example", "100%", "p=%zz", "https://x.example/100%25?p=%25zz"),
        # U+0080-U+00FF are latin-1-decoded bytes; beyond, a caller's text, as UTF-8
        ("https://x.example", "caf\xe9", "q=\xe9", "https://x.example/caf%E9?q=%E9"),
        ("https://x.example", "\u65e5", "", "https://x.example/%E6%97%A5"),
    ],
)
def test_redirect_target_keep_path(to: str, rest: str, query: str, expected: str) -> None:
    assert redirect_target(to, rest, query, keep_path=True) == expected


@pytest.mark.parametrize("to", ["https://www.example.com", "https://x.example/n?a=1#f", "/new"])
@pytest.mark.parametrize(("rest", "query"), [("", ""), ("about", "a=1"), ("/@evil.com/", "")])
def test_redirect_target_without_keep_path_is_to_exactly(to: str, rest: str, query: str) -> None:
    assert redirect_target(to, rest, query, keep_path=False) == to


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("https://www.example.com/", []),
        ("https://www.example.com/new/", []),
        ("http://example.com:8080/a?b=1#c", []),
        ("/new/", []),
        ("/", []),
        ("https://www.example.com", ['"/" is used as its path']),
        ("HTTPS://www.example.com?x=1", ['"/" is used as its path']),
        ("https://user@www.example.com/", ["user name"]),
        ("new/", ["relative reference"]),
        ("../up", ["relative reference"]),
        ("//evil.example/", ["scheme-relative"]),
        ("/\\evil.example/", ["scheme-relative"]),
        ("\\\\evil.example/", ["scheme-relative"]),
        ("https:/www.example.com", ["without a host"]),
        ("mailto:a@example.com", ["a mailto: URL"]),
        ("ftp://example.com/", ["a ftp: URL"]),
        (" /new", ["whitespace or control", "relative reference"]),
        ("/new\n", ["whitespace or control"]),
        ("https://[::1/", ["not a valid URL"]),
    ],
)
def test_redirect_warnings(to: str, expected: list[str]) -> None:
    warnings = redirect_warnings(to)
    assert len(warnings) == len(expected), warnings
    for warning, fragment in zip(warnings, expected, strict=True):
        assert fragment in warning
        assert repr(to) in warning  # each message names the target it is about


# ------------------------------------------------------------------------------------------
# Properties

ABSOLUTE = ["https://www.example.com", "https://example.com/new/", "https://example.com/new",
            "http://example.com:8080/a?x=1#f", "https://[2001:db8::1]:8443/p/", "https://a.b/#"]
RELATIVE = ["/", "/new", "/new/", "/a?b=1", "/n#frag"]

_NASTY = st.sampled_from([
    "@evil.com/", "//evil", "/\\evil", "\\\\evil", "%2F%2Fevil", ":443@evil", "?x#y", "#",
    "?", "/", "\\", "%", "%2", "%zz", "%41", "@", ":", "\u65e5\u672c", "\xe9", " ", "\t",
    "\r\n", "\x00", "..", ".", "http://evil/", "evil.com", "&", "=", ";",
])
TEXT = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(_NASTY, st.text(max_size=3)), max_size=8).map("".join),
)


@PROPS
@given(st.sampled_from(ABSOLUTE), TEXT, TEXT)
@example("https://www.example.com", "@evil.com/", "")
@example("https://www.example.com", "\\\\evil", "#x")
def test_an_absolute_target_keeps_its_origin_and_fragment(to: str, rest: str,
                                                          query: str) -> None:
    location = redirect_target(to, rest, query, keep_path=True)
    got, want = urlsplit(location), urlsplit(to)
    assert (got.scheme, got.netloc) == (want.scheme, want.netloc)
    assert (got.hostname, got.port) == (want.hostname, want.port)
    assert got.fragment == want.fragment
    if rest:
        assert got.path.startswith(want.path.rstrip("/") + "/")
    else:
        assert got.path == (want.path or "/")
    assert got.query.startswith(want.query)
    # One line of printable ASCII: safe in a header, and nothing for a browser to strip
    # or re-read.
    assert location.isascii() and location.isprintable() and " " not in location


@PROPS
@given(st.sampled_from(RELATIVE), TEXT, TEXT)
@example("/", "//evil", "")
@example("/", "/\\evil", "")
@example("/new/", "\\\\evil", "")
def test_an_absolute_path_target_stays_on_the_host(to: str, rest: str, query: str) -> None:
    location = redirect_target(to, rest, query, keep_path=True)
    assert location.startswith("/")
    assert not location.startswith(("//", "/\\"))
    parts = urlsplit(location)
    assert parts.scheme == "" and parts.netloc == ""
    assert parts.fragment == urlsplit(to).fragment
    # Resolved by a client against the request's URL, it stays on the same origin.
    resolved = urlsplit(urljoin("https://victim.example/old/page", location))
    assert (resolved.scheme, resolved.netloc) == ("https", "victim.example")
    assert location.isascii() and location.isprintable() and " " not in location


@PROPS
@given(st.sampled_from(ABSOLUTE + RELATIVE),
       st.text(st.characters(max_codepoint=0xFF, exclude_characters="%"), max_size=30))
def test_the_rest_is_kept_byte_for_byte(to: str, rest: str) -> None:
    # Encoding loses nothing: decoding the path again gives the rest back (without its
    # leading slashes), with U+0080-U+00FF as the latin-1 bytes they stand for.
    location = redirect_target(to, rest, "", keep_path=True)
    base = urlsplit(to).path.rstrip("/") + "/"
    path = urlsplit(location).path
    if rest:
        assert path.startswith(base)
        assert unquote(path[len(base):], encoding="latin-1") == rest.lstrip("/")
