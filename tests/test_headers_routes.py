"""Unit tests of sidecar.headers (raw-head hygiene, header rewriting) and sidecar.routes (matching).

Pure: no sockets, no event loop. The integration tests in test_proxy_core.py
check the same rules through the real daemon.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import string

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import config_from_dict
from sidecar.headers import (
    CONTENT_CODINGS,
    H11_REQUEST_HEADERS,
    H11_RESPONSE_HEADERS,
    HEAD_START,
    HOP_BY_HOP,
    STATUS_LINE_START_SIZE,
    begins_status_line,
    check_head_lines,
    check_raw_head,
    connection_tokens,
    content_codings,
    data_event,
    end_to_end,
    end_to_end_lines,
    find_head_end,
    h11_headers,
    has_control_byte,
    head_read,
    header_list,
    header_value,
    raw_method_and_path,
    raw_request_id,
    reason,
    request_event,
    request_id_for,
    response_event,
    simple_response,
    splice_lines,
    split_for_h11,
    without,
)
from sidecar.routes import is_ambiguous_path, match_route, split_target


def head(*lines: str, request_line: str = "POST /v1/chat/completions HTTP/1.1", eol: str = "\r\n") -> bytes:
    return (eol.join([request_line, *lines]) + eol + eol).encode("latin-1")


# ---------------------------------------------------------------------------- check_raw_head


@pytest.mark.parametrize(
    "raw",
    [
        head("Host: x", "Content-Length: 5"),
        head("Host: x", "Transfer-Encoding: chunked"),
        head("Host: x", "Transfer-Encoding: Chunked"),
        head("Host: x", "Content-Length: 5", "Content-Length: 5"),
        head("Host: x", "Content-Length: 5, 5"),
        head("Host: x", eol="\n"),
        head("Host: x", request_line="OPTIONS * HTTP/1.1"),
        head("Host: x", request_line="GET /v1/models?x=http://a/b HTTP/1.1"),
        head("Host: x", "X-Empty:", "x-tab:\tv"),
        head("Host:"),  # empty: allowed for a target without authority
        head("Host: [::1]:8080"),
        head("Host: my_host.local:80"),
        head("Host: x", "Content-Length: 5", request_line="POST /v1/chat HTTP/1.0"),
        head("Host: x", "Transfer-Encoding:\tchunked\t"),  # OWS is SP or HTAB
    ],
)
def test_acceptable_heads(raw: bytes) -> None:
    assert check_raw_head(raw) is None


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (head("Host: x", "Content-Length: 5", "Transfer-Encoding: chunked"), "both"),
        (head("Host: x", "Transfer-Encoding: chunked", "Content-Length: 5"), "both"),
        (head("Host: x", "Content-Length: 5", "Content-Length: 6"), "differing"),
        (head("Host: x", "Content-Length: 5, 6"), "differing"),
        # no space after the colon: the values differ in their first digit only
        (head("Host: x", "Content-Length:15", "Content-Length:25"), "differing"),
        (head("Host: x", "Transfer-Encoding: chunkedX"), "chunked"),
        (head("Host: x", "Transfer-Encoding: gzip"), "chunked"),
        (head("Host: x", "Transfer-Encoding: gzip, chunked"), "chunked"),
        (head("Host: x", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), "chunked"),
        (head("Host: x", "Transfer-Encoding: chunked, identity"), "chunked"),
        (head("Host: x", "X-A: 1", " folded"), "folding"),
        (head("Host: x", "X-A: 1", "\tfolded"), "folding"),
        (head("Host : x"), "whitespace"),
        (head("Host\t: x"), "whitespace"),
        (head("Host: x", request_line="GET http://evil.example/v1/models HTTP/1.1"), "absolute-form"),
        (head("Host: x", request_line="GET evil.example:443 HTTP/1.1"), "absolute-form"),
        (head("Host: x", request_line="CONNECT evil.example:443 HTTP/1.1"), "CONNECT"),
        (head("Host: x", request_line="GET  /v1/models HTTP/1.1"), "request line"),
        (head("Host: x", request_line="GET /v1/models"), "request line"),
        (head("Host: x", "no colon here"), "header line"),
        (head("Host: x", ": empty name"), "header line"),
        (head("Ho(st: x"), "header name"),
        (head("Host: x", request_line="POST /v1/chat/completions#x HTTP/1.1"), "fragment"),
        (head("Host: a b"), "Host"),
        (head("Host: x/y"), "Host"),
        # bare-LF line ends: the Host value's last byte is read too
        (head("Host: x/", eol="\n"), "Host"),
        (head("Host: x", "Content-Length: 5,", eol="\n"), "differing"),
        # every Host line is checked, not only the first (h11 then refuses two anyway)
        (head("Host: x", "Host: a/b"), "Host"),
        (head("Host: x", "host:\x00"), "Host"),
        (head("Host: x@y"), "Host"),
        (head("Host: x:notaport"), "Host"),
        (head("Host: x", "Transfer-Encoding: chunked", request_line="POST /v1/chat HTTP/1.0"),
         "HTTP/1.0"),
    ],
)
def test_refused_heads(raw: bytes, why: str) -> None:
    problem = check_raw_head(raw)
    assert problem is not None
    assert why.lower() in problem.lower()


@given(st.binary(max_size=300))
def test_check_raw_head_never_raises(raw: bytes) -> None:
    result = check_raw_head(raw + b"\r\n\r\n")
    assert result is None or isinstance(result, str)


@given(
    st.lists(
        st.tuples(
            st.text(string.ascii_letters, min_size=1, max_size=1)
            .flatmap(lambda first: st.text(string.ascii_letters + string.digits + "-", max_size=15)
                     .map(lambda rest: first + rest)),
            st.text(string.printable[:95], max_size=20).map(str.strip),
        ),
        max_size=8,
    )
)
def test_plain_token_headers_are_accepted(headers: list[tuple[str, str]]) -> None:
    headers = [(k, v) for k, v in headers
               if k.lower() not in ("content-length", "transfer-encoding")]
    raw = head(*(f"{k}: {v}" for k, v in headers))
    assert check_raw_head(raw) is None


# ---------------------------------------------------------------------------- header rewriting


def test_end_to_end_drops_hop_by_hop_and_connection_listed_headers() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Content-Length", b"3"),
        (b"Expect", b"100-continue"),
        (b"x-secret-hop", b"1"),
        (b"Authorization", b"Bearer sk-1"),
        (b"Cookie", b"a=b"),
        (b"X-Custom", b"kept"),
        (b"Content-Type", b"application/json"),
        (b"x-api-key", b"k"),
    ]
    assert end_to_end(headers) == [
        (b"Authorization", b"Bearer sk-1"),
        (b"Cookie", b"a=b"),
        (b"X-Custom", b"kept"),
        (b"Content-Type", b"application/json"),
        (b"x-api-key", b"k"),
    ]
    assert end_to_end(headers, b"cookie", b"x-custom") == [
        (b"Authorization", b"Bearer sk-1"),
        (b"Content-Type", b"application/json"),
        (b"x-api-key", b"k"),
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"Host", b"connection", b"Connection", b"Keep-Alive", b"x-a", b"X-A", b"accept",
                 b"x-request-id", b"Accept-Encoding", b"content-length", b"cookie"]
            ),
            st.sampled_from([b"1", b"x-a", b"close, X-A", b"keep-alive", b"cookie, te"]),
        ),
        max_size=8,
    ),
    st.sampled_from([(), (b"x-request-id",), (b"x-request-id", b"accept-encoding")]),
)
def test_end_to_end_lines_are_end_to_end_rendered_as_split_for_h11_renders_them(
    headers: list[tuple[bytes, bytes]], also: tuple[bytes, ...]
) -> None:
    kept = end_to_end(headers, *also)
    for_h11, lines = split_for_h11(kept, H11_REQUEST_HEADERS)
    assert not for_h11
    assert end_to_end_lines(headers, *also) == lines


_NAMES = st.sampled_from(
    [b"host", b"content-type", b"authorization", b"x-request-id", b"accept", b"connection",
     b"x-stainless-os", b"Content-Type", b"cookie"]
)
_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12
).map(str.encode)


def _parsed(role: type[h11.CLIENT] | type[h11.SERVER], data: bytes) -> list[tuple[bytes, bytes]]:
    conn = h11.Connection(role)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, (h11.Request, h11.Response))
    return list(event.headers)


def _by_name(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8), st.integers(0, 99))
def test_a_spliced_request_head_reads_as_if_h11_wrote_every_header(
    headers: list[tuple[bytes, bytes]], length: int
) -> None:
    headers = [h for h in headers if h[0].lower() not in (b"host", b"connection")]
    headers += [(b"host", b"worker:8000"), (b"content-length", str(length).encode())]
    whole = h11.Connection(h11.CLIENT).send(
        h11.Request(method=b"POST", target=b"/v1/x?a=1", headers=headers)
    )
    for_h11, lines = split_for_h11(headers, H11_REQUEST_HEADERS)
    assert {name.lower() for name, _ in for_h11} <= H11_REQUEST_HEADERS
    written = h11.Connection(h11.CLIENT).send(
        h11.Request(method=b"POST", target=b"/v1/x?a=1", headers=for_h11)
    )
    assert written is not None and whole is not None
    spliced = splice_lines(written, lines)
    assert spliced.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n")
    # every header once, same values in the same order per name (names lower-cased by h11)
    assert _by_name(_parsed(h11.SERVER, spliced)) == _by_name(_parsed(h11.SERVER, whole))


def test_a_spliced_response_head_keeps_h11s_framing() -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"x-request-id", b"r1"),
               (b"transfer-encoding", b"chunked"), (b"connection", b"close")]
    for_h11, lines = split_for_h11(headers, H11_RESPONSE_HEADERS)
    assert for_h11 == [(b"transfer-encoding", b"chunked"), (b"connection", b"close")]
    assert lines == b"content-type: text/event-stream\r\nx-request-id: r1\r\n"
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    server.next_event()
    head = server.send(h11.Response(status_code=200, headers=for_h11, reason=b"OK"))
    assert head is not None
    spliced = splice_lines(head, lines)
    assert spliced.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
    assert spliced.endswith(b"\r\n\r\n")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")]))
    client.receive_data(spliced)
    event = client.next_event()
    assert isinstance(event, h11.Response)
    assert _by_name(list(event.headers)) == _by_name(headers)
    assert splice_lines(head, b"") is head


@pytest.mark.parametrize(
    ("value", "bad"),
    [(b"plain", False), (b"a\tb", False), (b"", False), ("caf\u00e9".encode(), False),
     (b"a\x01b", True), (b"\x1b[0m", True), (b"x\x7f", True), (b"\x00", True), (b"a\x1f", True)],
)
def test_has_control_byte(value: bytes, bad: bool) -> None:
    """RFC 9110 5.5: HTAB and obs-text are field content, the other control bytes are not."""
    assert has_control_byte([(b"x-ok", b"fine"), (b"x-test", value)]) is bad


def test_hop_by_hop_names_are_lower_case() -> None:
    assert all(name == name.lower() for name in HOP_BY_HOP)
    for name in (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"):
        assert name in HOP_BY_HOP


def test_connection_tokens_over_several_headers() -> None:
    headers = [(b"Connection", b" Close ,X-A"), (b"connection", b"x-b,,"), (b"X-A", b"1")]
    assert connection_tokens(headers) == {b"close", b"x-a", b"x-b", b""}


def test_header_value_first_match_case_insensitive() -> None:
    headers = [(b"X-Request-ID", b"one"), (b"x-request-id", b"two")]
    assert header_value(headers, b"x-request-id") == b"one"
    assert header_value(headers, b"x-missing") is None


@pytest.mark.parametrize("coding", sorted(CONTENT_CODINGS))
def test_every_iana_content_coding_is_recognized(coding: bytes) -> None:
    assert content_codings([(b"Content-Encoding", coding.upper())]) == [coding]


def test_content_codings_reads_every_list_member_and_ignores_non_codings() -> None:
    headers = [
        (b"content-encoding", b"gzip,\tBR , utf-8"),
        (b"Content-Type", b"application/json"),
        (b"Content-Encoding", b"identity, zstd"),
    ]
    assert content_codings(headers) == [b"gzip", b"br", b"zstd"]
    assert content_codings([(b"content-encoding", b"identity")]) == []
    assert content_codings([]) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"POST /v1/chat/completions?key=secret HTTP/1.1\r\nHost: x\r\n\r\n", ("POST", "/v1/chat/completions")),
        (b"GET http://evil.example/x HTTP/1.1\r\n\r\n", ("GET", "-")),
        (b"\tGET / HTTP/1.1\r\n\r\n", ("-", "-")),
        (b"GET\t/ HTTP/1.1\r\n\r\n", ("-", "-")),
    ],
)
def test_raw_method_and_path_shows_no_query_and_nothing_it_cannot_read(
    raw: bytes, expected: tuple[str, str]
) -> None:
    assert raw_method_and_path(bytearray(raw)) == expected


def test_header_list_of_h11_headers_and_of_a_plain_list() -> None:
    request = h11.Request(method="GET", target="/", headers=[("Host", "x"), ("X-A", "1")])
    assert header_list(request.headers) == [(b"host", b"x"), (b"x-a", b"1")]
    plain = [(b"host", b"x")]
    assert header_list(plain) == plain


def test_without_is_case_insensitive_and_keeps_order() -> None:
    headers = [(b"A", b"1"), (b"b", b"2"), (b"C", b"3"), (b"a", b"4")]
    assert without(headers, b"a") == [(b"b", b"2"), (b"C", b"3")]
    assert without(headers) == headers


@pytest.mark.parametrize("given_id", ["abc-123", "x" * 200, "req_01H~!#$%&'*+.^`|"])
def test_request_id_taken_from_client(given_id: str) -> None:
    assert request_id_for(given_id.encode()) == given_id


@pytest.mark.parametrize("bad", [b"", b"x" * 201, b"has space", "caf\u00e9".encode(), b"a\tb"])
def test_request_id_generated_when_absent_or_insane(bad: bytes) -> None:
    rid = request_id_for(bad)
    assert re.fullmatch(r"[0-9a-f]{32}", rid)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-1\r\n\r\n", "abc-1"),
        (b"GET / HTTP/1.1\r\nx-request-id:\t abc-2 \t\r\nHost: a\r\n\r\n", "abc-2"),
        (b"GET / HTTP/1.1\nX-REQUEST-ID: abc-3\n\n", "abc-3"),  # bare LF heads too
        (b"POST /x HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-4\r\nX-Pad: ", "abc-4"),  # cut off
        (b"GET /?x-request-id:%20no HTTP/1.1\r\nHost: a\r\n\r\n", None),  # not a header
        (b"GET / HTTP/1.1\r\nX-Request-Id: has space\r\n\r\n", None),  # not sane: fresh
        (b"GET / HTTP/1.1\r\nX-Request-Id-Not: abc\r\n\r\n", None),
    ],
)
def test_raw_request_id_from_a_head_h11_never_parsed(head: bytes, expected: str | None) -> None:
    rid = raw_request_id(bytearray(head))
    if expected is None:
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    else:
        assert rid == expected


def test_generated_request_ids_are_unique() -> None:
    ids = {request_id_for(None) for _ in range(100)}
    assert len(ids) == 100


@pytest.mark.parametrize("status", [400, 404, 408, 413, 431, 503, 599])
def test_simple_response_is_a_complete_closing_response(status: int) -> None:
    body = b'{"error":{"message":"m","type":"t","code":"c"}}'
    raw = simple_response(status, body)
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    assert re.fullmatch(rb"HTTP/1\.1 %d [A-Za-z ]+" % status, lines[0])
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    assert fields[b"content-length"] == str(len(body)).encode()
    assert fields[b"connection"] == b"close"
    assert fields[b"content-type"] == b"application/json"
    assert rest == body


@pytest.mark.parametrize(
    ("buffer", "start", "end"),
    [
        (b"GET / HTTP/1.1\r\nA: b\r\n\r\nBODY", 0, 24),
        # the first blank line ends the head, whatever line ends the rest uses
        (b"GET / HTTP/1.1\nA: b\n\nab\r\n\r\ncd", 0, 21),
        (b"GET / HTTP/1.1\r\nA: b\n\r\n", 0, 23),
        (b"GET / HTTP/1.1\nA: b\n\nBODY", 0, 21),
        (b"GET / HTTP/1.1\r\nA: b\r\n", 0, -1),
        (b"GET / HTTP/1.1\r\nA: b\r\n\r\n", 20, 24),
        (b"", 0, -1),
    ],
)
def test_find_head_end(buffer: bytes, start: int, end: int) -> None:
    assert find_head_end(buffer, start) == end
    assert find_head_end(bytearray(buffer), start) == end


# ---------------------------------------------------------------------------- routes


def routes_from(raw_routes: list[dict]) -> tuple:
    config = config_from_dict(
        {"upstream": {"url": "http://127.0.0.1:9"}, "routes": raw_routes}, env={}
    )
    return config.routes


ROUTES = routes_from(
    [
        {"name": "chat", "match": {"path": "/v1/chat/completions", "methods": ["POST"]},
         "dialect": "openai-chat"},
        {"name": "chat-get", "match": {"path": "/v1/chat/completions", "methods": ["get"]},
         "dialect": "passthrough"},
        {"name": "models", "match": {"path": "/v1/models"}, "dialect": "passthrough"},
        {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"},
    ]
)


@pytest.mark.parametrize(
    ("method", "target", "name"),
    [
        ("POST", b"/v1/chat/completions", "chat"),
        ("POST", b"/v1/chat/completions?api-version=2024&x=/y", "chat"),
        ("GET", b"/v1/chat/completions", "chat-get"),
        ("DELETE", b"/v1/chat/completions", "rest"),
        ("GET", b"/v1/models", "models"),
        ("POST", b"/v1/models", "models"),
        ("GET", b"/v1/models/", "rest"),
        ("POST", b"/v1/chat/completions/", "rest"),
        ("GET", b"/v1/embeddings", "rest"),
        ("GET", b"/v1/", "rest"),
        ("GET", b"/v1/a.b/c...d", "rest"),
        ("GET", b"/v1/%41", None),  # an encoded letter: /v1/A to a worker, not to routes
        ("GET", b"/v1/caf%C3%A9%20au%2Blait", "rest"),  # encodings a URI needs are fine
        ("GET", b"/v1", None),
        ("GET", b"/v2/chat/completions", None),
        ("GET", b"/", None),
        ("GET", b"/V1/models", None),
    ],
)
def test_first_matching_route_wins(method: str, target: bytes, name: str | None) -> None:
    route = match_route(ROUTES, method, target)
    assert (route.name if route else None) == name


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/../v1/chat/completions",
        b"/v1/./chat/completions",
        b"/v1/chat/completions/..",
        b"/v1/chat/./completions",
        b"//v1/chat/completions",
        b"/v1//chat/completions",
        b"/v1/chat%2Fcompletions",
        b"/v1/chat%2fcompletions",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E/models",
        b"/v1/chat/complet%69ons",
        b"/v1/chat/completion%73",
        b"/v1/%7Euser/%5Fx/%2Dy/%30",
        b"/v1\\chat/completions",
        b"/v1/chat%5ccompletions",
        b"v1/chat/completions",
        b"*",
        "/v1/caf\u00e9".encode(),
    ],
)
def test_ambiguous_paths_match_no_route(target: bytes) -> None:
    assert match_route(ROUTES, "POST", target) is None
    assert match_route(ROUTES, "GET", target) is None


def test_query_is_not_part_of_the_path() -> None:
    assert split_target(b"/v1/models?a=1?b=2") == (b"/v1/models", b"a=1?b=2")
    assert split_target(b"/v1/models") == (b"/v1/models", b"")
    assert split_target(b"/v1/models?") == (b"/v1/models", b"")
    # an ambiguous-looking query does not make the path ambiguous
    assert match_route(ROUTES, "GET", b"/v1/models?next=/../x//y%2F").name == "models"


@pytest.mark.parametrize(
    ("path", "ambiguous"),
    [
        (b"/v1/models", False),
        (b"/", False),
        (b"/v1/a.b", False),
        (b"/v1/...", False),
        (b"/v1/..", True),
        (b"/.", True),
        (b"/v1%2Fmodels", True),
        (b"/v1%5cmodels", True),
        (b"/v1/chat\\completions", True),  # a backslash, even inside a matching prefix
        (b"/v1/a%20b", False),
        (b"/v1/100%25", False),
        (b"", True),
        (b"relative", True),
    ],
)
def test_is_ambiguous_path(path: bytes, ambiguous: bool) -> None:
    assert is_ambiguous_path(path) is ambiguous


def _ambiguous_checked_one_by_one(path: bytes) -> bool:
    """is_ambiguous_path as it was written before its one search: each rule on its own."""
    if not path.startswith(b"/") or b"//" in path or b"\\" in path:
        return True
    encoded = re.compile(rb"%(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|2[D-Fd-f]|5[CcFf]|7[Ee])")
    if b"%" in path and encoded.search(path) is not None:
        return True
    return any(segment in (b".", b"..") for segment in path.split(b"/"))


def test_is_ambiguous_path_is_each_rule_on_its_own() -> None:
    alphabet = [b"/", b".", b"%", b"\\", b"a", b"2", b"e", b"F", b"5", b"c", b"7", b"\n", b"~"]
    for size in range(6):  # every path of up to five of these
        for parts in itertools.product(alphabet, repeat=size):
            path = b"".join(parts)
            assert is_ambiguous_path(path) is _ambiguous_checked_one_by_one(path), path
    rng = random.Random(9)
    pieces = [b"/", b"//", b"/.", b"/..", b"/...", b".", b"..", b"v1", b"chat", b"%2F", b"%2e",
              b"%41", b"%20", b"%25", b"%7E", b"%7f", b"\\", b"?", b"\n", b"a.b", b"%"]
    for _ in range(50_000):
        path = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 9)))
        assert is_ambiguous_path(path) is _ambiguous_checked_one_by_one(path), path


@given(st.lists(st.sampled_from(["v1", "chat", "completions", ".", "..", "", "%2F", "a.b"]),
                min_size=1, max_size=6))
def test_a_matched_route_never_sees_dot_segments_or_empty_segments(segments: list[str]) -> None:
    target = ("/" + "/".join(segments)).encode()
    route = match_route(ROUTES, "GET", target)
    if route is not None:
        parts = target.split(b"/")[1:]
        assert b"." not in parts and b".." not in parts
        assert b"" not in parts[:-1]
        assert b"%2f" not in target.lower()


def test_no_routes_no_match() -> None:
    assert match_route((), "GET", b"/v1/models") is None


_head_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"Host: x",
                b"Content-Type: application/json",
                b"Content-Length: 10",
                b"content-length: 10",
                b"Content-Length: 11",
                b"Content-Length: 10, 10",
                b"Content-Length: 10, 11",
                b"Transfer-Encoding: chunked",
                b"transfer-encoding: gzip, chunked",
                b" folded",
                b"\tfolded",
                b"Bad Name: x",
                b"Name : x",
                b"NoColon",
                b":empty-name",
                b"X-Weird: a\rb",
                b"X-Empty:",
            ]
        ),
        st.builds(lambda n, v: n + b":" + v, st.binary(min_size=0, max_size=6), st.binary(max_size=6)),
    ),
    max_size=4,
)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([b"POST"] * 6 + [b"GET", b"CONNECT", b"P OST", b""]),
    st.sampled_from([b"/v1/x"] * 6 + [b"*", b"http://h/x", b"h:443", b"/a b", b""]),
    st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.1 ", b"HTTX"]),
    _head_lines,
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_the_one_match_gate_agrees_with_the_line_checks(
    method: bytes, target: bytes, version: bytes, lines: list[bytes], eol: bytes
) -> None:
    head = eol.join([method + b" " + target + b" " + version, *lines]) + eol + eol
    assert check_raw_head(head) == check_head_lines(head)


# ------------------------------------------------------------------ a worker's head in pieces


def _whole_head_accepted(head: bytes) -> bool:
    """What the worker side makes of `head` when it comes whole: h11 reads it and no value
    holds a control byte (`has_control_byte`)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "w")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return False
    return isinstance(event, h11.Response) and not has_control_byte(event.headers)


def _refused_in_pieces(head: bytes, cuts: list[int]) -> int | None:
    """Where `UpstreamConnection` refuses `head` read in the pieces `cuts` make of it (each
    read before the one that holds the blank line, judged as it arrives): the end of the
    read that was refused, or None."""
    state: bytes | None = HEAD_START
    ends = [i + n for i, n in ((head.find(b"\n\n"), 2), (head.find(b"\n\r\n"), 3)) if i >= 0]
    complete_at = min(ends, default=len(head) + 1)
    start = 0
    for cut in [*sorted(set(cuts)), len(head)]:
        if cut <= start:
            continue
        if cut >= complete_at:  # this read completes the head: h11 judges it whole
            return None
        data = head[start:cut]
        if not begins_status_line(head[:min(cut, STATUS_LINE_START_SIZE)]):
            return cut
        state = head_read(state, data)
        if state is None:
            return cut
        start = cut
    return None


_HEAD_PIECES = st.lists(
    st.one_of(
        st.sampled_from([b"content-type: application/json", b"x-a:\tb c", b"x-b: \x80\xff",
                         b" folded", b"x-c:", b"X-D: e:f", b"x-e : f", b"x-f", b":g",
                         b"x-g: a\rb", b"x-h: \x00", b"x-\x7f: a", b"x-i: \x7f", b"x-j: \x0b",
                         b"@k: l", b"\x80: m"]),
        st.binary(max_size=8),
    ),
    max_size=4,
)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.0 404 Not\tFound",
                     b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 2000", b"HTTP/1.1x 200", b"HTTP/1.1 200 \x7f"]),
    _HEAD_PIECES,
    st.sampled_from([b"\r\n", b"\n"]),
    st.lists(st.integers(min_value=1, max_value=120), max_size=6),
)
def test_a_worker_head_is_refused_in_pieces_only_when_refused_whole(
    status: bytes, lines: list[bytes], eol: bytes, cuts: list[int]
) -> None:
    """`head_read`, judging each read of a head not yet complete, never
    refuses a head that, come whole, would be served; and it refuses as it arrives every
    head that breaks framing with a control byte, a bare CR or a name that is no token."""
    head = eol.join([status, *lines]) + eol + eol
    if b"\n\n" in head[:-2] or b"\n\r\n" in head[:-3]:
        return  # a blank line before the end: another head and a body
    refused = _refused_in_pieces(head, cuts)
    if refused is not None:
        assert not _whole_head_accepted(head), (head, cuts)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\rcontent-type: x\r\r",
    b"HTTP/1.1 200 OK\r\nx-a: b\rc: d\r\n",
    b"HTTP/1.1 200 O\x00K\r\n",
    b"HTTP/1.1 200 OK\r\nx\x00: b\r\n",
    b"HTTP/1.1 200 OK\r\nx-a: \x1b\r\n",
    b"HTTP/1.1 200 OK\r\nx-a : b\r\n",
    b"HTTP/1.1 200 OK\r\nx-a\r\nb: c\r\n",
    b"HTTP/1.1 200 OK\r\n:b\r\n",
    b"HTTP/1.1 200 OK\r\n@a: b\r\n",
    b"HTTP/1.1 200 OK\r\nx-a: b\r\n\x80: c\r\n",
    b"HTTP/1.1 2x",
    b"HTTP/2 200 OK\r\n",
])
def test_a_worker_head_that_can_never_be_valid_is_refused_whichever_reads_bring_it(
    head: bytes
) -> None:
    """...at the latest with the read that brings the byte that breaks it (one read, two,
    or a byte per read), never waiting for the head's end."""
    for cut in range(1, len(head) + 1):
        assert _refused_in_pieces(head + b"\r\n", [cut, len(head)]) is not None, cut
    assert _refused_in_pieces(head + b"\r\n", list(range(1, len(head) + 1))) is not None


# -- h11 events made without h11's __init__ (request_event, response_event, data_event) ----


def _fields(event: h11.Event) -> dict[str, object]:
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


@pytest.mark.parametrize("status", [200, 204, 404, 502, 599, 999])
def test_events_made_by_hand_are_the_events_h11_makes(status: int) -> None:
    # every field set, as h11's own __init__ sets it: an h11 whose events gain a field or
    # change one fails here, not on the wire
    host = [(b"host", b"127.0.0.1:8000"), (b"content-length", b"5")]
    made = request_event(b"POST", b"/v1/chat/completions?x=1", h11_headers(host))
    built = h11.Request(method=b"POST", target=b"/v1/chat/completions?x=1", headers=host)
    assert type(made) is h11.Request and _fields(made) == _fields(built) and made == built
    framing = [(b"transfer-encoding", b"chunked")]
    made_response = response_event(status, h11_headers(framing))
    built_response = h11.Response(status_code=status, headers=framing, reason=reason(status))
    assert _fields(made_response) == _fields(built_response) and made_response == built_response
    for data in (b"", b"abc", bytearray(b"xyz")):
        assert _fields(data_event(data)) == _fields(h11.Data(data=data))


def test_events_made_by_hand_drive_h11_as_its_own_do() -> None:
    # the bytes h11 writes for them and the state it reaches are those of its own events
    for make in (False, True):
        client = h11.Connection(h11.CLIENT)
        head = [(b"host", b"w"), (b"content-length", b"3")]
        request = (request_event(b"POST", b"/p", h11_headers(head)) if make
                   else h11.Request(method=b"POST", target=b"/p", headers=head))
        wire = client.send(request)
        body = client.send(data_event(b"abc") if make else h11.Data(data=b"abc"))
        assert (wire, body, client.our_state) == (
            b"POST /p HTTP/1.1\r\nhost: w\r\ncontent-length: 3\r\n\r\n", b"abc", h11.SEND_BODY)
        server = h11.Connection(h11.SERVER)
        server.receive_data(wire + body)
        assert type(server.next_event()) is h11.Request
        server.next_event()
        server.next_event()
        framing = [(b"content-length", b"2")]
        response = (response_event(200, h11_headers(framing)) if make
                    else h11.Response(status_code=200, headers=framing, reason=b"OK"))
        assert server.send(response) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        assert server.send(data_event(b"ok") if make else h11.Data(data=b"ok")) == b"ok"
        server.send(h11.EndOfMessage())
        assert server.our_state is h11.DONE
