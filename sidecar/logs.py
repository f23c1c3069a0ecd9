"""Log output: one structured line per event, JSON off a terminal, plain text for journald.

Formatting only: what gets logged is decided where it happens. Request lines
carry their fields in `extra`; secrets never reach here because nothing
passes request headers to a logger.
"""

from __future__ import annotations

import logging
import sys
import time

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any request fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`level logger: msg key=value ...`, journald-friendly (journald adds its own time)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{record.levelname.lower()} {record.name}: {record.getMessage()}"]
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                parts.append(f"{name}={value}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(log_format: str = "auto", level: str = "info") -> None:
    """Send every sidecar log line to stderr in the chosen format."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
