"""`read_request_head`: h11 given only the header lines it acts on reads a request exactly as
it read the whole head.

serve_connection gives h11 the request line and the framing lines (`H11_READS_IN_REQUESTS`)
of a head whose every other line h11 would take, and keeps the full header list itself; any
other head goes to h11 whole, as before. The guard: over heads from a hostile alphabet, the
reduced head and the whole one are read by h11 the same (accepted or refused with the same
message; method, target, version, body framing, keep-alive, 100-continue, upgrade), and the
list is the one h11 gives for the whole head.
"""

from __future__ import annotations

import h11
import pytest
from h11._connection import _body_framing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.headers import (
    H11_READS_IN_REQUESTS,
    REQUEST_START,
    check_and_read_request_head,
    check_raw_head,
    end_to_end,
    end_to_end_lines,
    find_head_end,
    header_list,
    read_request_head,
    request_head_read,
)


def h11_reads(data: bytes) -> tuple[object, ...]:
    """What h11 (server side) makes of a request head: the request and the state it leaves,
    or its refusal."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return ("refused", str(exc), exc.error_status_hint)
    if not isinstance(event, h11.Request):
        return ("no request", repr(event))
    return (
        "request",
        event.method,
        event.target,
        event.http_version,
        _body_framing(event.method, event),  # ("content-length", (n,)), ("chunked", ()), ...
        conn._cstate.keep_alive,
        conn.they_are_waiting_for_100_continue,
        frozenset(conn._cstate.pending_switch_proposals),
        conn.their_state,
        conn.our_state,
        header_list(event.headers),
    )


def check(head: bytes) -> None:
    whole = h11_reads(head)
    read = read_request_head(head)
    if read is None:
        # the whole head goes to h11 (as before): only for one h11 or check_raw_head refuses
        assert whole[0] == "refused" or check_raw_head(head) is not None, (head, whole)
        return
    headers, reduced = read
    given_h11 = h11_reads(reduced)
    if whole[0] == "refused":
        assert given_h11 == whole, (head, reduced)
        return
    assert given_h11[:-1] == whole[:-1], (head, reduced)  # all but the header list
    assert headers == whole[-1], (head, headers)
    # h11 is given the request line and every line it reads, as it came, and no other
    lines = head.split(b"\n")
    kept = [
        line for line in lines[1:-2]
        if line.partition(b":")[0].lower() in H11_READS_IN_REQUESTS
    ]
    assert reduced == b"\n".join([lines[0], *kept, *lines[-2:]])


#: names h11 takes: the ones it reads, in any case, and others it only copies
READ_NAMES = [
    b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"CONTENT-LENGTH",
    b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-encoding", b"Connection",
    b"connection", b"Expect", b"EXPECT", b"Upgrade", b"upgrade",
]
COPIED_NAMES = [
    b"Content-Type", b"Accept", b"Authorization", b"X-Request-Id", b"x-stainless-os",
    b"Keep-Alive", b"TE", b"Hostx", b"X-Host", b"Content-Lengths", b"!#$%&'*+-.^_`|~",
]
NAMES = READ_NAMES + COPIED_NAMES
name = st.one_of(*[st.sampled_from(COPIED_NAMES)] * 3, st.sampled_from(READ_NAMES))
#: names h11 refuses
BAD_NAMES = [b"Host ", b" Host", b"Content-Length\t", b"Hos\x00t", b"X\x80", b"a@b", b"", b"x y"]
VALUES = [
    b"", b"a", b"5", b"0", b"12", b"5, 5", b"5,5", b"5, 6", b",5", b"5,", b" 5 ", b"05",
    b"chunked", b"Chunked", b"CHUNKED", b"gzip, chunked", b"close", b"Close", b"keep-alive",
    b"Keep-Alive, Upgrade", b"upgrade", b"h2c", b"websocket", b"100-continue",
    b"100-Continue", b"x.example", b"127.0.0.1:8080", b"[::1]:80", b"Bearer sk-abc",
]
#: bytes h11 takes inside a value (obs-text, most control bytes) and bytes it refuses
TAKEN = [b" ", b"\t", b" \t", b"\x01", b"\x08", b"\x1f", b"\x7f", b"\x80", b"\xa0", b"\xff",
         b",", b":", b"a", b"Z", b"9", b";", b"\"", b"\\"]
REFUSED = [b"\x00", b"\x0b", b"\x0c", b"\r", b"\n\t"]
taken = st.lists(st.sampled_from(TAKEN), max_size=3).map(b"".join)
hostile = st.lists(st.sampled_from(TAKEN + REFUSED), min_size=1, max_size=3).map(b"".join)
value = st.one_of(
    st.sampled_from(VALUES),
    st.tuples(taken, st.sampled_from(VALUES), taken).map(b"".join),
)
ows = st.sampled_from([b"", b"", b" ", b"\t", b"  ", b" \t "])
eol = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
good_line = st.tuples(name, st.just(b":"), ows, value, ows, eol).map(b"".join)
bad_line = st.one_of(
    st.tuples(st.sampled_from(BAD_NAMES), st.just(b":"), ows, value, eol).map(b"".join),
    st.tuples(st.sampled_from(NAMES), st.just(b":"), ows, value, hostile, value, eol).map(
        b"".join
    ),
    # obsolete line folding: a line that starts with whitespace
    st.tuples(st.sampled_from([b" ", b"\t"]), value, eol).map(b"".join),
    # no colon at all, or an odd line end
    st.tuples(st.sampled_from(NAMES), value, st.sampled_from([b"\r\r\n", b"\n", b"\r\n"])).map(
        b"".join
    ),
)
good_request_line = st.tuples(
    st.sampled_from([b"POST", b"GET", b"HEAD", b"OPTIONS"]),
    st.sampled_from([b" / ", b" /v1/chat/completions?x=1 ", b" * "]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    eol,
).map(b"".join)
bad_request_line = st.tuples(
    st.sampled_from([b"POST", b"G\x00T", b"PUT"]),
    st.sampled_from([b" / ", b"  / ", b" /\x01 "]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.2", b"HTTP/2.0"]),
    eol,
).map(b"".join)


def mostly(good: st.SearchStrategy[bytes], bad: st.SearchStrategy[bytes], one_in: int):
    """`good`, and `bad` about once in `one_in` draws."""
    return st.tuples(st.integers(1, one_in), good, bad).map(lambda t: t[2] if t[0] == 1 else t[1])


request_line = mostly(good_request_line, bad_request_line, 10)
header_line = mostly(good_line, bad_line, 25)


@settings(max_examples=3000, deadline=None)
@given(request_line, st.booleans(), st.lists(header_line, max_size=10), eol)
@example(b"POST / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"Content-Length: 5, 5\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"content-length: 5\r\n", b"Content-Length:5\n"],
         b"\r\n")
@example(b"POST / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"Content-Length: 5\r\n",
                                  b"Content-Length: 6\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\n", False, [b"Host: a\n", b"Transfer-Encoding: Chunked\n"], b"\n")
@example(b"POST / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"Transfer-Encoding: chunked\r\n",
                                  b"transfer-encoding: chunked\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"Expect: 100-continue\r\n",
                                  b"Content-Length: 3\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"Connection: Upgrade\r\n",
                                 b"Upgrade: websocket\r\n"], b"\r\n")
@example(b"GET / HTTP/1.0\r\n", False, [b"Connection: keep-alive\r\n"], b"\r\n")
@example(b"GET / HTTP/1.0\r\n", False, [], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"X: a\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"host: b\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: \t a \x80\xff b\t \r\n", b"Y:\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: a\x00\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: a\x0bb\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: a\rb\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: a\r\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: a\x01\x7f\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X : a\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"X: a\r\n", b" b\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", False, [b"Host: a\r\n", b"\r\r\n"], b"\r\n")
def test_h11_given_the_lines_it_acts_on_reads_the_request_as_from_the_whole_head(
    start: bytes, host: bool, lines: list[bytes], blank: bytes
) -> None:
    raw = start + b"Host: a\r\n" * host + b"".join(lines) + blank
    # as ClientConnection.read_head hands it on: through the first blank line
    end = find_head_end(raw)
    assert end > 0
    check(raw[:end])


def test_the_openai_sdk_head_gives_h11_the_host_connection_and_length_lines() -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
        b"Accept: application/json\r\nContent-Type: application/json\r\n"
        b"User-Agent: OpenAI/Python 1.54.4\r\nX-Stainless-Lang: python\r\n"
        b"Authorization: Bearer sk-x\r\nx-stainless-retry-count: 0\r\n"
        b"Content-Length: 112\r\n\r\n"
    )
    check(head)
    read = read_request_head(head)
    assert read is not None
    headers, reduced = read
    assert reduced == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Connection: keep-alive\r\nContent-Length: 112\r\n\r\n"
    )
    assert headers[0] == (b"host", b"127.0.0.1:8080")
    assert headers[5] == (b"user-agent", b"OpenAI/Python 1.54.4")
    assert len(headers) == 10


def test_a_line_h11_refuses_sends_the_whole_head_to_h11() -> None:
    for line in (b"X: a\x00b", b"X: a\rb", b"X : a", b"X\x80: a", b": a", b"X", b" folded"):
        head = b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n"
        assert read_request_head(head) is None, line
        check(head)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"connection", b"host", b"x-a", b"keep-alive", b"te", b"close",
                             b"accept-encoding", b"x-request-id", b"cookie", b"upgrade", b""]),
            st.sampled_from([b"keep-alive", b"Keep-Alive", b" keep-alive ", b"keep-alive,",
                             b"close", b"x-a", b"keep-alive, x-a", b"TE, Upgrade", b"cookie",
                             b"accept-encoding", b"", b"1"]),
        ),
        max_size=8,
    ),
    st.sampled_from([(), (b"x-request-id",), (b"x-request-id", b"accept-encoding")]),
)
def test_the_worker_head_drops_what_connection_names_past_a_keep_alive(
    headers: list[tuple[bytes, bytes]], also: tuple[bytes, ...]
) -> None:
    """end_to_end_lines keeps to its one pass when Connection names only headers dropped
    anyway (the SDK's `keep-alive`): the same lines as the general way."""
    general = b"".join([n + b": " + v + b"\r\n" for n, v in end_to_end(headers, *also)])
    assert end_to_end_lines(headers, *also) == general


#: request lines check_raw_head refuses, or sends its own general way
checked_request_line = st.one_of(
    request_line,
    st.tuples(
        st.sampled_from([b"POST", b"GET", b"CONNECT", b"connect", b"CONNECTX"]),
        st.sampled_from([b" / ", b" * ", b" /a#b ", b" http://x/ ", b" x.example:443 ",
                         b" /a b ", b" "]),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/11"]),
        st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b" \r\n"]),
    ).map(b"".join),
)
#: Host values check_raw_head takes and refuses
host_value = st.sampled_from([b"a", b"", b"x.example:8080", b"[::1]:80", b"a b", b"a/b",
                              b"a@b", b"[::1", b"A.Example", b"a:b:c", b"%41"])
framing_line = st.tuples(
    st.sampled_from([b"Host", b"host", b"HOST", b"Content-Length", b"content-length",
                     b"Transfer-Encoding", b"transfer-encoding"]),
    st.just(b":"), ows, st.one_of(host_value, st.sampled_from(VALUES)), ows, eol,
).map(b"".join)
checked_header_line = st.one_of(header_line, framing_line)


@settings(max_examples=3000, deadline=None)
@given(checked_request_line, st.lists(checked_header_line, max_size=8), eol)
@example(b"CONNECT x.example:443 HTTP/1.1\r\n", [b"Host: x.example\r\n"], b"\r\n")
@example(b"GET /a#b HTTP/1.1\r\n", [b"Host: a\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", [b"Host: a b\r\n"], b"\r\n")
@example(b"GET / HTTP/1.1\r\n", [b"Host: a\r\n", b"Host: a\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b"Content-Length: 5\r\n", b"Content-Length: 5\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b"Content-Length: 5, 5\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b"Content-Length: 5,\n"], b"\n")
@example(b"POST / HTTP/1.0\r\n", [b"Transfer-Encoding: chunked\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n"],
         b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b"Host: a\r\n", b"X: a\x0bb\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b"Host : a\r\n"], b"\r\n")
@example(b"POST / HTTP/1.1\r\n", [b" Host: a\r\n"], b"\r\n")
def test_one_pass_checks_and_reads_a_head_as_check_raw_head_then_read_request_head(
    start: bytes, lines: list[bytes], blank: bytes
) -> None:
    """check_and_read_request_head (serve_connection's one pass) refuses what check_raw_head
    refuses, with its reason, and reads what it takes as read_request_head does."""
    raw = start + b"".join(lines) + blank
    end = find_head_end(raw)
    assert end > 0
    head = raw[:end]
    problem = check_raw_head(head)
    assert check_and_read_request_head(head) == (
        problem, read_request_head(head) if problem is None else None
    ), head


# ------------------------------------------------------------------ a client's head in pieces


def served_whole(head: bytes) -> bool:
    """Whether serve_connection serves `head` (through its blank line) when it comes whole:
    check_and_read_request_head takes it and h11 reads a request from what it is given."""
    problem, read = check_and_read_request_head(head)
    return problem is None and h11_reads(head if read is None else read[1])[0] == "request"


def read_in_pieces(stream: bytes, cuts: list[int]) -> tuple[str, bytes | int | None]:
    """What ClientConnection.read_head makes of `stream` arriving in the reads `cuts` make
    of it: ("head", the head) when one completes, ("refused", the end of the read that
    request_head_read refused), or ("waiting", None). Each read the head is not complete
    after is judged as it arrives (the new bytes only), empty lines before the request line
    are dropped and the head starts afresh after them, as read_head does."""
    buffer = bytearray()
    state: bytes | None = REQUEST_START
    scanned = start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut <= start:
            continue
        buffer += stream[start:cut]
        start = cut
        if buffer and buffer[0] in b"\r\n":
            while buffer[:1] == b"\n" or buffer[:2] == b"\r\n":
                del buffer[: 1 if buffer[:1] == b"\n" else 2]
            scanned, state = 0, REQUEST_START
        if not buffer:
            continue
        end = find_head_end(buffer)
        if end >= 0:
            return "head", bytes(buffer[:end])
        assert state is not None
        state = request_head_read(state, bytes(buffer[scanned:]))
        if state is None:
            return "refused", cut
        assert len(state) <= 16  # a few bytes standing for where the head is, never the head
        scanned = len(buffer)
    return "waiting", None


def before_the_head_ends(stream: bytes) -> bytes:
    """`stream` up to the byte that completes its first head (all of it if none does)."""
    outcome, head = read_in_pieces(stream, [])
    if outcome != "head":
        return stream
    assert isinstance(head, bytes)
    return stream[: stream.index(head) + len(head) - 1]


#: request lines and header lines, valid ones and ones broken anywhere, and arbitrary bytes
any_request_line = st.one_of(checked_request_line, bad_request_line, st.binary(max_size=12),
                             st.sampled_from([b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r",
                                              b"GET /\x00 HTTP/1.1\r\n", b"GET\x01 / HTTP/1.1\n"]))
any_header_line = st.one_of(checked_header_line, bad_line, st.binary(max_size=8),
                            st.sampled_from([b"X: a\r", b"X: a\rb\r\n", b"\x00", b"X:\x00\r\n",
                                             b"@x: a\r\n", b"X-A: a\x01\x7f\x1f\r\n"]))


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([b"", b"\r\n", b"\n", b"\r\n\r\n"]), any_request_line,
       st.lists(any_header_line, max_size=6), eol, st.integers(min_value=0, max_value=200))
@example(b"", b"GET / HTTP/1.1\r", [b"Host: x\r", b"\r"], b"", 3)
@example(b"\r\n", b"GET / HTTP/1.1\n", [b"X: a\r"], b"\n", 20)
@example(b"", b"GET * HTTP/1.0\r\n", [b"X-A: \x01\r\n"], b"\r\n", 5)
@example(b"\r\n", b"\r", [], b"", 1)
def test_a_client_head_is_refused_in_pieces_only_when_never_served(
    leading: bytes, start: bytes, lines: list[bytes], blank: bytes, cut: int
) -> None:
    """request_head_read, judging each read of a head not yet complete, refuses a head
    whichever reads bring it (one, two cut anywhere, a byte per read), or none of them: it
    looks at the new bytes only, and what it judges is the same as for the head whole. And
    it never refuses a head that, come whole, is served."""
    stream = leading + start + b"".join(lines) + blank
    pre = before_the_head_ends(stream)
    bytewise = read_in_pieces(pre, list(range(1, len(pre) + 1)))
    refused = bytewise[0] == "refused"
    assert (read_in_pieces(pre, [])[0] == "refused") is refused, stream
    assert (read_in_pieces(pre, [cut])[0] == "refused") is refused, (stream, cut)
    outcome, head = read_in_pieces(stream, [])
    if refused and outcome == "head":
        assert isinstance(head, bytes)
        assert not served_whole(head), (stream, bytewise)


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\rHost: x\r\r",  # CR-only line ends
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\rc",
    b"GET /\x00 HTTP/1.1\r\n",
    b"GET /\x80 HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nX-A: a\r\r",
    b"G\x00T / HTTP/1.1\r\n",
    b"GET / HTTP/1.1\x00",
    b"GET / HTTP/1.1\r\nX-A: a\x00",
    b"GET / HTTP/1.1\r\nX-A: a\x0b",
    b"GET / HTTP/1.1\r\nX\x01: a",
    b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"GET  / HTTP/1.1",
    b"GET http://x/ HTTP/1.1",
    b"GET /a#b HTTP/1.1",
    b"GET / HTTP/1.1 \r\n",
    b"GET / http/1.1\r\n",
    b"GET / HTTP/1.10\r\n",
    b"GET * x",
    b"GET / HTTP/1.1\r\n folded: a",
    b"GET / HTTP/1.1\r\nX-A : b",
    b"GET / HTTP/1.1\r\n: b",
    b"GET / HTTP/1.1\r\nX-A\r\n",
    b"GET / HTTP/1.1\r\n@a: b",
    b"\r\rGET / HTTP/1.1",
])
def test_a_client_head_that_can_never_be_valid_is_refused_whichever_reads_bring_it(
    head: bytes
) -> None:
    """...at the latest with the read that brings the byte that breaks it (one read, two,
    or a byte per read), never waiting for a blank line (or a timeout)."""
    for cut in range(1, len(head) + 1):
        assert read_in_pieces(head, [cut])[0] == "refused", cut
    assert read_in_pieces(head, list(range(1, len(head) + 1)))[0] == "refused"


@pytest.mark.parametrize("head", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.0\nX-A:b\n\n",  # bare LF line ends
    b"\r\n\nGET * HTTP/1.1\r\nhost: x\r\n\r\n",  # empty lines before the request line
    b"GET /a?b=%2F&c HTTP/1.1\r\nX-A: \t\x01\x7f\x80\xff c \t\r\nhost:\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_a_client_head_served_whole_is_never_refused_in_pieces(head: bytes) -> None:
    assert served_whole(head.lstrip(b"\r\n"))
    for cut in range(len(head) + 1):
        assert read_in_pieces(head, [cut])[0] == "head", cut
    assert read_in_pieces(head, list(range(1, len(head) + 1)))[0] == "head"
