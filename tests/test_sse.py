"""Tests for sidecar.sse: WHATWG event-stream rules, chunking independence, raw bytes, limits."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar.sse import (
    Event,
    SSEParser,
    SSEProtocolError,
    encode_comment,
    encode_event,
    undispatched_lines,
)

BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------- reference
def reference(stream: bytes) -> tuple[list[tuple], bool]:
    """A deliberately naive WHATWG parser over the whole stream, character by character.

    Returns one tuple (data, event, id, retry, comments) per blank line, and whether an
    unterminated block remains at the end.
    """
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines: list[str] = []
    cur: list[str] = []
    i = 0
    last_end = 0
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            lines.append("".join(cur))
            cur = []
            i += 2 if ch == "\r" and text[i + 1 : i + 2] == "\n" else 1
            if lines[-1] == "":
                lines.append("\0BLANK")  # marker with the position of the dispatch
                last_end = i
        else:
            cur.append(ch)
            i += 1
    out = []
    data: list[str] | None = None
    event = id_ = retry = None
    comments = False
    for line in lines:
        if line == "\0BLANK":
            out.append((None if data is None else "\n".join(data), event, id_, retry, comments))
            data, event, id_, retry, comments = None, None, None, None, False
            continue
        if line == "":
            continue
        if line.startswith(":"):
            comments = True
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "data":
            data = [*(data or []), value]
        elif name == "event":
            event = value
        elif name == "id":
            if "\0" not in value:
                id_ = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return out, last_end < len(text)


def fields(events: list[Event]) -> list[tuple]:
    return [(e.data, e.event, e.id, e.retry, e.comments) for e in events]


def parse_chunks(
    chunks: list[bytes], max_event_size: int = 1 << 20
) -> tuple[list[Event], SSEParser]:
    p = SSEParser(max_event_size)
    events: list[Event] = []
    for c in chunks:
        events.extend(p.feed(c))
    events.extend(p.close())
    return events, p


def parse(stream: bytes) -> list[Event]:
    return parse_chunks([stream])[0]


def mended(data: bytes) -> bytes:
    """`data` as the parser passes it on: invalid UTF-8 replaced by U+FFFD (WHATWG)."""
    return data.decode("utf-8", "replace").encode("utf-8")


def check_stream(stream: bytes, chunks: list[bytes]) -> None:
    """Feed ``chunks`` (which join to ``stream``) and compare with the reference."""
    assert b"".join(chunks) == stream
    events, p = parse_chunks(chunks)
    expected, partial = reference(stream)
    assert fields(events) == expected
    assert p.has_partial == partial
    body = stream[3:] if stream.startswith(BOM) else stream
    consumed = len(body) - len(p.pending)
    assert body[consumed:] == p.pending
    assert b"".join(e.raw for e in events) == mended(body[:consumed])
    for e in events:
        assert type(e.raw) is bytes


def splits(stream: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({min(x, len(stream)) for x in points})
    out, prev = [], 0
    for c in cuts:
        out.append(stream[prev:c])
        prev = c
    out.append(stream[prev:])
    return out


# --------------------------------------------------------------------------- table tests
def E(data=None, event=None, id=None, retry=None, comments=False):
    return (data, event, id, retry, comments)


TABLE = [
    ("lf", b"data: x\n\n", [E("x")]),
    ("crlf", b"data: x\r\n\r\n", [E("x")]),
    ("cr", b"data: x\r\r", [E("x")]),
    ("mixed", b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r", [E("a\nb\nc"), E("d")]),
    ("bom", BOM + b"data: x\n\n", [E("x")]),
    ("bom only at start", b"data: x\n\n" + BOM + b"data: y\n\n", [E("x"), E(None)]),
    ("second bom kept", BOM + BOM + b"data: x\n\n", [E(None)]),
    ("comment", b": keep-alive\n\n", [E(comments=True)]),
    ("comment with data", b":c\ndata: x\n\n", [E("x", comments=True)]),
    ("colon only comment", b":\n\n", [E(comments=True)]),
    ("multi-line data", b"data: a\ndata:\ndata: b\n\n", [E("a\n\nb")]),
    ("empty data", b"data:\n\n", [E("")]),
    ("data no colon", b"data\n\n", [E("")]),
    ("data no colon twice", b"data\ndata\n\n", [E("\n")]),
    ("event", b"event: delta\ndata: {}\n\n", [E("{}", event="delta")]),
    ("event data no space", b"event: a\ndata:xy\n\n", [E("xy", event="a")]),
    ("event data two spaces", b"event:  a\ndata:  x\n\n", [E(" x", event=" a")]),
    ("event two data lines", b"event: a\ndata: x\ndata: y\n\n", [E("x\ny", event="a")]),
    ("event then id", b"event: a\nid: 1\n\n", [E(None, event="a", id="1")]),
    ("event last wins", b"event: a\nevent: b\ndata: x\n\n", [E("x", event="b")]),
    ("event empty", b"event:\ndata: x\n\n", [E("x", event="")]),
    ("event only not dispatched", b"event: ping\n\n", [E(None, event="ping")]),
    ("id", b"id: 7\ndata: x\n\n", [E("x", id="7")]),
    ("id only", b"id: 7\n\n", [E(None, id="7")]),
    ("id empty", b"id\ndata: x\n\n", [E("x", id="")]),
    ("id with nul ignored", b"id: a\x00b\ndata: x\n\n", [E("x")]),
    ("id nul keeps earlier", b"id: 1\nid: a\x00\ndata: x\n\n", [E("x", id="1")]),
    ("retry", b"retry: 1500\ndata: x\n\n", [E("x", retry=1500)]),
    ("retry non digit", b"retry: 15s\ndata: x\n\n", [E("x")]),
    ("retry negative", b"retry: -1\ndata: x\n\n", [E("x")]),
    ("retry empty", b"retry:\ndata: x\n\n", [E("x")]),
    ("retry unicode digit", "retry: \u0661\ndata: x\n\n".encode(), [E("x")]),
    ("retry space inside", b"retry: 1 0\ndata: x\n\n", [E("x")]),
    ("one space stripped", b"data:  two\n\n", [E(" two")]),
    ("no space", b"data:x\n\n", [E("x")]),
    ("tab not stripped", b"data:\tx\n\n", [E("\tx")]),
    ("trailing space kept", b"data: x \n\n", [E("x ")]),
    ("colon in value", b"data: a:b: c\n\n", [E("a:b: c")]),
    ("unknown field", b"foo: bar\ndata: x\n\n", [E("x")]),
    ("field case sensitive", b"Data: x\n\n", [E(None)]),
    ("field with space", b"data : x\n\n", [E(None)]),
    ("blank lines", b"\n\ndata: x\n\n\n", [E(None), E(None), E("x"), E(None)]),
    ("two events", b"data: 1\n\ndata: 2\n\n", [E("1"), E("2")]),
    ("invalid utf8", b"data: \xff\xfe\n\n", [E("\ufffd\ufffd")]),
    ("utf8", "data: h\u00e9llo \u2603\n\n".encode(), [E("h\u00e9llo \u2603")]),
    ("nul in data", b"data: a\x00b\n\n", [E("a\x00b")]),
    ("vt and ff are not line ends", b"data: a\x0bb\x0cc\x1cd\n\n", [E("a\x0bb\x0cc\x1cd")]),
    ("unicode line sep not line end", "data: a\u2028b\x85c\n\n".encode(), [E("a\u2028b\x85c")]),
]


@pytest.mark.parametrize(("stream", "expected"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_table(stream: bytes, expected: list[tuple]) -> None:
    assert fields(parse(stream)) == expected
    # the reference agrees with the table, so it can be trusted in the property tests
    assert reference(stream)[0] == expected
    # and every two-way and byte-by-byte chunking gives the same events
    for i in range(len(stream) + 1):
        check_stream(stream, [stream[:i], stream[i:]])
    check_stream(stream, [stream[i : i + 1] for i in range(len(stream))])
    # and the same through the whole-chunk fast paths (parser already past the BOM check)
    if not stream.startswith(BOM):
        p = SSEParser()
        assert fields(p.feed(b": warm-up\n\n")) == [E(comments=True)]
        assert fields(p.feed(stream)) == expected


def test_raw_is_exact_bytes() -> None:
    stream = BOM + b": hi\n\nevent: a\r\ndata: 1\r\n\r\n\ndata: 2\r\r"
    events = parse(stream)
    assert [e.raw for e in events] == [
        b": hi\n\n",
        b"event: a\r\ndata: 1\r\n\r\n",
        b"\n",
        b"data: 2\r\r",
    ]


def test_fast_path_returns_same_object() -> None:
    chunk = b'data: {"a": 1}\n\n'
    (ev,) = SSEParser().feed(b"\n")
    assert ev.raw == b"\n"
    p = SSEParser()
    assert p.feed(b": x\n\n")[0].comment_only
    (ev,) = p.feed(chunk)
    assert ev.raw is chunk
    assert ev == Event('{"a": 1}', None, None, None, chunk)


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    p = SSEParser()
    assert fields(p.feed(b"data: x\r")) == []
    assert fields(p.feed(b"\n")) == []  # the LF completes the CRLF, it is not a blank line
    assert fields(p.feed(b"\r")) == [E("x")]
    assert p.feed(b"\n") == []  # again the other half of a CRLF, not an extra blank block
    assert not p.has_partial
    assert p.pending == b"\n"
    (ev,) = p.feed(b"data: y\n\n")
    assert (ev.data, ev.raw) == ("y", b"\ndata: y\n\n")


def test_block_ending_in_cr_is_returned_at_once() -> None:
    p = SSEParser()
    (ev,) = p.feed(b"data: x\r\r")
    assert ev.data == "x"
    assert not p.has_partial
    assert p.feed(b"\r") == [Event(None, raw=b"\r")]  # a real blank line: its own block


def test_bom_split_across_chunks() -> None:
    p = SSEParser()
    assert p.feed(b"\xef") == []
    assert p.feed(b"\xbb") == []
    assert p.feed(b"\xbf") == []
    assert not p.has_partial
    (ev,) = p.feed(b"data: x\n\n")
    assert (ev.data, ev.raw) == ("x", b"data: x\n\n")


def test_bom_prefix_that_is_not_a_bom() -> None:
    events, _ = parse_chunks([b"\xef\xbb", b"data: x\n\n"])
    assert fields(events) == [E(None)]  # the field name is "\ufffddata"
    assert events[0].raw == "\ufffddata: x\n\n".encode()  # mended, like its text


@pytest.mark.parametrize(
    ("stream", "pending"),
    [
        (b"data: x", b"data: x"),
        (b"data: x\n", b"data: x\n"),
        (b"data: 1\n\ndata: 2\r\n", b"data: 2\r\n"),
        (b"\xef\xbb", b"\xef\xbb"),
        (b": comment", b": comment"),
    ],
)
def test_unterminated_final_block_is_not_dispatched(stream: bytes, pending: bytes) -> None:
    p = SSEParser()
    events = p.feed(stream)
    assert all(e.data != "2" and e.data != "x" for e in events)
    assert p.close() == []
    assert p.has_partial
    assert p.pending == pending


def test_clean_end_has_no_partial() -> None:
    p = SSEParser()
    p.feed(b"data: x\n\n")
    assert p.close() == []
    assert not p.has_partial
    assert p.pending == b""


def test_max_event_size_partial() -> None:
    p = SSEParser(max_event_size=64)
    p.feed(b"data: " + b"a" * 40)
    with pytest.raises(SSEProtocolError):
        p.feed(b"b" * 40)
    assert p.pending == b""  # nothing kept growing
    with pytest.raises(SSEProtocolError):
        p.feed(b"\n\n")  # stays failed


def test_max_event_size_partial_in_one_chunk_keeps_earlier_events() -> None:
    p = SSEParser(max_event_size=64)
    with pytest.raises(SSEProtocolError) as info:
        p.feed(b"data: ok\n\ndata: " + b"a" * 100)
    assert fields(info.value.events) == [E("ok")]


def test_max_event_size_complete() -> None:
    p = SSEParser(max_event_size=64)
    big = b"data: " + b"a" * 100 + b"\n\n"
    with pytest.raises(SSEProtocolError) as info:
        p.feed(b"data: 1\n\n" + big + b"data: 2\n\n")
    assert fields(info.value.events) == [E("1")]
    # a single oversized event in its own chunk (the fast path) also raises
    with pytest.raises(SSEProtocolError):
        SSEParser(max_event_size=64).feed(big)
    with pytest.raises(SSEProtocolError):
        SSEParser(max_event_size=64).feed(b"data: " + b"a" * 100 + b"\r\n\r\n")


def test_max_event_size_exact_limit_is_allowed() -> None:
    ev = b"data: " + b"a" * 56 + b"\n\n"
    assert len(ev) == 64
    p = SSEParser(max_event_size=64)
    p.feed(b"\n")
    assert [e.data for e in p.feed(ev)] == ["a" * 56]
    assert [e.data for e in p.feed(ev[:30]) + p.feed(ev[30:])] == ["a" * 56]
    # a block that is not one data line, LF or CRLF, cut in two: exactly the limit passes
    for named in (b"event: e\ndata: " + b"a" * 47 + b"\n\n", b"event: e\r\ndata: " + b"a" * 44 + b"\r\n\r\n"):
        assert len(named) == 64
        p = SSEParser(max_event_size=64)
        assert [e.data for e in p.feed(named[:30]) + p.feed(named[30:])] == [named.split(b"data: ")[1].strip().decode()]
        with pytest.raises(SSEProtocolError):
            p = SSEParser(max_event_size=63)
            p.feed(named[:30])
            p.feed(named[30:])


def test_a_chunk_that_starts_with_a_blank_line_is_that_line_then_its_block() -> None:
    """Whatever the chunking, a blank line before an event is a block of its own (the raw
    bytes a relay passes for it), then the event: the one-block fast path must not take it."""
    stream = b"\ndata: x\n\n"
    for first in (b"", b"data: a\n\n"):
        p = SSEParser()
        p.feed(first)
        assert [(e.raw, e.data) for e in p.feed(stream)] == [(b"\n", None), (b"data: x\n\n", "x")]


def test_many_small_chunks_of_one_event() -> None:
    payload = b"data: " + b"x" * 5000 + b"\r\ndata: y\n\n"
    events, p = parse_chunks([payload[i : i + 7] for i in range(0, len(payload), 7)])
    assert [e.data for e in events] == ["x" * 5000 + "\ny"]
    assert not p.has_partial


BIG_STREAM = (
    b"data: "
    + b"a" * 9000
    + b"\r\ndata: b\r\n\r\n"
    + b"event: e\rdata: "
    + b"c" * 10000
    + b"\r\r"
    + b": "
    + b"d" * 9000
    + b"\n\n"
    + b"data: "
    + b"e" * 9000
    + b"\r"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096, 8191, 8193, 20000])
def test_events_larger_than_the_small_buffer(size: int) -> None:
    chunks = [BIG_STREAM[i : i + size] for i in range(0, len(BIG_STREAM), size)]
    check_stream(BIG_STREAM, chunks)
    events, p = parse_chunks(chunks)
    assert [e.data for e in events] == ["a" * 9000 + "\nb", "c" * 10000, None]
    assert p.has_partial


def test_feed_accepts_bytearray_and_memoryview() -> None:
    p = SSEParser()
    (a,) = p.feed(bytearray(b"data: a\n\n"))
    (b,) = p.feed(memoryview(b"data: b\n\n"))
    assert (a.data, b.data) == ("a", "b")
    assert type(a.raw) is bytes and type(b.raw) is bytes


# --------------------------------------------------------------------------- encoders
def test_encode_event_shapes() -> None:
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event("x") == b"data: x\n\n"
    assert encode_event("") == b"data: \n\n"
    assert encode_event("a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert encode_event("a\n") == b"data: a\ndata: \n\n"
    assert encode_event(b"{}", event="message_stop", id="9") == (
        b"event: message_stop\nid: 9\ndata: {}\n\n"
    )
    assert encode_event("x", retry=10) == b"retry: 10\ndata: x\n\n"
    assert encode_event(b"a\nb") == b"data: a\ndata: b\n\n"


@pytest.mark.parametrize(
    "kwargs",
    [{"event": "a\nb"}, {"event": "a\rb"}, {"id": "1\n"}, {"id": "a\x00"}, {"retry": -1}],
)
def test_encode_event_rejects_unframable_fields(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        encode_event("x", **kwargs)


def test_encode_comment() -> None:
    assert encode_comment() == b": keep-alive\n\n"
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    (ev,) = parse(encode_comment())
    assert ev.comment_only and ev.data is None


# --------------------------------------------------------------------------- properties
LINE_ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])
VALUE = st.one_of(
    st.sampled_from([b"", b" ", b"  x", b"{}", b"[DONE]", b"a:b", b"\x00", b"\xff", b"1500"]),
    st.text(max_size=8).map(lambda s: s.encode("utf-8")),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
NAME = st.sampled_from([b"data", b"event", b"id", b"retry", b"foo", b"Data", b""])


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "field", "field", "nocolon", "comment"]))
    if kind == "comment":
        body = b":" + draw(VALUE)
    elif kind == "nocolon":
        body = draw(NAME) or b"data"
    else:
        body = draw(NAME) + b":" + draw(st.sampled_from([b"", b" "])) + draw(VALUE)
    return body + draw(LINE_ENDS)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    out = [BOM] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 4))):
        out.extend(draw(st.lists(lines(), max_size=4)))
        out.append(draw(LINE_ENDS))
    if draw(st.booleans()):
        out.extend(draw(st.lists(lines(), max_size=2)))  # unterminated tail
    return b"".join(out)[:300]


SOUP = st.lists(
    st.sampled_from(
        [
            b"\n",
            b"\r",
            b"\r\n",
            b":",
            b" ",
            b"data",
            b"event",
            b"id",
            b"retry",
            b"\x00",
            BOM,
            b"\xef",
            b"\xff",
            b"1",
            b"x",
            "\u00e9".encode(),
            b"\xe2\x82",
        ]
    ),
    max_size=60,
).map(b"".join)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("block", "lines"),
    [
        (b"event: progress\n\n", b""),
        (b"event: x\r\nid: 7\r\n\r\n", b"id: 7\r\n"),
        (b"retry: 500\n: note\nevent\n\n", b"retry: 500\n: note\n"),
        (b"id\rretry: 1\r\r", b"id\rretry: 1\r"),
    ],
)
def test_undispatched_lines_keep_id_retry_and_comments_without_the_blank_line(
    block: bytes, lines: bytes
) -> None:
    assert undispatched_lines(block) == lines


@FAST
@given(st.lists(lines(), min_size=1, max_size=5).map(b"".join), LINE_ENDS)
def test_a_data_less_block_made_undispatched_sets_what_whatwg_sets(
    block_lines: bytes, end: bytes
) -> None:
    """Read with the next block, the lines left of a block without `data` give that block
    the last event ID and retry WHATWG has once both are read, and no event name."""
    block = block_lines + end
    events, parser = parse_chunks([block])
    assume(len(events) == 1 and not parser.pending and events[0].data is None)
    (alone,) = events
    assume(not alone.garbage and not alone.comment_only)
    assert parse(undispatched_lines(block)) == []  # nothing of its own is dispatched
    (joined,) = parse(undispatched_lines(block) + b"data: x\n\n")
    assert (joined.data, joined.event) == ("x", None)
    assert (joined.id, joined.retry) == (alone.id, alone.retry)


@FAST
@given(streams())
def test_every_split_point_matches_reference(stream: bytes) -> None:
    for i in range(len(stream) + 1):
        check_stream(stream, [stream[:i], stream[i:]])


@FAST
@given(st.one_of(streams(), SOUP), st.lists(st.integers(0, 300), max_size=12))
def test_random_multi_splits_match_reference(stream: bytes, points: list[int]) -> None:
    check_stream(stream, splits(stream, points))


@FAST
@given(st.one_of(streams(), SOUP))
def test_byte_by_byte_matches_reference(stream: bytes) -> None:
    check_stream(stream, [stream[i : i + 1] for i in range(len(stream))])


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


FIELD_TEXT = st.text(
    st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)), max_size=10
)


@FAST
@given(
    st.text(max_size=40),
    st.none() | FIELD_TEXT,
    st.none() | FIELD_TEXT,
    st.none() | st.integers(0, 10**12),
    st.booleans(),
)
def test_encode_then_parse_round_trips(
    data: str, event: str | None, id_: str | None, retry: int | None, as_bytes: bool
) -> None:
    wire = encode_event(data.encode() if as_bytes else data, event=event, id=id_, retry=retry)
    (ev,) = parse(wire)
    assert (ev.data, ev.event, ev.id, ev.retry) == (_normalise(data), event, id_, retry)
    assert ev.raw == wire
    # and with a leading BOM, split anywhere, after another event
    stream = BOM + encode_comment() + wire
    for i in range(0, len(stream) + 1, 3):
        events, p = parse_chunks([stream[:i], stream[i:]])
        assert [e.data for e in events] == [None, _normalise(data)]
        assert not p.has_partial


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), SOUP),
    st.lists(st.integers(0, 200), max_size=8),
    st.integers(1, 64),
)
def test_fuzz_only_protocol_errors(stream: bytes, points: list[int], limit: int) -> None:
    p = SSEParser(max_event_size=limit)
    raw = b""
    try:
        for chunk in splits(stream, points):
            raw += b"".join(e.raw for e in p.feed(chunk))
        p.close()
    except SSEProtocolError as exc:
        raw += b"".join(e.raw for e in exc.events)
        body = stream[3:] if stream.startswith(BOM) else stream
        assert mended(body).startswith(raw)
        # (a mended event may be longer than it came: U+FFFD is 3 bytes, an invalid one 1)
        assert all(len(e.raw) <= 3 * limit for e in exc.events)
        return
    body = stream[3:] if stream.startswith(BOM) else stream
    consumed = len(body) - len(p.pending)
    assert body[consumed:] == p.pending
    assert raw == mended(body[:consumed])
    assert len(p.pending) <= limit


# ------------------------------------------------------------------ strict: garbage lines

STRICT_CASES = [
    b"data: 1\n\n<html><body>502 Bad Gateway</body></html>\n\ndata: 2\n\n",
    b"data: 1\r\n\r\ndata: 2\r\ngarbage\r\ndata: 3\r\n\r\ndata: 4\r\n\r\n",
    b": ok\n\nevent: a\ndata: 1\n\n\x00\x01junk\xff\n\ndata: 2\n\n",
    b"data: 1\n\nHTTP/1.1 502 Bad Gateway\r\nServer: x\r\n\r\n",  # a second response
]


def strict_parse(chunks: list[bytes]) -> tuple[list[Event], bool]:
    """Feed a strict parser; the events it gave (before a refusal too) and whether it refused."""
    p = SSEParser(strict=True)
    events: list[Event] = []
    try:
        for chunk in chunks:
            events.extend(p.feed(chunk))
    except SSEProtocolError as exc:
        return events + exc.events, True
    return events, False


@pytest.mark.parametrize("stream", STRICT_CASES)
def test_strict_parser_refuses_lines_sse_does_not_define(stream: bytes) -> None:
    lenient = parse(stream)
    first = next(i for i, e in enumerate(lenient) if e.garbage)
    expected = fields(lenient[:first])
    assert expected, "each case has good events before the garbage"
    for cut in range(len(stream) + 1):
        events, refused = strict_parse([stream[:cut], stream[cut:]])
        assert refused and fields(events) == expected, cut
    events, refused = strict_parse([stream[i : i + 1] for i in range(len(stream))])
    assert refused and fields(events) == expected


@settings(max_examples=300, deadline=None)
@given(SOUP, st.lists(st.integers(0, 200), max_size=8))
def test_strict_parser_is_whatwg_up_to_the_first_garbage_line(
    stream: bytes, points: list[int]
) -> None:
    lenient = parse(stream)
    first = next((i for i, e in enumerate(lenient) if e.garbage), None)
    events, refused = strict_parse(splits(stream, points))
    assert refused == (first is not None)
    assert fields(events) == fields(lenient if first is None else lenient[:first])


@pytest.mark.parametrize(
    "line", [b"x-vendor: thing", b"error: {\"code\": 500}", b"Retry-After: 3", b"foo:"]
)
def test_strict_parser_ignores_well_formed_unknown_fields(line: bytes) -> None:
    """`name: value` with a token name is an extension WHATWG ignores: strict ignores it too
    (llama.cpp's `error:` line among them)."""
    stream = b"data: 1\n\n" + line + b"\ndata: 2\n\n" + line + b"\n\n"
    events, refused = strict_parse([stream])
    assert not refused and fields(events) == fields(parse(stream))
    assert [e.data for e in events] == ["1", "2", None]


def test_an_error_field_is_kept_for_the_dialects() -> None:
    """llama.cpp's `error: {...}` line is no SSE field (clients skip it): its value is kept
    in `Event.error`; a bare `error` line with no colon is no field line at all."""
    (event,) = parse(b'error: {"code":500}\n\n')
    assert (event.data, event.error) == (None, '{"code":500}')
    events, refused = strict_parse([b"data: 1\n\nerror\n\n"])
    assert refused and [e.data for e in events] == ["1"]


@pytest.mark.parametrize(
    ("held", "garbage"),
    [
        (b"<html><body>502 Bad Gateway</body></html>\n", True),  # a whole line, no blank line
        (b"<html><body>502 Bad", True),  # a line still coming, already no field name
        (b"data: 1\nInternal Server Error", True),
        (b"\x00\x01junk", True),
        (b"data: {\"half", False),  # a half-received event: cut, not broken
        (b"dat", False),  # may still become `data:`
        (b"x-vendor", False),
        (b": comment\nevent: e\n", False),
        (b"error: {\"code\": 500}", False),
        (b"", False),
    ],
)
def test_pending_garbage_tells_a_broken_block_from_a_cut_one(held: bytes, garbage: bool) -> None:
    """What a strict parser holds when the stream stops (ends, closes, goes silent): a line
    that cannot be an SSE field line broke its framing; a block cut short did not."""
    for cut in range(len(held) + 1):  # however the held bytes arrived
        parser = SSEParser(strict=True)
        assert parser.feed(b"data: 0\n\n") and not parser.feed(held[:cut]) and not parser.feed(held[cut:])
        assert parser.pending_garbage() is garbage, cut


def test_a_retry_of_more_digits_than_int_converts() -> None:
    """`retry:` past int()'s digit limit (4,300 digits) is a reconnection time like any other,
    not a ValueError out of the parser (a traceback, and the stream stuck)."""
    block = b"retry: " + b"9" * 5000 + b"\n"
    (event, alone) = SSEParser().feed(block + b"data: x\n\n" + block + b"\n")
    assert event.data == "x" and event.retry is not None and event.retry > 10**18
    assert alone.data is None and alone.retry == event.retry and not alone.comment_only
