"""HTTP/1.1 chunked transfer coding for streamed bodies: a sans-I/O decoder and the framing.

Pure: no sockets, no asyncio. h11 reads and writes every head; once a worker's
response head says `Transfer-Encoding: chunked`, its body is decoded here
instead of through h11's general event machinery, because this is the path
every token takes and a chunk that arrives whole should cost one `find` and
one slice. Framing errors raise `ChunkedError`; nothing grows without bound
(a size line or the trailer section longer than `max_line` is an error).
"""

from __future__ import annotations

from typing import Final

_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_END: Final = b"0\r\n\r\n"


class ChunkedError(Exception):
    """The bytes break chunked framing (bad size line, missing CRLF, a bare LF, oversized line).

    `pieces` holds the payload decoded by the same `feed` call before the break, so a
    caller can still deliver what arrived intact.
    """

    def __init__(self, message: str, pieces: list[bytes | bytearray] | None = None) -> None:
        super().__init__(message)
        self.pieces: list[bytes | bytearray] = pieces or []


#: The size line of every chunk shorter than 4096 bytes, made once.
SIZE_LINES: Final = [b"%x\r\n" % n for n in range(4096)]


def frame(data: bytes | bytearray) -> bytes:
    """One chunk carrying `data` (which must not be empty)."""
    n = len(data)
    return (SIZE_LINES[n] if n < 4096 else b"%x\r\n" % n) + data + b"\r\n"


LAST_CHUNK: Final = _END
_SIZE_OF_LINE: Final = {line: size for size, line in enumerate(SIZE_LINES) if size}

#: The size line a whole chunk of each length (size line, payload, CRLF) must start with, for
#: payloads of 1 to 4095 bytes (hex digits + payload grows with the payload: one line per
#: length at most); b"" where no chunk has that length.
SIZE_LINE_OF_CHUNK: Final = [b""] * (4095 + len(SIZE_LINES[4095]) + 3)
for _size in range(1, 4096):
    SIZE_LINE_OF_CHUNK[_size + len(SIZE_LINES[_size]) + 2] = SIZE_LINES[_size]
del _size
#: len(SIZE_LINE_OF_CHUNK): no whole chunk of this length or longer is in the table
LONGEST_CHUNK: Final = len(SIZE_LINE_OF_CHUNK)
#: The longest payload of a whole chunk in the table
LONGEST_PAYLOAD: Final = len(SIZE_LINES) - 1


def first_chunk_end(data: bytes, at: int = 0) -> int:
    """Where the chunk starting at `data[at]` ends, when it is there whole, is not empty, is
    under 4096 bytes and has a plain lower-case size line (as workers write them); else 0.
    Only its size line is checked: the decoder or the fast lane checks the rest.

    The line is looked up as the 4, 5 or 3 bytes at `at` (2, 3 or 1 hex digits and CRLF):
    at most one of them is a size line (each ends at its only CRLF), and a slice and a
    look-up cost less than a `find` (a generic method call in compiled code), most often
    one of each (an event's chunk has 16 to 255 bytes)."""
    line_end = at + 4
    size = _SIZE_OF_LINE.get(data[at:line_end])
    if size is None:
        line_end = at + 5
        size = _SIZE_OF_LINE.get(data[at:line_end])
        if size is None:
            line_end = at + 3
            size = _SIZE_OF_LINE.get(data[at:line_end])
            if size is None:
                return 0
    end = line_end + size + 2
    return end if end <= len(data) else 0


def _size_text(line: bytes | bytearray) -> bytes | bytearray:
    """A size line's size: what comes before any `;` (its extensions), blanks stripped."""
    semi = line.find(b";")
    return (line if semi < 0 else line[:semi]).strip(b" \t")


def _no_hex_size(size: bytes | bytearray) -> bool:
    """Whether `size` (or the start of one) can be no chunk size: past 16 digits or not hex."""
    return len(size) > 16 or bool(size.translate(None, _HEX_DIGITS))


def _size_line_broken(part: bytes | bytearray) -> bool:
    """Whether the start of a size line (its CRLF not here yet) is already no size line,
    whatever follows: a bare LF, or a size (before any `;`) that is not hex digits. A worker
    that sent such bytes broke the framing now; waiting for the line's end would report its
    silence or its close instead (an HTML error page with LF line ends, say)."""
    return b"\n" in part or _no_hex_size(_size_text(part.removesuffix(b"\r")))


class ChunkedDecoder:
    """Decodes a chunked body fed in arbitrary pieces; `feed` returns the payload pieces.

    `done` turns True after the last chunk and its trailer section; bytes after
    that are kept in `trailing` (a worker that sends them cannot be reused).
    """

    __slots__ = (
        "_buf", "_remaining", "_state", "_trailer", "at_boundary", "done", "max_line", "trailing"
    )

    # states: 0 = expecting a size line, 1 = inside chunk data (`_remaining` bytes left),
    # 2 = expecting the CRLF after chunk data, 3 = inside the trailer section
    def __init__(self, max_line: int = 4096) -> None:
        self._buf: bytes | bytearray = b""
        self._remaining = 0
        self._state = 0
        self._trailer = 0  # bytes of whole trailer lines taken so far
        self.done = False
        self.max_line = max_line
        self.trailing: bytes | bytearray = b""
        # between two chunks with nothing buffered: the next bytes start a chunk
        self.at_boundary = True

    def feed(self, data: bytes) -> list[bytes | bytearray]:
        out: list[bytes | bytearray] = []
        if self.at_boundary:
            n = len(data)
            if n < LONGEST_CHUNK:
                # fast path: `data` is exactly one whole chunk with a plain lower-case size
                # line, as a worker writes one per event. A chunk of this length can start
                # with one size line only, so a match proves the framing (anything else:
                # general path).
                line = SIZE_LINE_OF_CHUNK[n]
                if line and data.startswith(line) and data.endswith(b"\r\n"):
                    return [data[len(line) : -2]]
            # Whole chunks with plain size lines one after the other, and maybe the last
            # chunk (a stream's last events and its end often come in one read): taken as
            # the general path takes them, a `find` and a look-up each; from the first other
            # byte on (a cut chunk, another size line, broken framing) the general path goes on.
            at = 0
            while True:
                line_end = data.find(b"\r\n", at, at + 5) + 2  # at most 3 hex digits
                if line_end < 2:
                    break  # no line end (and mypyc's bytes slice must not run backwards)
                size = _SIZE_OF_LINE.get(data[at:line_end])  # canonical lines only
                if size is None:
                    break
                end = line_end + size
                if data[end : end + 2] != b"\r\n":
                    break  # cut short, or no CRLF after the data (the general path says so)
                out.append(data[line_end:end])
                at = end + 2
            if at == n:
                return out
            if data[at:] == _END:  # the last chunk, no trailer section, nothing after it
                self._trailer = 2  # (its blank line, as the general path counts it)
                self.done = True
                self.at_boundary = False
                self._state = 3
                return out
            if at:
                data = data[at:]
        try:
            return self._feed(data, out)
        except ChunkedError as exc:
            exc.pieces = out
            raise

    def _feed(self, data: bytes | bytearray, out: list[bytes | bytearray]) -> list[bytes | bytearray]:
        self.at_boundary = False  # until this call ends between two chunks
        if self.done:
            self.trailing += data
            return []
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        state = self._state
        while pos < end:
            if state == 0:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if end - pos > self.max_line:
                        raise ChunkedError("chunk size line too long")
                    if _size_line_broken(buf[pos:]):
                        raise ChunkedError("bad chunk size line")
                    break
                line = buf[pos:nl]
                if 0 < len(line) < 17 and line.isalnum() and line[1:2] not in (b"x", b"X"):
                    # a bare size (what workers write): letters past f make int() refuse,
                    # isalnum() refuses signs, spaces and underscores, "0x" is refused above
                    try:
                        size = int(line, 16)
                    except ValueError:
                        raise ChunkedError("bad chunk size line") from None
                else:
                    size_text = _size_text(line)
                    if not size_text or _no_hex_size(size_text):
                        raise ChunkedError("bad chunk size line")
                    size = int(size_text, 16)
                pos = nl + 2
                if size == 0:
                    state = 3
                    continue
                # fast path: the whole chunk and its CRLF are here
                stop = pos + size
                if stop + 2 <= end:
                    if buf[stop : stop + 2] != b"\r\n":
                        raise ChunkedError("chunk data not followed by CRLF")
                    out.append(buf[pos:stop])
                    pos = stop + 2
                    continue
                self._remaining = size
                state = 1
            elif state == 1:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = 2
            elif state == 2:
                if end - pos < 2:
                    if buf[pos] != 13:  # no CR where the chunk's CRLF must begin
                        raise ChunkedError("chunk data not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ChunkedError("chunk data not followed by CRLF")
                pos += 2
                state = 0
            else:  # trailer section: lines until an empty one
                nl = buf.find(b"\r\n", pos)
                if buf.find(b"\n", pos, nl if nl >= 0 else end) >= 0:
                    # a LF before the next CRLF (or with none to come) ends no line: the
                    # framing broke here, as a bare LF in a size line breaks it
                    raise ChunkedError("bare LF in the trailer section")
                if nl < 0:
                    if self._trailer + end - pos > self.max_line:
                        raise ChunkedError("trailer section too long")
                    break
                # the whole section is bounded, not only each line: endless trailer lines
                # would hold the response open with bytes flowing (no idle timeout) for ever
                self._trailer += nl + 2 - pos
                if self._trailer > self.max_line:
                    raise ChunkedError("trailer section too long")
                if nl == pos:
                    self.done = True
                    self.at_boundary = False
                    self.trailing = buf[nl + 2 :]
                    self._buf = b""
                    self._state = state
                    return out
                pos = nl + 2
        self._buf = buf[pos:] if pos < end else b""
        self._state = state
        self.at_boundary = state == 0 and not self._buf
        return out
