"""How a worker's response body is framed, and the decoder that reads it past h11.

Pure: no sockets, no asyncio. h11 parses every response head; the body is then
read by a decoder with one small interface (`feed(bytes) -> payload pieces`,
`done`, `trailing`, `at_boundary`) instead of through h11's event machinery:
`chunked.ChunkedDecoder` for chunked bodies (every streamed token), and
`ContentLengthDecoder` for fixed-length ones (every non-streaming answer), so a
body costs no h11 event per read. Bodies h11 must frame itself (HEAD answers,
1xx/204/304, read-until-close) get no decoder. `keep_body_piece` is how a body
read in pieces (a request's, a worker's document) is held until it is whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sidecar.chunked import ChunkedDecoder
from sidecar.headers import Header


class ContentLengthDecoder:
    """Counts a `Content-Length` body fed in arbitrary pieces; `feed` returns the payload pieces.

    `done` turns True once `length` bytes have arrived; bytes after that are kept in
    `trailing` (a worker that sends them cannot be reused).
    """

    __slots__ = ("_remaining", "done", "trailing")

    #: a fixed-length body is never a run of whole SSE chunks: no fast lane
    at_boundary = False

    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0
        self.trailing: bytes | bytearray = b""

    def feed(self, data: bytes | bytearray) -> list[bytes | bytearray]:
        if self.done:
            self.trailing += data
            return []
        remaining = self._remaining
        n = len(data)
        if n < remaining:
            self._remaining = remaining - n
            return [data] if n else []
        self._remaining = 0
        self.done = True
        if n > remaining:
            self.trailing = data[remaining:]
            data = data[:remaining]
        return [data]


BodyDecoder = ChunkedDecoder | ContentLengthDecoder


def head_size(reason: bytes, headers: Iterable[Header]) -> int:
    """The size of a response head with this reason phrase and these header lines, written
    the plain way (`HTTP/1.1 200 reason`, `name: value` lines, CRLF line ends, the blank
    line): how much of `max_header_bytes` a worker's parsed head takes, whichever reads it
    came in (the whitespace h11 strips around values and line ends written as LF are not
    counted, so a head is never found larger than it came)."""
    size = 17 + len(reason)  # "HTTP/1.1 200 " and CRLF, the blank line's CRLF
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


def body_decoder(method: bytes, status: int, headers: Iterable[Header]) -> BodyDecoder | None:
    """The decoder for the body of a response with these (h11-parsed, lower-case) headers to a
    `method` request, or None when h11 must frame it (no body, or read until close).

    h11 has already validated the framing headers: one `Transfer-Encoding: chunked` or one
    plain decimal `Content-Length`, never both.
    """
    if method == b"HEAD" or status < 200 or status == 204 or status == 304:
        return None
    length: bytes | None = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return ChunkedDecoder()
        if name == b"content-length":
            length = value
    return None if length is None else ContentLengthDecoder(int(length))


#: body pieces shorter than this are copied into one growing bytearray (see
#: `keep_body_piece`); longer ones are kept as they came
SMALL_BODY_PIECE: Final = 4096


def keep_body_piece(pieces: list[bytes | bytearray], piece: bytes | bytearray) -> None:
    """Add one piece of a body, as read, to the `pieces` kept of it: a small piece after
    a small one is appended to the bytearray the pieces end with (made of the two), any
    other is kept as it is (not copied: a body that came in one read stays that read).
    A body that came a few bytes per read (a client's 1-byte chunks, a worker dripping its
    document) is held at about its size, not as an object of ~35 bytes per read."""
    if pieces and len(piece) < SMALL_BODY_PIECE:
        last = pieces[-1]
        if type(last) is bytearray:
            last += piece
            return
        if len(last) < SMALL_BODY_PIECE:  # two small pieces: from now on one buffer
            pieces[-1] = joined = bytearray(last)
            joined += piece
            return
    pieces.append(piece)  # the first piece (a body in one read: not copied) or a large one
