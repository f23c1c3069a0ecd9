"""Request-head hygiene and header rewriting between client and worker.

Pure functions over bytes: no I/O. h11 accepts some heads that a reverse proxy
must refuse (request smuggling vectors), so `check_raw_head` looks at the raw
bytes before h11 ever sees them; the rest rewrites header lists in both
directions (hop-by-hop headers dropped, the request id carried along).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Final

import h11
from h11._headers import Headers as H11Headers

Header = tuple[bytes, bytes]

#: Headers that describe one connection, not the message (RFC 9110 7.6.1),
#: plus the framing headers the proxy recomputes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
    }
)

_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


_BLANK_LINE = re.compile(rb"\n\r?\n")


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line ending an HTTP head, or -1 if not there yet."""
    match = _BLANK_LINE.search(buffer, start)
    return match.end() if match else -1


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: A request line every check below would pass: an origin-form (or `*`) target
_PLAIN_REQUEST_LINE = _TOKEN + rb" (?:/[^ \r\n#]*|\*) HTTP/[0-9]\.[0-9]\r?\n"
_PLAIN_START: Final = re.compile(_PLAIN_REQUEST_LINE)
#: A head every check below would pass on its own lines: a plain request line and plain
#: `name:value` header lines. One C-level match instead of a loop per line.
_PLAIN_HEAD = re.compile(_PLAIN_REQUEST_LINE + rb"(?:" + _TOKEN + rb":[^\r\n]*\r?\n)*\r?\n")
#: A Host value (RFC 9112 3.2, RFC 3986 3.2.2): an IP literal or a registered name, and an
#: optional port; empty is allowed (a target without authority)
_HOST_VALUE: Final = re.compile(rb"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def check_raw_head(head: bytes) -> str | None:
    """Return why a raw request head must be refused with 400, or None if it is acceptable.

    Refuses what SPEC lists under "The client side": both Content-Length and
    Transfer-Encoding, differing Content-Lengths, a transfer coding other than a
    single `chunked`, obsolete line folding, whitespace before a colon, and
    absolute-form or authority-form targets (including CONNECT); and what RFC 9112 also
    says is no request: a fragment (`#`) in the target, an invalid Host, and
    Transfer-Encoding in an HTTP/1.0 request (framing it must treat as faulty).
    """
    if (
        _PLAIN_HEAD.fullmatch(head)
        and not head.startswith(b"CONNECT ")
        # the common case: only the framing headers and Host are left to look at
        and _plain_framing(head.lower())
    ):
        return None
    return check_head_lines(head)


def _plain_framing(low: bytes) -> bool:
    """Whether the Host, Content-Length and Transfer-Encoding lines of a lower-cased head
    (or of those lines alone, each with the LF before it and after it) pass `check_raw_head`
    as they are: at most one Host, a plain one; no Transfer-Encoding; at most one
    Content-Length, with no list. False sends the head the general way (`check_head_lines`)."""
    host = low.find(b"\nhost:")
    if host >= 0 and (
        not _HOST_VALUE.fullmatch(low[host + 6 : low.find(b"\n", host + 1)].strip(b" \t\r"))
        or low.find(b"\nhost:", host + 1) >= 0  # a second Host: each line is checked
    ):
        return False
    if b"\ntransfer-encoding:" in low:
        return False
    at = low.find(b"\ncontent-length:")
    return at < 0 or (
        low.find(b"\ncontent-length:", at + 1) < 0 and b"," not in low[at : low.find(b"\n", at + 1)]
    )


def check_head_lines(head: bytes) -> str | None:
    """`check_raw_head` line by line: the general path, and the reason for any refusal."""
    lines = head.split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return "malformed request line"
    method, target, version = parts
    if method == b"CONNECT":
        return "CONNECT is not supported: this is a reverse proxy"
    if not target.startswith(b"/") and target != b"*":
        return "absolute-form and authority-form targets are not accepted"
    if b"#" in target:
        return "a fragment (#) is not part of a request target"
    content_lengths: set[bytes] = set()
    transfer_encodings: list[bytes] = []
    for raw_line in lines[1:]:
        line = raw_line.rstrip(b"\r")
        if not line:
            continue
        if line[0] in b" \t":
            return "obsolete line folding is not accepted"
        colon = line.find(b":")
        if colon <= 0:
            return "malformed header line"
        name = line[:colon]
        if not _FIELD_NAME.fullmatch(name):
            return "whitespace or an invalid character in a header name"
        lowered = name.lower()
        value = line[colon + 1 :].strip(b" \t")
        if lowered == b"content-length":
            content_lengths.update(v.strip() for v in value.split(b","))
        elif lowered == b"transfer-encoding":
            transfer_encodings.extend(v.strip().lower() for v in value.split(b","))
        elif lowered == b"host" and not _HOST_VALUE.fullmatch(value):
            return "invalid Host header"
    if len(content_lengths) > 1:
        return "differing Content-Length headers"
    if transfer_encodings:
        if version == b"HTTP/1.0":
            return "Transfer-Encoding in an HTTP/1.0 request"
        if content_lengths:
            return "both Content-Length and Transfer-Encoding"
        if transfer_encodings != [b"chunked"]:
            return "only a single Transfer-Encoding: chunked is accepted"
    return None


def header_list(headers: Sequence[Header]) -> list[Header]:
    """h11's parsed headers as a plain list of (lower-case name, value), read once.

    h11's `Headers` is a Sequence iterated item by item in Python; its `_full_items`
    already holds the lower-cased names, so they are taken from there when present.
    """
    full = getattr(headers, "_full_items", None)
    if full is None:
        return list(headers)
    return [(name, value) for _, name, value in full]


#: Bytes no field value may hold (RFC 9110 5.5: the control characters but HTAB). h11 reads
#: every one of them but NUL, CR and LF; parsers downstream (Node's llhttp: undici, fetch,
#: the Node SDKs) refuse a whole head that carries one.
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


_TOKEN_CHARS = rb"!#$%&'*+.^_`|~0-9A-Za-z-"  # (the - last: no range)
#: What no header line of a response head may hold, whatever follows (RFC 9112 5, RFC 9110
#: 5.5-5.6: lines ended by CRLF or a bare LF): a control character but HTAB, a CR that a
#: byte other than LF follows, and a header name (a token) that ends other than at its colon
#: (`name : value`, `name\r\n`, `:value`) or that does not begin with a token byte (`@a: b`);
#: a line that begins with SP or HTAB is a folded value, which h11 reads
_NOT_IN_HEADER_LINES = re.compile(
    rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r[^\n]|\n(?:[^ \t\r\n" + _TOKEN_CHARS + rb"]|["
    + _TOKEN_CHARS + rb"]+[^:" + _TOKEN_CHARS + rb"])"
)
#: What no status line may hold: what h11 refuses in a reason phrase (NUL, whitespace but SP
#: and HTAB; the other control bytes it reads, and the client gets the standard phrase
#: anyway) and a CR that a byte other than LF follows (CR-only line ends)
_NOT_IN_STATUS_LINE = re.compile(rb"[\x00\x0b\x0c]|\r[^\n]")
_TOKENS = re.compile(rb"[" + _TOKEN_CHARS + rb"]+")
#: `head_read`'s states, what of a read's end the next read is judged with: a few bytes
#: standing for where in its line the head is, never the head's own bytes
HEAD_START = b"s"  # in the status line (`s`, then a CR the line may end with)
_AFTER_CR = b"\r"
_AT_LINE_START = b"\n"
_IN_NAME = b"\nx"  # a header line begun with a name (tokens so far): as if it were `x`


def head_read(state: bytes, data: bytes) -> bytes | None:
    """Judge `data`, the next read of a response head not yet complete, in `state`
    (HEAD_START for a head's first read, then what the read before returned): None when it
    holds what no head may hold (see `_NOT_IN_STATUS_LINE`, `_NOT_IN_HEADER_LINES`), so
    that the head can never be completed into one h11 reads and sidecar serves; else the
    state to judge the next read in. Only `data` is looked at, never the head before it."""
    if state[:1] == b"s":  # still in the status line
        newline = data.find(b"\n")
        line = data if newline < 0 else data[:newline]
        if _NOT_IN_STATUS_LINE.search(state[1:] + line if len(state) > 1 else line):
            return None
        if newline < 0:
            return HEAD_START + _AFTER_CR if line.endswith(b"\r") else HEAD_START
        state, data = b"", data[newline:]  # the header lines, from the status line's LF
    return _header_lines_read(state, data, _NOT_IN_HEADER_LINES)


def _header_lines_read(state: bytes, data: bytes, refused: re.Pattern[bytes]) -> bytes | None:
    """`head_read` and `request_head_read` past the start line: None when `data`, read in
    `state` (b"" in a value, or `_AFTER_CR`, `_AT_LINE_START`, `_IN_NAME`), holds what
    `refused` finds; else the state the read leaves."""
    if not data:
        return state
    if refused.search(state + data if state else data):
        return None
    if data.endswith(b"\r"):
        return _AFTER_CR
    newline = data.rfind(b"\n")
    if newline >= 0:
        tail = data[newline + 1 :]
        if not tail:
            return _AT_LINE_START
    elif state in (_AT_LINE_START, _IN_NAME):
        tail = data
    else:
        return b""
    return _IN_NAME if _TOKENS.fullmatch(tail) else b""


#: What no header line of a request head may hold, whatever follows: what h11 refuses in a
#: line (NUL, VT, FF, a CR that a byte other than LF follows: CR-only line ends) and what
#: `check_raw_head` refuses (a line that begins other than with a token byte: obsolete
#: folding, `:value`, `@a: b`; a name that ends other than at its colon, `name : value`). The
#: other control bytes in a value are read, by h11 as by nginx, when the head comes whole.
_NOT_IN_REQUEST_HEADER_LINES = re.compile(
    rb"[\x00\x0b\x0c]|\r[^\n]|\n(?:[^\r\n" + _TOKEN_CHARS + rb"]|[" + _TOKEN_CHARS + rb"]+[^:"
    + _TOKEN_CHARS + rb"])"
)
#: A request target h11 (VCHAR) and `check_raw_head` (origin-form or `*`, no `#`) take
_TARGET = rb"(?:/[\x21\x22\x24-\x7e]*|\*)"
#: A whole request line as they take it (its LF cut off)
_REQUEST_LINE = re.compile(rb"[" + _TOKEN_CHARS + rb"]+ " + _TARGET + rb" HTTP/[0-9]\.[0-9]\r?")
#: The start of one (any of its first bytes, none at all included): each part, once the
#: one before it is whole, optional; the version's bytes (`HTTP/d.d` and a CR) one by one
_VERSION_START = rb"(?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?"
_REQUEST_LINE_START = re.compile(
    rb"(?:[" + _TOKEN_CHARS + rb"]+(?: (?:" + _TARGET + rb"(?: " + _VERSION_START + rb")?)?)?)?"
)
#: `request_head_read`'s state for a head's first read: in the request line (`r`, then a few
#: bytes standing for what of it came: `G` the method begun, `G ` its space, `G /` or `G *`
#: the target begun, `G / ` and what came of the version)
REQUEST_START = b"r"


def request_head_read(state: bytes, data: bytes) -> bytes | None:
    """Judge `data`, the next read of a client's request head not yet complete, in `state`
    (REQUEST_START for a head's first read, then what the read before returned): None when
    it holds what no request head may hold (a request line that cannot become one h11 and
    `check_raw_head` take, `_NOT_IN_REQUEST_HEADER_LINES`), so that the head can never be
    completed into one sidecar serves; else the state to judge the next read in. Only
    `data` is looked at, never the head before it. A CR at the end of `data` is judged with
    the byte after it, in the next read; empty lines before the request line are skipped
    (RFC 9112 2.2)."""
    while state[:1] == b"r":  # still in the request line
        newline = data.find(b"\n")
        line = state[1:] + (data if newline < 0 else data[:newline])
        if newline < 0:
            if line == b"\r":  # an empty line's CR, before the request line
                return REQUEST_START + line
            return _request_line_state(line) if _REQUEST_LINE_START.fullmatch(line) else None
        if line in (b"", b"\r"):  # an empty line before the request line
            state, data = REQUEST_START, data[newline + 1 :]
        elif _REQUEST_LINE.fullmatch(line):
            state, data = b"", data[newline:]  # the header lines, from the request line's LF
        else:
            return None
    return _header_lines_read(state, data, _NOT_IN_REQUEST_HEADER_LINES)


def _request_line_state(line: bytes) -> bytes:
    """`request_head_read`'s state for `line`, the start of a request line (no LF) that
    `_REQUEST_LINE_START` takes: a few bytes that stand for it (see REQUEST_START)."""
    first = line.find(b" ")
    if first < 0:
        return b"rG" if line else REQUEST_START
    second = line.find(b" ", first + 1)
    if second < 0:  # the target's first byte, if any, stands for it (`/` or `*`)
        return b"rG " + line[first + 1 : first + 2]
    return b"rG / " + line[second + 1 :]


_DIGIT = b"0123456789"
#: What each of a status line's first bytes may be, as h11 reads one: `HTTP/d.d ddd` and then
#: SP (a reason phrase follows) or the line's end
_STATUS_LINE_START = (b"H", b"T", b"T", b"P", b"/", _DIGIT, b".", _DIGIT, b" ",
                      _DIGIT, _DIGIT, _DIGIT, b" \r\n")
#: how many of a head's first bytes `begins_status_line` can judge
STATUS_LINE_START_SIZE = len(_STATUS_LINE_START)


def begins_status_line(start: bytes) -> bool:
    """Whether `start` (a head's first bytes, up to STATUS_LINE_START_SIZE of them) can
    begin a status line h11 reads."""
    return all(byte in allowed for byte, allowed in zip(start, _STATUS_LINE_START, strict=False))


def has_control_byte(headers: Iterable[Header]) -> bool:
    """Whether a header value holds a control byte: such a head is malformed, not written on."""
    return _CONTROL_BYTE.search(b"".join([value for _, value in headers])) is not None


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """Header names listed in `Connection:`; they are hop-by-hop too."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def end_to_end(
    headers: Sequence[Header], *also: bytes, tokens: set[bytes] | None = None
) -> list[Header]:
    """The headers that travel on to the other side: hop-by-hop ones removed, and any
    named in `also` (lower-case). `tokens`: their `connection_tokens`, when the caller
    has them already."""
    extra = connection_tokens(headers) if tokens is None else tokens
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in HOP_BY_HOP and low not in extra and low not in also
    ]


_DROPPED_WITH: dict[tuple[bytes, ...], frozenset[bytes]] = {}


def end_to_end_lines(headers: Sequence[Header], *also: bytes) -> bytes:
    """`end_to_end(headers, *also)` rendered as `name: value` lines, as `split_for_h11`
    renders the headers h11 does not see (none of these is one it sees: those are all
    hop-by-hop), in one pass over `headers` instead of three."""
    dropped = _DROPPED_WITH.get(also)
    if dropped is None:
        dropped = _DROPPED_WITH[also] = HOP_BY_HOP.union(also)
    lines: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low in dropped:
            # a Connection header may name more hop-by-hop headers: then the general way.
            # One naming only headers dropped anyway (`keep-alive`, as the openai SDK and
            # most clients send it) drops nothing more
            if low == b"connection" and not _names_only(value, dropped):
                return b"".join([n + b": " + v + b"\r\n" for n, v in end_to_end(headers, *also)])
            continue
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


def _names_only(connection: bytes, names: frozenset[bytes]) -> bool:
    """Whether every token of a Connection value (as `connection_tokens` reads it) is one
    of `names`."""
    return all(token.strip().lower() in names for token in connection.split(b","))


def header_value(headers: Iterable[Header], name: bytes) -> bytes | None:
    """First value of header `name` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


#: IANA's HTTP content codings, `identity` (no coding) aside: a body with one of them is not
#: the bytes of its content. Other tokens (`utf-8`, a charset sent in the wrong header) name
#: no coding; workers ignore them, and so does the sidecar.
CONTENT_CODINGS = frozenset(
    {b"aes128gcm", b"br", b"compress", b"dcb", b"dcz", b"deflate", b"exi", b"gzip",
     b"pack200-gzip", b"x-compress", b"x-gzip", b"zstd"}
)


def content_codings(headers: Iterable[Header]) -> list[bytes]:
    """The content codings (`CONTENT_CODINGS`, lower-case) a message's `Content-Encoding`
    headers name: an empty list for a body that is its content as it is."""
    return [
        coding
        for name, value in headers
        if name.lower() == b"content-encoding"
        for coding in (part.strip(b" \t").lower() for part in value.split(b","))
        if coding in CONTENT_CODINGS
    ]


_REQUEST_ID_OK = re.compile(rb"[!-~]{1,200}")
# generated ids: 20 random hex digits drawn once per process, then a counter (32 hex
# digits in all, like a uuid4 hex, unique across processes and restarts, no syscall)
_ID_PREFIX = ""
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(10).hex()
    _ID_COUNTER = itertools.count(int.from_bytes(os.urandom(3), "big"))


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # worker processes must not share ids


def request_id_for(given: bytes | None) -> str:
    """`given` (an `x-request-id` value, or None) when it is a sane token, else a fresh id."""
    if given is not None and _REQUEST_ID_OK.fullmatch(given):
        return given.decode("ascii")
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


_RAW_REQUEST_ID = re.compile(rb"\nx-request-id:[ \t]*([^\r\n]*?)[ \t]*\r?\n", re.IGNORECASE)


_RAW_START = re.compile(b"(" + _TOKEN + rb") (/[!-~]*)?")


def raw_method_and_path(head: bytes | bytearray) -> tuple[str, str]:
    """For the access-log line of a refused head: its method when it starts with a token and
    a space, and the path (query cut off) of an origin-form target after that; `-` for
    anything else. Nothing past them is ever shown: a head that breaks the rules may have
    anything where they should be (a tab-separated request line, headers on the first line),
    including a query string or credentials."""
    start = _RAW_START.match(head)
    if start is None:
        return "-", "-"
    path = start.group(2)
    return (
        start.group(1).decode("ascii"),
        "-" if path is None else path.partition(b"?")[0].decode("ascii"),
    )


def raw_request_id(head: bytes | bytearray) -> str:
    """`request_id_for` the `x-request-id` of a raw head h11 has not parsed (a refused or unfinished one)."""
    found = _RAW_REQUEST_ID.search(head)
    return request_id_for(None if found is None else bytes(found.group(1)))


#: The headers h11 acts on when it writes a message head: framing and keep-alive (and a
#: request's `host`, which HTTP/1.1 requires). Every other header h11 would only validate
#: and copy, costing per header on each of its passes, so those are rendered as lines
#: (`split_for_h11`) and spliced in after the start line h11 wrote (`splice_lines`).
H11_RESPONSE_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"connection"))
H11_REQUEST_HEADERS = H11_RESPONSE_HEADERS | {b"host"}


#: The request headers h11 reads on the server side: framing (Content-Length,
#: Transfer-Encoding: `_body_framing`), keep-alive (Connection: `_keep_alive`), 100-continue
#: (Expect: `has_expect_100_continue`), a protocol switch (Upgrade: `_process_event`) and Host
#: (required once in HTTP/1.1, refused twice: `Request.__init__`). Any other header h11 only
#: matches against its header-line regex, lowers and copies.
H11_READS_IN_REQUESTS = (b"host", b"content-length", b"transfer-encoding", b"connection",
                         b"expect", b"upgrade")

#: Header lines h11 takes, each through its LF (`h11._readers`: a line is split off at its
#: LF, one CR before that dropped, and must be a token, `:`, OWS, a value, OWS; the value's
#: bytes are any but NUL and whitespace, with SP and HTAB between them: so what follows the
#: colon is any bytes but NUL, CR, LF, VT and FF). A line that begins with SP or HTAB folds
#: into the one before it, which sidecar leaves to the general way too.
_H11_LINES: Final = re.compile(rb"(?:" + _TOKEN + rb":[^\x00\n\r\x0b\x0c]*\r?\n)*")
_H11_READ_NAMES: Final = frozenset(H11_READS_IN_REQUESTS)
#: Framing lines whose values h11 rewrites: a Transfer-Encoding (lowered), a Content-Length
#: list (`5, 5`: one value) or a second Content-Length (dropped, when it is the same)
_H11_REWRITES = re.compile(
    rb"\n(?i:transfer-encoding:|content-length:[^\n]*,|content-length:(?s:.*)\ncontent-length:)"
)


def read_request_head(head: bytes) -> tuple[list[Header], bytes] | None:
    """A raw request head (through its first blank line, as `ClientConnection.read_head`
    returns it) read into (its headers as h11 would give them: in order, names lower-case,
    values without the optional whitespace around them; the head h11 is to be given: the
    request line and only the header lines h11 reads, `H11_READS_IN_REQUESTS`, as they came).

    h11 given the whole head reads every header line (a regex match, lowering, a tuple, a
    Python-level loop over them all for Host: some 15k instructions a line); here every line
    is matched in one C-level pass (`_H11_LINES`), then split, and h11 still parses the
    request line and the lines it acts on, and refuses what it refused. None when a line is one h11 would
    refuse (a name not a token, a value with NUL, CR, VT, FF, an obsolete line folding, ...):
    then h11 is to be given the whole head, and refuses it as it always did, with the same
    message.
    """
    lines = _header_lines(head)
    return None if lines is None else _read_lines(head, lines)


def check_and_read_request_head(head: bytes) -> tuple[str | None, tuple[list[Header], bytes] | None]:
    """(`check_raw_head(head)`; when that is None, `read_request_head(head)`), in one pass
    over the head's lines where the two would each make one.

    The common head passes `check_raw_head` on what `read_request_head` finds anyway: when
    every header line is one h11 takes (`name:value`, no CR or LF inside), the request line
    is a plain one and the Host and framing lines, which are among the lines h11 reads, are
    plain too (`_HeadLines.plain`), nothing is left to look at. Any other head is checked
    by `check_raw_head` itself, so every refusal and its reason stay its own.
    """
    lines = _header_lines(head)
    if (
        lines is None
        or not lines.plain
        or not _PLAIN_START.match(head)
        or head.startswith(b"CONNECT ")
    ):
        problem = check_raw_head(head)
        if problem is not None:
            return problem, None
        if lines is None:
            return None, None
    return None, _read_lines(head, lines)


class _HeadLines:
    """A request head's header lines as `_header_lines` read them."""

    __slots__ = ("at", "framing", "headers", "plain")

    def __init__(self, at: int, headers: list[Header], framing: bytes, plain: bool) -> None:
        self.at = at  # the request line's LF: h11 reads that line itself
        self.headers = headers  # (lower-case name, value), as h11 gives them
        self.framing = framing  # the lines h11 reads, each with the LF before it, joined
        #: at most one Host line, with a plain value (`_HOST_VALUE`); no Transfer-Encoding;
        #: at most one Content-Length line, holding no list: as `_plain_framing` takes them
        self.plain = plain


def _header_lines(head: bytes) -> _HeadLines | None:
    """The header lines of a head as h11 reads them, or None when h11 refuses one of them
    (see `_H11_LINES`): one C-level match for them all, then a split, a lowering and a strip
    per line."""
    at = head.find(b"\n")
    last = head.rfind(b"\n", 0, -1)  # the last header line's LF (or the request line's)
    headers: list[Header] = []
    framing: list[bytes] = []
    plain = True
    if last > at:
        if _H11_LINES.fullmatch(head, at + 1, last + 1) is None:
            return None
        hosts = lengths = 0
        for line in head[at + 1 : last].split(b"\n"):
            name, _, value = line.partition(b":")
            # (OWS and the CR h11 drops: the value itself holds no CR)
            value = value.strip(b" \t\r")
            low = name.lower()
            headers.append((low, value))
            if low in _H11_READ_NAMES:
                framing.append(b"\n" + line)
                if low == b"host":
                    hosts += 1
                    plain = plain and hosts == 1 and _HOST_VALUE.fullmatch(value) is not None
                elif low == b"content-length":
                    lengths += 1
                    plain = plain and lengths == 1 and b"," not in value
                elif low == b"transfer-encoding":
                    plain = False
    return _HeadLines(at, headers, b"".join(framing), plain)


def _read_lines(head: bytes, lines: _HeadLines) -> tuple[list[Header], bytes]:
    """`read_request_head` for a head whose every header line h11 takes."""
    headers, framing = lines.headers, lines.framing
    if not lines.plain and _H11_REWRITES.search(framing):
        headers = _as_h11_gives(headers)
    # the last header line's LF and the blank line
    return headers, head[: lines.at] + framing + head[head.rfind(b"\n", 0, -1) :]


def _as_h11_gives(headers: list[Header]) -> list[Header]:
    """`headers` with the framing values h11 rewrites rewritten as it does
    (`h11._headers.normalize_and_validate`), for a head h11 accepts: a Content-Length
    list's one value (h11 refuses differing ones), only the first Content-Length (h11
    drops a second one with the same value, refuses another), Transfer-Encoding lowered."""
    rewritten: list[Header] = []
    seen_length = False
    for name, value in headers:
        if name == b"content-length":
            if seen_length:
                continue
            seen_length = True
            value = value.split(b",")[0].strip()
        elif name == b"transfer-encoding":
            value = value.lower()
        rewritten.append((name, value))
    return rewritten


def split_for_h11(
    headers: Iterable[Header], h11_names: frozenset[bytes]
) -> tuple[H11Headers, bytes]:
    """(the headers named in `h11_names`, every other header rendered as `name: value` lines).

    The names and values came out of h11's parser or are the sidecar's own constants, so
    they are written as they are. The first part is h11's own `Headers`, which an h11 event
    takes as it is: given a list, even with `_parsed=True`, h11 would normalize it again
    (a Content-Length split at commas, gathered in a set and matched by a regex).
    """
    for_h11: list[tuple[bytes, bytes, bytes]] = []
    lines: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low in h11_names:
            for_h11.append((name, low, value))
        else:
            lines.append(name + b": " + value + b"\r\n")
    return H11Headers(for_h11), b"".join(lines)


def h11_headers(headers: Iterable[Header]) -> H11Headers:
    """Framing headers with lower-case names (the sidecar's own, or values h11 parsed) as
    h11's `Headers`, taken as they are (see `split_for_h11`)."""
    return H11Headers([(name, name, value) for name, value in headers])


_new_event = object.__new__
_set_field = object.__setattr__


def request_event(method: bytes, target: bytes, headers: H11Headers) -> h11.Request:
    """`h11.Request(method=method, target=target, headers=headers, _parsed=True)` without
    its `__init__`, which checks again what is checked already: `method` and `target` came
    out of h11's parser (the client's request line), `headers` are the sidecar's own framing
    with one Host (`h11_headers`). Those checks (a Python-level loop over the headers for
    Host, two regex matches, keyword-argument calls) cost ~20k instructions a request; h11
    then writes the event as any other. (h11's events are frozen dataclasses with slots, the
    same in 0.14-0.16, as pinned.)"""
    event: h11.Request = _new_event(h11.Request)
    _set_field(event, "method", method)
    _set_field(event, "target", target)
    _set_field(event, "headers", headers)
    _set_field(event, "http_version", b"1.1")
    return event


def response_event(status: int, headers: H11Headers) -> h11.Response:
    """`h11.Response(status_code=status, headers=headers, reason=reason(status),
    _parsed=True)` without its `__init__` (see `request_event`): `status` is a worker's, which
    h11 parsed as a final response's (200-999), or the sidecar's own and `headers` come from
    `split_for_h11`."""
    event: h11.Response = _new_event(h11.Response)
    _set_field(event, "status_code", status)
    _set_field(event, "headers", headers)
    _set_field(event, "reason", reason(status))
    _set_field(event, "http_version", b"1.1")
    return event


def data_event(data: bytes | bytearray) -> h11.Data:
    """`h11.Data(data=data)` without its `__init__`'s keyword-argument call (see
    `request_event`)."""
    event: h11.Data = _new_event(h11.Data)
    _set_field(event, "data", data)
    _set_field(event, "chunk_start", False)
    _set_field(event, "chunk_end", False)
    return event


def splice_lines(head: bytes, lines: bytes) -> bytes:
    """A message head as h11 wrote it, with header `lines` inserted after its start line."""
    if not lines:
        return head
    at = head.find(b"\r\n") + 2
    return head[:at] + lines + head[at:]


def without(headers: Iterable[Header], *names: bytes) -> list[Header]:
    """`headers` minus every header named in `names` (lower-case)."""
    return [(k, v) for k, v in headers if k.lower() not in names]


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason(status: int) -> bytes:
    """The standard reason phrase for `status` (h11 sends none unless told)."""
    return _REASONS.get(status, b"")


def simple_response(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    request_id: str | None = None,
) -> bytes:
    """A complete `Connection: close` response, for answers given outside any h11 exchange."""
    phrase = _REASONS.get(status, b"Error")
    id_line = b"" if request_id is None else b"x-request-id: %s\r\n" % request_id.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
        % (status, phrase, content_type, len(body), id_line)
        + body
    )
