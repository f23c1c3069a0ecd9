"""The chunked decoder: whole, split at every byte, against h11's own encoder, and fuzzed."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.chunked import LAST_CHUNK, ChunkedDecoder, ChunkedError, first_chunk_end, frame
from tests.builds import attribute_names


def decode(data: bytes, splits: list[int] | None = None) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    out: list[bytes] = []
    points = [0, *(splits or []), len(data)]
    for a, b in itertools.pairwise(points):
        out.extend(decoder.feed(data[a:b]))
    return b"".join(out), decoder


def h11_chunked(pieces: list[bytes]) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[]))
    body = b"".join(conn.send(h11.Data(data=p)) or b"" for p in pieces)
    return body + conn.send(h11.EndOfMessage())


def test_whole_body() -> None:
    body, decoder = decode(frame(b"hello ") + frame(b"world") + LAST_CHUNK)
    assert body == b"hello world" and decoder.done and decoder.trailing == b""


def test_extensions_trailers_and_trailing_bytes() -> None:
    data = b"5;name=value\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nEXTRA"
    body, decoder = decode(data)
    assert body == b"hello" and decoder.done and decoder.trailing == b"EXTRA"


def test_bytes_after_the_end_are_all_kept_as_trailing() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(frame(b"ok") + LAST_CHUNK + b"EX") == [b"ok"]
    assert decoder.feed(b"TRA") == []
    assert decoder.done and decoder.trailing == b"EXTRA"


def test_a_read_that_looks_like_a_whole_chunk_continues_a_size_line() -> None:
    """After a read that ended inside a size line (`1`), the next read is its rest: `3` makes
    the size 0x13, so `3\r\nabc\r\n` is that line and 5 of the chunk's 19 bytes, not a
    3-byte chunk of its own."""
    decoder = ChunkedDecoder()
    assert decoder.feed(frame(b"ok") + b"1") == [b"ok"]
    assert decoder.feed(b"3\r\nabc\r\n") == [b"abc\r\n"]
    assert b"".join(decoder.feed(b"x" * 14 + b"\r\n" + LAST_CHUNK)) == b"x" * 14
    assert decoder.done


def test_a_trailer_section_of_exactly_max_line_bytes_is_accepted() -> None:
    line = b"x-t: " + b"a" * 11 + b"\r\n"  # 18 bytes; with the closing CRLF 20
    decoder = ChunkedDecoder(max_line=20)
    assert decoder.feed(b"0\r\n" + line + b"\r\n") == [] and decoder.done
    decoder = ChunkedDecoder(max_line=20)  # the same, its last 20 bytes still coming
    assert decoder.feed(b"0\r\n") == []
    assert decoder.feed(line + b"\r") == [] and not decoder.done
    assert decoder.feed(b"\n") == [] and decoder.done
    with pytest.raises(ChunkedError, match="trailer section too long"):
        ChunkedDecoder(max_line=19).feed(b"0\r\n" + line + b"\r\n")


def test_not_done_until_the_blank_line() -> None:
    body, decoder = decode(frame(b"abc") + b"0\r\n")
    assert body == b"abc" and not decoder.done


@pytest.mark.parametrize(
    "bad",
    [b"zz\r\nhello\r\n", b"5\r\nhelloXX", b"-1\r\n", b"\r\n", b"12345678901234567\r\n",
     b"0x5\r\nhello\r\n", b"0X5\r\nhello\r\n"],
)
def test_bad_framing_raises(bad: bytes) -> None:
    with pytest.raises(ChunkedError):
        decode(bad)


@pytest.mark.parametrize(
    "bad",
    [b"<html>\n<body>502", b"5\nhello\n", b"zz", b" 5x", b"12345678901234567", b"5\r5",
     b"5\r\nhelloX"],
)
def test_framing_broken_before_the_line_ends_raises_at_once(bad: bytes) -> None:
    """Bytes no CRLF can make a size line (or a chunk's end) raise when they arrive: a worker
    that sent them and then went silent or closed broke the framing, it did not just stop."""
    with pytest.raises(ChunkedError):
        decode(frame(b"ok") + bad)


@pytest.mark.parametrize("bad", [b"0\r\n\n", b"0\r\nx-t: 1\n", b"0\r\nx-t: 1\n\r\n", b"0\r\nx-t: 1\r\n\n"])
def test_a_bare_lf_in_the_trailer_section_raises_at_once(bad: bytes) -> None:
    """The trailer section's lines end with CRLF as the size lines do: a bare LF after the
    last chunk breaks the framing when it arrives, whether or not a CRLF follows (a worker
    that ends its body with `0\r\n\n` and waits would be a silence, reported as a timeout
    at idle_timeout), one byte at a time too."""
    for splits in ([], list(range(1, len(bad)))):
        with pytest.raises(ChunkedError, match="bare LF"):
            decode(frame(b"ok") + bad, [len(frame(b"ok")) + i for i in splits])


@pytest.mark.parametrize("good", [b"0\r\n", b"0\r\nx-t: 1", b"0\r\nx-t: 1\r", b"0\r\nx-t: 1\r\n\r"])
def test_a_trailer_section_still_coming_is_waited_for(good: bytes) -> None:
    body, decoder = decode(frame(b"ok") + good)
    assert body == b"ok" and not decoder.done


@pytest.mark.parametrize("good", [b"5", b"5 ", b"5\r", b"5;", b"5;x=\"a b\"", b" a", b"5\r\nhello\r"])
def test_a_size_line_still_coming_is_waited_for(good: bytes) -> None:
    body, decoder = decode(frame(b"ok") + good)
    assert body.startswith(b"ok") and not decoder.done


def test_size_line_is_bounded() -> None:
    decoder = ChunkedDecoder(max_line=64)
    with pytest.raises(ChunkedError):
        for _ in range(100):
            decoder.feed(b"0" * 10)


def test_trailer_section_is_bounded_not_only_each_line() -> None:
    """Endless short trailer lines (bytes flowing, so no idle timeout) are an error once the
    section passes max_line, whether they come in one read or line by line."""
    decoder = ChunkedDecoder(max_line=64)
    assert decoder.feed(b"2\r\nok\r\n0\r\n") == [b"ok"]
    with pytest.raises(ChunkedError, match="trailer section too long"):
        for _ in range(100):
            decoder.feed(b"x-t: 1\r\n")
    with pytest.raises(ChunkedError, match="trailer section too long"):
        ChunkedDecoder(max_line=64).feed(b"0\r\n" + b"x-t: 1\r\n" * 100 + b"\r\n")
    decoder = ChunkedDecoder(max_line=64)  # a section within the bound still ends the body
    assert decoder.feed(b"0\r\n" + b"x-t: 1\r\n" * 7 + b"\r\nEXTRA") == []
    assert decoder.done and decoder.trailing == b"EXTRA"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
def test_every_split_point_matches_h11(pieces: list[bytes]) -> None:
    data = h11_chunked(pieces)
    for cut in range(len(data) + 1):
        body, decoder = decode(data, [cut])
        assert body == b"".join(pieces)
        assert decoder.done


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.data())
def test_random_multi_splits(pieces: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(frame(p) for p in pieces) + LAST_CHUNK
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    body, decoder = decode(raw, cuts)
    assert body == b"".join(pieces) and decoder.done


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_only_chunked_error(data: bytes) -> None:
    decoder = ChunkedDecoder(max_line=64)
    try:
        out = decoder.feed(data)
    except ChunkedError:
        return
    assert sum(map(len, out)) <= len(data)


def _general(data: bytes) -> list[bytes] | str:
    """What the general (byte-at-a-time) path makes of `data`: payload pieces or the error."""
    decoder = ChunkedDecoder()
    out: list[bytes] = []
    try:
        for i in range(len(data)):
            out.extend(decoder.feed(data[i : i + 1]))
    except ChunkedError as exc:
        return str(exc)
    return [b"".join(out)] if out else []


@pytest.mark.parametrize("size", [1, 9, 15, 16, 17, 171, 255, 256, 257, 2748, 4095, 4096, 4097])
@pytest.mark.parametrize(
    "size_line",
    [
        lambda n: b"%x\r\n" % n,  # what workers write: the fast path
        lambda n: b"%X\r\n" % n,  # upper case
        lambda n: b"0%x\r\n" % n,  # a leading zero
        lambda n: b"%x;ext=1\r\n" % n,  # an extension
    ],
)
def test_one_whole_chunk_per_feed_matches_the_general_path(size: int, size_line) -> None:
    payload = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    data = size_line(size) + payload + b"\r\n"
    assert ChunkedDecoder().feed(data) == [payload] == _general(data)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 4100), st.binary(min_size=0, max_size=8), st.binary(min_size=0, max_size=3))
def test_near_miss_whole_chunks_match_the_general_path(
    size: int, line_tail: bytes, crlf: bytes
) -> None:
    """Bytes shaped almost like one whole chunk: the fast path never accepts what the
    general path would not, and never returns anything else."""
    data = b"%x" % size + line_tail + b"z" * size + crlf
    try:
        got: list[bytes] | str = ChunkedDecoder().feed(data)
    except ChunkedError as exc:
        got = str(exc)
    expected = _general(data)
    if isinstance(got, list) and isinstance(expected, list):
        assert b"".join(got) == b"".join(expected)
    else:
        assert isinstance(got, str) == isinstance(expected, str)


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (frame(b"x" * 26) + b"rest", 32),
        (frame(b"x" * 26), 32),
        (frame(b"x") + frame(b"y"), 6),
        (frame(b"x" * 4095), 4095 + 7),
        (b"1A\r\n" + b"x" * 26 + b"\r\n", 0),  # upper-case hex
        (b"01a\r\n" + b"x" * 26 + b"\r\n", 0),  # a leading zero
        (b"+1a\r\n" + b"x" * 26 + b"\r\n", 0),  # int() would take these
        (b" 1a\r\n" + b"x" * 26 + b"\r\n", 0),
        (b"0x1a\r\n" + b"x" * 26 + b"\r\n", 0),
        (b"1_a\r\n" + b"x" * 26 + b"\r\n", 0),
        (b"0\r\n\r\n", 0),  # the last chunk is no whole chunk with data
        (b"1000\r\n" + b"x" * 4096 + b"\r\n", 0),  # 4096 and more: the decoder's business
        (frame(b"x" * 26)[:-1], 0),  # cut short
        (b"1a;ext=1\r\n" + b"x" * 26 + b"\r\n", 0),
    ],
)
def test_first_chunk_end_takes_plain_size_lines_only(data: bytes, end: int) -> None:
    assert first_chunk_end(data) == end
    assert first_chunk_end(b"junk" + data, 4) == (end + 4 if end else 0)


def _state(decoder: ChunkedDecoder) -> tuple[object, ...]:
    return tuple(getattr(decoder, name) for name in attribute_names(ChunkedDecoder))


def _outcome(feed, data: bytes) -> object:
    try:
        return feed(data)
    except ChunkedError as exc:
        return (str(exc), exc.pieces)


def _general_feed(decoder: ChunkedDecoder):
    """`feed` without its fast paths: the general loop alone (pieces kept on an error)."""

    def feed(data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            return decoder._feed(data, out)
        except ChunkedError as exc:
            exc.pieces = out
            raise

    return feed


_TAILS = st.sampled_from(
    [
        b"",
        LAST_CHUNK,
        LAST_CHUNK + b"EXTRA",
        b"0\r\nx-t: 1\r\n\r\n",
        b"0\r\n\r",  # the last chunk, its blank line still coming
        b"0\r",
        b"5\r\nab",  # a chunk cut short
        b"5\r\nabcde",  # its CRLF still coming
        b"5\r\nabcde\r",
        b"5\r\nabcdeXY",  # no CRLF after the data
        b"5\n\nabcde\r\n",  # a bare LF
        b"A\r\n0123456789\r\n",  # upper case
        b"05\r\nabcde\r\n",  # a leading zero
        b"5;x=1\r\nabcde\r\n",  # an extension
        b"1000\r\n" + b"x" * 4096 + b"\r\n",  # 4096 bytes: no plain line of the table
        b"zz\r\n",
        b"\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=5), _TAILS, st.booleans())
def test_plain_chunks_in_one_read_match_the_general_path(
    pieces: list[bytes], tail: bytes, after_one: bool
) -> None:
    """A read of whole plain chunks, maybe the last chunk or anything else after them
    (the fast path's loop), decodes to what the general path makes of it, errors, pieces
    kept before an error and the decoder's state included."""
    data = b"".join(frame(p) for p in pieces) + tail
    fast, general = ChunkedDecoder(), ChunkedDecoder()
    if after_one:  # not the body's first read
        assert fast.feed(frame(b"x")) == general._feed(frame(b"x"), []) == [b"x"]
    assert _outcome(fast.feed, data) == _outcome(_general_feed(general), data)
    assert _state(fast) == _state(general)
