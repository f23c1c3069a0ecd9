"""The one table of worker-side failures: SPEC code -> HTTP status, ledger outcome, message.

Pure: no I/O. Every place that reports an upstream failure (the error frame
after the head, the HTTP error before it, the ledger, the metrics) reads it
from here, so the three views of one failure can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Failure:
    """One kind of failure: its SPEC code, the status before the head, the ledger outcome."""

    code: str
    status: int
    outcome: str
    message: str


UPSTREAM_DISCONNECTED = Failure(
    "upstream_disconnected", 502, "upstream_error", "the worker closed the connection mid-response"
)
UPSTREAM_TIMEOUT = Failure(
    "upstream_timeout", 504, "upstream_timeout", "the worker was silent longer than idle_timeout"
)
UPSTREAM_PROTOCOL_ERROR = Failure(
    "upstream_protocol_error", 502, "upstream_error", "the worker broke HTTP or SSE framing"
)
UPSTREAM_INCOMPLETE = Failure(
    "upstream_incomplete", 502, "upstream_error", "the worker ended the response without finishing it"
)
UPSTREAM_UNAVAILABLE = Failure(
    "upstream_unavailable", 502, "upstream_error", "the worker could not be reached"
)
CONNECT_TIMEOUT = Failure(
    "upstream_timeout", 504, "upstream_timeout", "connecting to the worker timed out"
)
RESPONSE_TIMEOUT = Failure(
    "upstream_timeout", 504, "upstream_timeout", "the worker sent no response head in time"
)


class UpstreamFailure(Exception):
    """Raised inside the I/O shell to carry a `Failure` to the one place that reports it."""

    def __init__(self, failure: Failure, detail: str = "", errno: int | None = None) -> None:
        super().__init__(detail or failure.message)
        self.failure = failure
        self.detail = detail
        self.errno = errno  # the OS error behind it, when there is one


def error_type_for(status: int) -> str:
    """OpenAI-style `error.type` for a status the sidecar answers itself."""
    if status in (400, 404, 405, 408, 411, 413, 414, 431, 505):  # the request is at fault
        return "invalid_request_error"
    if status == 503:
        return "overloaded_error"
    return "upstream_error"
