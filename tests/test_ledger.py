"""Tests for sidecar.ledger: exact line bytes, whole-line appends under concurrency,
logrotate reopen, failures that are logged and counted but never raised, and lines cut
short (a failed write, a crash) that the next line is never glued to."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import resource
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar.ledger import Ledger, LedgerRecord, record_line, utc_timestamp
from sidecar.metrics import Metrics
from tests.harness import Daemon, FakeWorker, chat_body, openai_handler, post

SPEC_FIELDS = [
    "ts", "request_id", "route", "model", "request_model", "client_stream",
    "upstream_stream", "outcome", "status", "prompt_tokens", "completion_tokens",
    "cached_tokens", "reasoning_tokens", "cost", "ttfb_ms", "duration_ms",
    "usage_estimated", "dialect",
]


def make_record(request_id: str = "req-1", cost: Decimal | None = Decimal("0.0000103"),
                **kw: object) -> LedgerRecord:
    base = LedgerRecord(
        ts="2026-11-27T15:11:43.123Z", request_id=request_id, route="chat",
        model="Qwen/Qwen3-32B", request_model="qwen", client_stream=True,
        upstream_stream=True, outcome="ok", status=200, prompt_tokens=13,
        completion_tokens=30, cached_tokens=None, reasoning_tokens=None, cost=cost,
        ttfb_ms=12.5, duration_ms=250.0, usage_estimated=False, dialect="openai-chat",
    )
    return replace(base, **kw)


def read_records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line, parse_float=Decimal) for line in data.splitlines()]


# -- the pure serializer --------------------------------------------------------------


def test_record_fields_are_the_spec_fields() -> None:
    assert [f.name for f in fields(LedgerRecord)] == SPEC_FIELDS


def test_record_line_exact_bytes() -> None:
    assert record_line(make_record()) == (
        b'{"ts":"2026-11-27T15:11:43.123Z","request_id":"req-1","route":"chat",'
        b'"model":"Qwen/Qwen3-32B","request_model":"qwen","client_stream":true,'
        b'"upstream_stream":true,"outcome":"ok","status":200,"prompt_tokens":13,'
        b'"completion_tokens":30,"cached_tokens":null,"reasoning_tokens":null,'
        b'"cost":0.0000103,"ttfb_ms":12.5,"duration_ms":250.0,"usage_estimated":false,'
        b'"dialect":"openai-chat"}\n'
    )


def test_record_line_null_cost_and_order() -> None:
    line = record_line(make_record(cost=None, ttfb_ms=None, upstream_stream=None))
    obj = json.loads(line)
    assert list(obj) == SPEC_FIELDS
    assert obj["cost"] is None and obj["ttfb_ms"] is None and obj["upstream_stream"] is None
    assert b'"cost":null,' in line


@pytest.mark.parametrize(
    "cost", ["0", "1E-10", "0.00000000000012345678901234567", "12345.6789", "1.03E-5"]
)
def test_record_line_cost_is_exact_literal(cost: str) -> None:
    line = record_line(make_record(cost=Decimal(cost)))
    assert re.search(rb'"cost":-?[0-9]+(\.[0-9]+)?,', line)
    assert b"e" not in re.search(rb'"cost":([^,]*),', line).group(1).lower()
    assert json.loads(line, parse_float=Decimal, parse_int=Decimal)["cost"] == Decimal(cost)


def test_record_line_hostile_strings_stay_one_line() -> None:
    rec = make_record(request_id='a"b\nc\r\u2028\x00', model="m\ud800x", request_model="é漢")
    line = record_line(rec)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    obj = json.loads(line)
    assert obj["request_id"] == 'a"b\nc\r\u2028\x00'
    assert obj["model"] == "m?x"  # a lone surrogate is replaced, the line is still written
    assert obj["request_model"] == "é漢"


def test_record_line_counts_past_64_bits() -> None:
    """Anthropic's prompt_tokens sums three worker counts: past 64 bits, which orjson refuses,
    the line is written all the same, the counts exact (it was lost, and an error logged)."""
    big = 2 * (2**64 - 1)
    line = record_line(make_record(prompt_tokens=big, cached_tokens=2**64 - 1))
    obj = json.loads(line)
    assert (obj["prompt_tokens"], obj["cached_tokens"]) == (big, 2**64 - 1)
    assert obj["completion_tokens"] == 30 and line.count(b"\n") == 1


def test_utc_timestamp() -> None:
    assert utc_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert utc_timestamp(1795792303.1239) == "2026-11-27T15:11:43.123Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp())


# -- writing ---------------------------------------------------------------------------


def test_none_path_is_a_noop() -> None:
    led = Ledger(None)
    led.write(make_record())
    led.reopen()
    led.close()
    assert led.errors == 0


def test_write_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b'{"existing":1}\n')
    old_umask = os.umask(0o022)
    try:
        (tmp_path / "fresh.jsonl").unlink(missing_ok=True)
        fresh = Ledger(str(tmp_path / "fresh.jsonl"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "fresh.jsonl").stat().st_mode) == 0o640
    fresh.close()

    led = Ledger(str(path))
    for i in range(3):
        led.write(make_record(f"r{i}"))
        # flushed when written: visible to a reader at once
        assert len(read_records(path)) == i + 2
    led.close()
    recs = read_records(path)
    assert [r.get("request_id") for r in recs] == [None, "r0", "r1", "r2"]
    assert recs[1]["cost"] == Decimal("0.0000103")
    assert led.errors == 0


def test_ledger_total_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    led = Ledger(str(path))
    costs = [Decimal(n).scaleb(-9) for n in range(1, 2001)]  # 0.000000001 ... 0.000002
    for i, c in enumerate(costs):
        led.write(make_record(f"r{i}", cost=c))
    led.close()
    total = sum((r["cost"] for r in read_records(path)), Decimal(0))
    assert total == Decimal(2000 * 2001 // 2).scaleb(-9)


def _hammer(path: str, tag: str, n: int) -> None:
    """Write n records of very different sizes (some well above PIPE_BUF)."""
    led = Ledger(path)
    for i in range(n):
        led.write(make_record(f"{tag}-{i}-" + "x" * ((i * 997) % 9000)))
    led.close()


def _check_hammered(path: Path, tags: list[str], n: int) -> None:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    ids = []
    for line in data.split(b"\n")[:-1]:
        obj = json.loads(line)  # a torn or interleaved line would not parse
        assert list(obj) == SPEC_FIELDS
        ids.append(obj["request_id"].rstrip("x"))
    assert sorted(ids) == sorted(f"{t}-{i}-" for t in tags for i in range(n))


def test_concurrent_threads_never_tear_lines(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    tags = [f"t{k}" for k in range(8)]
    threads = [threading.Thread(target=_hammer, args=(str(path), t, 300)) for t in tags]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_hammered(path, tags, 300)


def test_concurrent_processes_never_tear_lines(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    tags = [f"p{k}" for k in range(4)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(path), t, 400)) for t in tags]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    _check_hammered(path, tags, 400)


def test_reopen_after_logrotate_rename(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    rotated = tmp_path / "usage.jsonl.1"
    led = Ledger(str(path))
    led.write(make_record("before"))
    os.rename(path, rotated)
    led.write(make_record("between"))  # still the old descriptor: nothing is lost
    assert not path.exists()
    led.reopen()
    led.write(make_record("after"))
    led.close()
    assert [r["request_id"] for r in read_records(rotated)] == ["before", "between"]
    assert [r["request_id"] for r in read_records(path)] == ["after"]
    assert led.errors == 0


def test_reopen_failure_keeps_old_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    led = Ledger(str(d / "usage.jsonl"))
    d.rename(tmp_path / "gone")
    with caplog.at_level(logging.ERROR, logger="sidecar.ledger"):
        led.reopen()  # the directory is gone: cannot open, must not raise
    assert any("cannot open" in r.getMessage() for r in caplog.records)
    led.write(make_record("kept"))
    led.close()
    assert [r["request_id"] for r in read_records(tmp_path / "gone" / "usage.jsonl")] == ["kept"]
    assert led.errors == 0


@pytest.mark.parametrize("kind", ["directory", "missing_parent", "proc"])
def test_unwritable_path_logs_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    path = {
        "directory": str(tmp_path),
        "missing_parent": str(tmp_path / "no" / "such" / "usage.jsonl"),
        "proc": "/proc/self/no-such-ledger",
    }[kind]
    metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="sidecar.ledger"):
        led = Ledger(path, metrics)  # must not raise
        for i in range(5):
            led.write(make_record(f"r{i}"))  # must not raise
        led.reopen()
        led.close()
    assert led.errors == 5
    assert metrics.ledger_write_errors == 5
    assert b"sidecar_ledger_write_errors_total 5\n" in metrics.render()
    errors = [r for r in caplog.records if r.name == "sidecar.ledger" and r.levelno == logging.ERROR]
    assert len(errors) == 1  # rate-limited: once per 10 s
    assert path in errors[0].getMessage()
    if kind == "missing_parent":
        assert not (tmp_path / "no").exists()  # the parent directory is not created


def test_write_error_is_counted_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="sidecar.ledger"):
        led = Ledger("/dev/full", metrics)  # opens fine, every write fails with ENOSPC
        led.write(make_record("a"))
        led.write(make_record("b"))
        led.close()
    assert led.errors == 2 and metrics.ledger_write_errors == 2
    msgs = [r.getMessage() for r in caplog.records if r.name == "sidecar.ledger"]
    assert len(msgs) == 1 and "cannot write" in msgs[0]


def test_write_after_close_reopens(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    led = Ledger(str(path))
    led.close()
    led.write(make_record("late"))
    led.close()
    assert [r["request_id"] for r in read_records(path)] == ["late"]


def test_unserializable_record_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    metrics = Metrics()
    led = Ledger(str(path), metrics)
    led.write(make_record("bad", cost=Decimal("NaN")))
    led.write(make_record("good"))
    led.close()
    assert metrics.ledger_write_errors == 1
    assert [r["request_id"] for r in read_records(path)] == ["good"]


# -- a line cut short ---------------------------------------------------------------------------

TORN_AT = 40  # bytes of the torn line that reach the file


def _write_torn_then_whole(path: str) -> None:
    """In a forked child: one line, one cut short by the file size limit (the write takes
    `TORN_AT` bytes, the next part fails with EFBIG, as with a disk that fills), then the
    limit lifted and one more line. Python ignores SIGXFSZ, so the failure is an error."""
    led = Ledger(path)
    led.write(make_record("first"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + TORN_AT, hard))
    led.write(make_record("torn"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    led.write(make_record("after"))
    led.close()
    os._exit(0 if led.errors == 1 else 3)


def test_a_line_after_a_write_that_failed_half_way_starts_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    child = multiprocessing.get_context("fork").Process(
        target=_write_torn_then_whole, args=(str(path),))
    child.start()
    child.join(30)
    assert child.exitcode == 0  # exactly the torn line was counted as lost
    first, torn, after, end = path.read_bytes().split(b"\n")
    assert json.loads(first)["request_id"] == "first"
    assert torn == record_line(make_record("torn"))[:TORN_AT]
    assert json.loads(after)["request_id"] == "after"  # not glued to the torn line
    assert end == b""


def test_a_ledger_a_crash_left_torn_is_mended_at_start_up(
    tmp_path: Path, worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    """A previous run killed in the middle of a line (SIGKILL between two pages of a long
    one) left the file without its last line break: the first line of this run must not
    be glued to it."""
    ledger = tmp_path / "usage.jsonl"
    whole = record_line(make_record("before"))
    torn = whole[:TORN_AT]
    ledger.write_bytes(whole + torn)
    worker.default = openai_handler("vllm")
    daemon = make_daemon(worker=worker, usage_log=str(ledger))
    assert any("cut short" in str(e.get("msg")) and e.get("level") == "warning"
               for e in daemon.logs)
    response = post(daemon, chat_body())
    assert response.status == 200
    deadline = time.monotonic() + 10
    while ledger.read_bytes().count(b"\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    first, torn_line, new, end = ledger.read_bytes().split(b"\n")
    assert (first + b"\n", torn_line) == (whole, torn)
    assert json.loads(new)["request_id"] == response.header("x-request-id")
    assert end == b""
