"""SIGHUP and SIGTERM on the real daemon (SPEC "Process").

SIGHUP reloads the config: new requests get the new one (here: a new price)
while a stream that started before goes on with the old one untouched; a bad
config is refused, logged, and the old one kept. SIGTERM drains: the listener
closes at once, streams in flight finish (up to `drain_timeout`), idle
keep-alive connections are closed, and the process exits 0; a second SIGTERM
exits at once. The systemd notifications around these (READY, RELOADING,
STOPPING, WATCHDOG) are tested in test_systemd_units.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import (
    LOOPBACK,
    MODEL,
    REPO,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    chat_body,
    chat_completion,
    chat_stream_events,
    daemon_config,
    deep_merge,
    free_port,
    held_stream,
    json_reply,
    openai_handler,
    post,
    request_bytes,
)

OLD_COST = Decimal("0.000017")  # 11 x 1 + 3 x 2 per million (the harness's USAGE and price)
NEW_COST = Decimal("0.00017")  # 11 x 10 + 3 x 20 per million
NEW_PRICE = {"pricing": {"currency": "EUR", "models": {MODEL: {"prompt": 10.0, "completion": 20.0}}}}


def write_config(daemon: Daemon, config: dict[str, Any] | str) -> None:
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    daemon.config_path.write_text(text)


def reloaded(daemon: Daemon, after: int) -> dict[str, Any] | None:
    """The first 'config reloaded' log entry past index `after`."""
    return daemon.wait_log(
        lambda e: daemon.logs.index(e) >= after and str(e.get("msg", "")).startswith("config reloaded")
    )


def stream_in_background(daemon: Daemon, request_id: str) -> Future[RawResponse]:
    """A streaming chat request read to its end on another thread."""

    def run() -> RawResponse:
        with RawClient(daemon.address, timeout=20) as client:
            client.send(request_bytes(body=chat_body(stream=True, include_usage=True),
                                      headers=[("x-request-id", request_id)]))
            return client.read_response(timeout=20)

    pool = ThreadPoolExecutor(1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def wait_refused(daemon: Daemon, timeout: float = 5.0) -> bool:
    """True once a new connection to the client port is refused (the listener is closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(daemon.address, timeout=1).close()
        except OSError:  # refused; or reset, or never answered, in the closing backlog
            return True
        time.sleep(0.02)
    return False


def usage_cost(response: RawResponse) -> Decimal:
    chunks = [c for c in response.sse_json() if c != "[DONE]" and c.get("usage")]
    assert chunks, response.body
    return Decimal(str(chunks[-1]["usage"]["cost"]))


# =============================================================================================
# SIGHUP
# =============================================================================================


def test_sighup_new_price_for_new_requests_while_old_stream_finishes(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    release, started = threading.Event(), threading.Event()
    worker.reply(held_stream(chat_stream_events(("old", " stream")), release, started=started))
    worker.default = openai_handler()
    daemon = make_daemon(worker=worker, upstream={"idle_timeout": "10s"})

    old = stream_in_background(daemon, "old-stream")
    assert started.wait(5)
    mark = len(daemon.logs)
    write_config(daemon, deep_merge(daemon.config, NEW_PRICE))
    daemon.send_signal(signal.SIGHUP)
    assert reloaded(daemon, mark) is not None

    new = post(daemon, chat_body(), headers=[("x-request-id", "new-json")])
    assert new.status == 200
    assert Decimal(new.header("x-sidecar-cost") or "nan") == NEW_COST
    new_stream = post(daemon, chat_body(stream=True, include_usage=True),
                      headers=[("x-request-id", "new-stream")])
    assert usage_cost(new_stream) == NEW_COST
    assert not old.done(), "the old stream should still be held open"

    release.set()
    response = old.result(10)
    assert response.status == 200 and response.complete
    payloads = response.sse()
    assert payloads[-1] == "[DONE]"
    assert not any('"error"' in p for p in payloads)
    content = "".join(c["choices"][0]["delta"].get("content") or ""
                      for c in response.sse_json()[:-1] if c["choices"])
    assert content == "old stream"
    assert usage_cost(response) == OLD_COST

    assert daemon.ledger_path is not None
    records = {r["request_id"]: r for r in daemon.wait_ledger(3)}
    assert records["old-stream"]["outcome"] == "ok"
    assert Decimal(str(records["old-stream"]["cost"])) == OLD_COST
    assert Decimal(str(records["new-json"]["cost"])) == NEW_COST
    assert Decimal(str(records["new-stream"]["cost"])) == NEW_COST
    # each cost is counted in the currency it was priced in
    metrics = httpx.get(daemon.admin_url + "/metrics", timeout=5).text
    assert f'sidecar_cost_total{{model="{MODEL}",currency="USD"}} {OLD_COST}\n' in metrics, metrics
    assert f'sidecar_cost_total{{model="{MODEL}",currency="EUR"}} {2 * NEW_COST}\n' in metrics, metrics


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("listen: [unclosed\n", id="yaml-syntax"),
        pytest.param(None, id="invalid-values"),
    ],
)
def test_sighup_with_a_bad_config_keeps_the_old_one(
    worker: FakeWorker, tmp_path: Path, bad: str | None
) -> None:
    worker.default = openai_handler()
    config = daemon_config(worker.url)
    with Daemon(config, tmp_path) as daemon:
        if bad is None:
            broken = deep_merge(config, {"pricing": {"models": {MODEL: {"prompt": "lots"}}},
                                         "no_such_key": 1})
            write_config(daemon, broken)
        else:
            write_config(daemon, bad)
        # logrotate renamed the ledger: it is reopened by its path all the same
        assert daemon.ledger_path is not None
        daemon.ledger_path.rename(daemon.ledger_path.with_name("rotated.jsonl"))
        mark = len(daemon.logs)
        daemon.send_signal(signal.SIGHUP)
        refusal = daemon.wait_log(lambda e: daemon.logs.index(e) >= mark and e.get("level") == "error")
        assert refusal is not None, daemon.lines
        assert "exc" not in refusal and "\n" not in refusal["msg"], refusal
        if bad is None:
            assert "no_such_key" in refusal["msg"] and "pricing" in refusal["msg"], refusal
        # still serving, with the old price
        r = post(daemon, chat_body(), headers=[("x-request-id", "after-bad-reload")])
        assert r.status == 200
        assert Decimal(r.header("x-sidecar-cost") or "nan") == OLD_COST
        assert daemon.ledger_for("after-bad-reload")["outcome"] == "ok"  # in the reopened file
        assert daemon.alive()
        # and a good config is taken on the next SIGHUP
        write_config(daemon, deep_merge(config, NEW_PRICE))
        mark = len(daemon.logs)
        daemon.send_signal(signal.SIGHUP)
        assert reloaded(daemon, mark) is not None
        r = post(daemon, chat_body(), headers=[("x-request-id", "after-good-reload")])
        assert Decimal(r.header("x-sidecar-cost") or "nan") == NEW_COST
        unexpected = [e for e in daemon.errors() if e != json.dumps(refusal)]
        assert not unexpected, unexpected
        assert daemon.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_storm_leaves_it_serving_on_the_last_config(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], workers: int
) -> None:
    """20 SIGHUPs in a row, the file rewritten before each (a price, then the worker too):
    signals may merge, but the daemon keeps serving and ends on the last file, in every
    worker process."""
    worker.default = openai_handler()
    with FakeWorker() as last_worker:
        last_worker.default = openai_handler()
        daemon = make_daemon(worker=worker, workers=workers)
        for i in range(20):
            upstream = last_worker.url if i == 19 else worker.url
            staged = daemon.config_path.with_suffix(".new")  # whole, as a deploy tool writes it
            staged.write_text(yaml.safe_dump(deep_merge(daemon.config, {
                "upstream": {"url": upstream},
                "pricing": {"models": {MODEL: {"prompt": i + 1, "completion": 0}}}})))
            staged.replace(daemon.config_path)
            daemon.send_signal(signal.SIGHUP)
        last_cost = Decimal(20 * 11) / 1_000_000  # the harness's 11 prompt tokens at 20
        deadline = time.monotonic() + 15
        streak = 0
        while streak < 12:  # on fresh connections: both processes of workers: 2 take some
            assert time.monotonic() < deadline, "the last config was not applied"
            response = post(daemon, chat_body())
            assert response.status == 200
            streak = streak + 1 if Decimal(response.header("x-sidecar-cost") or "0") == last_cost else 0
        before = len(worker.requests)
        assert post(daemon, chat_body()).status == 200
        assert len(worker.requests) == before and last_worker.requests
        assert daemon.alive()
    assert daemon.stop() == 0


def test_sighup_applies_logging_and_names_what_needs_a_restart(
    worker: FakeWorker, tmp_path: Path
) -> None:
    """log_level and log_format apply at once; listen, admin_listen and workers are bound at
    start, so a reload that changes them says so, compared with what the process runs."""
    worker.default = openai_handler()
    config = daemon_config(worker.url)
    with Daemon(config, tmp_path) as daemon:

        def reload(changes: dict[str, Any]) -> list[dict[str, Any]]:
            """Reload; the warnings logged so far. At level warning the only sign of the
            reload is its warning, so one is asked for then."""
            mark = len(daemon.lines)
            write_config(daemon, deep_merge(config, changes))
            daemon.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while not any("config reloaded" in line for line in daemon.lines[mark:]):
                assert time.monotonic() < deadline, daemon.lines[mark:]
                time.sleep(0.02)
            return [e for e in daemon.logs if e.get("level") == "warning"]

        def access_lines(request_id: str) -> list[str]:
            assert post(daemon, chat_body(), headers=[("x-request-id", request_id)]).status == 200
            time.sleep(0.2)
            return [line for line in daemon.lines if request_id in line]

        warnings = reload({"log_level": "warning", "listen": "127.0.0.1:1", "workers": 2})
        assert len(warnings) == 1, warnings
        message = warnings[0]["msg"]
        assert "listen (still 127.0.0.1:0)" in message and "workers (still 1)" in message, message
        assert "admin_listen" not in message
        assert access_lines("at-warning") == [], "log_level: warning still logs requests"

        # back to what the process runs: nothing to warn about; requests are logged again
        assert reload({}) == warnings
        assert len(access_lines("at-info")) == 1

        reload({"log_format": "text"})
        (line,) = access_lines("as-text")
        assert line.startswith("info sidecar.access:"), line
        assert daemon.stop() == 0


# =============================================================================================
# SIGTERM
# =============================================================================================


def sighup_ignored(pid: int) -> bool:
    """True once the process ignores SIGHUP (its SigIgn mask in /proc has the bit)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signal.SIGHUP - 1)))


def test_sighup_during_startup_does_not_kill_the_daemon(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """logrotate's `kill -HUP` may race a restart: from the moment the command runs its own
    code until the daemon listens (and after), SIGHUP never ends the process."""
    worker.default = openai_handler()
    daemon = make_daemon(worker=worker, start=False)
    starting = ThreadPoolExecutor(1).submit(daemon.start)
    deadline = time.monotonic() + 20
    while daemon.proc is None or not sighup_ignored(daemon.proc.pid):
        assert time.monotonic() < deadline, "the command never set SIGHUP aside"
        assert daemon.proc is None or daemon.proc.poll() is None, daemon.lines
        time.sleep(0.001)
    sent = 0
    while not starting.done():
        daemon.send_signal(signal.SIGHUP)
        sent += 1
        time.sleep(0.01)
    starting.result()
    daemon.send_signal(signal.SIGHUP)  # and once the daemon's own handler reloads
    assert sent > 3 and daemon.alive(), daemon.lines
    assert post(daemon, chat_body()).status == 200
    assert reloaded(daemon, 0) is not None


def test_sigterm_lets_the_stream_in_flight_finish_and_exits_0(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    release, started = threading.Event(), threading.Event()
    worker.default = openai_handler()
    daemon = make_daemon(worker=worker, drain_timeout="10s", upstream={"idle_timeout": "10s"})
    idle = RawClient(daemon.address)  # a keep-alive connection, idle at SIGTERM
    idle.send(request_bytes(body=chat_body()))
    assert idle.read_response().status == 200
    worker.reply(held_stream(chat_stream_events(("drain", "ed")), release, started=started))

    stream = stream_in_background(daemon, "in-flight")
    assert started.wait(5)
    daemon.send_signal(signal.SIGTERM)
    assert wait_refused(daemon), "new connections are still accepted while draining"
    assert idle.closed_by_peer(5), "an idle keep-alive connection stays open while draining"
    idle.close()
    assert daemon.alive(), "the daemon exited with a stream in flight"
    assert not stream.done()
    # the admin port answers through the drain: alive, not ready
    assert httpx.get(f"{daemon.admin_url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{daemon.admin_url}/readyz", timeout=5).status_code == 503
    assert "sidecar_active_streams" in httpx.get(f"{daemon.admin_url}/metrics", timeout=5).text

    release.set()
    response = stream.result(10)
    assert response.status == 200 and response.complete
    assert response.sse()[-1] == "[DONE]"
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0
    record = daemon.ledger_for("in-flight")
    assert record["outcome"] == "ok"
    assert any(e.get("msg") == "stopped" for e in daemon.logs)


def test_second_sigterm_exits_at_once(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    release, started = threading.Event(), threading.Event()
    worker.reply(held_stream(chat_stream_events(), release, started=started))
    daemon = make_daemon(worker=worker, drain_timeout="60s", upstream={"idle_timeout": "60s"})
    stream = stream_in_background(daemon, "never-finishes")
    assert started.wait(5)
    daemon.send_signal(signal.SIGTERM)
    assert wait_refused(daemon)  # the first one was handled: draining
    time.sleep(0.2)
    assert daemon.alive(), "the first SIGTERM should wait for the stream (drain_timeout 60s)"
    began = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.proc is not None
    assert daemon.proc.wait(5) == 0
    assert time.monotonic() - began < 3.0  # loose: "at once"
    response = stream.result(5)
    assert "[DONE]" not in response.sse()
    release.set()
    # what it cut is still in the ledger
    assert daemon.ledger_for("never-finishes")["outcome"] == "client_disconnect"


def test_drain_timeout_bounds_the_wait(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    release, started = threading.Event(), threading.Event()
    worker.reply(held_stream(chat_stream_events(), release, started=started))
    daemon = make_daemon(worker=worker, drain_timeout="1s", upstream={"idle_timeout": "60s"})
    stream = stream_in_background(daemon, "cut-by-drain")
    assert started.wait(5)
    began = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0
    waited = time.monotonic() - began
    assert 0.8 <= waited < 8.0, waited  # loose bounds around drain_timeout: 1s
    response = stream.result(5)
    assert not response.complete or "[DONE]" not in response.sse()
    assert worker.wait_peer_closed(1, timeout=2), "the worker connection was left open"
    # every request has its ledger line, whatever the outcome (SPEC "Ledger")
    record = daemon.ledger_for("cut-by-drain", timeout=2)
    assert record["outcome"] != "ok"
    release.set()


def test_sigterm_waits_for_an_answer_the_client_has_not_taken_yet(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """An answer the daemon has written whole (accounted `ok`) but a slow client has not
    read yet sits partly in the daemon's own buffers, beyond what the kernel queues: the
    drain waits for it (it is in flight), rather than exiting and cutting it short."""
    content = "x" * 16_000_000  # far more than the kernel's socket buffers hold
    worker.reply(json_reply(chat_completion(content=content)))
    daemon = make_daemon(worker=worker, drain_timeout="30s")
    with RawClient(daemon.address, timeout=20) as client:
        client.send(request_bytes(body=chat_body(), headers=[("x-request-id", "unread")]))
        assert daemon.ledger_for("unread")["outcome"] == "ok"  # answered, from its side
        daemon.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the client reads nothing yet
        response = client.read_response(timeout=20)
    assert response.status == 200
    assert response.complete, f"{len(response.body)} of {response.header('content-length')} bytes"
    assert response.json()["choices"][0]["message"]["content"] == content
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0


def test_sigterm_still_answers_a_request_already_received_behind_the_one_in_flight(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """A pipelined request that had arrived whole when the drain began is answered (with
    `connection: close`) and recorded, not dropped with the connection it came on."""
    release, started = threading.Event(), threading.Event()
    worker.reply(held_stream(chat_stream_events(("drain", "ed")), release, started=started))
    worker.default = openai_handler()
    daemon = make_daemon(worker=worker, drain_timeout="10s", upstream={"idle_timeout": "10s"})
    with RawClient(daemon.address, timeout=20) as client:
        client.send(
            request_bytes(body=chat_body(stream=True), headers=[("x-request-id", "first")])
            + request_bytes(body=chat_body(), headers=[("x-request-id", "behind")])
        )
        assert started.wait(5)
        daemon.send_signal(signal.SIGTERM)
        assert wait_refused(daemon)
        release.set()
        first = client.read_response()
        second = client.read_response()
        assert client.closed_by_peer(5)
    assert first.status == 200 and first.complete and first.sse()[-1] == "[DONE]"
    assert second.status == 200 and second.complete
    assert second.header("x-request-id") == "behind"
    assert second.header("connection") == "close"
    assert daemon.ledger_for("behind")["outcome"] == "ok"
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0


def test_sighup_while_draining_reopens_the_ledger_and_tells_systemd_nothing(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """After STOPPING=1 a reload would tell systemd RELOADING=1 then READY=1: a SIGHUP
    during the drain (logrotate's) only reopens the ledger; the stream in flight ends."""
    release, started = threading.Event(), threading.Event()
    worker.reply(held_stream(chat_stream_events(("drain", "ed")), release, started=started))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    daemon = make_daemon(worker=worker, drain_timeout="10s", upstream={"idle_timeout": "10s"},
                         env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        stream = stream_in_background(daemon, "in-flight")
        assert started.wait(5)
        daemon.send_signal(signal.SIGTERM)
        assert wait_refused(daemon)
        assert daemon.ledger_path is not None
        daemon.ledger_path.rename(daemon.ledger_path.with_suffix(".1"))  # logrotate
        daemon.send_signal(signal.SIGHUP)
        ignored = daemon.wait_log(lambda e: "reload" in str(e.get("msg")), 5)
        release.set()
        assert stream.result(10).sse()[-1] == "[DONE]"
        assert daemon.proc is not None and daemon.proc.wait(10) == 0
        states: list[bytes] = []
        with contextlib.suppress(TimeoutError):
            while True:
                states.append(notify.recv(4096))
        after_stop = b"\n".join(states).partition(b"STOPPING=1")[2]
        assert b"STOPPING=1" in b"\n".join(states)
        assert b"RELOADING=1" not in after_stop and b"READY=1" not in after_stop, states
        assert ignored is not None and "reload ignored" in ignored["msg"]
        assert daemon.ledger_for("in-flight")["outcome"] == "ok"  # in the reopened ledger
        assert "in-flight" in daemon.ledger_path.read_text()
    finally:
        release.set()
        notify.close()


# =============================================================================================
# SIGTERM and Ctrl-C while starting
# =============================================================================================


def spawn_sidecar(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "SIDECAR_LISTEN", "SIDECAR_ADMIN_LISTEN",
                 "SIDECAR_UPSTREAM"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_accepting(proc: subprocess.Popen[str], port: int, timeout: float = 20.0) -> None:
    """Return the moment a TCP connection to `port` is accepted (the listener is bound)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the daemon never listened"
            time.sleep(0.001)


def stopped_by(proc: subprocess.Popen[str], sig: signal.Signals, when: Callable[[], None]) -> str:
    """Send `sig` to a `sidecar` command once `when()` returns; it must stop cleanly: exit 0,
    no traceback. Returns its stderr."""
    try:
        when()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (sig, err)
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_as_soon_as_the_port_listens_exits_0(
    worker: FakeWorker, tmp_path: Path, workers: int
) -> None:
    """A supervisor (or a test) that stops the daemon the moment its port accepts
    connections gets SPEC's SIGTERM: a clean stop and exit 0, never a death by the signal
    (the listener is bound before the daemon's own handlers are in place)."""
    worker.default = openai_handler()
    port = free_port()
    config = daemon_config(worker.url, listen=f"{LOOPBACK}:{port}", workers=workers)
    del config["admin_listen"]
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    for _ in range(3):
        proc = spawn_sidecar("run", "-c", str(path), cwd=tmp_path)
        err = stopped_by(proc, signal.SIGTERM, lambda p=proc: wait_accepting(p, port))
        assert '"stopped"' in err, err


def test_sigterm_right_after_the_demo_prints_its_url_exits_0(tmp_path: Path) -> None:
    """`sidecar demo` prints its URL once the port listens: a SIGTERM (or Ctrl-C) sent on
    reading it stops both cleanly, exit 0."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        proc = spawn_sidecar("demo", cwd=tmp_path)

        def url_printed(proc: subprocess.Popen[str] = proc) -> None:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("sidecar demo: the daemon is at http://127.0.0.1:"), first

        stopped_by(proc, sig, url_printed)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_command_starts_is_a_clean_stop(
    worker: FakeWorker, tmp_path: Path, sig: signal.Signals
) -> None:
    """From the moment the command runs its own code (it sets SIGHUP aside first), a
    SIGTERM or Ctrl-C that comes before the daemon listens (imports, config) is not lost
    and kills nothing: the daemon stops as soon as it can, exit 0, no traceback."""
    worker.default = openai_handler()
    config = daemon_config(worker.url)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = spawn_sidecar("run", "-c", str(path), cwd=tmp_path)

    def starting() -> None:
        deadline = time.monotonic() + 20
        while not sighup_ignored(proc.pid):
            assert time.monotonic() < deadline, "the command never set SIGHUP aside"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.0005)

    stopped_by(proc, sig, starting)
