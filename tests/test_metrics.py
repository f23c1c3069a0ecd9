"""Tests for sidecar.metrics: the rendered text parsed by prometheus_client's parser."""

from __future__ import annotations

import random
import re
from decimal import Decimal

from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.metrics import (
    CONTENT_TYPE,
    MAX_MODELS,
    OTHER_MODEL,
    TTFB_BUCKETS,
    Metrics,
)
from sidecar.usage import Usage


def samples(m: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of the rendered registry, keyed by (name, labels)."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode("utf-8")):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def val(m: Metrics, name: str, **labels: str) -> float:
    return samples(m)[(name, frozenset(labels.items()))]


def families(m: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(m.render().decode())}


def test_empty_registry_renders_and_parses() -> None:
    m = Metrics()
    text = m.render().decode()
    assert text.endswith("\n")
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    fams = families(m)
    assert fams["sidecar_requests"] == "counter"
    assert fams["sidecar_time_to_first_byte_seconds"] == "histogram"
    assert fams["sidecar_active_streams"] == "gauge"
    assert val(m, "sidecar_build_info", version=__version__) == 1
    assert val(m, "sidecar_active_streams") == 0
    assert val(m, "sidecar_ledger_write_errors_total") == 0


def test_naming_conventions() -> None:
    m = Metrics()
    m.request_finished("chat", "ok", 200, "m", Usage(1, 1), Decimal(1), 0.1, 0.2)
    m.upstream_error("upstream_timeout")
    text = m.render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    assert set(types) == helps
    for name, kind in types.items():
        assert name.startswith("sidecar_")
        assert name.endswith("_total") == (kind == "counter"), name
        assert "milliseconds" not in name and "_ms" not in name
    for line in text.splitlines():
        if not line.startswith("#"):
            assert any(line.startswith(n) for n in types), line


def test_request_accounting() -> None:
    m = Metrics(currency="EUR")
    u = Usage(prompt_tokens=100, completion_tokens=50, cached_tokens=40, reasoning_tokens=20)
    m.request_finished("chat", "ok", 200, "qwen", u, Decimal("0.0000103"), 0.02, 1.5)
    m.request_finished("chat", "ok", 200, "qwen", Usage(prompt_tokens=1), Decimal("0.0000001"), 0.2, 3.0)
    m.request_finished("chat", "upstream_error", 200, "qwen", Usage(), None, 0.5, 9.0)
    m.request_finished("rest", "bad_request", 400, None, Usage(), None, None, 0.001)
    m.request_finished("chat", "ok", 200, "est", Usage(completion_tokens=9, estimated=True), None, 0.01, 0.5)
    assert val(m, "sidecar_requests_total", route="chat", outcome="ok", status="200") == 3
    assert val(m, "sidecar_requests_total", route="chat", outcome="upstream_error", status="200") == 1
    assert val(m, "sidecar_requests_total", route="rest", outcome="bad_request", status="400") == 1
    assert val(m, "sidecar_tokens_total", model="qwen", kind="prompt") == 101
    assert val(m, "sidecar_tokens_total", model="qwen", kind="completion") == 50
    assert val(m, "sidecar_tokens_total", model="qwen", kind="cached") == 40
    assert val(m, "sidecar_tokens_total", model="qwen", kind="reasoning") == 20
    assert val(m, "sidecar_tokens_total", model="est", kind="completion") == 9
    assert val(m, "sidecar_usage_estimated_total", route="chat") == 1
    assert val(m, "sidecar_cost_total", model="qwen", currency="EUR") == 0.0000104
    assert 'sidecar_cost_total{model="qwen",currency="EUR"} 0.0000104\n' in m.render().decode()
    assert ("sidecar_cost_total", frozenset({("model", "est"), ("currency", "EUR")})) not in samples(m)
    # ttfb: 4 observations on chat (0.02, 0.2, 0.5, 0.01), none on rest
    assert val(m, "sidecar_time_to_first_byte_seconds_count", route="chat") == 4
    assert abs(val(m, "sidecar_time_to_first_byte_seconds_sum", route="chat") - 0.73) < 1e-9
    assert ("sidecar_time_to_first_byte_seconds_count", frozenset({("route", "rest")})) not in samples(m)
    assert val(m, "sidecar_request_duration_seconds_count", route="rest") == 1
    assert val(m, "sidecar_request_duration_seconds_count", route="chat") == 4


def test_histogram_buckets_are_cumulative_and_le() -> None:
    m = Metrics()
    obs = [0.001, 0.005, 0.0051, 0.1, 0.1, 59.9, 60.0, 61.0, 1e6]
    for t in obs:
        m.request_finished("chat", "ok", 200, "m", Usage(), None, t, t)
    s = samples(m)
    prev = -1.0
    for b in TTFB_BUCKETS:
        n = s[("sidecar_time_to_first_byte_seconds_bucket",
               frozenset({("route", "chat"), ("le", repr(float(b)))}))]
        assert n == sum(1 for t in obs if t <= b), b  # le: a value equal to a bound counts
        assert n >= prev
        prev = n
    assert s[("sidecar_time_to_first_byte_seconds_bucket",
              frozenset({("route", "chat"), ("le", "+Inf")}))] == len(obs)
    assert s[("sidecar_time_to_first_byte_seconds_count", frozenset({("route", "chat")}))] == len(obs)
    assert TTFB_BUCKETS[0] == 0.005 and TTFB_BUCKETS[-1] == 60.0


def test_gauges_streams_connections_and_errors() -> None:
    m = Metrics()
    for _ in range(3):
        m.stream_opened()
        m.connection_opened()
    m.stream_closed()
    m.connection_closed()
    m.connection_closed()
    assert val(m, "sidecar_active_streams") == 2
    assert val(m, "sidecar_client_connections") == 1
    for _ in range(5):
        m.stream_closed()
        m.connection_closed()
    assert val(m, "sidecar_active_streams") == 0  # never negative
    assert val(m, "sidecar_client_connections") == 0
    m.upstream_error("upstream_disconnected")
    m.upstream_error("upstream_disconnected")
    m.upstream_error("upstream_timeout")
    m.ledger_error()
    assert val(m, "sidecar_upstream_errors_total", code="upstream_disconnected") == 2
    assert val(m, "sidecar_upstream_errors_total", code="upstream_timeout") == 1
    assert val(m, "sidecar_ledger_write_errors_total") == 1


def test_label_values_are_escaped() -> None:
    m = Metrics()
    hostile = 'a"b\\c\nd}{,=é'
    m.request_finished(hostile, "ok", 200, hostile, Usage(prompt_tokens=1), Decimal("0.5"), 0.1, 0.1)
    assert val(m, "sidecar_requests_total", route=hostile, outcome="ok", status="200") == 1
    assert val(m, "sidecar_tokens_total", model=hostile, kind="prompt") == 1
    assert val(m, "sidecar_cost_total", model=hostile, currency="USD") == 0.5
    assert len([ln for ln in m.render().decode().splitlines() if "sidecar_requests_total{" in ln]) == 1


def test_model_label_cardinality_is_capped() -> None:
    m = Metrics()
    for i in range(MAX_MODELS + 50):
        m.request_finished("chat", "ok", 200, f"model-{i}", Usage(prompt_tokens=1), None, None, 0.1)
    models = {dict(k[1])["model"] for k in samples(m) if k[0] == "sidecar_tokens_total"}
    assert len(models) == MAX_MODELS + 1
    assert val(m, "sidecar_tokens_total", model=OTHER_MODEL, kind="prompt") == 50
    # a model seen before the cap keeps its own label
    m.request_finished("chat", "ok", 200, "model-0", Usage(prompt_tokens=1), None, None, 0.1)
    assert val(m, "sidecar_tokens_total", model="model-0", kind="prompt") == 2


def test_cost_total_is_exact_over_many_requests() -> None:
    rng = random.Random(7)
    m = Metrics()
    exact = 0  # units of 1e-12
    for _ in range(50_000):
        units = rng.randrange(0, 10**9)
        exact += units
        m.request_finished("chat", "ok", 200, "m", Usage(), Decimal(units).scaleb(-12), None, 0.1)
    line = re.search(r'^sidecar_cost_total\{model="m",currency="USD"\} (\S+)$',
                     m.render().decode(), re.M)
    assert line is not None
    assert "e" not in line.group(1).lower()
    assert Decimal(line.group(1)).scaleb(12) == exact
    assert val(m, "sidecar_cost_total", model="m", currency="USD") == float(Decimal(exact).scaleb(-12))
