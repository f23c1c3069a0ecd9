"""The per-request formatting shortcuts write exactly what the plain code they replaced wrote.

Access-log lines, ledger lines and their times are built on every request; the cheaper
ways of building them (`round_ms`, the millisecond table of `utc_timestamp`, the access
line built without a look-up per field) are compared here with the straightforward
code, over many inputs, ties and edge cases included.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable
from decimal import Decimal

import orjson
import pytest

from sidecar import ledger, logs
from sidecar.exchange import _log_request
from sidecar.logs import json_line, round_ms, text_line


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def _round_inputs() -> list[float]:
    rng = random.Random(8)
    values = [0.0, -0.0, 1e-300, 5e-7, 4.999999e-4, 5e-4, 5.000001e-4, 0.0005, 0.0015, 0.0025,
              1.0005, 2.675, 1234.5675, -1.0005, -2.675, -1e-9, float("inf"), float("-inf"),
              float("nan"), 4294967.295, 4294967.2955, 4294967.296, 1e12, 1.7976931348623157e308]
    for _ in range(100_000):
        values.append(rng.uniform(0.0, 10_000.0))  # a time in ms
        values.append(10 ** rng.uniform(-9, 9))
        values.append(rng.uniform(0.0, 1.0))
    for _ in range(20_000):  # halves of a microsecond, exact or as near as a float gets
        half = (rng.randrange(0, 10**10) + 0.5) / 1000.0
        values += [half, math.nextafter(half, 0.0), math.nextafter(half, math.inf)]
    return values


def test_round_ms_is_round_to_3_digits() -> None:
    for value in _round_inputs():
        assert _same_float(round_ms(value), round(value, 3)), value


def test_timestamp_millisecond_table() -> None:
    rng = random.Random(3)
    instants = [0.0, 0.0009999, 0.999, 0.9999999, 1795792303.1239, 1795792303.9995, time.time()]
    instants += [rng.uniform(0, 4102444800.0) for _ in range(50_000)]
    instants += [1795792303 + k / 1000.0 for k in range(2000)]
    for created in instants:
        assert logs.utc_timestamp(created) == logs._datetime_timestamp(created), created


def _old_log_request(
    request_id: str, route: str, method: str, path: str, status: int, outcome: str,
    code: str | None, ttfb: float | None, duration: float, model: str | None,
    cost: Decimal | None,
) -> tuple[str, dict[str, object]]:
    from sidecar.usage import cost_header_value

    return f"{method} {status} {outcome}", {
        "request_id": request_id, "route": route, "method": method, "path": path,
        "status": status, "outcome": outcome, "code": code,
        "ttfb_ms": None if ttfb is None else round(ttfb * 1000.0, 3),
        "duration_ms": round(duration * 1000.0, 3), "model": model,
        "cost": None if cost is None else cost_header_value(cost),
    }


@pytest.mark.parametrize("json_format", [True, False])
def test_access_line_is_the_line_json_line_and_text_line_write(
    monkeypatch: pytest.MonkeyPatch, json_format: bool
) -> None:
    rng = random.Random(5)
    models = [None, "m", "gpt-4o", 'a "quoted"\nmodel', "é ü", ""]
    for i in range(3000):
        args = (
            f"req-{i:x}", rng.choice(["", "chat", "r o"]), rng.choice(["POST", "GET", "-"]),
            rng.choice(["/v1/chat/completions", "-", "/x y"]), rng.choice([200, 404, 499, 502]),
            rng.choice(["ok", "bad_request", "client_disconnect"]),
            rng.choice([None, "upstream_timeout", "request_timeout"]),
            rng.choice([None, 0.0, rng.uniform(0, 3), 10 ** rng.uniform(-7, 2)]),
            rng.choice([0.0, rng.uniform(0, 30), 10 ** rng.uniform(-7, 3)]),
            rng.choice(models),
            rng.choice([None, Decimal(0), Decimal("0.0000103"), Decimal("1.50"),
                        Decimal(rng.randrange(10**9)).scaleb(-rng.randrange(15))]),
        )
        out = io.StringIO()
        now = 1795792303.0 + i / 7.0
        monkeypatch.setattr(logs, "_access_stream", out)
        monkeypatch.setattr(logs, "_access_json", json_format)
        monkeypatch.setattr(logs.time, "time", lambda now=now: now)
        _log_request(*args)
        msg, fields = _old_log_request(*args)
        if json_format:
            expected = json_line(now, "info", logs.ACCESS_LOGGER, msg, fields)
        else:
            expected = text_line("info", logs.ACCESS_LOGGER, msg, fields)
        assert out.getvalue() == expected + "\n"
        if json_format:
            orjson.loads(out.getvalue())


def test_ledger_timestamp_is_datetimes_text() -> None:
    rng = random.Random(6)
    instants = [0.0, 0.0004995, 0.0005, 0.9999995, 0.9999994999, 1.0, 1795792303.1239,
                1795792303.9999995, 1795792303.9995, 253402300799.9999995, 253402300799.999,
                253402300800.0, 253402300801.5, -0.5, -1.0, -86400.0005, time.time()]
    instants += [rng.uniform(0, 4102444800.0) for _ in range(50_000)]
    instants += [1795792303 + rng.randrange(10**6) / 1e6 for _ in range(20_000)]  # exact us
    instants += [1795792303 + (rng.randrange(10**6) + 0.5) / 1e6 for _ in range(20_000)]  # ties
    instants += [1795792303 + k / 1000.0 for k in range(2000)]
    instants += [k / 8.0 for k in range(1000)]  # exact binary fractions
    instants += [float("nan"), float("inf"), 1e20]  # refused alike
    for created in instants:
        assert _outcome(ledger.utc_timestamp, created) == _outcome(
            logs._datetime_timestamp, created
        ), created


def _outcome(function: Callable[[float], str], value: float) -> str | type[Exception]:
    try:
        return function(value)
    except Exception as exc:  # the same error, the same type
        return type(exc)


def _old_record_line(record: ledger.LedgerRecord) -> bytes:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(float(value), 3)

    def clean(value: object) -> object:
        return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else value

    def dumps(obj: dict[str, object]) -> bytes:
        try:
            return orjson.dumps(obj, default=str)
        except orjson.JSONEncodeError:
            return orjson.dumps({k: clean(v) for k, v in obj.items()}, default=str)

    r = record
    head = dumps({
        "ts": r.ts, "request_id": r.request_id, "route": r.route, "model": r.model,
        "request_model": r.request_model, "client_stream": r.client_stream,
        "upstream_stream": r.upstream_stream, "outcome": r.outcome, "status": r.status,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens, "reasoning_tokens": r.reasoning_tokens,
    })
    tail = dumps({"ttfb_ms": ms(r.ttfb_ms), "duration_ms": ms(r.duration_ms),
                  "usage_estimated": r.usage_estimated, "dialect": r.dialect})
    cost = b"null" if r.cost is None else ledger.cost_literal(r.cost)
    return head[:-1] + b',"cost":' + cost + b"," + tail[1:] + b"\n"


def test_record_line_is_the_spliced_line() -> None:
    rng = random.Random(7)
    texts = [None, "m", "gpt-4o", 'a "quoted"\nmodel', "\ud800 lone", "é ü", ""]
    for i in range(5000):
        record = ledger.LedgerRecord(
            ts=ledger.utc_timestamp(rng.uniform(0, 4102444800.0)),
            request_id=rng.choice([f"req-{i}", "\udfff"]),
            route=rng.choice([None, "chat", "r\u2028"]),
            model=rng.choice(texts),
            request_model=rng.choice(texts),
            client_stream=rng.choice([None, True, False]),
            upstream_stream=rng.choice([None, True, False]),
            outcome=rng.choice(["ok", "bad_request", "upstream_timeout"]),
            status=rng.choice([None, 200, 499, 502]),
            prompt_tokens=rng.choice([None, 0, rng.randrange(10**7)]),
            completion_tokens=rng.choice([None, 0, rng.randrange(10**7)]),
            cached_tokens=rng.choice([None, rng.randrange(100)]),
            reasoning_tokens=rng.choice([None, rng.randrange(100)]),
            cost=rng.choice([None, Decimal(0), Decimal("1.50"),
                             Decimal(rng.randrange(10**9)).scaleb(-rng.randrange(15))]),
            ttfb_ms=rng.choice([None, 0.0, rng.uniform(0, 5000), 10 ** rng.uniform(-6, 6)]),
            duration_ms=rng.choice([None, rng.uniform(0, 60000), 10 ** rng.uniform(-6, 7)]),
            usage_estimated=rng.choice([True, False]),
            dialect=rng.choice([None, "openai-chat", "anthropic"]),
        )
        assert ledger.record_line(record) == _old_record_line(record), record
