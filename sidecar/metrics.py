"""Prometheus metrics registry and text-format renderer.

What it is for: plain-dict counters, gauges and histograms that the daemon
updates once per finished request (and on stream / connection open and
close), rendered as Prometheus text exposition format 0.0.4 for the admin
port's `/metrics`.

What it must never do: I/O, per-event work on the hot path, or depend on
prometheus_client at run time. It never sees secrets: labels are route
names, outcomes, status codes, model names and error codes only. Model
names come partly from clients, so their label values are capped.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from decimal import Context, Decimal

from sidecar import __version__
from sidecar.usage import Usage, cost_header_value

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "TTFB_BUCKETS", "Histogram", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFB_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)

# Distinct model label values kept before new ones are folded into "other".
MAX_MODELS = 256
OTHER_MODEL = "other"

_SUM_CTX = Context(prec=80)  # exact sums of exact costs

Labels = tuple[tuple[str, str], ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape_label(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return repr(float(value))


class Histogram:
    """A fixed-bucket histogram of one label set (counts per bucket, sum, count)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: above every bound
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation (le buckets: value <= bound); NaN is ignored."""
        if math.isnan(value):
            return
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: Labels, out: list[str]) -> None:
        """Append the _bucket/_sum/_count sample lines."""
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            cumulative += n
            le = 'le="' + _num(bound) + '"'
            out.append(f"{name}_bucket{_labels(labels, le)} {cumulative}")
        le = 'le="+Inf"'
        out.append(f"{name}_bucket{_labels(labels, le)} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.total)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")


class Metrics:
    """The daemon's metrics: update once per request end, render on scrape.

    `currency` labels the cost counter; set it again after a config reload.
    """

    def __init__(self, currency: str = "USD", version: str = __version__) -> None:
        self.currency = currency
        self.version = version
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.cost: dict[tuple[str, str], Decimal] = {}
        self.estimated: dict[str, int] = {}
        self.upstream_errors: dict[str, int] = {}
        self.ttfb: dict[str, Histogram] = {}
        self.duration: dict[str, Histogram] = {}
        self.active_streams = 0
        self.client_connections = 0
        self.ledger_write_errors = 0
        self._models: set[str] = set()

    # -- updates ---------------------------------------------------------------

    def _model_label(self, model: str | None) -> str:
        if model is None:
            return ""
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return OTHER_MODEL
        self._models.add(model)
        return model

    def request_finished(
        self,
        route: str,
        outcome: str,
        status: int,
        model: str | None,
        usage: Usage,
        cost: Decimal | None,
        ttfb_s: float | None,
        duration_s: float,
    ) -> None:
        """Account one finished request (call exactly once per request)."""
        key = (route, outcome, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        m = self._model_label(model)
        for kind, n in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cached", usage.cached_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("cache_write", usage.cache_write_tokens),
        ):
            if n:
                tk = (m, kind)
                self.tokens[tk] = self.tokens.get(tk, 0) + n
        if usage.estimated:
            self.estimated[route] = self.estimated.get(route, 0) + 1
        if cost is not None:
            ck = (m, self.currency)
            self.cost[ck] = _SUM_CTX.add(self.cost.get(ck, Decimal(0)), cost)
        if ttfb_s is not None:
            h = self.ttfb.get(route)
            if h is None:
                h = self.ttfb[route] = Histogram(TTFB_BUCKETS)
            h.observe(ttfb_s)
        h = self.duration.get(route)
        if h is None:
            h = self.duration[route] = Histogram(DURATION_BUCKETS)
        h.observe(duration_s)

    def stream_opened(self) -> None:
        """A streaming response to a client started."""
        self.active_streams += 1

    def stream_closed(self) -> None:
        """A streaming response to a client ended (any way)."""
        self.active_streams = max(self.active_streams - 1, 0)

    def connection_opened(self) -> None:
        """A client connection was accepted."""
        self.client_connections += 1

    def connection_closed(self) -> None:
        """A client connection was closed."""
        self.client_connections = max(self.client_connections - 1, 0)

    def upstream_error(self, code: str) -> None:
        """A worker-side failure, by the SPEC's error code."""
        self.upstream_errors[code] = self.upstream_errors.get(code, 0) + 1

    def ledger_error(self) -> None:
        """A ledger line could not be written."""
        self.ledger_write_errors += 1

    # -- rendering -------------------------------------------------------------

    def render(self) -> bytes:
        """The whole registry in Prometheus text format 0.0.4."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {_escape_help(help_text)}")
            out.append(f"# TYPE {name} {kind}")

        family("sidecar_build_info", "gauge", "Build information; always 1.")
        out.append(f"sidecar_build_info{_labels((('version', self.version),))} 1")

        family("sidecar_requests_total", "counter", "Finished requests by route, outcome and status.")
        for (route, outcome, status), n in sorted(self.requests.items()):
            labels = (("route", route), ("outcome", outcome), ("status", status))
            out.append(f"sidecar_requests_total{_labels(labels)} {n}")

        family("sidecar_tokens_total", "counter", "Tokens by model and kind (prompt, completion, cached, reasoning, cache_write).")
        for (model, kind), n in sorted(self.tokens.items()):
            out.append(f"sidecar_tokens_total{_labels((('model', model), ('kind', kind)))} {n}")

        family("sidecar_cost_total", "counter", "Cost of finished requests by model, in the pricing currency.")
        for (model, currency), total in sorted(self.cost.items()):
            labels = (("model", model), ("currency", currency))
            out.append(f"sidecar_cost_total{_labels(labels)} {cost_header_value(total)}")

        family("sidecar_usage_estimated_total", "counter", "Requests whose usage was counted from the stream because the worker sent none.")
        for route, n in sorted(self.estimated.items()):
            out.append(f"sidecar_usage_estimated_total{_labels((('route', route),))} {n}")

        family("sidecar_active_streams", "gauge", "Streaming responses in flight.")
        out.append(f"sidecar_active_streams {self.active_streams}")

        family("sidecar_client_connections", "gauge", "Open client connections, idle ones included.")
        out.append(f"sidecar_client_connections {self.client_connections}")

        family("sidecar_time_to_first_byte_seconds", "histogram", "Time from request received to the first response byte sent, by route.")
        for route, h in sorted(self.ttfb.items()):
            h.render("sidecar_time_to_first_byte_seconds", (("route", route),), out)

        family("sidecar_request_duration_seconds", "histogram", "Time from request received to request finished, by route.")
        for route, h in sorted(self.duration.items()):
            h.render("sidecar_request_duration_seconds", (("route", route),), out)

        family("sidecar_upstream_errors_total", "counter", "Worker-side failures by error code.")
        for code, n in sorted(self.upstream_errors.items()):
            out.append(f"sidecar_upstream_errors_total{_labels((('code', code),))} {n}")

        family("sidecar_ledger_write_errors_total", "counter", "Ledger lines that could not be written.")
        out.append(f"sidecar_ledger_write_errors_total {self.ledger_write_errors}")

        out.append("")
        return "\n".join(out).encode("utf-8")
