"""The per-request formatting shortcuts write exactly what the plain code they replaced wrote.

Access-log lines, ledger times and cost texts are built on every request; the cheaper
ways of building them (`round_ms`, the millisecond table of `_timestamp`, the access
line built without a look-up per field) are compared here with the straightforward
code, over many inputs, ties and edge cases included.
"""

from __future__ import annotations

import io
import math
import random
import time
from decimal import Decimal

import orjson
import pytest

from sidecar import logs
from sidecar.exchange import _log_request
from sidecar.logs import json_line, round_ms, text_line


def _old_timestamp(created: float) -> str:
    whole = int(created)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{text}.{int((created - whole) * 1000):03d}Z"


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
        assert logs._timestamp(created) == _old_timestamp(created), created


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
