"""`workers: 2`: two processes share the client port; ledger, SIGHUP and SIGTERM cover them all.

The daemon does not say which process answered a request, so the tests look
at the processes from outside: the children of the daemon's pid in /proc, and
which of them holds each established client connection (socket inodes of
/proc/net/tcp matched against /proc/PID/fd).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    MODEL,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    chat_body,
    chat_completion,
    chat_stream_events,
    daemon_config,
    deep_merge,
    held_stream,
    json_reply,
    metric_samples,
    metrics_text,
    openai_handler,
    post,
    request_bytes,
    run_cli,
)

OLD_COST = Decimal("0.000017")  # the harness's USAGE at prompt 1, completion 2 per million
NEW_COST = Decimal("0.00017")
CONNECTIONS = 24  # both processes get some: all on one has odds 2 x 2^-24


def children(pid: int) -> set[int]:
    """Pids whose parent is `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def dead(pid: int) -> bool:
    """True once `pid` has exited: reaped (no /proc entry) or a zombie awaiting its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # reaped, possibly between any two looks at /proc
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_children(pid: int, count: int, timeout: float = 5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        found = children(pid)
        if len(found) == count or time.monotonic() >= deadline:
            return found
        time.sleep(0.02)


def established_by_process(pids: set[int], port: int) -> Counter[int]:
    """How many established TCP connections on local `port` each of `pids` holds."""
    inodes: dict[str, int] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes[inode] = 0
    owners: Counter[int] = Counter()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[pid] += 1
    return owners


def open_kept(daemon: Daemon, stack: ExitStack, count: int, prefix: str) -> list[RawResponse]:
    """`count` keep-alive connections, one request each, answered concurrently; left open."""
    clients = [stack.enter_context(RawClient(daemon.address)) for _ in range(count)]

    def one(i: int) -> RawResponse:
        clients[i].send(request_bytes(body=chat_body(), headers=[("x-request-id", f"{prefix}-{i}")]))
        return clients[i].read_response()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def write_config(daemon: Daemon, config: dict[str, Any]) -> None:
    daemon.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    return make_module_daemon(worker=module_worker, workers=2,
                              limits={"max_connections": 512},
                              upstream={"max_idle_connections": 64})


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    module_worker.reset()
    module_worker.default = openai_handler()
    yield module_worker
    assert not module_worker.errors, module_worker.errors


def test_two_processes_share_the_port_and_both_serve(daemon: Daemon, worker: FakeWorker) -> None:
    kids = wait_children(daemon.pid, 2)
    assert len(kids) == 2, kids
    with ExitStack() as stack:
        responses = open_kept(daemon, stack, CONNECTIONS, "share")
        assert [r.status for r in responses] == [200] * CONNECTIONS
        owners = established_by_process(kids | {daemon.pid}, daemon.port)
    assert sum(owners.values()) == CONNECTIONS, owners
    assert owners[daemon.pid] == 0, "the supervising parent serves clients itself"
    assert all(owners[k] > 0 for k in kids), f"only one process serves: {owners}"


@pytest.mark.parametrize("workers", [2, 1])
def test_a_second_daemon_cannot_take_a_share_of_the_port(
    daemon: Daemon, worker: FakeWorker, tmp_path: Path, workers: int
) -> None:
    """The running daemon's workers share the port through SO_REUSEPORT; a second daemon on
    that port (a stray manual start, a duplicate container) fails to start, as it does
    when nothing shares it, instead of silently joining the group and its traffic."""
    config = daemon_config(worker.url, workers=workers, listen=f"127.0.0.1:{daemon.port}")
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_cli("run", "-c", str(path), timeout=20)
    assert result.returncode == 1, result
    assert "already in use" in result.stderr and str(daemon.port) in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert all(post(daemon, chat_body()).status == 200 for _ in range(4))


def test_ledger_whole_lines_across_processes(daemon: Daemon, worker: FakeWorker) -> None:
    assert daemon.ledger_path is not None
    before = len(daemon.ledger())
    # long ids make long lines: a torn or interleaved append would show
    ids = [f"w-{i:03d}-" + "x" * 150 for i in range(200)]

    def one(i: int) -> int:
        body = chat_body(stream=i % 2 == 0, include_usage=True if i % 2 == 0 else None)
        return post(daemon, body, headers=[("x-request-id", ids[i])]).status

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(one, range(len(ids))))
    assert statuses == [200] * len(ids)
    records = daemon.wait_ledger(before + len(ids))
    text = daemon.ledger_path.read_text()
    assert text.endswith("\n")
    assert len(text.splitlines()) == len(records) == before + len(ids)  # every line parsed
    mine = Counter(r["request_id"] for r in records[before:])
    assert mine == Counter(ids)
    assert all(r["outcome"] == "ok" and Decimal(str(r["cost"])) == OLD_COST
               for r in records[before:])


def test_sighup_reaches_every_worker(daemon: Daemon, worker: FakeWorker) -> None:
    kids = wait_children(daemon.pid, 2)
    mark = len(daemon.logs)
    write_config(daemon, deep_merge(daemon.config,
                                    {"pricing": {"models": {MODEL: {"prompt": 10.0, "completion": 20.0}}}}))
    try:
        daemon.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reloads = [e for e in daemon.logs[mark:] if str(e.get("msg", "")).startswith("config reloaded")]
            if len(reloads) >= 2:
                break
            time.sleep(0.02)
        assert len(reloads) == 2, daemon.lines[mark:]
        with ExitStack() as stack:
            responses = open_kept(daemon, stack, CONNECTIONS, "hup")
            owners = established_by_process(kids, daemon.port)
        assert all(owners[k] > 0 for k in kids), owners
        costs = {Decimal(r.header("x-sidecar-cost") or "nan") for r in responses}
        assert costs == {NEW_COST}, costs
        assert wait_children(daemon.pid, 2) == kids  # reloaded, not restarted
    finally:
        mark = len(daemon.logs)
        write_config(daemon, daemon.config)
        daemon.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(
            str(e.get("msg", "")).startswith("config reloaded") for e in daemon.logs[mark:]
        ) < 2:
            time.sleep(0.02)


def test_a_refused_reload_still_reopens_every_workers_ledger(
    worker: FakeWorker, tmp_path: Path
) -> None:
    """logrotate renames the ledger and sends SIGHUP: the file is reopened by its path in
    every worker process even when the config on disk is refused."""
    config = daemon_config(worker.url, workers=2, limits={"max_connections": 512})
    with Daemon(config, tmp_path) as daemon:  # (not make_daemon: the refusal is an error line)
        kids = wait_children(daemon.pid, 2)
        assert daemon.ledger_path is not None
        daemon.ledger_path.rename(daemon.ledger_path.with_name("rotated.jsonl"))
        mark = len(daemon.logs)
        daemon.config_path.write_text(daemon.config_path.read_text() + "no_such_key: 1\n")
        daemon.send_signal(signal.SIGHUP)
        assert daemon.wait_log(lambda e: daemon.logs.index(e) >= mark
                               and str(e.get("msg", "")).startswith("reload refused"))
        time.sleep(0.3)  # the workers' reopen
        with ExitStack() as stack:
            open_kept(daemon, stack, CONNECTIONS, "rotated")
            owners = established_by_process(kids, daemon.port)
        assert all(owners[k] > 0 for k in kids), owners
        ids = {f"rotated-{i}" for i in range(CONNECTIONS)}
        deadline = time.monotonic() + 5
        while {r["request_id"] for r in daemon.ledger()} & ids != ids:
            assert time.monotonic() < deadline, "lines went to the rotated file"
            time.sleep(0.05)
        assert daemon.stop() == 0


def test_metrics_count_the_requests_of_every_worker(daemon: Daemon, worker: FakeWorker) -> None:
    """/metrics describes the daemon, not whichever process happened to accept the scrape."""
    kids = wait_children(daemon.pid, 2)
    with ExitStack() as stack:
        open_kept(daemon, stack, CONNECTIONS, "metrics")
        owners = established_by_process(kids, daemon.port)
    assert all(owners[k] > 0 for k in kids), owners
    finished = len(daemon.wait_ledger(CONNECTIONS))
    totals = []
    for _ in range(6):
        text = httpx.get(daemon.admin_url + "/metrics", timeout=5).text
        totals.append(sum(
            s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "sidecar_requests_total"
        ))
    assert totals == [finished] * len(totals), (
        f"the ledger has {finished} requests; scrapes of /metrics counted {totals}")


def scraped_requests(daemon: Daemon) -> float:
    """sidecar_requests_total summed over its label sets, from one scrape of /metrics."""
    text = httpx.get(daemon.admin_url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "sidecar_requests_total")


def test_metrics_of_a_worker_that_does_not_answer_keep_their_last_counts(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """A stopped (SIGSTOP) worker process holds up a scrape ~1 s, not forever, and its
    counters stay in the totals: a counter that dipped would read as a reset."""
    kids = wait_children(daemon.pid, 2)
    with ExitStack() as stack:
        open_kept(daemon, stack, CONNECTIONS, "stop")
    finished = len(daemon.wait_ledger(CONNECTIONS))
    assert scraped_requests(daemon) == finished
    frozen = min(kids)
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert scraped_requests(daemon) == finished
    finally:
        os.kill(frozen, signal.SIGCONT)
    warning = daemon.wait_log(lambda e: e.get("level") == "warning" and str(e.get("msg", ""))
                              .startswith(f"worker process {frozen} did not answer"))
    assert warning is not None, daemon.lines[-20:]
    assert scraped_requests(daemon) == finished


def test_a_hung_worker_process_is_killed_and_replaced(worker: FakeWorker, tmp_path: Path) -> None:
    """A worker whose event loop stops (SIGSTOP stands in for a wedged loop) takes its share
    of new connections and answers none; systemd's watchdog hears only the parent, so the
    parent watches its workers: after `worker_timeout` of silence it kills and replaces it."""
    config = daemon_config(worker.url, workers=2, worker_timeout="1s")
    with Daemon(config, tmp_path) as daemon:
        kids = wait_children(daemon.pid, 2)
        hung, survivor = sorted(kids)
        os.kill(hung, signal.SIGSTOP)
        began = time.monotonic()
        killed = daemon.wait_log(lambda e: str(e.get("msg", "")).startswith(
            f"worker process {hung} has not answered for"), timeout=10)
        assert killed is not None, daemon.lines[-20:]
        assert 0.8 <= time.monotonic() - began <= 4.0
        ready = daemon.wait_log(lambda e: str(e.get("msg", "")).endswith(" is ready"), timeout=10)
        assert ready is not None, daemon.lines[-20:]
        now = wait_children(daemon.pid, 2)
        assert hung not in now and survivor in now and len(now) == 2, now
        assert [post(daemon, chat_body()).status for _ in range(8)] == [200] * 8
        time.sleep(1.5)  # a healthy worker under the same watch is left alone
        assert wait_children(daemon.pid, 2) == now


def test_a_killed_worker_process_is_replaced_and_requests_keep_succeeding(
    worker: FakeWorker, tmp_path: Path
) -> None:
    config = daemon_config(worker.url, workers=2, limits={"max_connections": 512})
    with Daemon(config, tmp_path) as daemon:
        kids = wait_children(daemon.pid, 2)
        assert len(kids) == 2, kids
        with ExitStack() as stack:
            assert [r.status for r in open_kept(daemon, stack, CONNECTIONS, "before")] == [200] * CONNECTIONS
        daemon.wait_ledger(CONNECTIONS)
        assert scraped_requests(daemon) == CONNECTIONS

        victim, survivor = sorted(kids)
        os.kill(victim, signal.SIGKILL)
        # dead (its listener closed with it): the survivor serves at once
        deadline = time.monotonic() + 5
        while not dead(victim):
            assert time.monotonic() < deadline, "SIGKILL did not kill"
            time.sleep(0.01)
        assert [post(daemon, chat_body()).status for _ in range(4)] == [200] * 4

        ready = daemon.wait_log(lambda e: str(e.get("msg", "")).endswith(" is ready"))
        assert ready is not None, daemon.lines
        now = wait_children(daemon.pid, 2)
        assert survivor in now and victim not in now and len(now) == 2, now
        replacement = (now - {survivor}).pop()
        assert ready["msg"] == f"worker process {replacement} is ready"
        with ExitStack() as stack:
            responses = open_kept(daemon, stack, CONNECTIONS, "after")
            owners = established_by_process(now, daemon.port)
        assert [r.status for r in responses] == [200] * CONNECTIONS
        assert all(owners[k] > 0 for k in now), f"the replacement does not serve: {owners}"

        total = 2 * CONNECTIONS + 4
        assert len(daemon.wait_ledger(total)) == total
        # the killed process's counters (as last scraped) stay in the daemon's totals
        assert scraped_requests(daemon) == total
        errors = [e for e in daemon.logs if e.get("level") in ("error", "critical") or "exc" in e]
        assert [e["msg"] for e in errors] == [
            f"worker process {victim} was killed by SIGKILL: starting a replacement"]
    assert daemon.proc is not None and daemon.proc.returncode == 0


def next_notify(sock: socket.socket, state: str) -> list[str]:
    """The next sd_notify datagram holding `state` (WATCHDOG=1 pings in between are skipped)."""
    while True:
        lines = sock.recv(4096).decode().split("\n")
        if state in lines:
            return lines


def test_sd_notify_and_watchdog_come_from_the_parent(worker: FakeWorker, tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    with notify, Daemon(daemon_config(worker.url, workers=2), tmp_path, env=env) as daemon:
        ready = next_notify(notify, "READY=1")
        assert f"STATUS=listening on {daemon.host}:{daemon.port} with 2 workers" in ready
        kids = wait_children(daemon.pid, 2)
        assert len(kids) == 2
        assert notify.recv(4096) == b"WATCHDOG=1"
        assert notify.recv(4096) == b"WATCHDOG=1"
        daemon.send_signal(signal.SIGHUP)
        assert any(line.startswith("MONOTONIC_USEC=") for line in next_notify(notify, "RELOADING=1"))
        next_notify(notify, "READY=1")
        assert post(daemon, chat_body()).status == 200
        daemon.send_signal(signal.SIGTERM)
        next_notify(notify, "STOPPING=1")
        assert daemon.proc is not None and daemon.proc.wait(10) == 0
    assert not daemon.errors(), daemon.errors()


def streams_on_both_processes(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], stack: ExitStack,
    release: threading.Event, streams: int, prefix: str, timeout: str, drain: str | None = None,
) -> tuple[Daemon, set[int], list[RawClient]]:
    """A `workers: 2` daemon with `streams` streams held open until `release` (request ids
    `prefix-N`), some on each worker process: (the daemon, its worker pids, the clients)."""
    started = [threading.Event() for _ in range(streams)]
    worker.default = None
    for i in range(streams):
        worker.reply(held_stream(chat_stream_events(("bye",)), release, started=started[i]))
    daemon = make_daemon(worker=worker, workers=2, drain_timeout=drain or timeout,
                         upstream={"idle_timeout": timeout})
    kids = wait_children(daemon.pid, 2)
    assert len(kids) == 2
    clients = [stack.enter_context(RawClient(daemon.address, timeout=20)) for _ in range(streams)]
    for i, client in enumerate(clients):
        client.send(request_bytes(body=chat_body(stream=True),
                                  headers=[("x-request-id", f"{prefix}-{i}")]))
    assert all(e.wait(5) for e in started)
    owners = established_by_process(kids, daemon.port)
    assert all(owners[k] > 0 for k in kids), owners
    return daemon, kids, clients


@pytest.mark.parametrize("to_every_process", [False, True], ids=["to-parent", "to-the-group"])
def test_sigterm_stops_every_worker_after_their_streams(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], to_every_process: bool
) -> None:
    """One SIGTERM drains, whether sent to the parent or to every process of the group
    (systemd's KillMode=control-group): a worker process that gets it from both sides has
    been told once."""
    streams = 12
    release = threading.Event()
    with ExitStack() as stack:
        daemon, kids, clients = streams_on_both_processes(
            worker, make_daemon, stack, release, streams, "term", "10s")

        if to_every_process:  # (not killpg: the daemon shares the test's process group)
            for kid in kids:
                os.kill(kid, signal.SIGTERM)
            time.sleep(0.3)  # each has handled its own before the parent's word comes
        daemon.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                socket.create_connection(daemon.address, timeout=1).close()
                time.sleep(0.02)
            except OSError:  # refused; or reset, or never answered, in a closing backlog
                refused = True
        assert refused, "new connections are still accepted while draining"
        assert daemon.alive() and all(Path(f"/proc/{k}").exists() for k in kids)

        release.set()
        for client in clients:
            response = client.read_response(timeout=10)
            assert response.status == 200 and response.complete
            assert response.sse()[-1] == "[DONE]"
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0
    assert not children(daemon.pid)
    for kid in kids:
        assert dead(kid), kid
    records = daemon.wait_ledger(streams)
    assert sorted(r["request_id"] for r in records) == sorted(f"term-{i}" for i in range(streams))
    assert all(r["outcome"] == "ok" for r in records)


def test_sigterm_refuses_new_clients_on_a_shared_unix_socket(
    worker: FakeWorker, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """On a unix socket every process shares one listening socket, the parent's copy too:
    once the drain begins a new client is refused at once, not queued in a backlog that no
    process takes from any more (it would hang until the daemon exits)."""
    release, started = threading.Event(), threading.Event()
    worker.default = None
    worker.reply(held_stream(chat_stream_events(("bye",)), release, started=started))
    path = str(tmp_path / "sidecar.sock")
    daemon = make_daemon(worker=worker, workers=2, listen=f"unix:{path}", drain_timeout="10s",
                         upstream={"idle_timeout": "10s"})
    assert len(wait_children(daemon.pid, 2)) == 2
    try:
        with RawClient(path, timeout=20) as client:
            client.send(request_bytes(body=chat_body(stream=True),
                                      headers=[("x-request-id", "held")]))
            assert started.wait(5)
            daemon.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            refused = False
            while not refused and time.monotonic() < deadline:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(2)
                    try:
                        probe.connect(path)
                    except OSError:
                        refused = True
                        continue
                    time.sleep(0.02)
            assert refused, "new clients are still queued on the unix socket while draining"
            assert daemon.alive()
            release.set()
            response = client.read_response(timeout=10)
            assert response.status == 200 and response.sse()[-1] == "[DONE]"
    finally:
        release.set()
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0
    assert daemon.ledger_for("held")["outcome"] == "ok"


def test_drain_timeout_cuts_the_streams_of_every_worker_and_exits_0(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """One SIGTERM, streams that never end: each worker process cuts its own at
    drain_timeout, every cut stream has its ledger line, and the daemon exits 0."""
    streams = 8
    release = threading.Event()
    try:
        with ExitStack() as stack:
            daemon, _, clients = streams_on_both_processes(
                worker, make_daemon, stack, release, streams, "cut-by-drain", "30s", drain="1s")
            began = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.proc is not None
            assert daemon.proc.wait(15) == 0
            assert time.monotonic() - began >= 0.8, "exited before drain_timeout"
            assert not children(daemon.pid)
            for client in clients:
                assert "[DONE]" not in client.read_response(timeout=5).sse()
        records = daemon.ledger()
        assert sorted(r["request_id"] for r in records) == sorted(
            f"cut-by-drain-{i}" for i in range(streams))
        assert {r["outcome"] for r in records} == {"client_disconnect"}
    finally:
        release.set()


def test_a_second_sigterm_waits_for_the_workers_to_close_what_is_in_flight(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """The second SIGTERM cuts the streams in flight, each still with its ledger line, then
    exit 0. The parent exits only after its workers: as a container's pid 1, or under the
    shipped unit's KillMode=mixed, its exit kills the workers before they write those lines.
    (A worker process held in SIGSTOP stands in for one that takes a moment to close.)"""
    streams = 12
    release = threading.Event()
    with ExitStack() as stack:
        daemon, kids, clients = streams_on_both_processes(
            worker, make_daemon, stack, release, streams, "cut", "30s")
        slow = min(kids)
        os.kill(slow, signal.SIGSTOP)
        try:
            daemon.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            daemon.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert daemon.alive(), "the parent exited while a worker still held requests"
        finally:
            os.kill(slow, signal.SIGCONT)
        assert daemon.proc is not None
        assert daemon.proc.wait(5) == 0
        assert not children(daemon.pid)
        records = daemon.ledger()  # complete when the daemon is gone, not some time later
        assert sorted(r["request_id"] for r in records) == sorted(f"cut-{i}" for i in range(streams))
        assert {r["outcome"] for r in records} == {"client_disconnect"}
        for client in clients:
            assert "[DONE]" not in client.read_response(timeout=5).sse()
    release.set()


def test_model_labels_stay_put_when_a_worker_process_is_replaced(
    worker: FakeWorker, tmp_path: Path
) -> None:
    """Model labels are capped (256, then `other`) in the daemon's sum too. Which models keep
    their label must not depend on the order the parent sums its workers in (a dead worker's
    counters move to the front): a model's series would vanish and `other` go backwards."""
    worker.default = lambda request: json_reply(chat_completion(model=request.json()["model"]))
    config = daemon_config(worker.url, workers=2, limits={"max_connections": 512})
    per_connection = 14  # 24 x 14 = 336 models, about 168 per process: over the cap together
    with Daemon(config, tmp_path) as daemon:
        kids = wait_children(daemon.pid, 2)
        with ExitStack() as stack:
            clients = [stack.enter_context(RawClient(daemon.address)) for _ in range(CONNECTIONS)]

            def one(i: int) -> list[int]:
                statuses = []
                for j in range(per_connection):
                    clients[i].send(request_bytes(body=chat_body(model=f"model-{i:02d}-{j:02d}")))
                    statuses.append(clients[i].read_response().status)
                return statuses

            with ThreadPoolExecutor(8) as pool:
                assert all(s == [200] * per_connection for s in pool.map(one, range(CONNECTIONS)))
            owners = established_by_process(kids, daemon.port)
        assert all(owners[k] > 0 for k in kids), owners
        daemon.wait_ledger(CONNECTIONS * per_connection)
        before = metric_samples(metrics_text(daemon))
        labels = {dict(key[1])["model"] for key in before if key[0] == "sidecar_tokens_total"}
        assert len(labels) == 257 and "other" in labels  # 256 models, then `other`

        victim = max(kids)  # summed last while alive; first once gone
        os.kill(victim, signal.SIGKILL)
        assert daemon.wait_log(lambda e: str(e.get("msg", "")).startswith(
            f"worker process {victim} was killed"))
        after = metric_samples(metrics_text(daemon))
        for key, value in before.items():
            if key[0] in ("sidecar_tokens_total", "sidecar_cost_total"):
                assert after.get(key, -1) >= value, (key, value, after.get(key))


def test_a_reload_while_the_workers_start_does_not_tell_systemd_ready(
    worker: FakeWorker, tmp_path: Path
) -> None:
    """READY=1 means every worker process listens: a SIGHUP that comes while they start
    (logrotate's) must not send RELOADING=1/READY=1 early; systemd would start what waits
    for sidecar while its port still refuses connections. (The ledger is a FIFO: a worker
    process starts only once something opens it for reading.)"""
    fifo = tmp_path / "usage.fifo"
    os.mkfifo(fifo)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    daemon = Daemon(daemon_config(worker.url, workers=2, usage_log=str(fifo)), tmp_path, env=env)
    starting = threading.Thread(target=daemon.start, daemon=True)
    reader = -1
    with notify:
        try:
            starting.start()
            deadline = time.monotonic() + 10
            while daemon.proc is None or len(children(daemon.pid)) < 2:
                assert time.monotonic() < deadline, "no worker processes"
                time.sleep(0.01)
            daemon.send_signal(signal.SIGHUP)
            with pytest.raises(TimeoutError):
                early = notify.recv(4096)
                pytest.fail(f"told systemd {early!r} before the workers listen")
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the workers start now
            starting.join(10)
            assert daemon.port, daemon.lines
            ready = next_notify(notify, "READY=1")
            assert f"STATUS=listening on {daemon.host}:{daemon.port} with 2 workers" in ready
            assert post(daemon, chat_body()).status == 200
        finally:
            if reader < 0:
                reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            assert daemon.stop() == 0
            os.close(reader)


def test_workers_left_by_their_parent_drain_through_the_next_sigterm(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """The parent dies (SIGKILL, the OOM killer): its workers drain by themselves. Under
    KillMode=control-group systemd then sends SIGTERM to each remaining process: that is the
    first termination signal they get, which drains (as it does), not a second one that
    cuts the streams in flight."""
    streams = 12
    release = threading.Event()
    with ExitStack() as stack:
        daemon, kids, clients = streams_on_both_processes(
            worker, make_daemon, stack, release, streams, "orphan", "10s")
        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.proc is not None
        daemon.proc.wait(5)
        time.sleep(0.3)  # the workers saw their link close
        for kid in kids:
            os.kill(kid, signal.SIGTERM)
        time.sleep(0.3)
        release.set()
        for client in clients:
            response = client.read_response(timeout=10)
            assert response.status == 200 and response.complete
            assert response.sse()[-1] == "[DONE]"
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{k}").exists() for k in kids):
            assert time.monotonic() < deadline, "a worker left by its parent still runs"
            time.sleep(0.02)
    records = daemon.wait_ledger(streams)
    assert sorted(r["request_id"] for r in records) == sorted(f"orphan-{i}" for i in range(streams))
    assert all(r["outcome"] == "ok" for r in records)


def test_ready_after_a_reload_means_every_worker_process_has_the_new_config(
    worker: FakeWorker, tmp_path: Path
) -> None:
    """`systemctl reload` returns at the READY=1 that follows RELOADING=1: from then on every
    request is served by the new config, whichever worker process takes it. The parent
    says READY=1 once every worker process has said it loaded the config again, not once
    it has signalled them (they were still parsing it: requests on kept-alive
    connections were priced by the old config)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    config = daemon_config(worker.url, workers=2, limits={"max_connections": 512})
    with notify, Daemon(config, tmp_path, env=env) as daemon, ExitStack() as stack:
        next_notify(notify, "READY=1")
        kids = wait_children(daemon.pid, 2)
        clients = [stack.enter_context(RawClient(daemon.address)) for _ in range(CONNECTIONS)]

        def costs(prefix: str) -> set[Decimal]:
            def one(i: int) -> Decimal:
                clients[i].send(request_bytes(body=chat_body(),
                                              headers=[("x-request-id", f"{prefix}-{i}")]))
                return Decimal(clients[i].read_response().header("x-sidecar-cost") or "nan")

            with ThreadPoolExecutor(CONNECTIONS) as pool:
                return set(pool.map(one, range(CONNECTIONS)))

        assert costs("before") == {OLD_COST}
        owners = established_by_process(kids, daemon.port)
        assert all(owners[k] > 0 for k in kids), owners
        write_config(daemon, deep_merge(
            config, {"pricing": {"models": {MODEL: {"prompt": 10.0, "completion": 20.0}}}}))
        for kid in kids:  # the worker processes cannot load it yet
            os.kill(kid, signal.SIGSTOP)
        try:
            daemon.send_signal(signal.SIGHUP)
            next_notify(notify, "RELOADING=1")
            notify.settimeout(1.0)
            with pytest.raises(TimeoutError):
                early = notify.recv(4096)
                pytest.fail(f"told systemd {early!r} before the workers had the new config")
        finally:
            for kid in kids:
                os.kill(kid, signal.SIGCONT)
        notify.settimeout(10)
        next_notify(notify, "READY=1")
        assert costs("after") == {NEW_COST}  # at once, on the connections both processes hold
        assert wait_children(daemon.pid, 2) == kids  # reloaded, not restarted
    assert not daemon.errors(), daemon.errors()


def test_a_killed_worker_process_keeps_its_counts_up_to_the_last_poke(
    worker: FakeWorker, tmp_path: Path
) -> None:
    """A worker process killed before any scrape asked for its counters (the OOM killer,
    SIGKILL) still has them in the totals as of the parent's last poke (every
    `worker_timeout`/4): its requests do not vanish from /metrics (the ledger has them)."""
    config = daemon_config(worker.url, workers=2, worker_timeout="1s",
                           limits={"max_connections": 512})
    with Daemon(config, tmp_path) as daemon:
        kids = wait_children(daemon.pid, 2)
        with ExitStack() as stack:
            open_kept(daemon, stack, CONNECTIONS, "poked")
            owners = established_by_process(kids, daemon.port)
        assert all(owners[k] > 0 for k in kids), owners
        daemon.wait_ledger(CONNECTIONS)
        time.sleep(0.75)  # a poke or two (every 0.25 s), and no scrape
        os.kill(min(kids), signal.SIGKILL)
        replaced = daemon.wait_log(lambda e: str(e.get("msg", "")).endswith(" is ready"))
        assert replaced is not None, daemon.lines[-20:]
        assert scraped_requests(daemon) == CONNECTIONS
