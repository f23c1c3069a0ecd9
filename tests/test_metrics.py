"""Tests for sidecar.metrics: the rendered text parsed by prometheus_client's parser."""

from __future__ import annotations

import random
import re
from decimal import Decimal

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.metrics import (
    CONTENT_TYPE,
    MAX_MODELS,
    OTHER_MODEL,
    TTFB_BUCKETS,
    Histogram,
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


# -- across processes: snapshot() and its sum (workers: N) ------------------------

def _busy(seed: int, n: int = 200) -> Metrics:
    """A registry that saw `n` varied requests (costs of 1e-12 units, dyadic times)."""
    rng = random.Random(seed)
    m = Metrics()
    for _ in range(n):
        route = rng.choice(["chat", "completions", "rest"])
        model = rng.choice(["qwen", "llama", None])
        cost = Decimal(rng.randrange(0, 10**9)).scaleb(-12) if model else None
        usage = Usage(prompt_tokens=rng.randrange(100), completion_tokens=rng.randrange(100),
                      estimated=rng.random() < 0.1)
        ttfb = rng.randrange(0, 4096) / 64 if rng.random() < 0.8 else None
        m.request_finished(route, rng.choice(["ok", "upstream_error"]), 200, model, usage, cost,
                           ttfb, rng.randrange(0, 65536) / 64)
        if rng.random() < 0.1:
            m.upstream_error(rng.choice(["upstream_timeout", "upstream_disconnected"]))
    return m


def _wire(m: Metrics) -> dict:
    """A snapshot as it crosses the socketpair between processes."""
    return orjson.loads(orjson.dumps(m.snapshot()))


def test_snapshot_survives_json_and_renders_the_same() -> None:
    m = _busy(1)
    m.stream_opened()
    m.connection_opened()
    m.ledger_error()
    assert Metrics.from_snapshot(_wire(m)).render() == m.render()
    assert Metrics.from_snapshot(_wire(Metrics())).render() == Metrics().render()


def test_counts_past_64_bits_survive_the_wire_exactly() -> None:
    # a token counter summed past orjson's integer range (workers: N sends snapshots as JSON)
    m = Metrics()
    huge = Usage(prompt_tokens=2**64 - 1, completion_tokens=3)
    m.request_finished("chat", "ok", 200, "m", huge, None, 0.1, 0.2)
    m.request_finished("chat", "ok", 200, "m", huge, None, 0.1, 0.2)
    assert m.tokens[("m", "prompt")] == 2**65 - 2
    back = Metrics.from_snapshot(_wire(m))
    assert back.tokens == m.tokens and back.render() == m.render()
    assert b"36893488147419103230" in back.render()  # 2**65 - 2, every digit
    merged = Metrics.from_snapshots([_wire(m), _wire(m)])
    assert merged.tokens[("m", "prompt")] == 2**66 - 4


def test_merged_registries_equal_one_registry_that_saw_everything() -> None:
    # the same requests, counted by one process or spread over three
    rng = random.Random(5)
    whole = Metrics()
    parts = [Metrics(), Metrics(), Metrics()]
    for i in range(600):
        model = rng.choice(["a", "b", None])
        args = (rng.choice(["chat", "rest"]), "ok", 200, model,
                Usage(prompt_tokens=i % 7, completion_tokens=i % 5),
                Decimal(rng.randrange(10**6)).scaleb(-9) if model else None,
                rng.randrange(1024) / 256, rng.randrange(8192) / 16)
        whole.request_finished(*args)
        parts[rng.randrange(3)].request_finished(*args)
    merged = Metrics.from_snapshots(_wire(p) for p in parts)
    assert samples(merged) == samples(whole)
    assert merged.render() == whole.render()


def test_exact_decimal_cost_sums_survive_merge() -> None:
    a, b = Metrics(), Metrics()
    costs_a = [Decimal("0.000000000001"), Decimal("123456789.123456789012")]
    costs_b = [Decimal("0.1"), Decimal("0.2"), Decimal("1E-18")]
    for c in costs_a:
        a.request_finished("chat", "ok", 200, "m", Usage(), c, None, 0.1)
    for c in costs_b:
        b.request_finished("chat", "ok", 200, "m", Usage(), c, None, 0.1)
    text = Metrics.from_snapshots([_wire(a), _wire(b)]).render().decode()
    line = re.search(r'^sidecar_cost_total\{model="m",currency="USD"\} (\S+)$', text, re.M)
    assert line is not None
    assert line.group(1) == "123456789.423456789013000001"  # float would give 123456789.42345679
    assert Decimal(line.group(1)) == sum(costs_a + costs_b)


def test_histogram_buckets_add() -> None:
    a, b = Metrics(), Metrics()
    for t in (0.001, 0.3, 2.0):
        a.request_finished("chat", "ok", 200, "m", Usage(), None, t, t)
    for t in (0.3, 100.0):
        b.request_finished("chat", "ok", 200, "m", Usage(), None, t, t)
    s = samples(Metrics.from_snapshots([_wire(a), _wire(b)]))
    obs = (0.001, 0.3, 2.0, 0.3, 100.0)
    for bound in TTFB_BUCKETS:
        key = ("sidecar_time_to_first_byte_seconds_bucket",
               frozenset({("route", "chat"), ("le", repr(float(bound)))}))
        assert s[key] == sum(1 for t in obs if t <= bound), bound
    inf = frozenset({("route", "chat"), ("le", "+Inf")})
    assert s[("sidecar_time_to_first_byte_seconds_bucket", inf)] == 5
    assert s[("sidecar_time_to_first_byte_seconds_count", frozenset({("route", "chat")}))] == 5
    assert s[("sidecar_time_to_first_byte_seconds_sum", frozenset({("route", "chat")}))] == sum(obs)
    assert s[("sidecar_request_duration_seconds_count", frozenset({("route", "chat")}))] == 5


def test_label_sets_union_and_gauges_sum() -> None:
    a, b = Metrics(currency="EUR"), Metrics(currency="USD")
    a.request_finished("chat", "ok", 200, "qwen", Usage(prompt_tokens=3), Decimal("0.5"), 0.1, 0.1)
    a.upstream_error("upstream_timeout")
    b.request_finished("rest", "bad_request", 400, None, Usage(), None, None, 0.1)
    b.request_finished("chat", "ok", 200, "llama", Usage(prompt_tokens=4, estimated=True),
                       Decimal("0.25"), 0.1, 0.1)
    b.upstream_error("upstream_disconnected")
    for m, streams, conns in ((a, 2, 5), (b, 1, 3)):
        for _ in range(streams):
            m.stream_opened()
        for _ in range(conns):
            m.connection_opened()
    merged = Metrics.from_snapshots([_wire(a), _wire(b)])
    assert val(merged, "sidecar_requests_total", route="chat", outcome="ok", status="200") == 2
    assert val(merged, "sidecar_requests_total", route="rest", outcome="bad_request", status="400") == 1
    assert val(merged, "sidecar_tokens_total", model="qwen", kind="prompt") == 3
    assert val(merged, "sidecar_tokens_total", model="llama", kind="prompt") == 4
    assert val(merged, "sidecar_cost_total", model="qwen", currency="EUR") == 0.5
    assert val(merged, "sidecar_cost_total", model="llama", currency="USD") == 0.25
    assert val(merged, "sidecar_usage_estimated_total", route="chat") == 1
    assert val(merged, "sidecar_upstream_errors_total", code="upstream_timeout") == 1
    assert val(merged, "sidecar_upstream_errors_total", code="upstream_disconnected") == 1
    assert val(merged, "sidecar_active_streams") == 3
    assert val(merged, "sidecar_client_connections") == 8
    # a process that is gone keeps its counters, not its gauges
    gone = Metrics()
    gone.add(Metrics.from_snapshot(_wire(a)), gauges=False)
    assert val(gone, "sidecar_active_streams") == 0
    assert val(gone, "sidecar_client_connections") == 0
    assert val(gone, "sidecar_tokens_total", model="qwen", kind="prompt") == 3


def test_merge_keeps_the_model_cap() -> None:
    a, b = Metrics(), Metrics()
    for i in range(MAX_MODELS):
        a.request_finished("chat", "ok", 200, f"a-{i}", Usage(prompt_tokens=1), None, None, 0.1)
        b.request_finished("chat", "ok", 200, f"b-{i}", Usage(prompt_tokens=1), None, None, 0.1)
    merged = Metrics.from_snapshots([_wire(a), _wire(b)])
    models = {dict(k[1])["model"] for k in samples(merged) if k[0] == "sidecar_tokens_total"}
    assert len(models) == MAX_MODELS + 1
    assert val(merged, "sidecar_tokens_total", model=OTHER_MODEL, kind="prompt") == MAX_MODELS
    assert sum(v for k, v in samples(merged).items() if k[0] == "sidecar_tokens_total") == 2 * MAX_MODELS


def test_bad_snapshots_are_refused() -> None:
    good = _wire(_busy(3, 20))
    bad: list[object] = [None, [], {}, {**good, "format": 99}]
    bad.append({**good, "requests": [["chat", "ok", "200", -1]]})
    bad.append({**good, "requests": [["chat", "ok", 200, 1]]})
    bad.append({**good, "requests": [["chat", "ok", "200", "-1"]]})
    bad.append({**good, "requests": [["chat", "ok", "200", "\uff11\uff12"]]})  # fullwidth digits: not ASCII
    bad.append({**good, "tokens": [["m", "prompt", "1e3"]]})
    bad.append({**good, "cost": [["m", "USD", "NaN"]]})
    bad.append({**good, "cost": [["m", "USD", "twelve"]]})
    bad.append({**good, "tokens": [["m", "prompt"]]})
    hist = Histogram(TTFB_BUCKETS).snapshot()
    bad.append({**good, "ttfb": [["chat", {**hist, "bounds": [1.0]}]]})
    bad.append({**good, "ttfb": [["chat", {**hist, "count": 3}]]})
    bad.append({**good, "active_streams": 1.5})
    for data in bad:
        with pytest.raises(ValueError):
            Metrics.from_snapshot(data)
    with pytest.raises(ValueError):
        Metrics.from_snapshots([good, {**good, "format": 99}])
