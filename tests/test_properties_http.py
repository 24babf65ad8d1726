"""Properties of the pure HTTP rules (sniport.wire.httprules) that the tables of
test_httprules.py check by example: ranges (RFC 9110 section 14), preconditions (section
13.2.2) and Accept-Encoding with q-values (sections 12.4.2 and 12.5.3).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sniport.wire.httprules import (
    UNSATISFIABLE,
    ByteRange,
    Validators,
    accepts_encoding,
    http_date,
    parse_range,
    preconditions,
)

# No deadline: the machine is shared, and timing is not what these properties are about.
PROPS = settings(deadline=None, max_examples=200)

# ------------------------------------------------------------------------------------------
# parse_range

_OWS = st.sampled_from(["", " ", "  ", "\t"])
_NUMBER = st.one_of(st.integers(0, 2000).map(str), st.integers(0, 10**25).map(str),
                    st.integers(0, 50).map(lambda n: f"{n:05d}"))


@st.composite
def single_ranges(draw: st.DrawFn) -> tuple[str, str, str]:
    """(header value, first-pos, last-pos) of one range spec, either part possibly empty."""
    first = draw(st.one_of(st.just(""), _NUMBER))
    last = draw(st.one_of(st.just(""), _NUMBER))
    unit = draw(st.sampled_from(["bytes", "Bytes", "BYTES"]))
    value = (f"{draw(_OWS)}{unit}={draw(_OWS)}{first}{draw(_OWS)}-{draw(_OWS)}{last}"
             f"{draw(_OWS)}")
    return value, first, last


# Up to the largest file size (off_t): parse_range need not convert longer numbers exactly.
SIZES = st.one_of(st.integers(0, 3000), st.integers(0, 2**63 - 1))


@PROPS
@given(single_ranges(), SIZES)
def test_a_range_is_within_the_representation(spec: tuple[str, str, str], size: int) -> None:
    value, first, last = spec
    result = parse_range(value, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end <= size - 1
        assert result.length >= 1
    elif result is UNSATISFIABLE:
        # RFC 9110 section 14.1.2: an int-range is unsatisfiable when its first-pos is not
        # less than the length; a suffix-range when its suffix-length is zero. Nothing else.
        if first:
            assert int(first) >= size
            assert not last or int(last) >= int(first)  # an invalid range is ignored instead
        else:
            assert int(last) == 0
    else:
        assert result is None
        # Ignored only when the spec is invalid (section 14.1.1: last < first, or no number)
        # or asks for the tail of an empty representation (sent whole).
        assert ((not first and not last) or (first and last and int(last) < int(first))
                or (not first and size == 0))


@PROPS
@given(single_ranges(), SIZES)
def test_a_satisfiable_range_is_the_one_asked_for(spec: tuple[str, str, str],
                                                  size: int) -> None:
    value, first, last = spec
    result = parse_range(value, size)
    if first and int(first) < size and (not last or int(last) >= int(first)):
        end = size - 1 if not last else min(int(last), size - 1)
        assert result == ByteRange(int(first), end)
    elif not first and last and int(last) > 0 and size > 0:
        assert result == ByteRange(max(0, size - int(last)), size - 1)
        assert result.length == min(int(last), size)


@PROPS
@given(st.lists(single_ranges(), min_size=2, max_size=4), SIZES)
def test_a_list_of_ranges_is_ignored(specs: list[tuple[str, str, str]], size: int) -> None:
    # Several ranges are not served (a server MAY ignore Range, RFC 9110 section 14.2).
    value = "bytes=" + ",".join(v.split("=", 1)[1] for v, _, _ in specs)
    assert parse_range(value, size) is None


@PROPS
@given(single_ranges(), st.sampled_from(["items", "byte", "bits", "none", "", "bytes x"]),
       SIZES)
def test_another_unit_is_ignored(spec: tuple[str, str, str], unit: str, size: int) -> None:
    value = unit + "=" + spec[0].split("=", 1)[1]
    assert parse_range(value, size) is None


@PROPS
@given(st.text(max_size=40), SIZES)
def test_parse_range_never_raises(value: str, size: int) -> None:
    result = parse_range(value, size)
    assert result is None or result is UNSATISFIABLE or isinstance(result, ByteRange)


# ------------------------------------------------------------------------------------------
# preconditions: RFC 9110 section 13.2.2

T = 784111777
_DATES = st.sampled_from([http_date(T - 1), http_date(T), http_date(T + 1), "not a date", ""])
_TAG_LISTS = st.sampled_from(['"a"', 'W/"a"', '"b"', '"b", "a"', 'W/"b", W/"a"', "*", ""])
_METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
_VALIDATORS = st.builds(Validators, st.sampled_from(['"a"', 'W/"a"', '"b"']),
                        st.sampled_from([T - 1, T, T + 1]))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Validators, str | None, str | None, str | None,
                                       str | None]:
    maybe = st.one_of(st.none(), _TAG_LISTS)
    maybe_date = st.one_of(st.none(), _DATES)
    return (draw(_METHODS), draw(_VALIDATORS), draw(maybe), draw(maybe_date), draw(maybe),
            draw(maybe_date))


Request = tuple[str, Validators, str | None, str | None, str | None, str | None]


@PROPS
@given(requests())
def test_if_match_beats_if_unmodified_since(req: Request) -> None:
    method, v, im, _ius, inm, ims = req
    if im is not None:
        # Step 2 is only for a request without If-Match.
        assert preconditions(*req) == preconditions(method, v, im, None, inm, ims)


@PROPS
@given(requests())
def test_if_none_match_beats_if_modified_since(req: Request) -> None:
    method, v, im, ius, inm, _ims = req
    if inm is not None:
        # Step 4 is only for a request without If-None-Match.
        assert preconditions(*req) == preconditions(method, v, im, ius, inm, None)


@PROPS
@given(requests())
def test_a_failed_step_1_or_2_is_412_whatever_follows(req: Request) -> None:
    method, v, im, ius, _inm, _ims = req
    failed_step_1_or_2 = preconditions(method, v, im, ius, None, None)
    if failed_step_1_or_2 is not None:
        assert failed_step_1_or_2 == 412
        assert preconditions(*req) == 412


@PROPS
@given(requests())
def test_304_only_for_get_and_head(req: Request) -> None:
    method, v, im, ius, inm, _ims = req
    result = preconditions(*req)
    assert result in (None, 304, 412)
    if result == 304:
        assert method in ("GET", "HEAD")
    if method not in ("GET", "HEAD"):
        # If-Modified-Since is not evaluated for them (section 13.1.3) ...
        assert result == preconditions(method, v, im, ius, inm, None)
        # ... and a matching If-None-Match is a 412 (section 13.1.2).
        assert result != 304


@PROPS
@given(_METHODS, _VALIDATORS)
def test_no_precondition_no_decision(method: str, v: Validators) -> None:
    assert preconditions(method, v, None, None, None, None) is None


# ------------------------------------------------------------------------------------------
# accepts_encoding: RFC 9110 section 12.5.3, qvalues section 12.4.2

_CODINGS = ["gzip", "br", "deflate", "zstd", "compress", "identity", "*"]
# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = st.one_of(
    st.sampled_from(["0", "0.", "0.0", "0.00", "0.000", "1", "1.", "1.0", "1.000"]),
    st.from_regex(r"0\.[0-9]{1,3}", fullmatch=True),
)


@st.composite
def accept_encodings(draw: st.DrawFn) -> tuple[str, dict[str, float]]:
    """An Accept-Encoding value, and the q-value of each coding it lists (each listed once)."""
    names = draw(st.lists(st.sampled_from(_CODINGS), unique=True, max_size=len(_CODINGS)))
    items: list[str] = []
    weights: dict[str, float] = {}
    for name in names:
        q = draw(st.one_of(st.none(), _QVALUE))
        spelt = draw(st.sampled_from([name, name.upper(), name.capitalize()]))
        if q is None:
            items.append(spelt)
            weights[name] = 1.0
        else:
            param = draw(st.sampled_from(["q", "Q"]))
            items.append(f"{spelt}{draw(_OWS)};{draw(_OWS)}{param}={q}")
            weights[name] = float(q)
    separator = draw(st.sampled_from([",", ", ", " ,", ",\t"]))
    return separator.join(items), weights


@PROPS
@given(accept_encodings(), st.sampled_from(["gzip", "br", "zstd"]))
def test_accepts_encoding_follows_q_values(header: tuple[str, dict[str, float]],
                                           coding: str) -> None:
    value, weights = header
    if coding in weights:
        expected = weights[coding] > 0  # q=0 is "not acceptable"
    elif "*" in weights:
        expected = weights["*"] > 0  # "*": any coding not listed otherwise
    else:
        expected = False
    assert accepts_encoding(value, coding) is expected


@PROPS
@given(st.text(max_size=40), st.sampled_from(["gzip", "br"]))
def test_accepts_encoding_never_raises(value: str, coding: str) -> None:
    assert accepts_encoding(value, coding) in (True, False)

