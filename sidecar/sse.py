"""Server-Sent Events (``text/event-stream``): an incremental parser and a serializer.

What it is for: turning the worker's response body bytes into events (``feed(bytes) ->
list[Event]``) exactly as the WHATWG HTML "event stream interpretation" does, while keeping
each event's exact bytes (``Event.raw``) so a pass-through event can be forwarded as
received; and writing the events and comments the daemon itself sends.

What it must never do: any I/O (no sockets, files, clocks, asyncio, logging); hold back an
event whose terminating blank line has arrived; re-encode or normalise the bytes of a
pass-through event; buffer more than ``max_event_size`` bytes of one unfinished event.

Parsing rules (WHATWG): lines end with CRLF, LF or CR, mixed freely (a CR at the end of one
chunk followed by an LF at the start of the next is one line end); one leading UTF-8 BOM of
the stream is dropped; ``:`` starts a comment; ``field:value`` with one leading space of the
value removed, a line without a colon is a field with an empty value; ``data`` lines are
joined with ``\\n``; ``id`` is ignored when its value contains NUL; ``retry`` is used only
when it is one or more ASCII digits; unknown fields are ignored (an ``error`` field's value
is kept in ``Event.error`` for llama.cpp's failures; a ``strict`` parser refuses
lines that are no field line at all: see ``Event.garbage``); a blank line ends a block.
Text is decoded as UTF-8 with ``errors="replace"``, and an event with invalid UTF-8 has
the same replacement in its ``raw`` bytes.

Blocks and events: every blank line ends one *block* and ``feed`` returns one ``Event`` per
block, in order, including blocks that WHATWG would not dispatch (comment-only blocks,
``event:``/``id:``-only blocks, and the empty block of each extra blank line, e.g. the
third ``\\n`` of ``\\n\\n\\n`` is a block of its own with ``raw == b"\\n"``). Those have
``data is None``; a caller that wants WHATWG's dispatched events keeps the ones with
``data is not None``. This keeps ``Event.raw`` exact: for every input and every chunking,
``b"".join(e.raw for e in events) + parser.pending`` equals the input minus a leading BOM.
The only chunking-dependent detail: when a block ends with a lone CR at the very end of a
chunk, the block is returned at once (never held back); if the next chunk starts with LF,
that LF (the second half of a CRLF) is carried at the start of the next block's ``raw``.

``Event.id`` and ``Event.event`` are the values of this block's own fields (``None`` when
absent), not WHATWG's sticky "last event ID" (a caller that needs it keeps the last non-None
``id``). An empty ``event:`` value is kept as ``""`` (WHATWG: type "message").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BOM", "Event", "SSEParser", "SSEProtocolError", "encode_comment", "encode_event",
    "undispatched_lines", "without_bom",
]

#: the UTF-8 byte-order mark: dropped from the start of a worker's body, never written
BOM: Final = b"\xef\xbb\xbf"
#: an HTTP token (RFC 9110 5.6.2): what a well-formed field name of an extension looks like
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A line end followed by a line end: the end of a block whose first line is not blank.
# Possessive "\r\n?+" so that a CRLF is never split into two line ends by backtracking.
_BLOCK_END: Final = re.compile(rb"(?:\r\n?+|\n)(?:\r\n?+|\n)")
_BIG: Final = 8192  # a partial block this large is accumulated in a bytearray
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_STR_LINE_END: Final = re.compile(r"\r\n|\r|\n")
#: `Event.retry` of a `retry:` field too long for int() (over sys.get_int_max_str_digits())
_LONGEST_RETRY: Final = 2**63 - 1


def without_bom(held: bytes, chunk: bytes | bytearray) -> tuple[bytes | None, bytes | bytearray]:
    """A stream's first bytes, those held so far and the next `chunk`, with a leading
    byte-order mark dropped: (None, the bytes that follow it) once that is decided, or
    (the bytes to hold, b"") while they may still be the start of one."""
    head = held + chunk
    if len(head) < len(BOM) and BOM.startswith(head):
        return head, b""
    return None, head[len(BOM) :] if head.startswith(BOM) else head


class SSEProtocolError(Exception):
    """The event stream breaks the parser's limits (an event larger than ``max_event_size``).

    ``events`` holds the events completed by the same ``feed`` call before the failure,
    in order, so a caller can still forward them. The parser stays failed afterwards.
    """

    def __init__(self, message: str, events: Iterable[Event] = ()) -> None:
        super().__init__(message)
        self.events: list[Event] = list(events)


@dataclass(slots=True)
class Event:
    """One block of an event stream: the fields it set and its exact bytes.

    ``data`` is ``None`` when the block had no ``data`` field (WHATWG does not dispatch
    it); ``raw`` is the block's bytes as received, including its terminating blank line
    (minus the stream's leading BOM); ``comments`` is true when the block had at least one
    comment line; ``garbage`` when it had a line that is not an SSE field line at all: no
    colon and not a field SSE defines, or a name that is not an HTTP token (an HTML page,
    a status line, binary junk; WHATWG would ignore it as an unknown field); ``error`` the
    value of an ``error`` field, which SSE does not define (WHATWG ignores it) and llama.cpp
    reports a failure in (``error: {"code":500,...}``), so that a dialect can tell it.
    """

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    raw: bytes = b""
    comments: bool = False
    garbage: bool = False
    error: str | None = None  # an `error` field's value: how llama.cpp reports a failure

    @property
    def comment_only(self) -> bool:
        """True for a block made only of comment lines (a heartbeat such as ``: ping``)."""
        return (
            self.comments
            and self.data is None
            and self.event is None
            and self.id is None
            and self.retry is None
        )


def _valid_utf8(block: bytes) -> bytes:
    """`block` itself when it is valid UTF-8, else with every invalid sequence replaced by
    U+FFFD, as an event stream's decoder reads it (WHATWG): the text a client gets, and the
    bytes passed on for it (never invalid UTF-8, which SDKs fail on)."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("utf-8", "replace").encode("utf-8")
    return block


def _parse_block(block: bytes) -> Event:
    """Parse one complete block (its raw bytes, ending with the blank line)."""
    # Fast paths: "data: X\n\n" and "event: E\ndata: X\n\n", LF only.
    n = len(block)
    try:
        if block.startswith(b"data: "):
            if block.find(10, 6) == n - 2 and block[n - 1] == 10 and 13 not in block:
                return Event(block[6:-2].decode("utf-8"), None, None, None, block, False)
        elif block.startswith(b"event: "):
            i = block.find(10, 7)
            if (
                block.startswith(b"data: ", i + 1)
                and block.find(10, i + 7) == n - 2
                and block[n - 1] == 10
                and 13 not in block
            ):
                return Event(
                    block[i + 7 : -2].decode("utf-8"),
                    block[7:i].decode("utf-8"),
                    None,
                    None,
                    block,
                    False,
                )
    except UnicodeDecodeError:
        pass  # the general way below mends it
    if not block.isascii():
        block = _valid_utf8(block)
    data: list[bytes] | None = None
    event: str | None = None
    id_: str | None = None
    retry: int | None = None
    comments = False
    garbage = False
    error: str | None = None
    for line in block.splitlines():  # bytes.splitlines: exactly CRLF, CR and LF
        if not line:
            continue  # the terminating blank line, or the LF half of a split CRLF
        name, colon, value = line.partition(b":")
        if colon:
            if not name:
                comments = True
                continue
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            if data is None:
                data = [value]
            else:
                data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id":
            if 0 not in value:
                id_ = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():  # ASCII digits only, false for b""
                try:
                    retry = int(value)
                except ValueError:  # more digits than int() converts: as long a time as any
                    retry = _LONGEST_RETRY
        elif name == b"error" and colon:  # no SSE field: kept, llama.cpp reports failures so
            error = value.decode("utf-8", "replace")
        elif not colon or _TOKEN.fullmatch(name) is None:
            # A field SSE does not define is ignored (WHATWG) when it is written as one, an
            # HTTP token and a colon (a vendor's extension); a line that is no field at all
            # (an HTML page, a status line, binary junk) is garbage
            garbage = True
    text = None if data is None else b"\n".join(data).decode("utf-8", "replace")
    return Event(text, event, id_, retry, block, comments, garbage, error)


class SSEParser:
    """Incremental event-stream parser: ``feed`` chunks, get every completed block.

    The common case (LF line ends, chunks holding whole events) takes a fast path with no
    copy of the chunk and no per-line work for a single ``data: ...`` line.
    """

    __slots__ = (
        "_at_start", "_buf", "_error", "_lead", "_max", "_scan", "_skip_lf", "_strict", "busy"
    )

    def __init__(self, max_event_size: int = 1 << 20, strict: bool = False) -> None:
        """``strict``: a block with a line that is no field line at all (``Event.garbage``:
        an HTML error page in the stream, binary junk) raises ``SSEProtocolError`` with the
        blocks before it, instead of being ignored as WHATWG ignores it. Well-formed
        unknown fields (``x-vendor: ...``) are ignored either way."""
        self._max = max_event_size
        self._strict = strict
        # The unfinished block's raw bytes (BOM already removed): bytes while small, a
        # bytearray once it reaches _BIG (so that many small chunks cost linear time).
        self._buf: bytes | bytearray = b""
        self._lead = 0  # 1 when _buf starts with the LF half of a CRLF split across chunks
        self._scan = 0  # offset in _buf from which a block end may still be found
        self._skip_lf = False  # the last byte seen was a CR that ended a block
        self._at_start = True  # the BOM question is still open
        self._error: str | None = None
        # Any of the above states is set: take the general path. While False, the
        # parser holds nothing from earlier chunks, so a caller that knows what a chunk
        # holds (sidecar.fastlane) may pass it by.
        self.busy = True

    @property
    def max_event_size(self) -> int:
        """The longest block it takes, in bytes (a longer one is an SSEProtocolError)."""
        return self._max

    @property
    def pending(self) -> bytes:
        """The buffered bytes not yet returned in any ``Event.raw``."""
        return bytes(self._buf)

    @property
    def has_partial(self) -> bool:
        """True when bytes of an unfinished block are buffered (a half-received event)."""
        return len(self._buf) > self._lead

    def pending_garbage(self) -> bool:
        """Whether the unfinished block already holds a line no SSE field line can be: a
        whole line `Event.garbage` would flag, or a last line still coming whose name (up to
        its colon, if any) is already not an HTTP token (``<html>...``, binary junk). For a
        stream that ended or failed with such a block held: its framing was broken before
        its end. Not called per read."""
        buf = bytes(self._buf[self._lead :])
        if not buf:
            return False
        last = buf.splitlines(keepends=True)[-1]
        whole, partial = (buf, b"") if last.endswith((b"\r", b"\n")) else (buf[: -len(last)], last)
        if whole and _parse_block(whole).garbage:
            return True
        name = partial.partition(b":")[0]
        return bool(name) and _TOKEN.fullmatch(name) is None

    def close(self) -> list[Event]:
        """End of stream. An unterminated final block is never dispatched (WHATWG), so this
        returns ``[]``; check ``has_partial`` first to learn whether one was dropped."""
        return []

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Event]:
        """Return every block completed by ``chunk``, in order; keep the unfinished rest.

        Raises ``SSEProtocolError`` when a block (complete or not) exceeds
        ``max_event_size`` bytes, and on every call after that.
        """
        if self.busy:
            return self._feed_slow(chunk)
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        n = len(chunk)
        if n <= self._max and 13 not in chunk:
            # The chunk is exactly one "data: X\n\n" event (operators, not method calls:
            # this runs for every token), or exactly one block.
            if chunk[:6] == b"data: " and chunk[-2:] == b"\n\n":
                value = chunk[6:-2]
                if 10 not in value:
                    try:
                        return [Event(value.decode("utf-8"), None, None, None, chunk, False)]
                    except UnicodeDecodeError:
                        pass  # one block all the same: mended the general way below
            if n > 2 and chunk[0] != 10 and chunk.find(b"\n\n") == n - 2:
                events: list[Event] = []
                self._append_block(events, chunk)
                return events
        return self._run(chunk, 0, 0, 0)

    def _feed_slow(self, chunk: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise SSEProtocolError(self._error)
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if not chunk:
            return []
        if self._at_start:
            held, chunk = without_bom(self._buf, chunk)  # type: ignore[arg-type]  # bytes at start
            if held is not None:
                self._buf = held  # maybe a BOM split across chunks: wait
                return []
            self._at_start = False
            self._buf = b""
            # nothing else is held: the stream's first bytes take the fast paths of any
            # chunk (its first event, alone in its read, is made without `_run`)
            self.busy = False
            return self.feed(chunk)
        if self._skip_lf:
            self._skip_lf = False
            lead = 1 if chunk[0] == 10 else 0
            return self._run(chunk, 0, lead, lead)
        buf = self._buf
        if not buf:
            return self._run(chunk, 0, 0, 0)
        p = self._lead
        scan = self._scan
        if len(buf) < _BIG:
            return self._run(buf + chunk, 0, p, scan)  # type: ignore[arg-type]  # bytes below _BIG
        if type(buf) is bytes:
            buf = self._buf = bytearray(buf)
        buf += chunk
        # A partial this large has a first line, so only a line end pair can end it.
        if _BLOCK_END.search(buf, max(p, scan)) is None:
            if len(buf) > self._max:
                self._fail([], f"unfinished event exceeds max_event_size ({self._max} bytes)")
            self._scan = max(p, len(buf) - 3)
            return []
        data = bytes(buf)
        self._buf = b""
        self._lead = 0
        return self._run(data, 0, p, scan)

    def _run(self, data: bytes, a: int, p: int, scan: int) -> list[Event]:
        """Cut complete blocks out of ``data`` (nothing else buffered), starting with the
        block whose raw bytes start at ``a`` and whose lines start at ``p``; ``scan`` is
        where to resume looking for that first block's end."""
        events: list[Event] = []
        append = events.append
        n = len(data)
        mx = self._max
        if 13 not in data:  # LF only: bytes.find, and "data: X\n\n" inline
            find = data.find
            while p < n:
                if data[p] == 10:
                    end = p + 1
                else:
                    i = find(b"\n\n", scan if scan > p else p)
                    if i < 0:
                        break
                    end = i + 2
                    if end - a <= mx and data.startswith(b"data: ", a) and find(10, a + 6) == i:
                        try:
                            value = data[a + 6 : i].decode("utf-8")
                        except UnicodeDecodeError:
                            pass  # mended the general way below
                        else:
                            append(Event(value, None, None, None, data[a:end], False))
                            a = p = end
                            continue
                if end - a > mx:
                    self._fail(events, f"event of {end - a} bytes exceeds max_event_size ({mx})")
                self._append_block(events, data[a:end])
                a = p = end
        else:
            while p < n:
                c = data[p]
                if c == 10:
                    end = p + 1
                elif c == 13:
                    end = p + 2 if p + 1 < n and data[p + 1] == 10 else p + 1
                else:
                    m = _BLOCK_END.search(data, scan if scan > p else p)
                    if m is None:
                        break
                    end = m.end()
                if end - a > mx:
                    self._fail(events, f"event of {end - a} bytes exceeds max_event_size ({mx})")
                self._append_block(events, data[a:end])
                a = p = end
        if a == n:
            # Everything consumed. A lone CR ending the last block may be half a CRLF.
            self._buf = b""
            self._lead = 0
            if n and data[n - 1] == 13:
                self._skip_lf = True
                self.busy = True
            else:
                self.busy = False
            return events
        rest = n - a
        if rest > mx:
            self._fail(events, f"unfinished event exceeds max_event_size ({mx} bytes)")
        self._buf = data[a:]  # no copy when nothing was consumed
        self._lead = p - a
        self._scan = max(p - a, rest - 3)
        self.busy = True
        return events

    def _append_block(self, events: list[Event], block: bytes) -> None:
        event = _parse_block(block)
        if event.garbage and self._strict:
            self._fail(events, "a line of the event stream is not an SSE field line")
        events.append(event)

    def _fail(self, events: list[Event], message: str) -> None:
        self._error = message
        self._buf = b""
        self._lead = 0
        self._skip_lf = False
        self.busy = True
        raise SSEProtocolError(message, events)


def _check_field(name: str, value: str) -> bytes:
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain CR or LF: {value!r}")
    return value.encode("utf-8")


def encode_event(
    data: str | bytes,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Serialize one event: ``event:``, ``id:``, ``retry:`` lines when given, one ``data:``
    line per line of ``data`` (split at CRLF, CR and LF), then the blank line.

    Parsing the result gives back ``data`` with its line ends normalised to ``\\n`` (an SSE
    stream cannot carry a CR inside data), and ``event``/``id``/``retry`` unchanged.
    Raises ``ValueError`` for an ``event`` or ``id`` containing CR or LF, an ``id``
    containing NUL, or a negative ``retry``.
    """
    if type(data) is bytes:
        plain = b"\n" not in data and b"\r" not in data
        if plain and event is None and id is None and retry is None:
            return b"data: " + data + b"\n\n"
        raw = data
    elif isinstance(data, str):
        raw = data.encode("utf-8")
    else:
        raw = bytes(data)
    head = b""
    if event is not None:
        head += b"event: " + _check_field("event", event) + b"\n"
    if id is not None:
        if "\x00" in id:
            raise ValueError("SSE id must not contain NUL")
        head += b"id: " + _check_field("id", id) + b"\n"
    if retry is not None:
        if retry < 0:
            raise ValueError("SSE retry must be >= 0")
        head += b"retry: %d\n" % retry
    if b"\n" not in raw and b"\r" not in raw:
        return head + b"data: " + raw + b"\n\n"
    return head + b"".join(b"data: " + line + b"\n" for line in _LINE_END.split(raw)) + b"\n"


def undispatched_lines(block: bytes) -> bytes:
    """A block with no `data` field (`event: x`, `id: 7`, `retry: 10`, each alone or with
    comments) as lines a client does not take for an event: without its `event` lines and
    its blank line (and without its `data` lines, for a block with data that a dialect
    does not pass on as an event).

    WHATWG dispatches nothing for such a block (its `id` and `retry` take effect, its
    event type is dropped), but the openai and Anthropic SDKs and httpx-sse dispatch it,
    with empty data, which the SDKs fail to parse. Its `id`, `retry` and comment lines are
    kept, with their own line ends, to be read with the next block: the last event ID and
    the retry time come out as WHATWG has them once that block is read."""
    kept = []
    for line in block.splitlines(keepends=True):  # exactly CRLF, CR and LF
        field = line.rstrip(b"\r\n")
        if field and field.partition(b":")[0] not in (b"event", b"data"):
            kept.append(line)
    return b"".join(kept)


def encode_comment(text: str = "keep-alive") -> bytes:
    """Serialize a comment block (``: keep-alive\\n\\n``), one ``: `` line per line of text.

    This is the heartbeat the daemon writes; clients ignore it.
    """
    lines = _STR_LINE_END.split(text)
    return b"".join(b": " + line.encode("utf-8") + b"\n" for line in lines) + b"\n"
