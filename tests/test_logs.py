"""What the daemon writes on stderr: one structured line per request, clean startup errors, no secrets.

- `log_format: auto` gives one JSON object per line when stderr is not a
  terminal, key=value text when it is; `log_format: text` forces text.
- Every finished request gives exactly one access line (request_id, route,
  status, outcome, timings), whatever its outcome.
- A bad config at startup prints one line per problem and exits 2; a port in
  use prints one line and exits 1; never a traceback.
- `Authorization`, `Cookie`, `x-api-key` and similar secrets reach the worker
  unchanged and appear in no log line, ledger line or metric (SPEC "The client side").
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import (
    REPO,
    Daemon,
    FakeWorker,
    RawClient,
    Reset,
    Stall,
    chat_body,
    chat_stream_events,
    daemon_config,
    json_reply,
    openai_handler,
    post,
    request_bytes,
    run_cli,
    sse_reply,
)

ACCESS_FIELDS = ("request_id", "route", "status", "outcome", "ttfb_ms", "duration_ms")


def access_entries(daemon: Daemon, request_id: str) -> list[dict[str, Any]]:
    return [e for e in daemon.logs if e.get("request_id") == request_id]


def wait_access(daemon: Daemon, request_id: str) -> dict[str, Any]:
    daemon.ledger_for(request_id)  # the request has finished
    entry = daemon.wait_log(lambda e: e.get("request_id") == request_id, timeout=5)
    assert entry is not None, f"no log line for {request_id}"
    return entry


# =============================================================================================
# JSON lines (log_format: auto, stderr a pipe)
# =============================================================================================


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, log_format="auto", log_level="debug",
                              upstream={"idle_timeout": "500ms"})


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    module_worker.reset()
    yield module_worker
    assert not module_worker.errors, module_worker.errors


def test_one_json_line_per_request_whatever_the_outcome(daemon: Daemon, worker: FakeWorker) -> None:
    events = chat_stream_events(("a", "b"))
    worker.reply(
        sse_reply(events),
        json_reply({"id": "x", "object": "chat.completion", "created": 1, "model": "test-model",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}]}),
        json_reply({"error": {"message": "busy"}}, status=503),
        [*sse_reply(events[:2], end=False), Reset()],
    )
    cases = [
        ("log-stream", chat_body(stream=True), "/v1/chat/completions", 200, "ok", "chat"),
        ("log-json", chat_body(), "/v1/chat/completions", 200, "ok", "chat"),
        ("log-503", chat_body(), "/v1/chat/completions", 503, "upstream_http_error", "chat"),
        ("log-crash", chat_body(stream=True), "/v1/chat/completions", 200, "upstream_error", "chat"),
        ("log-404", chat_body(), "/nowhere", 404, "bad_request", ""),
        ("log-400", b"{nope", "/v1/chat/completions", 400, "bad_request", "chat"),
    ]
    for rid, body, target, status, outcome, route in cases:
        r = post(daemon, body, target=target, headers=[("x-request-id", rid)])
        assert r.status == status, (rid, r.body)
        entry = wait_access(daemon, rid)
        for name in ACCESS_FIELDS:
            if name == "ttfb_ms" and status >= 400:
                continue
            assert name in entry or (name == "route" and route == ""), (name, entry)
        assert entry["status"] == status, entry
        assert entry["outcome"] == outcome, entry
        assert entry.get("route", "") == route, entry
        assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] >= 0, entry
        assert entry["level"] == "info" and entry["ts"].endswith("Z"), entry
        assert entry.get("path") == target, entry
        assert entry.get("method") == "POST", entry
    crash = access_entries(daemon, "log-crash")[0]
    assert crash.get("code") == "upstream_disconnected", crash
    time.sleep(0.1)  # a late duplicate would show up here
    for rid, *_ in cases:
        assert len(access_entries(daemon, rid)) == 1, access_entries(daemon, rid)
    # every stderr line is one JSON object (stderr is a pipe, log_format auto)
    assert daemon.lines
    for line in daemon.lines:
        assert isinstance(json.loads(line), dict), line


def test_client_leaving_gives_one_line(daemon: Daemon, worker: FakeWorker) -> None:
    events = chat_stream_events(("Hel", "lo"))
    worker.reply([*sse_reply(events[:2], end=False), Stall()])
    with RawClient(daemon.address) as client:
        client.send(request_bytes(body=chat_body(stream=True), headers=[("x-request-id", "log-gone")]))
        client.read_until(b"Hel")
        client.reset()
    entry = wait_access(daemon, "log-gone")
    assert entry["outcome"] == "client_disconnect", entry
    assert len(access_entries(daemon, "log-gone")) == 1


# =============================================================================================
# Secrets
# =============================================================================================

SECRETS = {
    "authorization": "Bearer sk-live-AUTHSECRET-4f1d9a",
    "cookie": "session=COOKIESECRET-77ab; theme=dark",
    "x-api-key": "XAPIKEYSECRET-0c3e",
    "api-key": "AZUREKEYSECRET-9e2",
}
#: Hop-by-hop (RFC 9110 11.7.2: meant for the proxy): may be dropped, must not be logged either.
HOP_SECRETS = {"proxy-authorization": "Basic UFJPWFlTRUNSRVQ6cHc="}
#: Distinctive parts that must not appear anywhere, however a value would be cut or quoted.
SECRET_MARKERS = ("AUTHSECRET", "COOKIESECRET", "XAPIKEYSECRET", "UFJPWFlTRUNSRVQ6cHc",
                  "AZUREKEYSECRET")


def test_secrets_reach_the_worker_and_appear_nowhere(daemon: Daemon, worker: FakeWorker) -> None:
    events = chat_stream_events(("a", "b"))
    worker.reply(
        openai_handler(),
        openai_handler(),
        json_reply({"error": {"message": "bad key"}}, status=401),
        [*sse_reply(events[:2], end=False), Reset()],
        json_reply({"object": "list", "data": []}),
    )
    headers = [*SECRETS.items(), *HOP_SECRETS.items()]
    sent = [
        ("sec-json", "POST", "/v1/chat/completions", chat_body()),
        ("sec-stream", "POST", "/v1/chat/completions", chat_body(stream=True)),
        ("sec-401", "POST", "/v1/chat/completions", chat_body()),
        ("sec-crash", "POST", "/v1/chat/completions", chat_body(stream=True)),
        ("sec-rest", "GET", "/v1/models", None),
        ("sec-404", "POST", "/nowhere", chat_body()),
        ("sec-400", "POST", "/v1/chat/completions", b"{not json"),
    ]
    for rid, method, target, body in sent:
        with RawClient(daemon.address) as client:
            client.send(request_bytes(method, target, body, [*headers, ("x-request-id", rid)]))
            client.read_response()
        daemon.ledger_for(rid)
        wait_access(daemon, rid)
    forwarded = worker.wait_requests(5)
    assert len(forwarded) == 5
    for request in forwarded:
        for name, value in SECRETS.items():
            assert request.header(name) == value, (request.target, name, request.headers)
    metrics = httpx.get(daemon.admin_url + "/metrics", timeout=5).text
    assert daemon.ledger_path is not None
    ledger = daemon.ledger_path.read_text()
    with daemon._cond:
        lines = list(daemon.lines)
    for marker in SECRET_MARKERS:
        leaks = [line for line in lines if marker in line]
        assert not leaks, leaks
        assert marker not in ledger
        assert marker not in metrics


@pytest.mark.parametrize(
    ("head", "method", "path"),
    [
        (b"GET /x\r\nAuthorization:Bearer sk-live-AUTHSECRET-4f1d9a\r\n"
         b"Cookie:s=COOKIESECRET-77ab\r\nx-request-id: refused-1\r\n\r\n", "GET", "/x"),
        (b"POST\t/v1/chat/completions?password=XAPIKEYSECRET-0c3e\tHTTP/1.1\r\nHost: x\r\n"
         b"x-request-id: refused-2\r\n\r\n", "-", "-"),
        (b"GET http://user:AZUREKEYSECRET-9e2@host/v1/models HTTP/1.1\r\nhost: x\r\n"
         b"x-request-id: refused-3\r\n\r\n", "GET", "-"),
        (b"GET /v1/models?key=UFJPWFlTRUNSRVQ6cHc HTTP/1.1\r\nx-request-id: refused-4\r\n"
         b"X-Folded: a\r\n b\r\n\r\n", "GET", "/v1/models"),
    ],
    ids=["no-version", "tabs", "absolute-form", "folded"],
)
def test_refused_heads_log_no_secret(
    daemon: Daemon, worker: FakeWorker, head: bytes, method: str, path: str
) -> None:
    """A head that breaks the rules is logged by its method and path only where those are
    plainly there: never what follows them (headers, a query string, user info)."""
    with RawClient(daemon.address) as client:
        client.send(head)
        assert client.read_response().status == 400
    request_id = re.search(rb"x-request-id: (\S+)", head).group(1).decode()  # type: ignore[union-attr]
    entry = wait_access(daemon, request_id)
    assert (entry["method"], entry["path"]) == (method, path), entry
    with daemon._cond:
        lines = list(daemon.lines)
    for marker in SECRET_MARKERS:
        assert not [line for line in lines if marker in line], marker


# =============================================================================================
# Text lines: log_format text, and auto on a terminal
# =============================================================================================


class TextDaemon:
    """`sidecar run` whose stderr is plain text (a pipe, or a pseudo-terminal), read line by line."""

    def __init__(self, config: dict[str, Any], directory: Path, *, tty: bool) -> None:
        config = {**config, "usage_log": str(directory / "usage.jsonl")}
        self.config_path = directory / "sidecar.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.lines: list[str] = []
        self._cond = threading.Condition()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        argv = [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)]
        if tty:
            master, slave = pty.openpty()
            self.proc = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=slave)
            os.close(slave)
            fd = master
        else:
            self.proc = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert self.proc.stderr is not None
            fd = os.dup(self.proc.stderr.fileno())
            self.proc.stderr.close()
        threading.Thread(target=self._read, args=(fd,), daemon=True).start()
        line = self.wait_line(lambda s: "listening on " in s)
        assert line is not None, self.lines
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        self.address = ("127.0.0.1", int(match.group(1)))

    def _read(self, fd: int) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                data = b""
            if not data:
                break
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            with self._cond:
                self.lines += [c.decode("utf-8", "replace").rstrip("\r") for c in complete]
                self._cond.notify_all()
        with contextlib.suppress(OSError):
            os.close(fd)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 10) -> str | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.mark.parametrize(("log_format", "tty"), [("text", False), ("auto", True)])
def test_text_lines(worker: FakeWorker, tmp_path: Path, log_format: str, tty: bool) -> None:
    worker.default = openai_handler()
    text = TextDaemon(daemon_config(worker.url, log_format=log_format), tmp_path, tty=tty)
    try:
        with RawClient(text.address) as client:
            client.send(request_bytes(body=chat_body(), headers=[("x-request-id", "text-ok")]))
            assert client.read_response().status == 200
        with RawClient(text.address) as client:
            client.send(request_bytes(target="/nowhere", body=chat_body(),
                                      headers=[("x-request-id", "text-404")]))
            assert client.read_response().status == 404
        ok = text.wait_line(lambda s: "request_id=text-ok" in s)
        missing = text.wait_line(lambda s: "request_id=text-404" in s)
        assert ok is not None and missing is not None, text.lines
    finally:
        assert text.stop() == 0
    for line in text.lines:
        assert line and not line.startswith("{"), line
    fields = dict(token.split("=", 1) for token in ok.split() if "=" in token)
    assert fields["route"] == "chat", ok
    assert fields["status"] == "200", ok
    assert fields["outcome"] == "ok", ok
    assert float(fields["duration_ms"]) >= 0 and float(fields["ttfb_ms"]) >= 0, ok
    assert ok.startswith("info "), ok
    fields = dict(token.split("=", 1) for token in missing.split() if "=" in token)
    assert (fields["status"], fields["outcome"]) == ("404", "bad_request"), missing
    assert sum("request_id=text-ok" in s for s in text.lines) == 1


def test_text_lines_cannot_be_forged_by_a_model_name(worker: FakeWorker, tmp_path: Path) -> None:
    """A value from a client (the request's model, the line's model when the worker answers
    with an error) is quoted and escaped: it can neither end the line nor add keys."""
    forged = 'm status=200 outcome=ok\nerror sidecar.daemon: FORGED "x"'
    worker.reply(json_reply({"error": {"message": "busy"}}, status=503))
    text = TextDaemon(daemon_config(worker.url, log_format="text"), tmp_path, tty=False)
    try:
        with RawClient(text.address) as client:
            client.send(request_bytes(body={**chat_body(), "model": forged},
                                      headers=[("x-request-id", "text-forged")]))
            client.read_response()
        line = text.wait_line(lambda s: "request_id=text-forged" in s)
        assert line is not None, text.lines
    finally:
        assert text.stop() == 0
    assert not any(s.startswith("error sidecar.daemon: FORGED") for s in text.lines), text.lines
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line.partition(": ")[2])
    keys = [k for k, _ in pairs]
    assert keys.count("status") == keys.count("outcome") == keys.count("model") == 1, pairs
    assert json.loads(dict(pairs)["model"]) == forged
    assert dict(pairs)["status"] == "503"


# =============================================================================================
# Startup failures
# =============================================================================================


def test_bad_config_at_startup_prints_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listen: nonsense\n"
        "bogus: 1\n"
        "upstream:\n  url: ftp://worker\n  idle_timeout: soon\n"
        "routes:\n  - name: a\n    match: {path: v1}\n    dialect: passthrough\n"
    )
    result = run_cli("run", "-c", str(path), timeout=20)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) >= 5, lines
    for line in lines:
        assert re.match(r"^[A-Za-z_\[\]0-9.]+: \S", line), line
    for key in ("listen:", "bogus:", "upstream.url:", "upstream.idle_timeout:",
                "routes[0].match.path:"):
        assert any(line.startswith(key) for line in lines), (key, lines)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("listen: [unclosed\n", "YAML", id="yaml-syntax"),
        pytest.param(None, "no such file", id="missing-file"),
    ],
)
def test_unreadable_config_is_one_line(tmp_path: Path, text: str | None, needle: str) -> None:
    path = tmp_path / "sidecar.yaml"
    if text is not None:
        path.write_text(text)
    result = run_cli("run", "-c", str(path), timeout=20)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
def test_port_in_use_is_one_line_and_exit_1(worker: FakeWorker, tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = daemon_config(worker.url, **{which: f"127.0.0.1:{port}"})
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            result = run_cli("run", "-c", str(path), timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon started although {which} port {port} is in use")
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert str(port) in lines[0], lines
