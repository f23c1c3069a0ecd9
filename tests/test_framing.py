"""Response body framing past h11: which decoder a head gets, and the Content-Length decoder,
split at every byte and against h11's own reading of the same bytes."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.chunked import ChunkedDecoder, frame
from sidecar.framing import ContentLengthDecoder, body_decoder, head_size


def feed_all(decoder: ContentLengthDecoder | ChunkedDecoder, data: bytes, splits: list[int]) -> bytes:
    out: list[bytes] = []
    points = [0, *sorted(splits), len(data)]
    for a, b in itertools.pairwise(points):
        out.extend(decoder.feed(data[a:b]))
    return b"".join(out)


def h11_reading(head: bytes, body: bytes, method: bytes = b"GET") -> tuple[bytes, bool, bytes]:
    """What h11 makes of a response: its body, whether it ended, the bytes after it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"w")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + body)
    out: list[bytes] = []
    while True:
        event = conn.next_event()
        if type(event) is h11.Data:
            out.append(event.data)
        elif type(event) is h11.EndOfMessage:
            return b"".join(out), True, conn.trailing_data[0]
        elif event is h11.NEED_DATA:
            return b"".join(out), False, b""


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=300),
    extra=st.binary(max_size=40),
    cut=st.integers(min_value=0, max_value=400),
    splits=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_content_length_matches_h11(body: bytes, extra: bytes, cut: int, splits: list[int]) -> None:
    data = (body + extra)[: cut if cut < len(body) else len(body) + len(extra)]
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    decoder = ContentLengthDecoder(len(body))
    got = feed_all(decoder, data, [s for s in splits if s <= len(data)])
    want, ended, after = h11_reading(head, data)
    assert got == want
    assert decoder.done is ended
    assert decoder.trailing == (after if ended else b"")


def test_content_length_every_split_point() -> None:
    body, extra = b'{"choices": []}', b"HTTP/1.1 200"
    for at in range(len(body) + len(extra) + 1):
        decoder = ContentLengthDecoder(len(body))
        assert feed_all(decoder, body + extra, [at]) == body
        assert decoder.done and decoder.trailing == extra
    empty = ContentLengthDecoder(0)
    assert empty.done and empty.feed(b"x") == [] and empty.trailing == b"x"


def test_no_fast_lane_for_a_fixed_length_body() -> None:
    decoder = ContentLengthDecoder(len(frame(b"data: x\n\n")))
    assert decoder.at_boundary is False


CHUNKED = [(b"transfer-encoding", b"chunked")]
LENGTH = [(b"content-type", b"application/json"), (b"content-length", b"12")]


@pytest.mark.parametrize(
    ("method", "status", "headers", "kind"),
    [
        (b"POST", 200, CHUNKED, ChunkedDecoder),
        (b"POST", 200, LENGTH, ContentLengthDecoder),
        (b"GET", 404, LENGTH, ContentLengthDecoder),
        (b"POST", 200, [(b"content-length", b"3"), *CHUNKED], ChunkedDecoder),  # TE wins
        (b"POST", 200, [(b"content-type", b"text/plain")], None),  # until the worker closes
        (b"HEAD", 200, LENGTH, None),  # HEAD: the length describes a body never sent
        (b"HEAD", 200, CHUNKED, None),
        (b"POST", 204, LENGTH, None),
        (b"GET", 304, CHUNKED, None),
    ],
)
def test_which_decoder(method: bytes, status: int, headers: list[tuple[bytes, bytes]], kind: type | None) -> None:
    decoder = body_decoder(method, status, headers)
    assert (None if decoder is None else type(decoder)) is kind
    if kind is None:
        return
    # h11 frames the same response the same way: the decoder ends where h11 ends
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    body = frame(b"hello") + b"0\r\n\r\n" if kind is ChunkedDecoder else b"hello world!"
    assert decoder is not None
    got = feed_all(decoder, body + b"NEXT", [])
    want, ended, after = h11_reading(head, body + b"NEXT", method)
    assert (got, decoder.done, decoder.trailing) == (want, ended, after)


def test_head_size_is_the_plain_head_written_out() -> None:
    """What a worker head parsed by h11 takes of max_header_bytes: its plain CRLF form."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"5")]
    plain = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n"
    assert head_size(b"OK", headers) == len(plain)
    assert head_size(b"", []) == len(b"HTTP/1.1 200 \r\n\r\n")
