"""Prometheus metrics registry and text-format renderer.

What it is for: plain-dict counters, gauges and histograms that the daemon
updates once per finished request (and on stream / connection open and
close), rendered as Prometheus text exposition format 0.0.4 for the admin
port's `/metrics`. With `workers: N` every worker process keeps its own
registry; `snapshot()` turns one into plain JSON-ready data and
`from_snapshot()` / `add()` / `from_snapshots()` sum them in the supervising
process, so that one scrape shows the whole daemon.

What it must never do: I/O, per-event work on the hot path, or depend on
prometheus_client at run time. It never sees secrets: labels are route
names, outcomes, status codes, model names and error codes only. Model
names come partly from clients, so their label values are capped.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from sidecar import __version__
from sidecar.dialects.jsonio import ORJSON_INT_END
from sidecar.usage import Usage, cost_header_value

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "SNAPSHOT_FORMAT",
    "TTFB_BUCKETS",
    "Histogram",
    "Metrics",
]

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

#: The layout of `Metrics.snapshot()`; a snapshot of another layout is refused.
SNAPSHOT_FORMAT = 1

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


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(f"bad metrics snapshot: {problem}")


def _carried(count: int) -> int | str:
    """A count as a snapshot carries it: its digits past orjson's 64-bit range (a token
    counter can sum past it), so the snapshot still encodes and decodes exactly."""
    return count if count < ORJSON_INT_END else str(count)


def _count(value: Any) -> int:
    if type(value) is str and value.isascii() and value.isdigit():
        return int(value)
    _check(type(value) is int and value >= 0, f"{value!r} is not a count")
    return int(value)


def _float(value: Any) -> float:
    _check(type(value) in (int, float), f"{value!r} is not a number")
    return float(value)


def _label(value: Any) -> str:
    _check(isinstance(value, str), f"{value!r} is not a label value")
    return str(value)


def _rows(data: Any, width: int) -> list[list[Any]]:
    _check(isinstance(data, list), "a family is not a list")
    for row in data:
        _check(isinstance(row, list) and len(row) == width, f"bad row {row!r}")
    return data


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

    def add(self, other: Histogram) -> None:
        """Add another histogram's observations (same bounds) to this one."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be added")
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total
        self.count += other.count

    def snapshot(self) -> dict[str, Any]:
        """Bounds, per-bucket counts (not cumulative), sum and count, as JSON-ready data."""
        return {"bounds": list(self.bounds), "counts": list(self.counts),
                "sum": self.total, "count": self.count}

    @classmethod
    def from_snapshot(cls, data: Any, bounds: tuple[float, ...]) -> Histogram:
        """The histogram of a `snapshot()`; ValueError unless its buckets are `bounds`."""
        _check(isinstance(data, Mapping), "a histogram is not an object")
        _check(tuple(data["bounds"]) == bounds, "histogram buckets differ")
        counts = [_count(n) for n in data["counts"]]
        _check(len(counts) == len(bounds) + 1, "histogram bucket counts do not match its bounds")
        h = cls(bounds)
        h.counts = counts
        h.total = _float(data["sum"])
        h.count = _count(data["count"])
        _check(h.count == sum(counts), "histogram count is not the sum of its buckets")
        return h

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

    def __init__(
        self, currency: str = "USD", version: str = __version__, *,
        model_labels: set[str] | None = None,
    ) -> None:
        """`model_labels`: the model labels admitted so far, updated in place (a set kept
        across registries summed anew at each scrape keeps each model's label stable)."""
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
        self._models: set[str] = set() if model_labels is None else model_labels

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
        currency: str | None = None,
    ) -> None:
        """Account one finished request (call exactly once per request); `currency`: the one
        its cost was priced in (a request that outlived a reload keeps its config's)."""
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
            ck = (m, currency or self.currency)
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

    # -- across processes ------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything this registry counts as plain data (orjson/json-serializable).

        Label tuples become lists, costs exact decimal strings, histograms their
        per-bucket counts. `Metrics.from_snapshot(m.snapshot())` renders as `m` does.
        """
        return {
            "format": SNAPSHOT_FORMAT,
            "version": self.version,
            "currency": self.currency,
            "requests": [[*k, _carried(n)] for k, n in self.requests.items()],
            "tokens": [[*k, _carried(n)] for k, n in self.tokens.items()],
            "cost": [[*k, str(total)] for k, total in self.cost.items()],
            "estimated": [[k, _carried(n)] for k, n in self.estimated.items()],
            "upstream_errors": [[k, _carried(n)] for k, n in self.upstream_errors.items()],
            "ttfb": [[k, h.snapshot()] for k, h in self.ttfb.items()],
            "duration": [[k, h.snapshot()] for k, h in self.duration.items()],
            "active_streams": self.active_streams,
            "client_connections": self.client_connections,
            "ledger_write_errors": self.ledger_write_errors,
        }

    @classmethod
    def from_snapshot(cls, data: Any) -> Metrics:
        """The registry a `snapshot()` describes; ValueError when `data` is not one."""
        try:
            _check(isinstance(data, Mapping), "not an object")
            _check(data.get("format") == SNAPSHOT_FORMAT, f"format {data.get('format')!r}")
            m = cls(_label(data["currency"]), _label(data["version"]))
            for route, outcome, status, n in _rows(data["requests"], 4):
                m.requests[(_label(route), _label(outcome), _label(status))] = _count(n)
            for model, kind, n in _rows(data["tokens"], 3):
                m.tokens[(_label(model), _label(kind))] = _count(n)
            for model, currency, text in _rows(data["cost"], 3):
                total = Decimal(_label(text))
                _check(total.is_finite(), f"cost {text!r}")
                m.cost[(_label(model), _label(currency))] = total
            for route, n in _rows(data["estimated"], 2):
                m.estimated[_label(route)] = _count(n)
            for code, n in _rows(data["upstream_errors"], 2):
                m.upstream_errors[_label(code)] = _count(n)
            for route, h in _rows(data["ttfb"], 2):
                m.ttfb[_label(route)] = Histogram.from_snapshot(h, TTFB_BUCKETS)
            for route, h in _rows(data["duration"], 2):
                m.duration[_label(route)] = Histogram.from_snapshot(h, DURATION_BUCKETS)
            m.active_streams = _count(data["active_streams"])
            m.client_connections = _count(data["client_connections"])
            m.ledger_write_errors = _count(data["ledger_write_errors"])
        except (KeyError, TypeError, InvalidOperation) as exc:
            raise ValueError(f"bad metrics snapshot: {exc!r}") from None
        m._models = {model for model, _ in (*m.tokens, *m.cost) if model}
        return m

    def _merged_model(self, label: str) -> str:
        return label if label in ("", OTHER_MODEL) else self._model_label(label)

    def add(self, other: Metrics, gauges: bool = True) -> None:
        """Sum `other` into this registry: counters, histograms and (unless `gauges`
        is False) the gauges, which count per process (streams, connections).

        Label sets are united; model labels stay capped at MAX_MODELS here too.
        `gauges=False` keeps only the counters of a process that is gone.
        """
        for k, n in other.requests.items():
            self.requests[k] = self.requests.get(k, 0) + n
        for (model, kind), n in sorted(other.tokens.items()):
            tk = (self._merged_model(model), kind)
            self.tokens[tk] = self.tokens.get(tk, 0) + n
        for (model, currency), total in sorted(other.cost.items()):
            ck = (self._merged_model(model), currency)
            self.cost[ck] = _SUM_CTX.add(self.cost.get(ck, Decimal(0)), total)
        for route, n in other.estimated.items():
            self.estimated[route] = self.estimated.get(route, 0) + n
        for code, n in other.upstream_errors.items():
            self.upstream_errors[code] = self.upstream_errors.get(code, 0) + n
        for mine, theirs, bounds in ((self.ttfb, other.ttfb, TTFB_BUCKETS),
                                     (self.duration, other.duration, DURATION_BUCKETS)):
            for route, h in theirs.items():
                if route not in mine:
                    mine[route] = Histogram(bounds)
                mine[route].add(h)
        self.ledger_write_errors += other.ledger_write_errors
        if gauges:
            self.active_streams += other.active_streams
            self.client_connections += other.client_connections

    @classmethod
    def from_snapshots(cls, snapshots: Iterable[Any], currency: str = "USD") -> Metrics:
        """A fresh registry holding the sum of `snapshots` (one per worker process).

        ValueError if any of them is not a snapshot; nothing is summed then.
        """
        parts = [cls.from_snapshot(s) for s in snapshots]
        merged = cls(currency)
        for part in parts:
            merged.add(part)
        return merged

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
            out.append(
                f"sidecar_cost_total{_labels((('model', model), ('currency', currency)))} "
                f"{cost_header_value(total)}"
            )

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
