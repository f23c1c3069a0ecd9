"""Request framing, differentially: the same raw bytes to sidecar and to nginx (SPEC "The client side").

sidecar often sits behind a client-facing server. A request that the front
server and sidecar split into different requests (other boundaries, other
body bytes) is a smuggling hole. Each case below is a request (or a few,
pipelined) as raw bytes, sent on a raw socket to the real daemon through a
`passthrough` route and an `openai-chat` route, both in front of the fake
worker, which records exactly the requests it receives. Each case states what
sidecar must do, so the test runs without nginx:

- `refused(status)`: that status with the error body, the connection closed,
  nothing reaches the worker (SPEC's list of refused heads, and bodies whose
  chunked framing no strict RFC 9112 reader accepts);
- `served(*requests)`: one 2xx answer per request, and the worker gets exactly
  these requests (method, target, body bytes), no more, in order.

Where nginx is installed (Debian's package; CI does not install it), the same
bytes also go to an nginx reverse proxy in front of the same worker, and every
request sidecar serves must reach the worker through nginx the same way (or
nginx refuses it, when the case names the reason: sidecar may be more lenient
only where RFC 9112 allows the form). sidecar may always be stricter than
nginx. After every case a marker request proves that nothing else reached the
worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    WorkerRequest,
    chat_completion,
    http_response,
    json_reply,
    nginx_in_front,
    serving,
)

PASSTHROUGH = "/v1/echo"
CHAT = "/v1/chat/completions"
MARKER = "/v1/marker"
B7 = b'{"m":1}'  # 7 bytes, and JSON for the chat route
B10 = b'{"m":1234}'  # 10 bytes (0xA: hex digits with letters)
SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


# =============================================================================================
# Cases
# =============================================================================================


@dataclass(frozen=True)
class Outcome:
    """What sidecar must do with a case: refuse it (`status` >= 400, closed, nothing
    forwarded) or serve `requests` (method, target with `{p}` for the path, body)."""

    status: int = 200
    requests: tuple[tuple[str, str, bytes], ...] = ()
    closed: bool = False  # the connection is closed after the last answer
    #: the status of a refusal after the requests served (the bytes after them are no
    #: request): the connection closes after it
    refused_after: int = 0


def refused(status: int = 400) -> Outcome:
    return Outcome(status=status, closed=True)


def served(*requests: tuple[str, str, bytes], closed: bool = False, refused_after: int = 0) -> Outcome:
    return Outcome(requests=tuple(requests), closed=closed or bool(refused_after),
                   refused_after=refused_after)


@dataclass(frozen=True)
class Case:
    data: Callable[[str], bytes]  # the raw bytes for a path
    expect: Outcome
    #: why nginx handles this case otherwise (it refuses a form RFC 9112 allows, or keeps
    #: an HTTP/1.0 connection alive): then nginx is not compared
    nginx_differs: str = ""


def req(path: str, headers: list[str | bytes], body: bytes = b"", *, method: str = "POST",
        version: str = "HTTP/1.1", host: bool = True) -> bytes:
    lines = [f"{method} {path} {version}".encode()]
    if host:
        lines.append(b"Host: x")
    lines += [h if isinstance(h, bytes) else h.encode("latin-1") for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes) -> bytes:
    return b"%X\r\n%s\r\n0\r\n\r\n" % (len(body), body)


CL7 = "Content-Length: 7"
TE = ["Transfer-Encoding: chunked"]
ONE7 = served(("POST", "{p}", B7))
ONE10 = served(("POST", "{p}", B10))
CASES: dict[str, Case] = {}


def case(name: str, data: Callable[[str], bytes], expect: Outcome, nginx_differs: str = "") -> None:
    assert name not in CASES, name
    CASES[name] = Case(data, expect, nginx_differs)


# -- Content-Length values (RFC 9110 8.6: 1*DIGIT; a list of identical values is one value);
# the bytes after the body are the next request
ONE7_THEN_SMUGGLED = served(("POST", "{p}", B7), ("GET", "/v1/smuggled", b""))
for value, outcome, why in [
    ("7", ONE7_THEN_SMUGGLED, ""),
    ("07", ONE7_THEN_SMUGGLED, ""),
    (" 7 ", ONE7_THEN_SMUGGLED, ""),
    ("7\t", ONE7_THEN_SMUGGLED, "nginx refuses a trailing tab (OWS)"),
    ("7,7", ONE7_THEN_SMUGGLED, "nginx refuses a list of identical lengths (RFC 9110 8.6 allows it)"),
    ("7 , 7", ONE7_THEN_SMUGGLED, "nginx refuses a list of identical lengths (RFC 9110 8.6 allows it)"),
    ("+7", refused(), ""),
    ("-1", refused(), ""),
    ("7, 8", refused(), ""),
    ("0x7", refused(), ""),
    ("7a", refused(), ""),
    ("7 7", refused(), ""),
    ("", refused(), ""),
    ("99999999999999999999999999", refused(), ""),
]:
    case(f"content-length {value!r}",
         lambda p, v=value: req(p, [f"Content-Length: {v}"], B7 + SMUGGLED), outcome, why)
case("content-length twice, same", lambda p: req(p, [CL7, CL7], B7),
     ONE7, "nginx refuses a repeated Content-Length (RFC 9110 8.6 allows identical ones)")
case("content-length twice, differing", lambda p: req(p, [CL7, "Content-Length: 8"], B7 + b"x"), refused())
case("content-length past max_request_body", lambda p: req(p, ["Content-Length: 2000000"], B7),
     refused(413))

# -- Transfer-Encoding values (only a single `chunked`, any case, OWS around it)
for value in ("chunked", "Chunked", "CHUNKED", " chunked", "chunked ", "chunked\t"):
    case(f"transfer-encoding {value!r}", lambda p, v=value: req(p, [f"Transfer-Encoding: {v}"], chunked(B10)),
         ONE10, "nginx answers 501 to a trailing tab" if value.endswith("\t") else "")
for value in ("chunked;foo=bar", "chunked, chunked", "gzip, chunked", "chunked, gzip", "identity",
              "xchunked", "chunked,", ", chunked", ""):
    case(f"transfer-encoding {value!r}", lambda p, v=value: req(p, [f"Transfer-Encoding: {v}"], chunked(B10)),
         refused())
case("transfer-encoding in HTTP/1.0",
     lambda p: req(p, TE, chunked(B10), version="HTTP/1.0"), refused())
case("transfer-encoding and content-length",
     lambda p: req(p, [*TE, "Content-Length: 17"], chunked(B10)), refused())
case("content-length and transfer-encoding",
     lambda p: req(p, ["Content-Length: 17", *TE], chunked(B10)), refused())
case("transfer-encoding on two lines", lambda p: req(p, [*TE, *TE], chunked(B10)), refused())
case("transfer-encoding gzip then chunked lines",
     lambda p: req(p, ["Transfer-Encoding: gzip", *TE], chunked(B10)), refused())

# -- chunked bodies (RFC 9112 7.1)
CHUNKED_OK = {
    "upper-case hex size": b"A\r\n" + B10 + b"\r\n0\r\n\r\n",
    "lower-case hex size": b"a\r\n" + B10 + b"\r\n0\r\n\r\n",
    "leading zeros": b"000A\r\n" + B10 + b"\r\n0000\r\n\r\n",
    "extension": b"A;foo=bar\r\n" + B10 + b"\r\n0\r\n\r\n",
    "quoted extension with ;": b'A;foo="a;b"\r\n' + B10 + b"\r\n0\r\n\r\n",
    "last chunk with extension": b"A\r\n" + B10 + b"\r\n0;x=1\r\n\r\n",
    "trailer": b"A\r\n" + B10 + b"\r\n0\r\nX-T: 1\r\n\r\n",
    # forbidden trailer fields are dropped, never merged into the head (the worker's body
    # is framed by sidecar)
    "trailer with framing fields": b"A\r\n" + B10 + b"\r\n0\r\nContent-Length: 50\r\n"
    b"Transfer-Encoding: chunked\r\nHost: evil\r\n\r\n",
    "one-byte chunks": b"".join(b"1\r\n%c\r\n" % c for c in B10) + b"0\r\n\r\n",
}
for label, body in CHUNKED_OK.items():
    case(f"chunked {label}", lambda p, b=body: req(p, TE, b + SMUGGLED),
         served(("POST", "{p}", B10), ("GET", "/v1/smuggled", b"")))
CHUNKED_BAD = {
    "quoted extension across CRLF": b'A;foo="a\r\n' + B10 + b'"\r\n0\r\n\r\n',
    "bare LF in extension": b"A;foo=a\nb\r\n" + B10 + b"\r\n0\r\n\r\n",
    "bare LF after size": b"A\n" + B10 + b"\r\n0\r\n\r\n",
    "bare LF after data": b"A\r\n" + B10 + b"\n0\r\n\r\n",
    "bare LF after last chunk": b"A\r\n" + B10 + b"\r\n0\n\r\n",
    "CR alone after size": b"A\r" + B10 + b"\r\n0\r\n\r\n",
    "space before size": b" A\r\n" + B10 + b"\r\n0\r\n\r\n",
    "missing CRLF after data": b"A\r\n" + B10 + b"0\r\n\r\n",
    "junk after data": b"A\r\n" + B10 + b"XX\r\n0\r\n\r\n",
    "size shorter than data": b"5\r\n" + B10 + b"\r\n0\r\n\r\n",
    "0x size": b"0xA\r\n" + B10 + b"\r\n0\r\n\r\n",
    "+ size": b"+A\r\n" + B10 + b"\r\n0\r\n\r\n",
    "- size": b"-A\r\n" + B10 + b"\r\n0\r\n\r\n",
    "_ in size": b"0_A\r\n" + B10 + b"\r\n0\r\n\r\n",
    "empty size": b"\r\n" + B10 + b"\r\n0\r\n\r\n",
    "trailer line without colon": b"A\r\n" + B10 + b"\r\n0\r\nnocolon\r\n\r\n",
}
for label, body in CHUNKED_BAD.items():
    case(f"chunked {label}", lambda p, b=body: req(p, TE, b + SMUGGLED), refused())
# A chunk declared larger than max_request_body (1 MiB here) is too large as soon as its
# size line arrives, as a Content-Length past it is at the head: 413 at once, not a wait
# for bytes that can only be refused (408 at body_timeout); nginx does the same. The sizes
# past 64 bits are the ones a parser that wraps would read as small.
for label, size in [("2 MiB", b"200000"), ("2^64 + 10", b"1000000000000000A"),
                    ("20 hex digits", b"FFFFFFFFFFFFFFFFFFFF")]:
    case(f"chunked size {label}", lambda p, s=size: req(p, TE, s + b"\r\n" + B10 + b"\r\n0\r\n\r\n"),
         refused(413), "nginx refuses a size past 64 bits with 400" if len(size) > 16 else "")
case("chunked size past max_request_body after a small chunk",
     lambda p: req(p, TE, b"A\r\n" + B10 + b"\r\n100000\r\n" + B10 + b"\r\n0\r\n\r\n"), refused(413))

# -- header bytes (RFC 9110 5.5, RFC 9112 5)
for label, line in [("NUL in a value", b"X-A: a\x00b"), ("CR alone in a value", b"X-A: a\rb"),
                    ("space before the colon", b"X-A : a"), ("tab before the colon", b"X-A\t: a"),
                    ("NUL in a name", b"X-\x00A: a"), ("space in a name", b"X A: a"),
                    ("empty name", b": a"), ("DEL in a name", b"X-\x7fA: a"),
                    ("obs-text in a name", b"X-\xe9: a"), ("line without a colon", b"X-A"),
                    ("obs-fold", b"X-A: a\r\n b"), ("obs-fold with a tab", b"X-A: a\r\n\tb")]:
    case(f"header {label}", lambda p, line=line: req(p, [line, CL7], B7), refused())
case("header folded first line", lambda p: f"POST {p} HTTP/1.1\r\n Host: x\r\n".encode()
     + b"Content-Length: 7\r\n\r\n" + B7, refused())
case("content-length with space before the colon", lambda p: req(p, [b"Content-Length : 7"], B7), refused())
case("transfer-encoding with space before the colon",
     lambda p: req(p, [b"Transfer-Encoding : chunked", CL7], B7), refused())
case("transfer-encoding folded", lambda p: req(p, [b"X-A: a", b"Transfer-Encoding:\r\n chunked"], chunked(B10)),
     refused())
for label, line in [("DEL in a value", b"X-A: a\x7fb"), ("obs-text in a value", b"X-A: a\xe9b"),
                    ("tab in a value", b"X-A: a\tb"),
                    # RFC 9112 2.2: a recipient MAY take a bare LF as a line end
                    ("bare LF between fields", b"X-A: a\nX-B: b")]:
    case(f"header {label}", lambda p, line=line: req(p, [line, CL7], B7), ONE7)
# where a head ends (RFC 9112 2.2: a bare LF may end a line, so an empty line may be LF,
# CRLF LF, LF CRLF): the fields after it are the next "request", refused
for label, blank in [("LF LF", b"\n\n"), ("LF CRLF", b"\n\r\n"), ("CRLF LF", b"\r\n\n")]:
    case(f"head ended early by {label}",
         lambda p, blank=blank: f"GET {p} HTTP/1.1\r\nHost: x\r\nX-A: a".encode() + blank
         + b"Content-Length: 7\r\n\r\n" + B7, served(("GET", "{p}", b""), refused_after=400))
case("head ended early, then transfer-encoding", lambda p: f"GET {p} HTTP/1.1\r\nHost: x\r\n".encode()
     + b"Content-Length: 3\n\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     served(("GET", "{p}", b"Tra"), refused_after=400))
case("header line ending in CR CR LF", lambda p: req(p, [b"X-A: a\r", CL7], B7), refused())
case("header line of one space", lambda p: req(p, [CL7, b" "], B7), refused())
case("head ending in a bare LF", lambda p: f"POST {p} HTTP/1.1\nHost: x\nContent-Length: 7\n\n".encode() + B7,
     ONE7)

# -- request lines (RFC 9112 3)
for label, line, outcome in [
    ("HTTP/1.2", "POST {p} HTTP/1.2", ONE7),
    ("HTTP/1.10", "POST {p} HTTP/1.10", refused()),
    ("lower-case http", "POST {p} http/1.1", refused()),
    ("two spaces before the target", "POST  {p} HTTP/1.1", refused()),
    ("two spaces after the target", "POST {p}  HTTP/1.1", refused()),
    ("a tab", "POST\t{p} HTTP/1.1", refused()),
    ("a trailing space", "POST {p} HTTP/1.1 ", refused()),
    ("absolute-form", "POST http://x{p} HTTP/1.1", refused()),
    ("no version", "POST {p}", refused()),
    ("a space in the target", "POST {p} x HTTP/1.1", refused()),
    ("a fragment", "POST {p}#f HTTP/1.1", refused()),
]:
    case(f"request line {label}", lambda p, line=line: line.replace("{p}", p).encode()
         + b"\r\nHost: x\r\nContent-Length: 7\r\n\r\n" + B7, outcome)
case("request line HTTP/2.0", lambda p: req(p, [CL7], B7, version="HTTP/2.0"), refused(505))
for label, raw in [("raw non-ASCII byte", b"\xe9"), ("NUL", b"\x00x"), ("raw byte in the query", b"?d=\xe9")]:
    case(f"request line target with a {label}",
         lambda p, raw=raw: b"POST " + p.encode() + raw + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n" + B7,
         refused())
case("request line query kept as sent",
     lambda p: req(p + "?a=%2F&b=..//c&c=%zz&d", [CL7], B7), served(("POST", "{p}?a=%2F&b=..//c&c=%zz&d", B7)))
case("request line 8 KiB target", lambda p: req(p + "?" + "a" * 8000, [CL7], B7),
     served(("POST", "{p}?" + "a" * 8000, B7)))
case("request line target past max_header_bytes", lambda p: req(p + "?" + "a" * 20000, [CL7], B7),
     refused(431))
case("request line CONNECT", lambda p: b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", refused())

# -- pipelining, Expect, Connection, HTTP/1.0, Host
case("pipelined length then length", lambda p: req(p, [CL7], B7) + req(p, ["Content-Length: 10"], B10),
     served(("POST", "{p}", B7), ("POST", "{p}", B10)))
case("pipelined length then chunked", lambda p: req(p, [CL7], B7) + req(p, TE, chunked(B10)),
     served(("POST", "{p}", B7), ("POST", "{p}", B10)))
case("pipelined chunked then length", lambda p: req(p, TE, chunked(B10)) + req(p, [CL7], B7),
     served(("POST", "{p}", B10), ("POST", "{p}", B7)))
case("GET with a body, then a request", lambda p: req(p, [CL7], B7, method="GET") + SMUGGLED,
     served(("GET", "{p}", B7), ("GET", "/v1/smuggled", b"")))
for value in ("100-continue", "100-Continue"):
    case(f"expect {value}", lambda p, v=value: req(p, [CL7, f"Expect: {v}"], B7), ONE7)
case("expect with another expectation", lambda p: req(p, [CL7, "Expect: 100-continue, foo"], B7), ONE7)
for label, lines in [("Close", ["Connection: Close"]), ("keep-alive, CLOSE", ["Connection: keep-alive, CLOSE"]),
                     ("close on a second line", ["Connection: keep-alive", "Connection: close"])]:
    case(f"connection {label}", lambda p, lines=lines: req(p, [CL7, *lines], B7) + req(p, [CL7], B7),
         served(("POST", "{p}", B7), closed=True))
case("HTTP/1.0 keep-alive", lambda p: req(p, [CL7, "Connection: keep-alive"], B7, version="HTTP/1.0")
     + req(p, [CL7], B7), served(("POST", "{p}", B7), closed=True),
     "nginx keeps an HTTP/1.0 keep-alive connection (README: sidecar closes every HTTP/1.0 one)")
case("HTTP/1.0 without Host", lambda p: req(p, [CL7], B7, version="HTTP/1.0", host=False),
     served(("POST", "{p}", B7), closed=True))
case("HTTP/1.1 without Host", lambda p: req(p, [CL7], B7, host=False), refused())
case("HTTP/1.1 with two Hosts", lambda p: req(p, [CL7, "Host: y"], B7), refused())
case("HTTP/1.1 with an invalid Host", lambda p: req(p, ["Host: a b", CL7], B7, host=False), refused())
case("HTTP/1.1 with an empty Host", lambda p: req(p, ["Host:", CL7], B7, host=False), ONE7,
     "nginx refuses an empty Host (README: it is valid)")


# =============================================================================================
# The proxies and the worker
# =============================================================================================


def answer(request: WorkerRequest) -> Any:
    """A chat completion on the chat path; any other request: 200 with a small body."""
    if request.target.startswith(CHAT):
        return json_reply(chat_completion())
    return http_response(200, b'{"ok":true}')


@pytest.fixture(scope="module")
def nginx(module_worker: FakeWorker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int] | None]:
    """nginx in front of the module's worker, or None where it is not installed."""
    with nginx_in_front(module_worker.port, tmp_path_factory.mktemp("nginx"),
                        http="client_max_body_size 1m;") as address:
        yield address


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    # default routes: openai-chat on /v1/chat/completions (POST), passthrough on /v1/
    return make_module_daemon(worker=module_worker, limits={"body_timeout": "3s"})


@pytest.fixture
def worker(module_worker: FakeWorker, daemon: Daemon) -> Iterator[FakeWorker]:
    yield from serving(module_worker, answer)


# =============================================================================================
# Sending a case
# =============================================================================================


@dataclass
class Seen:
    """What one proxy did with a case: its answers (1xx skipped), whether it closed the
    connection, and the requests the worker got (method, target, body)."""

    responses: list[RawResponse]
    closed: bool
    requests: list[tuple[str, str, bytes]]

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def send(address: tuple[str, int], worker: FakeWorker, data: bytes, answers: int, *,
         wait_close: bool = False) -> Seen:
    """Send `data` and read up to `answers` responses (fewer if the proxy closes first);
    `wait_close`: the proxy is expected to close, give it time to. Then a marker request:
    on the same connection if it is still open (it must be read as the next request: no
    byte of the case is left over), else on a new one. The worker's requests before the
    marker are those the case caused."""
    responses: list[RawResponse] = []
    marker = f"GET {MARKER} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with RawClient(address, timeout=5) as client:
        with contextlib.suppress(OSError):  # closed before we finished writing
            client.send(data)
        for _ in range(answers):
            try:
                response = client.read_response(5)
            except (AssertionError, ValueError, IndexError):
                break
            responses.append(response)
            if not response.complete or client.eof:
                break
        closed = client.closed_by_peer(3) if wait_close else client.eof
        if not closed:
            try:
                client.send(marker)
                closed = client.read_response(5).status != 200
            except (AssertionError, OSError, ValueError, IndexError):
                closed = True
    if closed:
        with RawClient(address, timeout=5) as client:
            client.send(marker)
            assert client.read_response().status == 200
    assert worker.wait_until(lambda: any(r.target == MARKER for r in worker.requests))
    seen = [(r.method, r.target, r.body) for r in worker.requests]
    cut = next(i for i, r in enumerate(seen) if r[1] == MARKER)
    worker.reset()
    worker.default = answer
    return Seen(responses, closed, seen[:cut])


def expected_requests(outcome: Outcome, path: str) -> list[tuple[str, str, bytes]]:
    return [(m, t.replace("{p}", path), b) for m, t, b in outcome.requests]


@pytest.mark.parametrize("path", [PASSTHROUGH, CHAT], ids=["passthrough", "openai-chat"])
@pytest.mark.parametrize("name", list(CASES))
def test_request_framing(daemon: Daemon, worker: FakeWorker, nginx: tuple[str, int] | None,
                         name: str, path: str) -> None:
    item = CASES[name]
    data = item.data(path)
    outcome = item.expect
    want = expected_requests(outcome, path)
    seen = send(daemon.address, worker, data, max(1, len(want) + bool(outcome.refused_after)),
                wait_close=outcome.closed or outcome.status >= 400)
    if outcome.status >= 400:
        assert seen.statuses == [outcome.status], (seen.statuses, seen.responses[:1])
        body = seen.responses[0].json()
        assert set(body) == {"error"} and body["error"]["message"], body
        assert seen.closed, "the connection stayed open after a refused request"
        assert seen.requests == [], "a refused request reached the worker"
    else:
        statuses = [200] * len(want) + ([outcome.refused_after] if outcome.refused_after else [])
        assert seen.statuses == statuses, [r.raw[:300] for r in seen.responses]
        assert seen.requests == want
        assert seen.closed == outcome.closed
    if nginx is None or item.nginx_differs:
        return
    theirs = send(nginx, worker, data, max(1, len(want) + bool(outcome.refused_after)))
    if outcome.status < 400:
        # what sidecar serves, nginx (a strict-enough reader) must read the same way
        assert theirs.requests == want, f"nginx read it otherwise: {theirs.statuses} {theirs.requests}"
    elif theirs.requests:
        # sidecar is stricter here: whatever nginx forwarded is no concern of sidecar's, but
        # it must never have read it as more requests than nginx did
        assert seen.requests == []
