"""SPEC "Config (YAML)": whatever was asked, the worker's actual response decides.
`Content-Type: text/event-stream` is SSE, `application/json` is JSON (parameters and case
aside), and with no usable type the first non-blank byte decides: `{` JSON, and each of
`d e i r :` (data, event, id, retry, a comment) SSE. A non-streaming client sees the
aggregated document either way; the real daemon and a fake worker, on real sockets."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.harness import (
    Daemon,
    FakeWorker,
    Send,
    chat_completion,
    chat_route,
    chat_stream_events,
    post,
    response_head,
)

SSE = b"".join(chat_stream_events())  # content "Hello!"
DOC = json.dumps(chat_completion("From JSON")).encode()


@pytest.fixture(scope="module")
def proxy(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, routes=[chat_route()])


@pytest.mark.parametrize(
    ("content_type", "body", "content"),
    [
        (None, b"event: message\n" + SSE, "Hello!"),
        (None, b"id: 1\n" + SSE, "Hello!"),
        (None, b"retry: 1000\n" + SSE, "Hello!"),
        (None, b": warming up\n\n" + SSE, "Hello!"),
        (None, b"\r\n\t " + DOC, "From JSON"),
        ("application/octet-stream", SSE, "Hello!"),
        ("Text/Event-Stream; charset=utf-8", SSE, "Hello!"),
        ("application/json; charset=utf-8", DOC, "From JSON"),
    ],
    ids=["e", "i", "r", "colon", "brace", "unusable-type", "sse-type", "json-type"],
)
def test_the_response_itself_decides_sse_or_json(
    w: FakeWorker, proxy: Daemon, content_type: str | None, body: bytes, content: str
) -> None:
    headers = [("content-length", str(len(body)))]
    if content_type:
        headers.append(("content-type", content_type))
    w.reply([Send(response_head(200, headers) + body)])
    response = post(proxy, {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status == 200, response.body
    assert response.json()["choices"][0]["message"]["content"] == content
