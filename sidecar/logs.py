"""Log output: one structured line per event, JSON off a terminal, plain text for journald.

Formatting only: what gets logged is decided where it happens. Request lines
carry their fields in `extra`; secrets never reach here because nothing
passes request headers to a logger.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

import orjson

_FIELDS = (
    "request_id",
    "route",
    "method",
    "path",
    "status",
    "outcome",
    "code",
    "ttfb_ms",
    "duration_ms",
    "model",
    "cost",
)


#: a timestamp's tail for each millisecond (".007Z"): looked up, not formatted, per line
MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _datetime_timestamp(epoch_s: float) -> str:
    """`utc_timestamp` through datetime: the definition of its text, for any instant."""
    dt = datetime.fromtimestamp(epoch_s, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


#: instants whose text `utc_timestamp` writes from a cached second (years 1970 to 9999)
_CACHED_RANGE = 253402300800.0
#: the last second a line was stamped in, and its text: strftime once per second
_last_second: tuple[int, str] = (-1, "")


def utc_timestamp(epoch_s: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds: "2026-11-27T15:11:43.123Z" (log lines, the ledger).

    The text `_datetime_timestamp` writes (datetime's rounding to the microsecond, ties
    to even, then the millisecond cut), without a datetime per line.
    """
    global _last_second
    t = time.time() if epoch_s is None else epoch_s
    if not 0.0 <= t < _CACHED_RANGE:  # (NaN too)
        return _datetime_timestamp(t)
    fraction, whole = math.modf(t)
    micro = round(fraction * 1e6)  # as datetime.fromtimestamp rounds
    if micro >= 1_000_000:
        micro -= 1_000_000
        whole += 1.0
    second = int(whole)
    last = _last_second
    if last[0] != second:  # (never rounded up into year 10000: floats that large have
        # no fraction of a second below a microsecond)
        last = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return last[1] + MILLIS[micro // 1000]


def round_ms(value: float) -> float:
    """`round(value, 3)`, the same float, at a fraction of its cost (a time in ms for a log
    or ledger line, rounded to the microsecond; round() goes through a decimal string).

    The value scaled to whole microseconds rounds the same way in binary as it does
    exactly whenever it is not within its own rounding error of a half (the margin below
    is twice that error below 2**32 us), and `whole / 1000.0` is then the float nearest
    to the decimal round() reads back. Zero, negatives, NaN, huge values and near-halves
    take round() itself.
    """
    scaled = value * 1000.0
    if 0.0 < scaled < 4294967296.0:
        whole = round(scaled)
        if 0.5 - abs(scaled - whole) > 1e-6:
            return whole / 1000.0
    return round(value, 3)


def json_line(
    created: float,
    level: str,
    logger: str,
    msg: str,
    fields: dict[str, object],
    exc: str | None = None,
) -> str:
    """One JSON log line: ts, level, logger, msg, the request fields that are set, exc."""
    entry: dict[str, object] = {
        "ts": utc_timestamp(created),
        "level": level,
        "logger": logger,
        "msg": msg,
    }
    for name in _FIELDS:
        value = fields.get(name)
        if value is not None:
            entry[name] = value
    if exc is not None:
        entry["exc"] = exc
    return orjson.dumps(entry, default=str).decode()


#: a value written bare in a text line: no space, quote, `=`, backslash or control character
_BARE_VALUE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f]+")


def _text_value(value: object) -> str:
    """`value` as logfmt writes it: bare when it can be, else a JSON string literal, so a
    value from a client or worker (a model name) can neither end the line nor forge keys."""
    text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    return orjson.dumps(text).decode()


def text_line(level: str, logger: str, msg: str, fields: dict[str, object]) -> str:
    """One text log line: `level logger: msg key=value ...` (line breaks in `msg` escaped)."""
    if "\n" in msg or "\r" in msg:
        msg = msg.replace("\r", "\\r").replace("\n", "\\n")
    parts = [f"{level} {logger}: {msg}"]
    for name in _FIELDS:
        value = fields.get(name)
        if value is not None:
            parts.append(f"{name}={_text_value(value)}")
    return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any request fields."""

    def format(self, record: logging.LogRecord) -> str:
        return json_line(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            record.__dict__,
            self.formatException(record.exc_info) if record.exc_info else None,
        )


class TextFormatter(logging.Formatter):
    """`level logger: msg key=value ...`, journald-friendly (journald adds its own time)."""

    def format(self, record: logging.LogRecord) -> str:
        line = text_line(record.levelname.lower(), record.name, record.getMessage(), record.__dict__)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


ACCESS_LOGGER = "sidecar.access"
_access_stream: TextIO | None = None
_access_json = True


_access_logger = logging.getLogger(ACCESS_LOGGER)


def access_enabled() -> bool:
    """True when request lines are logged (level info or lower)."""
    return _access_logger.isEnabledFor(logging.INFO)


def log_access(msg: str, fields: dict[str, object]) -> None:
    """Write one request line, in the configured format, straight to the log stream.

    `fields`: the request fields that are set, in `_FIELDS` order, none of them None
    (what `json_line` would keep of them). The same line the `sidecar.access` logger
    would write, without a LogRecord and handler chain per request. Falls back to that
    logger when logging was set up by someone else (tests driving the code in-process).
    """
    stream = _access_stream
    if stream is None:
        _access_logger.info(msg, extra=fields)
        return
    if _access_json:
        # json_line's entry, built without looking up each of the _FIELDS
        line = orjson.dumps(
            {"ts": utc_timestamp(), "level": "info", "logger": ACCESS_LOGGER,
             "msg": msg, **fields},
            default=str,
            option=orjson.OPT_APPEND_NEWLINE,
        ).decode()
    else:
        line = text_line("info", ACCESS_LOGGER, msg, fields) + "\n"
    try:
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):  # stderr gone: requests go on, as with logging
        pass


def setup_logging(log_format: str = "auto", level: str = "info") -> None:
    """Send every sidecar log line to stderr in the chosen format."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    global _access_stream, _access_json
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    _access_stream = sys.stderr
    _access_json = log_format == "json"
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # a line per request: don't look up thread and process names nobody prints
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
