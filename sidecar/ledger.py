"""The usage ledger (`usage_log`): one JSON line per finished request.

What it is for: appending one whole line per request, when the request ends,
with a single `os.write` on an `O_APPEND` descriptor, so that concurrent
requests - threads, or several processes sharing the file - never
interleave or tear lines, and a crash loses at most the requests in flight.
`reopen()` (on SIGHUP) lets logrotate move the file away. `record_line()`
is the pure serializer; `cost` is written as an exact decimal literal.

A line cut short (a write that failed half-way, a disk that filled; a process
killed in the middle of a line longer than a page) never has the next line glued
to it: the next line this process writes starts on a line of its own, and
`end_torn_line()` mends a file that a previous run left that way, at start-up.

What it must never do: raise into request handling. A ledger that cannot be
opened or written is logged loudly (at most once per 10 s, on the
`sidecar.ledger` logger) and counted in the metrics, and traffic goes on.
It never records secrets: a record has no header or body fields.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.dialects.jsonio import json_int
from sidecar.logs import round_ms, utc_timestamp
from sidecar.usage import cost_literal

if TYPE_CHECKING:
    from sidecar.metrics import Metrics

__all__ = ["Ledger", "LedgerRecord", "end_torn_line", "record_line", "utc_timestamp"]

log = logging.getLogger("sidecar.ledger")

LOG_INTERVAL_S = 10.0  # at most one error log line per this many seconds
REOPEN_RETRY_S = 1.0  # a ledger that failed to open is retried at most this often
FILE_MODE = 0o640


@dataclass(slots=True, kw_only=True)
class LedgerRecord:
    """One ledger line: exactly the SPEC's fields, in the SPEC's order (null where a request
    never got that far: a head refused before any route has only the first and the last few)."""

    ts: str
    request_id: str
    route: str | None = None
    model: str | None = None
    request_model: str | None = None
    client_stream: bool | None = None
    upstream_stream: bool | None = None  # what the worker actually sent: True = SSE
    outcome: str
    status: int | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: Decimal | None = None
    ttfb_ms: float | None
    duration_ms: float | None
    usage_estimated: bool = False
    dialect: str | None = None


def _ms(value: float | None) -> float | None:
    return None if value is None else round_ms(float(value))


def _clean(value: Any) -> Any:
    """Strings that orjson refuses (lone surrogates) are made valid UTF-8, and integers past
    64 bits (Anthropic's prompt tokens, a sum of three counts) written as their digits."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if type(value) is int:
        return json_int(value)
    return value


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return orjson.dumps(
            {k: _clean(v) for k, v in obj.items()}, default=str, option=orjson.OPT_APPEND_NEWLINE
        )


def record_line(record: LedgerRecord) -> bytes:
    """The exact bytes of one ledger line, newline included (pure)."""
    return _dumps(
        {
            "ts": record.ts,
            "request_id": record.request_id,
            "route": record.route,
            "model": record.model,
            "request_model": record.request_model,
            "client_stream": record.client_stream,
            "upstream_stream": record.upstream_stream,
            "outcome": record.outcome,
            "status": record.status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cached_tokens": record.cached_tokens,
            "reasoning_tokens": record.reasoning_tokens,
            # the exact literal, never a float's digits
            "cost": None if record.cost is None else orjson.Fragment(cost_literal(record.cost)),
            "ttfb_ms": _ms(record.ttfb_ms),
            "duration_ms": _ms(record.duration_ms),
            "usage_estimated": record.usage_estimated,
            "dialect": record.dialect,
        }
    )


def _ends_torn(path: str) -> bool:
    """Whether `path` is a regular file, not empty, whose last byte is not a line break (a
    FIFO or a device is never torn, and opening one must not wait for its writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        size = info.st_size
        return stat.S_ISREG(info.st_mode) and size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    finally:
        os.close(fd)


def end_torn_line(path: str) -> bool:
    """Give a ledger whose last line was cut short (a crash in the middle of writing it) the
    missing line break, so that the next line is not glued to the torn one. For start-up,
    before any process of the daemon writes. True when it added one; never raises (a ledger
    that cannot be opened is reported when the daemon opens it)."""
    try:
        if not _ends_torn(path):
            return False
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)
    except OSError:
        return False
    log.warning("usage_log %r ended in a line cut short (a crash while writing it?): "
                "a line break was added after it", path)
    return True


class Ledger:
    """Appends ledger lines to `path`; `path=None` is a ledger that writes nothing."""

    def __init__(self, path: str | None, metrics: Metrics | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self.errors = 0  # lines lost (also counted in metrics)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._last_log = -LOG_INTERVAL_S
        self._suppressed = 0
        self._last_open_try = -REOPEN_RETRY_S
        self._torn = False  # a write failed half-way: the next line starts with a line break
        if path is not None:
            with self._lock:
                self._fd = self._open()

    # -- internals -------------------------------------------------------------

    def _open(self) -> int | None:
        """Open the ledger file; on failure report and return None."""
        assert self.path is not None
        self._last_open_try = time.monotonic()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            self._report(f"cannot open usage_log {self.path!r}: {exc}", count=False)
            return None
        if self._torn:  # a line of this process was torn: is it in this file (not rotated)?
            with contextlib.suppress(OSError):
                self._torn = _ends_torn(self.path)
        return fd

    def _report(self, message: str, count: bool = True) -> None:
        """Log an error (rate-limited) and, for a lost line, count it."""
        if count:
            self.errors += 1
            if self.metrics is not None:
                # metrics must not break traffic either
                with contextlib.suppress(Exception):
                    self.metrics.ledger_error()
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            suppressed = self._suppressed
            self._suppressed = 0
            self._last_log = now
            extra = f" ({suppressed} similar errors suppressed)" if suppressed else ""
            with contextlib.suppress(Exception):
                log.error("usage ledger: %s%s", message, extra)
        else:
            self._suppressed += 1

    def _write_all(self, fd: int, data: bytes) -> None:
        """Write `data` whole; if it fails after a part of it went out, the file now ends in
        a torn line, which the next line written will not be glued to (`_torn`)."""
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(fd, view)
                except InterruptedError:
                    continue
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                view = view[n:]
        finally:
            if len(view) < len(data):  # something was written: the file's end is known
                self._torn = bool(view)

    # -- public ----------------------------------------------------------------

    def write(self, record: LedgerRecord) -> None:
        """Append one record as one line. Never raises."""
        if self.path is None:
            return
        try:
            line = record_line(record)
        except Exception as exc:
            with self._lock:
                self._report(f"cannot serialize record {getattr(record, 'request_id', '?')!r}: {exc!r}")
            return
        with self._lock:
            if self._fd is None:
                if time.monotonic() - self._last_open_try < REOPEN_RETRY_S:
                    self._report(f"usage_log {self.path!r} is not open; line lost")
                    return
                self._fd = self._open()
                if self._fd is None:
                    self._report(f"usage_log {self.path!r} is not open; line lost")
                    return
            try:
                self._write_all(self._fd, line)
            except Exception as exc:
                self._report(f"cannot write usage_log {self.path!r}: {exc}")

    def reopen(self) -> None:
        """Reopen the file by path (SIGHUP, after logrotate moved it). Never raises.

        The new file is opened before the old descriptor is closed; if it
        cannot be opened, writes go on to the old file.
        """
        if self.path is None:
            return
        with self._lock:
            fd = self._open()
            if fd is None:
                return
            old, self._fd = self._fd, fd
            if old is not None:
                with contextlib.suppress(OSError):
                    os.close(old)

    def close(self) -> None:
        """Close the file; later writes reopen it."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._last_open_try = -REOPEN_RETRY_S
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
