"""Odd and malformed worker responses, sidecar's answer written down case by case (nginx beside it).

Each case is one raw response of a scripted worker (tests/harness.py FakeWorker): framing
(Content-Length and Transfer-Encoding variants, chunk-size lines, trailers, bytes past
the body's end), heads (line ends, folding, control bytes, interim 1xx, odd status
lines, 204/304/HEAD answers that carry a body) and timing (a close right after the
head, `Connection: close` then more bytes). For each, the test states what the client
must get from sidecar (status, body, a clean end or a cut), the ledger outcome, and
what becomes of the worker connection: reused for the next request, or closed. Then a
second request on a new client connection must get exactly the worker's next answer:
no byte of a broken response may reach another client, and no connection holding bytes
nobody asked for goes back to the pool.

Where SPEC says nothing, the expectation follows README; sidecar may be stricter than
nginx (a 502 `upstream_protocol_error` for a head nginx lets through), never looser.

The sidecar expectations run everywhere (CI installs no nginx). When Debian's nginx is
installed (`/usr/sbin/nginx`, as bench/run.py uses it: `proxy_buffering off`, HTTP/1.1
to an upstream keep-alive pool), each case also goes through nginx in front of the same
worker, and nginx's status and ending (observed with nginx 1.22) are checked against
the `nginx` column, so that every place where the two differ is written down here, on
purpose, beside sidecar's reason; and the no-leak check of the second request holds
for nginx too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness import (
    Call,
    Close,
    Daemon,
    Drip,
    FakeWorker,
    Handler,
    RawClient,
    Reset,
    Send,
    Sleep,
    Stall,
    WorkerIO,
    chat_body,
    chat_completion,
    chat_stream_events,
    daemon_config,
    nginx_in_front,
    request_bytes,
    serving,
    sse_payloads,
)

# ============================================================================ the proxies

IDLE = "500ms"  # sidecar's idle_timeout here (nginx's proxy_read_timeout is 1s)


@pytest.fixture(scope="module")
def sidecar(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(daemon_config(
        module_worker.url, upstream={"idle_timeout": IDLE, "response_timeout": "1s"}
    ))


@pytest.fixture(scope="module")
def nginx(module_worker: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int] | None]:
    """nginx in front of the same worker, or None when it is not installed."""
    with nginx_in_front(module_worker.port, tmp_path_factory.mktemp("nginx"),
                        location="proxy_buffering off; proxy_read_timeout 1s;") as address:
        yield address


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    yield from serving(module_worker)


# ============================================================================ observing one case

#: the worker's answer to the request after each case: what the next client must get, whole
NEXT = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nnext"


def head(*lines: str | bytes, eol: bytes = b"\r\n") -> bytes:
    """A response head from its lines (written exactly as given) and the blank line."""
    return b"".join((x.encode("latin-1") if isinstance(x, str) else x) + eol for x in lines) + eol


@dataclass
class Seen:
    """What a client got for one request, and what became of the worker connection."""

    status: int | None  # None: the connection ended before a whole head
    headers: dict[str, str]
    framing: list[tuple[str, str]]  # the head's Content-Length and Transfer-Encoding lines
    body: bytes
    end: str  # "clean": the body's framing ended; "cut": the connection closed first
    reused: bool  # the next request went out on the same worker connection
    closed: bool  # that worker connection is closed (when it was not reused)
    next: tuple[int, bytes] | str  # the next client's answer, or what went wrong

    def error_code(self) -> str | None:
        try:
            return json.loads(self.body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


_ids = itertools.count()


def observe(address: tuple[str, int], worker: FakeWorker, reply: Handler, *,
            method: str = "GET", target: str = "/v1/x", body: dict[str, Any] | None = None,
            request_id: str = "") -> Seen:
    """Send one request answered by `reply`, then one answered by NEXT on a new client
    connection; what each client got and whether the worker connection was reused."""
    worker.reset()
    worker.reply(reply, NEXT)
    headers = [("x-request-id", request_id)] if request_id else []
    with RawClient(address, timeout=5) as client:
        client.send(request_bytes(method, target, body, headers))
        try:
            r = client.read_response(5, head_only_body=method == "HEAD")
            status, hdrs, got = r.status, dict(r.headers), r.body
            framing = [(k, v) for k, v in r.headers if k in ("content-length", "transfer-encoding")]
            end = "clean" if r.complete else ("cut" if client.eof else "stuck")
        except AssertionError:  # no whole head before the close (or in time)
            status, hdrs, got, end = None, {}, bytes(client.buffer), "cut" if client.eof else "stuck"
            framing = []
    nxt: tuple[int, bytes] | str
    with RawClient(address, timeout=5) as client:
        client.send(request_bytes("GET", "/v1/next"))
        try:
            r = client.read_response(5)
            nxt = (r.status, r.body) if r.complete else f"incomplete {r.raw!r}"
        except AssertionError as exc:
            nxt = str(exc)[:300]
    first, second = worker.wait_requests(2)[:2]
    reused = first.connection == second.connection
    conn = worker.connection_of(first)
    closed = reused or worker.wait_until(lambda: conn.peer_closed or conn.closed_by_us, 3)
    return Seen(status, hdrs, framing, got, end, reused, closed, nxt)


# ============================================================================ the cases

OK5 = b"hello"


@dataclass
class Case:
    """One worker answer to a passthrough GET and what sidecar must make of it."""

    id: str
    reply: Handler
    status: int | None  # sidecar's status to the client (None: cut before any head)
    body: bytes | str | None = OK5  # the body the client gets; str: the error body's code
    end: str = "clean"
    reused: bool = True  # the worker connection serves the next request
    outcome: str = "ok"  # the ledger's outcome
    #: nginx's (status, end), if not sidecar's; "skip": not checked (nginx holds the client)
    nginx: tuple[int | None, str] | str | None = None
    method: str = "GET"
    why: str = ""


PROTO = "upstream_protocol_error"
#: what an HTTP/2-only server answers an HTTP/1.1 request with: SETTINGS, then GOAWAY
HTTP2_FRAMES = (b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01")


def send_and_close(data: bytes) -> Callable[[WorkerIO], None]:
    """A step body writing `data` and closing at once (its FIN right behind it, in one go)."""
    def run(io: WorkerIO) -> None:
        transport = io._p.transport
        transport.write(data)
        io.info.closed_by_us = True
        transport.close()
    return run


BIG_HEAD = head("HTTP/1.1 200 OK", "X-A: " + "a" * 20000, "Content-Length: 5")

CASES = [
    # -- framing: Content-Length ---------------------------------------------------------
    Case("cl", head("HTTP/1.1 200 OK", "Content-Length: 5") + OK5, 200),
    Case("cl-and-te", head("HTTP/1.1 200 OK", "Content-Length: 3", "Transfer-Encoding: chunked")
         + b"5\r\nhello\r\n0\r\n\r\n", 200,
         why="RFC 9112 6.3: chunked wins; the length is not forwarded (README)"),
    Case("cl-twice-equal", head("HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 5") + OK5, 200),
    Case("cl-list-equal", head("HTTP/1.1 200 OK", "Content-Length: 5,5") + OK5, 200,
         nginx=(200, "cut"), why="RFC 9110 8.6 allows a list of one repeated value"),
    Case("cl-twice-differ", head("HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 3") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "clean"),
         why="no length to trust: nginx takes the last one"),
    Case("cl-list-differ", head("HTTP/1.1 200 OK", "Content-Length: 5, 3") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "cut")),
    Case("cl-plus", head("HTTP/1.1 200 OK", "Content-Length: +5") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "cut")),
    Case("cl-negative", head("HTTP/1.1 200 OK", "Content-Length: -1") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "cut")),
    Case("cl-hex", head("HTTP/1.1 200 OK", "Content-Length: 0x5") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "cut")),
    Case("cl-overflow", head("HTTP/1.1 200 OK", "Content-Length: 99999999999999999999999") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "cut")),
    Case("cl-spaces", head("HTTP/1.1 200 OK", "Content-Length:   5  ") + OK5, 200),
    Case("cl-leading-zero", head("HTTP/1.1 200 OK", "Content-Length: 05") + OK5, 200),
    Case("cl-body-longer", head("HTTP/1.1 200 OK", "Content-Length: 3") + b"helloEXTRA", 200, b"hel",
         reused=False, why="bytes past the length: the connection is not reused"),
    Case("cl0-then-a-response", head("HTTP/1.1 200 OK", "Content-Length: 0")
         + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG", 200, b"", reused=False),
    Case("cl-close-after-head", [Send(head("HTTP/1.1 200 OK", "Content-Length: 5")), Close()],
         200, b"", end="cut", reused=False, outcome="upstream_error"),
    Case("cl-close-mid-body", [Send(head("HTTP/1.1 200 OK", "Content-Length: 9") + b"hel"), Close()],
         200, b"hel", end="cut", reused=False, outcome="upstream_error"),
    Case("connection-close-then-more",
         [Send(head("HTTP/1.1 200 OK", "Connection: close", "Content-Length: 5") + b"helloMORE"),
          Sleep(0.1), Send(b"EVENMORE"), Close()], 200, reused=False),
    *(Case(f"connection-{name}", head("HTTP/1.1 200 OK", f"Connection: {value}", "Content-Length: 5") + OK5,
           200, reused=False, why="the worker closes after this answer: its connection is not pooled")
      for name, value in [("Close", "Close"), ("list-with-close", "keep-alive, close"),
                          ("close-with-blanks", " close ")]),
    # -- framing: Transfer-Encoding ------------------------------------------------------
    Case("chunked", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n", 200),
    Case("te-Chunked", head("HTTP/1.1 200 OK", "Transfer-Encoding: Chunked")
         + b"5\r\nhello\r\n0\r\n\r\n", 200, why="codings are case-insensitive"),
    Case("te-gzip-chunked", head("HTTP/1.1 200 OK", "Transfer-Encoding: gzip, chunked")
         + b"5\r\nhello\r\n0\r\n\r\n", 502, PROTO, reused=False, outcome="upstream_error",
         nginx=(200, "clean"), why="a transfer coding sidecar cannot undo (nginx passes it on)"),
    Case("te-chunked-identity", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked, identity")
         + b"5\r\nhello\r\n0\r\n\r\n", 502, PROTO, reused=False, outcome="upstream_error",
         nginx=(200, "clean"), why="RFC 9112 6.1: chunked must be the final coding"),
    Case("te-identity", head("HTTP/1.1 200 OK", "Transfer-Encoding: identity") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(200, "cut")),
    Case("te-twice", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked")
         + b"5\r\nhello\r\n0\r\n\r\n", 502, PROTO, reused=False, outcome="upstream_error",
         nginx=(200, "clean"), why="chunked applied twice"),
    Case("te-in-http10", head("HTTP/1.0 200 OK", "Transfer-Encoding: chunked")
         + b"5\r\nhello\r\n0\r\n\r\n", 200, reused=False,
         why="RFC 9112 6.1: read it, then close (faulty framing)"),
    # -- chunk-size lines ------------------------------------------------------------------
    Case("chunk-upper-hex", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"A\r\nhellohello\r\n0\r\n\r\n", 200, b"hellohello"),
    Case("chunk-leading-zeros", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"0005\r\nhello\r\n000\r\n\r\n", 200),
    Case("chunk-ext", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"5;a=b\r\nhello\r\n0;last\r\n\r\n", 200),
    Case("chunk-ext-quoted-semicolon", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b'5;a="x;y"\r\nhello\r\n0\r\n\r\n', 200),
    Case("chunk-space-before-crlf", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"5 \r\nhello\r\n0\r\n\r\n", 200),
    Case("chunk-tab-before-semicolon", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"5\t;a=b\r\nhello\r\n0\r\n\r\n", 200),
    Case("chunk-trailers", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Trailer: X-T")
         + b"5\r\nhello\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n", 200),
    Case("chunk-bytes-after-last", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"5\r\nhello\r\n0\r\n\r\nGARBAGE", 200, reused=False),
    # a broken chunked body, after the head went out: the client's body is cut (a passthrough
    # route has no error frame), and the worker connection closed
    *(Case(f"chunk-{name}", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + data, 200, b"",
           end="cut", reused=False, outcome="upstream_error", nginx=nginx_seen, why=why)
      for name, data, nginx_seen, why in [
          ("size-overflows-64-bits", b"10000000000000005\r\nhello\r\n0\r\n\r\n", (None, "cut"), ""),
          ("size-negative", b"-5\r\nhello\r\n0\r\n\r\n", (None, "cut"), ""),
          ("size-0x", b"0x5\r\nhello\r\n0\r\n\r\n", (None, "cut"), ""),
          ("size-plus", b"+5\r\nhello\r\n0\r\n\r\n", (None, "cut"), ""),
          ("size-empty", b"\r\nhello\r\n0\r\n\r\n", (None, "cut"), ""),
          ("ext-quote-across-crlf", b'5;a="x\r\ny"\r\nhello\r\n0\r\n\r\n', (None, "cut"), ""),
          ("data-without-crlf", b"5\r\nhello0\r\n\r\n", (None, "cut"), ""),
          ("bare-lf-after-size", b"5\nhello\r\n0\r\n\r\n", (200, "clean"),
           "README: a bare LF breaks chunked framing (nginx takes it)"),
          ("bare-lf-after-data", b"5\r\nhello\n0\r\n\r\n", (200, "clean"), "README, as above"),
      ]),
    # a bare LF after the last chunk breaks the framing as it does in a size line: at once,
    # not as the silence after it (idle_timeout), which nginx, taking it as a line end, has none of
    *(Case(f"chunk-bare-lf-{name}", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n"
           + data, 200, end="cut", reused=False, outcome="upstream_error", nginx=(200, "clean"))
      for name, data in [("ending-the-body", b"\n"), ("ending-a-trailer", b"X-T: 1\n\r\n"),
                         ("ending-a-trailer-and-the-body", b"X-T: 1\n\n")]),
    Case("chunk-bare-lf-last-chunk", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"5\r\nhello\r\n0\n\n", 200, end="cut", reused=False, outcome="upstream_error",
         nginx=(200, "clean"), why="README: a bare LF breaks chunked framing"),
    Case("chunk-close-after-head", [Send(head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")), Close()],
         200, b"", end="cut", reused=False, outcome="upstream_error"),
    # -- read until close --------------------------------------------------------------------
    Case("until-close-http11", [Send(head("HTTP/1.1 200 OK")), Send(OK5), Close()], 200, reused=False),
    Case("until-close-http10", [Send(head("HTTP/1.0 200 OK")), Send(OK5), Close()], 200, reused=False),
    Case("until-close-reset", [Send(head("HTTP/1.1 200 OK")), Send(OK5), Reset()], 200, None, end="cut",
         reused=False, outcome="upstream_error", nginx="skip",
         why="a reset is no end: the client's body is cut, not ended"),
    Case("http10-keep-alive", head("HTTP/1.0 200 OK", "Connection: keep-alive", "Content-Length: 5") + OK5,
         200, reused=False, why="sidecar keeps only HTTP/1.1 connections"),
    # -- the head ------------------------------------------------------------------------------
    Case("lf-only-head", head("HTTP/1.1 200 OK", "Content-Length: 5", eol=b"\n") + OK5, 200),
    Case("obs-fold", head("HTTP/1.1 200 OK", "X-A: a", " b", "Content-Length: 5") + OK5, 200,
         nginx=(502, "clean"), why="RFC 9112 5.2: a proxy may replace obs-fold with SP"),
    *(Case(f"head-{name}", head("HTTP/1.1 200 OK", line, "Content-Length: 5") + OK5, 502, PROTO,
           reused=False, outcome="upstream_error")
      for name, line in [("space-before-colon", "X-A : 1"), ("space-before-colon-cl", "Content-Length : 5"),
                         ("nul-in-value", b"X-A: a\x00b"), ("cr-in-value", b"X-A: a\rb")]),
    *(Case(f"head-{name}", head("HTTP/1.1 200 OK", line, "Content-Length: 5") + OK5, 502, PROTO,
           reused=False, outcome="upstream_error", nginx=(200, "clean"), why="RFC 9110 5.1, 5.5")
      for name, line in [("del-in-value", b"X-A: a\x7fb"), ("name-not-a-token", "X(A): 1")]),
    *(Case(f"head-{name}", head("HTTP/1.1 200 OK", line, "Content-Length: 5") + OK5, 502, PROTO,
           reused=False, outcome="upstream_error")
      for name, line in [("empty-name", ": 1"), ("line-without-colon", "XA 1")]),
    *(Case(f"head-{name}", head("HTTP/1.1 200 OK", line, "Content-Length: 5") + OK5, 200)
      for name, line in [("obs-text-in-value", b"X-A: caf\xe9"), ("empty-value", "X-A:"),
                         ("trailing-blanks-in-value", "X-A: 1  \t")]),
    Case("head-mixed-line-ends", b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\n" + OK5, 200),
    Case("status-line-double-space", head("HTTP/1.1  200 OK", "Content-Length: 5") + OK5, 502, PROTO,
         reused=False, outcome="upstream_error", nginx=(200, "clean")),
    Case("status-line-tab", head("HTTP/1.1\t200 OK", "Content-Length: 5") + OK5, 502, PROTO,
         reused=False, outcome="upstream_error", nginx="skip"),
    Case("reason-with-control-byte", head(b"HTTP/1.1 200 O\x01K", "Content-Length: 5") + OK5, 200,
         why="README: the client's status line carries the standard reason phrase"),
    Case("head-6k-header", head("HTTP/1.1 200 OK", "X-A: " + "a" * 6000, "Content-Length: 5") + OK5,
         200, nginx=(502, "clean"), why="nginx's proxy_buffer_size is 4k; sidecar's is max_header_bytes"),
    # a head past max_header_bytes (16 KiB here) is refused however its bytes arrive: in one
    # read as in many (h11 alone limits only a head still incomplete)
    *(Case(f"head-over-max-header-bytes-{name}", reply, 502, PROTO, reused=False,
           outcome="upstream_error", nginx=(502, "clean"))
      for name, reply in [
          ("in-one-write", BIG_HEAD + OK5),
          ("in-two-writes", [Send(BIG_HEAD[:8000]), Sleep(0.05), Send(BIG_HEAD[8000:] + OK5)]),
          ("in-1k-pieces", [Drip(BIG_HEAD + OK5, 1024)]),
      ]),
    Case("100-continue-first", head("HTTP/1.1 100 Continue") + head("HTTP/1.1 200 OK", "Content-Length: 5")
         + OK5, 200, why="README: interim answers are not forwarded"),
    Case("103-early-hints-first", head("HTTP/1.1 103 Early Hints", "Link: </a>; rel=preload")
         + head("HTTP/1.1 200 OK", "Content-Length: 5") + OK5, 200),
    Case("101-without-upgrade", head("HTTP/1.1 101 Switching Protocols", "Connection: upgrade",
                                     "Upgrade: websocket") + OK5,
         502, PROTO, reused=False, outcome="upstream_error", nginx=(None, "cut")),
    Case("status-without-reason", head("HTTP/1.1 200", "Content-Length: 5") + OK5, 200),
    Case("status-099", head("HTTP/1.1 099 X", "Content-Length: 5") + OK5, 502, PROTO, reused=False,
         outcome="upstream_error", nginx=(99, "clean")),
    Case("status-2-digits", head("HTTP/1.1 20 X", "Content-Length: 5") + OK5, 502, PROTO,
         reused=False, outcome="upstream_error", nginx=(20, "clean")),
    Case("status-600", head("HTTP/1.1 600 X", "Content-Length: 5") + OK5, 600,
         outcome="upstream_http_error", why="a worker's non-2xx answer passes through (SPEC)"),
    Case("http-2-status-line", head("HTTP/2 200", "Content-Length: 5") + OK5, 502, PROTO,
         reused=False, outcome="upstream_error", nginx=(200, "clean")),
    Case("http-1.2", head("HTTP/1.2 200 OK", "Content-Length: 5") + OK5, 200, reused=False),
    # -- no HTTP at all: bytes that cannot begin a status line break HTTP framing at once (SPEC's
    # upstream_protocol_error), not a response_timeout later, nor a disconnect when the worker
    # then closes (nginx passes them on as an HTTP/0.9 answer)
    *(Case(f"no-status-line-{name}", reply, 502, PROTO, reused=False, outcome="upstream_error",
           nginx="skip" if name.endswith("-then-close") else (None, "cut"))
      for name, reply in [
          ("html-then-silence", [Send(b"<html>\n<body>Bad Gateway</body>\n</html>\n"), Stall()]),
          ("html-then-close", [Send(b"<html>\n<body>Bad Gateway</body>\n</html>\n"), Close()]),
          ("json-then-silence", [Send(b'{"error": "busy"}'), Stall()]),
          ("word-without-line-end", [Send(b"hello"), Stall()]),
          ("lower-case-http", [Send(b"http/1.1 200 OK\r\nContent-Length: 5\r\n"), Stall()]),
          ("blank-line-first", [Send(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), Stall()]),
          ("http2-frames-then-close", [Send(HTTP2_FRAMES), Close()]),
      ]),
    # a whole head h11 refuses, the worker closing right after it: the head broke HTTP, the
    # close came after (not upstream_disconnected)
    *(Case(f"malformed-head-then-close-{name}{how}", steps, 502, PROTO, reused=False,
           outcome="upstream_error", nginx="skip")
      for name, data in [("header-line-without-colon", b"HTTP/1.1 200 OK\r\nbad line\r\n\r\n"),
                         ("status-099", b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n"),
                         ("two-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
                         ("http2-frames", HTTP2_FRAMES), ("html", b"<html>\n<body>Bad Gateway</body>\n</html>\n")]
      for how, steps in [("", [Send(data), Close()]), ("-in-one-go", [Call(send_and_close(data))])]),
    # -- answers without a body that carry one ----------------------------------------------------
    Case("204-with-length", head("HTTP/1.1 204 No Content", "Content-Length: 5") + OK5, 204, b"",
         reused=False, why="bytes after a bodiless answer: the connection is not reused"),
    Case("204-then-a-response", head("HTTP/1.1 204 No Content")
         + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG", 204, b"", reused=False),
    Case("304-with-length", head("HTTP/1.1 304 Not Modified", "Content-Length: 5") + OK5, 304, b"",
         reused=False, outcome="upstream_http_error"),
    Case("100-then-204-then-bytes", head("HTTP/1.1 100 Continue") + head("HTTP/1.1 204 No Content")
         + OK5, 204, b"", reused=False),
    Case("head-request-clean", head("HTTP/1.1 200 OK", "Content-Length: 5"), 200, b"", method="HEAD"),
    Case("head-request-chunked-clean", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"), 200, b"",
         method="HEAD"),
    Case("head-request-no-framing", head("HTTP/1.1 200 OK"), 200, b"", method="HEAD",
         why="a HEAD answer ends at its head whatever its framing headers say"),
    Case("head-request-with-body", head("HTTP/1.1 200 OK", "Content-Length: 5") + OK5, 200, b"",
         method="HEAD", reused=False, nginx=(200, "clean"),
         why="the worker sent a body a HEAD answer has not: the connection is not reused"),
    Case("head-request-chunked-body", head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
         + b"5\r\nhello\r\n0\r\n\r\n", 200, b"", method="HEAD", reused=False),
]


# the same answers a byte at a time: every boundary of the head and of the chunk framing
# (how much of a body that then breaks gets out, and whether nginx has sent its head by
# then, depends on the reads: not checked; bytes after an answer's end are left out: dripped, they may come after the next
# request took the connection, as they would to nginx)
CASES += [
    Case(f"{c.id}-dripped", [Drip(c.reply)], c.status, None if c.end == "cut" else c.body, c.end, c.reused,
         c.outcome,
         "skip" if c.end == "cut" else c.nginx, c.method, c.why)
    for c in CASES
    if isinstance(c.reply, bytes) and c.id in {
        "cl", "cl-and-te", "chunked", "chunk-upper-hex", "chunk-leading-zeros", "chunk-ext",
        "chunk-ext-quoted-semicolon", "chunk-space-before-crlf", "chunk-trailers",
        "chunk-bare-lf-after-size", "chunk-data-without-crlf", "chunk-size-overflows-64-bits",
        "lf-only-head", "obs-fold", "100-continue-first", "head-space-before-colon",
    }
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_passthrough_gets_what_the_worker_framing_allows(
    case: Case, worker: FakeWorker, sidecar: Daemon, nginx: tuple[str, int] | None
) -> None:
    rid = f"framing-{next(_ids)}"
    seen = observe(sidecar.address, worker, case.reply, method=case.method, request_id=rid)
    note = f"{case.id}: {seen} ({case.why})"
    assert seen.next == (200, b"next"), note  # nothing of this answer reached the next client
    assert (seen.status, seen.end) == (case.status, case.end), note
    # one framing header at most, none on a 204 (README), a plain one
    assert len(seen.framing) <= (0 if seen.status == 204 else 1), note
    if seen.end == "clean" and case.method != "HEAD" and seen.status != 304:
        assert all(v == "chunked" if k == "transfer-encoding" else v.isdigit() and int(v) == len(seen.body)
                   for k, v in seen.framing), note
    if isinstance(case.body, str):
        assert seen.error_code() == case.body, note
    elif case.body is not None:
        assert seen.body == case.body, note
    assert seen.reused == case.reused, note
    assert seen.closed, f"{case.id}: a connection not reused was left open"
    record = sidecar.ledger_for(rid)
    assert record["outcome"] == case.outcome, (note, record)
    if nginx is not None and case.nginx != "skip":
        theirs = observe(nginx, worker, case.reply, method=case.method)
        expected = case.nginx or (case.status, case.end)
        assert (theirs.status, theirs.end) == expected, f"nginx: {theirs} ({case.why})"
        assert theirs.next == (200, b"next"), f"nginx: {theirs}"


# ============================================================================ an openai-chat route

DOC = json.dumps(chat_completion()).encode()
JSON_HEAD = "Content-Type: application/json"
SSE_HEAD = "Content-Type: text/event-stream"
EVENTS = chat_stream_events()  # role, content pieces, finish, usage, [DONE]
STREAM = b"".join(EVENTS)


def chunked(data: bytes, size: str = "%x") -> bytes:
    return (size % len(data)).encode() + b"\r\n" + data + b"\r\n"


@dataclass
class ChatCase:
    """One worker answer to a chat request and what sidecar must make of it."""

    id: str
    reply: Handler
    status: int
    code: str | None = None  # None: the document (or a stream ending in [DONE]); else the error code
    reused: bool = True
    nginx: tuple[int | None, str] | None = None  # nginx's (status, end) for a document's case
    why: str = ""


DOC_CASES = [
    ChatCase("length", head("HTTP/1.1 200 OK", JSON_HEAD, f"Content-Length: {len(DOC)}") + DOC, 200),
    ChatCase("length-short", head("HTTP/1.1 200 OK", JSON_HEAD, f"Content-Length: {len(DOC) - 10}") + DOC,
             502, PROTO, reused=False, nginx=(200, "clean"),
             why="the length cuts the document: what is left is no JSON"),
    ChatCase("length-long-then-close",
             [Send(head("HTTP/1.1 200 OK", JSON_HEAD, f"Content-Length: {len(DOC) + 10}") + DOC), Close()],
             502, "upstream_disconnected", reused=False, nginx=(200, "cut")),
    ChatCase("length-long-then-silence",
             head("HTTP/1.1 200 OK", JSON_HEAD, f"Content-Length: {len(DOC) + 10}") + DOC,
             504, "upstream_timeout", reused=False, nginx=(200, "cut")),
    ChatCase("until-close", [Send(head("HTTP/1.1 200 OK", JSON_HEAD) + DOC), Close()], 200,
             reused=False, nginx=(200, "clean")),
    ChatCase("until-close-http10", [Send(head("HTTP/1.0 200 OK", JSON_HEAD) + DOC), Close()], 200,
             reused=False, nginx=(200, "clean")),
    ChatCase("until-close-cut", [Send(head("HTTP/1.1 200 OK", JSON_HEAD) + DOC[:100]), Close()],
             502, PROTO, reused=False, nginx=(200, "clean"),
             why="the document that came is no JSON (nginx cannot tell)"),
    ChatCase("chunked-upper-hex-ext", head("HTTP/1.1 200 OK", JSON_HEAD, "Transfer-Encoding: chunked")
             + chunked(DOC, "%X;a=b") + b"0\r\n\r\n", 200, nginx=(200, "clean")),
    ChatCase("chunked-trailers", head("HTTP/1.1 200 OK", JSON_HEAD, "Transfer-Encoding: chunked")
             + chunked(DOC) + b"0\r\nX-A: 1\r\n\r\n", 200, nginx=(200, "clean")),
    ChatCase("chunked-and-length", head("HTTP/1.1 200 OK", JSON_HEAD, "Content-Length: 3",
                                        "Transfer-Encoding: chunked") + chunked(DOC) + b"0\r\n\r\n",
             200, nginx=(200, "clean")),
    ChatCase("chunked-bare-lf-after-last-chunk", head("HTTP/1.1 200 OK", JSON_HEAD, "Transfer-Encoding: chunked")
             + chunked(DOC) + b"0\r\n\n", 502, PROTO, reused=False, nginx=(200, "clean"),
             why="not a 504 at idle_timeout: the framing broke when the LF came"),
    ChatCase("chunked-no-last-chunk-close",
             [Send(head("HTTP/1.1 200 OK", JSON_HEAD, "Transfer-Encoding: chunked") + chunked(DOC)), Close()],
             502, "upstream_disconnected", reused=False, nginx=(200, "cut")),
    ChatCase("100-first", head("HTTP/1.1 100 Continue")
             + head("HTTP/1.1 200 OK", JSON_HEAD, f"Content-Length: {len(DOC)}") + DOC, 200,
             nginx=(200, "clean")),
    ChatCase("204", head("HTTP/1.1 204 No Content", JSON_HEAD), 502, PROTO, reused=False,
             nginx=(204, "clean"), why="README: a 2xx that is neither JSON nor SSE"),
    ChatCase("control-byte-in-head", head("HTTP/1.1 200 OK", JSON_HEAD, b"X-A: \x01",
                                          f"Content-Length: {len(DOC)}") + DOC,
             502, PROTO, reused=False, nginx=(200, "clean"), why="README: RFC 9110 5.5"),
]


@pytest.mark.parametrize("case", DOC_CASES, ids=[c.id for c in DOC_CASES])
def test_chat_document_gets_what_the_worker_framing_allows(
    case: ChatCase, worker: FakeWorker, sidecar: Daemon, nginx: tuple[str, int] | None
) -> None:
    rid = f"doc-{next(_ids)}"
    seen = observe(sidecar.address, worker, case.reply, method="POST", target="/v1/chat/completions",
                   body=chat_body(), request_id=rid)
    note = f"{case.id}: {seen} ({case.why})"
    assert seen.next == (200, b"next"), note
    assert (seen.status, seen.end) == (case.status, "clean"), note
    if case.code is None:
        assert json.loads(seen.body)["choices"][0]["message"]["content"] == "Hello!", note
    else:
        assert seen.error_code() == case.code, note
    assert seen.reused == case.reused, note
    assert seen.closed, f"{case.id}: a connection not reused was left open"
    record = sidecar.ledger_for(rid)
    outcome = "ok" if case.code is None else "upstream_timeout" if case.code == "upstream_timeout" \
        else "upstream_error"
    assert (record["outcome"], record["status"]) == (outcome, case.status), (note, record)
    if nginx is not None and case.nginx is not None:
        theirs = observe(nginx, worker, case.reply, method="POST", target="/v1/chat/completions",
                         body=chat_body())
        assert (theirs.status, theirs.end) == case.nginx, f"nginx: {theirs} ({case.why})"
        assert theirs.next == (200, b"next"), f"nginx: {theirs}"


CHUNKED_SSE = head("HTTP/1.1 200 OK", SSE_HEAD, "Transfer-Encoding: chunked")
FIRST = b"".join(chunked(e) for e in EVENTS[:2])  # the role chunk and the first content piece

STREAM_CASES = [
    ChatCase("chunked", CHUNKED_SSE + b"".join(chunked(e) for e in EVENTS) + b"0\r\n\r\n", 200),
    ChatCase("chunked-upper-hex-quoted-ext",
             CHUNKED_SSE + b"".join(chunked(e, '%X;q="a;b"') for e in EVENTS) + b"0\r\n\r\n", 200),
    ChatCase("chunked-trailers", CHUNKED_SSE + b"".join(chunked(e) for e in EVENTS)
             + b"0\r\nX-T: 1\r\n\r\n", 200),
    ChatCase("bare-lf-mid-stream", [Send(CHUNKED_SSE + FIRST), Sleep(0.05), Send(b"5\nhello\r\n"), Stall()],
             200, PROTO, reused=False),
    ChatCase("size-overflow-mid-stream",
             [Send(CHUNKED_SSE + FIRST), Sleep(0.05), Send(b"10000000000000005\r\nhello\r\n"), Stall()],
             200, PROTO, reused=False),
    ChatCase("data-without-crlf-mid-stream",
             [Send(CHUNKED_SSE + FIRST), Sleep(0.05), Send(b"5\r\nhelloXX5\r\nhello\r\n"), Stall()],
             200, PROTO, reused=False),
    ChatCase("close-inside-a-chunk", [Send(CHUNKED_SSE + FIRST + chunked(EVENTS[2])[:20]), Close()],
             200, "upstream_disconnected", reused=False, why="the half event is not forwarded"),
    ChatCase("close-after-a-half-event", [Send(CHUNKED_SSE + FIRST + chunked(EVENTS[2][:20])), Close()],
             200, "upstream_disconnected", reused=False, why="the half event is not forwarded"),
    ChatCase("huge-chunk-then-close", [Send(CHUNKED_SSE + FIRST + b"ffffffff\r\n" + EVENTS[2]), Close()],
             200, "upstream_disconnected", reused=False),
    ChatCase("close-after-head", [Send(CHUNKED_SSE), Close()], 200, "upstream_disconnected", reused=False),
    ChatCase("silence-after-head", [Send(CHUNKED_SSE), Stall()], 200, "upstream_timeout", reused=False),
    ChatCase("silence-after-a-half-event", [Send(CHUNKED_SSE + FIRST + chunked(EVENTS[2][:20])), Stall()],
             200, "upstream_timeout", reused=False, why="the half event is not forwarded"),
    ChatCase("done-then-broken-framing",
             [Send(CHUNKED_SSE + b"".join(chunked(e) for e in EVENTS)), Sleep(0.05), Send(b"zz\r\n"), Stall()],
             200, reused=False, why="README: after [DONE] the stream is whole"),
    ChatCase("done-then-close-without-last-chunk",
             [Send(CHUNKED_SSE + b"".join(chunked(e) for e in EVENTS)), Close()], 200, reused=False),
    ChatCase("until-close-with-done", [Send(head("HTTP/1.1 200 OK", SSE_HEAD) + STREAM), Close()], 200,
             reused=False),
    ChatCase("until-close-without-done",
             [Send(head("HTTP/1.1 200 OK", SSE_HEAD) + b"".join(EVENTS[:-1])), Close()],
             200, "upstream_disconnected", reused=False, why="README: a crash is the likelier"),
    ChatCase("length-long-then-close",
             [Send(head("HTTP/1.1 200 OK", SSE_HEAD, f"Content-Length: {len(STREAM) + 20}") + STREAM), Close()],
             200, reused=False, why="the close came after [DONE]"),
    ChatCase("length-cuts-before-finish",
             head("HTTP/1.1 200 OK", SSE_HEAD, f"Content-Length: {len(b''.join(EVENTS[:3])) + 7}") + STREAM,
             200, "upstream_incomplete", reused=False, why="a clean end with no terminator"),
]


@pytest.mark.parametrize("case", STREAM_CASES, ids=[c.id for c in STREAM_CASES])
def test_chat_stream_gets_what_the_worker_framing_allows(
    case: ChatCase, worker: FakeWorker, sidecar: Daemon
) -> None:
    """The client's stream ends in [DONE] or in SPEC's error frame with the right code, and
    every event it got is whole (a half-received event is dropped, never forwarded)."""
    rid = f"stream-{next(_ids)}"
    seen = observe(sidecar.address, worker, case.reply, method="POST", target="/v1/chat/completions",
                   body=chat_body(stream=True), request_id=rid)
    note = f"{case.id}: {seen} ({case.why})"
    assert seen.next == (200, b"next"), note
    assert (seen.status, seen.end) == (case.status, "clean"), note
    events = [p if p == "[DONE]" else json.loads(p) for p in sse_payloads(seen.body)]
    assert events, note
    last = events[-1]
    if case.code is None:
        assert last == "[DONE]", note
    else:
        assert "[DONE]" not in events, note
        assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}], note
        assert last["error"]["code"] == case.code, note
    assert seen.reused == case.reused, note
    assert seen.closed, f"{case.id}: a connection not reused was left open"
    record = sidecar.ledger_for(rid)
    outcome = "ok" if case.code is None else "upstream_timeout" if case.code == "upstream_timeout" \
        else "upstream_error"
    assert record["outcome"] == outcome, (note, record)


# ============================================================================ an early answer


class EarlyAnswerWorker:
    """Answers a streamed upload (`POST /v1/up`, chunked) as soon as its head is read, with a
    keep-alive 200, then reads the rest of the body as HTTP/1.1 asks and serves the next
    request on the same connection; `answered` is set once the early answer is written."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answered = threading.Event()
        self.connections = 0
        self.bodies: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                request, _, data = data.partition(b"\r\n\r\n")
                if not request.startswith(b"POST /v1/up "):
                    conn.sendall(NEXT)
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                self.answered.set()
                while b"0\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                body, _, data = data.partition(b"0\r\n\r\n")
                self.bodies.append(body)

    def close(self) -> None:
        self.sock.close()


def test_an_early_answer_to_an_upload_waits_for_the_body_and_keeps_the_connection(
    make_daemon: Callable[..., Daemon],
) -> None:
    """A worker that answers a streamed upload before reading it all and stays open (RFC 9112
    9.5 lets it) reads the rest: the answer goes to the client once its body is through
    (README), and the connection, whose request went out whole, serves the next request."""
    worker = EarlyAnswerWorker()
    try:
        daemon = make_daemon(daemon_config(worker.url))
        with RawClient(daemon.address, timeout=5) as client:
            client.send(request_bytes("POST", "/v1/up", None, [("transfer-encoding", "chunked")])
                        + b"5\r\nhello\r\n")
            assert worker.answered.wait(5)
            client.send(b"6\r\n world\r\n0\r\n\r\n")
            response = client.read_response(5)
            assert (response.status, response.body, response.complete) == (200, b"ok", True)
            client.send(request_bytes("GET", "/v1/next"))
            response = client.read_response(5)
            assert (response.status, response.body) == (200, b"next")
        assert worker.bodies == [b"5\r\nhello\r\n6\r\n world\r\n"]
        assert worker.connections == 1
    finally:
        worker.close()
