"""The usage ledger and /metrics through the real daemon: a concurrent soak, then one line per outcome.

The soak sends a few hundred concurrent requests (streaming and not, some
workers crashing mid-stream, some clients leaving mid-stream), each with its
own `x-request-id`, and checks that the ledger holds exactly one whole,
well-formed line per request whose outcome is what the client saw, and whose
token and cost sums are exactly what the fake worker reported (costs compared
as `Decimal`s of the ledger's own number literals). The other tests write one
ledger line per outcome (`bad_request`, `upstream_http_error`,
`upstream_timeout`, estimated usage, unpriced model), rotate the ledger with
SIGHUP, and point it somewhere unwritable.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    MODEL,
    USAGE,
    Call,
    Daemon,
    FakeWorker,
    RawClient,
    Reset,
    Send,
    Stall,
    Step,
    WorkerIO,
    WorkerRequest,
    chat_body,
    chat_completion,
    chat_route,
    chat_stream_events,
    chunk,
    daemon_config,
    held_stream,
    json_reply,
    metric_samples,
    metrics_text,
    openai_handler,
    post,
    request_bytes,
    response_head,
    sse_data,
    sse_payloads,
    sse_reply,
)

#: Every key of a ledger line, as SPEC "Ledger" lists them.
LEDGER_KEYS = {
    "ts", "request_id", "route", "model", "request_model", "client_stream", "upstream_stream",
    "outcome", "status", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "cost", "ttfb_ms", "duration_ms", "usage_estimated", "dialect",
}
OUTCOMES = {"ok", "upstream_error", "upstream_timeout", "upstream_http_error",
            "client_disconnect", "bad_request"}

#: Prices as exact decimal strings; the config gets them as YAML numbers.
PRICES: dict[str, dict[str, str]] = {
    "model-a": {"prompt": "0.15", "completion": "0.6", "cached_prompt": "0.075", "reasoning": "0.9"},
    "model-b": {"prompt": "3", "completion": "15"},
    MODEL: {"prompt": "1", "completion": "2"},
}
SOAK_MODELS = ("model-a", "model-b", MODEL)
ALWAYS_PATH = "/always/v1/chat/completions"


def pricing_config(prices: dict[str, dict[str, str]] = PRICES) -> dict[str, Any]:
    return {"currency": "USD",
            "models": {m: {k: float(v) for k, v in row.items()} for m, row in prices.items()}}


def expected_cost(model: str, usage: dict[str, Any]) -> Decimal:
    """SPEC's cost formula, in Decimal, from the usage object the worker sent."""
    row = {k: Decimal(v) for k, v in PRICES[model].items()}
    prompt = usage["prompt_tokens"]
    completion = usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    total = ((prompt - cached) * row["prompt"]
             + cached * row.get("cached_prompt", row["prompt"])
             + (completion - reasoning) * row["completion"]
             + reasoning * row.get("reasoning", row["completion"]))
    return total / Decimal(1_000_000)


def ledger_records(path: Path) -> list[dict[str, Any]]:
    """Every ledger line, numbers that have a fraction parsed as Decimal (exact cost literals)."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the ledger ends in a torn line"
    return [json.loads(line, parse_float=Decimal) for line in text.splitlines()]


def check_well_formed(record: dict[str, Any]) -> None:
    assert set(record) == LEDGER_KEYS, record
    assert record["outcome"] in OUTCOMES, record
    assert isinstance(record["ts"], str) and record["ts"].endswith("Z"), record
    assert isinstance(record["usage_estimated"], bool), record
    assert isinstance(record["duration_ms"], int | Decimal) and record["duration_ms"] >= 0, record
    for key in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
        assert record[key] is None or (isinstance(record[key], int) and record[key] >= 0), record
    assert record["cost"] is None or isinstance(record["cost"], Decimal | int), record


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def exact_cost_samples(text: str) -> dict[str, Decimal]:
    """sidecar_cost_total by model, read as exact decimals from the text (the parser gives floats)."""
    out: dict[str, Decimal] = {}
    for line in text.splitlines():
        if line.startswith("sidecar_cost_total{"):
            labels, _, value = line.rpartition(" ")
            model = labels.split('model="', 1)[1].split('"', 1)[0]
            out[model] = Decimal(value)
    return out


# =============================================================================================
# The soak
# =============================================================================================

SOAK_N = 300
KINDS = ("stream_ok", "json_ok", "aggregate_ok", "stream_crash", "client_leaves", "aggregate_crash")


@dataclass
class Plan:
    """What request i is, and what the worker will send for it."""

    index: int
    kind: str
    model: str
    usage: dict[str, Any]
    content: tuple[str, ...]

    @property
    def request_id(self) -> str:
        return f"soak-{self.index:04d}"


def soak_plan(i: int) -> Plan:
    kind = KINDS[i % len(KINDS)]
    model = SOAK_MODELS[(i // len(KINDS)) % len(SOAK_MODELS)]
    prompt, completion = 20 + i, 5 + i % 11
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion,
                             "prompt_tokens_details": {"cached_tokens": i % 7},
                             "completion_tokens_details": {"reasoning_tokens": i % 3}}
    content = tuple(f"t{i}-{j} " for j in range(2 + i % 4))
    return Plan(i, kind, model, usage, content)


def soak_handler(request: WorkerRequest) -> list[Step]:
    """The worker side of the soak, chosen by the request id the client set."""
    rid = request.header("x-request-id") or ""
    plan = soak_plan(int(rid.removeprefix("soak-")))
    events = chat_stream_events(plan.content, model=plan.model, usage=plan.usage,
                                id=f"chatcmpl-{rid}")
    if plan.kind == "json_ok":
        return json_reply(chat_completion("".join(plan.content), model=plan.model,
                                          usage=plan.usage, id=f"chatcmpl-{rid}"))
    if plan.kind in ("stream_ok", "aggregate_ok"):
        return sse_reply(events)
    # role chunk + first content chunk, then the worker dies (RST) or goes on generating
    head = sse_reply(events[:2], end=False)
    if plan.kind == "client_leaves":
        return [*head, Call(generate_until_closed)]
    return [*head, Reset()]


async def generate_until_closed(io: WorkerIO) -> None:
    """Keep streaming content deltas (as a real worker generates) until the daemon hangs up."""
    delta = {"id": "chatcmpl-more", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "more"}, "finish_reason": None}]}
    for _ in range(1000):  # bounded: 20 s
        if io.info.peer_closed or not io.open:
            return
        await io.send(chunk(sse_data(delta)))
        await asyncio.sleep(0.02)


@dataclass
class Seen:
    """What one soak client saw."""

    status: int
    outcome: str  # ok | upstream_error | client_disconnect
    body: bytes
    cost_header: str | None = None
    error_code: str | None = None


async def soak_one(client: httpx.AsyncClient, base: str, plan: Plan) -> Seen:
    headers = {"x-request-id": plan.request_id}
    if plan.kind == "json_ok":
        body = chat_body(model=plan.model)
        r = await client.post(base + "/v1/chat/completions", json=body, headers=headers)
        return Seen(r.status_code, "ok" if r.status_code == 200 else "upstream_error", r.content,
                    r.headers.get("x-sidecar-cost"))
    if plan.kind in ("aggregate_ok", "aggregate_crash"):
        body = chat_body(model=plan.model)
        r = await client.post(base + ALWAYS_PATH, json=body, headers=headers)
        code = None
        if r.status_code != 200:
            code = r.json()["error"]["code"]
        return Seen(r.status_code, "ok" if r.status_code == 200 else "upstream_error", r.content,
                    r.headers.get("x-sidecar-cost"), code)
    body = chat_body(stream=True, model=plan.model, include_usage=True)
    data = bytearray()
    async with client.stream("POST", base + "/v1/chat/completions", json=body,
                             headers=headers) as r:
        async for piece in r.aiter_bytes():
            data += piece
            if plan.kind == "client_leaves" and plan.content[0].encode() in data:
                return Seen(r.status_code, "client_disconnect", bytes(data))
    payloads = sse_payloads(bytes(data))
    if payloads and payloads[-1] == "[DONE]":
        return Seen(r.status_code, "ok", bytes(data))
    last = json.loads(payloads[-1]) if payloads else {}
    assert "[DONE]" not in payloads and last["choices"][0]["finish_reason"] == "error", payloads
    code = (last.get("error") or {}).get("code")
    return Seen(r.status_code, "upstream_error", bytes(data), error_code=code)


async def soak_clients(base: str, plans: list[Plan]) -> list[Seen]:
    limits = httpx.Limits(max_connections=len(plans) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        return await asyncio.gather(*(soak_one(client, base, p) for p in plans))


def test_soak_one_ledger_line_per_request(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    worker.default = soak_handler
    daemon = make_daemon(
        worker=worker,
        pricing=pricing_config(),
        upstream={"idle_timeout": "10s", "response_timeout": "10s", "connect_timeout": "10s",
                  "max_idle_connections": 64},
        limits={"max_connections": 1024},
        routes=[chat_route(), chat_route("always", match={"path": ALWAYS_PATH, "methods": ["POST"]},
                                         upstream_stream="always")],
    )
    plans = [soak_plan(i) for i in range(SOAK_N)]
    seen = asyncio.run(soak_clients(daemon.url, plans))

    assert daemon.ledger_path is not None
    daemon.wait_ledger(SOAK_N, timeout=15)
    records = ledger_records(daemon.ledger_path)
    for record in records:
        check_well_formed(record)
    ids = Counter(r["request_id"] for r in records)
    assert ids == Counter(p.request_id for p in plans), "not exactly one line per request"
    by_id = {r["request_id"]: r for r in records}

    designed = {"stream_ok": "ok", "json_ok": "ok", "aggregate_ok": "ok",
                "stream_crash": "upstream_error", "client_leaves": "client_disconnect",
                "aggregate_crash": "upstream_error"}
    expected_tokens: dict[str, Counter[str]] = defaultdict(Counter)
    expected_costs: dict[str, Decimal] = defaultdict(Decimal)
    for plan, saw in zip(plans, seen, strict=True):
        record = by_id[plan.request_id]
        where = f"{plan.request_id} ({plan.kind}): saw {saw.outcome} {saw.status}, ledger {record}"
        assert saw.outcome == designed[plan.kind], where
        assert record["outcome"] == saw.outcome, where
        assert record["status"] == saw.status, where
        assert record["route"] == ("always" if plan.kind.startswith("aggregate") else "chat"), where
        assert record["request_model"] == plan.model, where
        assert record["dialect"] == "openai-chat", where
        assert record["client_stream"] is (plan.kind in ("stream_ok", "stream_crash", "client_leaves")), where
        if plan.kind in ("stream_crash", "aggregate_crash"):
            assert saw.error_code == "upstream_disconnected", where
        if record["outcome"] != "ok":
            continue
        usage = plan.usage
        cost = expected_cost(plan.model, usage)
        assert record["model"] == plan.model, where
        assert record["upstream_stream"] is (plan.kind != "json_ok"), where
        assert record["usage_estimated"] is False, where
        assert record["prompt_tokens"] == usage["prompt_tokens"], where
        assert record["completion_tokens"] == usage["completion_tokens"], where
        assert (record["cached_tokens"] or 0) == usage["prompt_tokens_details"]["cached_tokens"], where
        assert (record["reasoning_tokens"] or 0) == usage["completion_tokens_details"]["reasoning_tokens"], where
        assert record["cost"] == cost, where
        assert record["ttfb_ms"] is not None and record["ttfb_ms"] <= record["duration_ms"], where
        if plan.kind == "stream_ok":
            chunks = [json.loads(p) for p in sse_payloads(saw.body) if p != "[DONE]"]
            usage_chunks = [c for c in chunks if c.get("usage") and not c["choices"]]
            assert len(usage_chunks) == 1, where
            assert Decimal(str(usage_chunks[0]["usage"]["cost"])) == cost, where
        else:
            assert saw.cost_header is not None and Decimal(saw.cost_header) == cost, where
        expected_costs[plan.model] += cost
        for kind, n in (("prompt", usage["prompt_tokens"]), ("completion", usage["completion_tokens"]),
                        ("cached", usage["prompt_tokens_details"]["cached_tokens"]),
                        ("reasoning", usage["completion_tokens_details"]["reasoning_tokens"])):
            expected_tokens[plan.model][kind] += n

    # token and cost sums of the completed requests equal the worker's own totals, exactly
    ok = [r for r in records if r["outcome"] == "ok"]
    assert len(ok) == sum(1 for p in plans if designed[p.kind] == "ok")
    for model in SOAK_MODELS:
        mine = [r for r in ok if r["model"] == model]
        assert sum(r["prompt_tokens"] for r in mine) == expected_tokens[model]["prompt"]
        assert sum(r["completion_tokens"] for r in mine) == expected_tokens[model]["completion"]
        assert sum(Decimal(r["cost"]) for r in mine) == expected_costs[model]

    # /metrics agrees with the ledger, line by line
    text = metrics_text(daemon)
    s = metric_samples(text)
    requests: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in s.items():
        if name == "sidecar_requests_total":
            d = dict(labels)
            requests[(d["route"], d["outcome"])] += int(value)
    assert requests == Counter((r["route"], r["outcome"]) for r in records)
    tokens: Counter[tuple[str, str]] = Counter()
    for r in records:
        for kind in ("prompt", "completion", "cached", "reasoning"):
            tokens[(r["model"], kind)] += r[f"{kind}_tokens"] or 0
    for (model, kind), n in tokens.items():
        if n:
            assert s[("sidecar_tokens_total", frozenset({("model", model), ("kind", kind)}))] == n
    ledger_cost: dict[str, Decimal] = defaultdict(Decimal)
    for r in records:
        if r["cost"] is not None:
            ledger_cost[r["model"]] += Decimal(r["cost"])
    assert exact_cost_samples(text) == dict(ledger_cost)
    crashes = sum(1 for p in plans if p.kind in ("stream_crash", "aggregate_crash"))
    assert s[("sidecar_upstream_errors_total", frozenset({("code", "upstream_disconnected")}))] == crashes
    ttfb_count = sum(v for (name, _), v in s.items()
                     if name == "sidecar_time_to_first_byte_seconds_count")
    assert ttfb_count == sum(1 for r in records if r["ttfb_ms"] is not None) == SOAK_N
    assert s[("sidecar_active_streams", frozenset())] == 0
    assert not worker.errors


# =============================================================================================
# One line per outcome (one daemon for the module)
# =============================================================================================

#: Chat with short worker timeouts (the timeout tests), beside the ordinary chat route.
HASTY_PATH = "/hasty/v1/chat/completions"


@pytest.fixture(scope="module")
def daemon(module_worker: FakeWorker, make_module_daemon: Callable[..., Daemon]) -> Daemon:
    hasty = chat_route("hasty", match={"path": HASTY_PATH, "methods": ["POST"]},
                       upstream={"idle_timeout": "500ms", "response_timeout": "500ms"})
    routes = [chat_route(), hasty,
              {"name": "rest", "match": {"path_prefix": "/v1/"}, "dialect": "passthrough"}]
    return make_module_daemon(
        worker=module_worker, pricing=pricing_config(), routes=routes,
        upstream={"idle_timeout": "10s", "response_timeout": "10s"},
    )


@pytest.fixture
def worker(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    module_worker.reset()
    yield module_worker
    assert not module_worker.errors, module_worker.errors


def exact_record(daemon: Daemon, request_id: str) -> dict[str, Any]:
    daemon.ledger_for(request_id)
    assert daemon.ledger_path is not None
    matches = [r for r in ledger_records(daemon.ledger_path) if r["request_id"] == request_id]
    assert len(matches) == 1, matches
    check_well_formed(matches[0])
    return matches[0]


@pytest.mark.parametrize(
    ("method", "target", "answer"),
    [
        # a worker's error answer, with its Content-Length, on a dialect's route
        ("POST", "/v1/chat/completions",
         json_reply({"error": {"message": "context too long", "code": 400}}, status=400)),
        # a passthrough route: a body of known length, none after HEAD or in a 204
        ("GET", "/v1/models", json_reply({"object": "list", "data": [{"id": MODEL}]})),
        ("HEAD", "/v1/models", [Send(response_head(200, [("content-length", "42")]))]),
        ("DELETE", "/v1/files/f1", [Send(response_head(204))]),
        # a chunked answer, for comparison (its last chunk goes out after the line)
        ("GET", "/v1/models", json_reply({"object": "list", "data": []}, chunked=True)),
    ],
)
def test_the_line_is_there_once_the_client_has_its_whole_answer(
    daemon: Daemon, worker: FakeWorker, method: str, target: str, answer: list[Step]
) -> None:
    """README: the ledger line is written before the last byte of the answer goes out, so a
    client that has its whole answer finds its line, also when the answer's end is the last
    byte of a length it was told (or its head, when there is no body)."""
    worker.default = answer
    with RawClient(daemon.address) as client:
        for i in range(8):
            rid = f"whole-{method}-{target}-{len(answer)}-{i}"
            body = chat_body() if method == "POST" else None
            client.send(request_bytes(method, target, body, [("x-request-id", rid)]))
            response = client.read_response(head_only_body=method == "HEAD")
            assert response.complete and response.status in (200, 204, 400)
            assert rid in {r["request_id"] for r in daemon.ledger()}, (rid, response.status)


def test_bad_json_is_a_bad_request_line(daemon: Daemon, worker: FakeWorker) -> None:
    r = post(daemon, b'{"model": "model-a", "messages": [', headers=[("x-request-id", "bad-json-1")])
    assert r.status == 400
    record = exact_record(daemon, "bad-json-1")
    assert record["outcome"] == "bad_request"
    assert record["status"] == 400
    assert record["route"] == "chat"
    assert record["cost"] is None
    assert worker.requests == []


def test_no_route_is_a_bad_request_line(daemon: Daemon, worker: FakeWorker) -> None:
    r = post(daemon, chat_body(), target="/nowhere", headers=[("x-request-id", "no-route-1")])
    assert r.status == 404
    record = exact_record(daemon, "no-route-1")
    assert record["outcome"] == "bad_request"
    assert record["status"] == 404
    assert record["route"] is None
    assert worker.requests == []


def test_worker_4xx_is_an_upstream_http_error_line(daemon: Daemon, worker: FakeWorker) -> None:
    body = {"error": {"message": "slow down", "type": "rate_limit", "code": "429"}}
    worker.reply(json_reply(body, status=429))
    r = post(daemon, chat_body(model="model-a"), headers=[("x-request-id", "http-429")])
    assert r.status == 429
    assert r.json() == body  # passed through
    record = exact_record(daemon, "http-429")
    assert record["outcome"] == "upstream_http_error"
    assert record["status"] == 429
    assert record["request_model"] == "model-a"


def test_idle_timeout_mid_stream_is_an_upstream_timeout_line(
    daemon: Daemon, worker: FakeWorker
) -> None:
    events = chat_stream_events(("Hel", "lo"), model="model-a")
    worker.reply([*sse_reply(events[:2], end=False), Stall()])
    r = post(daemon, chat_body(stream=True, model="model-a"), target=HASTY_PATH,
             headers=[("x-request-id", "idle-timeout-1")])
    assert r.status == 200
    last = r.sse_json()[-1]
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["error"]["code"] == "upstream_timeout"
    record = exact_record(daemon, "idle-timeout-1")
    assert record["outcome"] == "upstream_timeout"
    assert record["status"] == 200


def test_client_closing_while_the_worker_is_silent_is_a_client_disconnect(
    daemon: Daemon, worker: FakeWorker
) -> None:
    """SPEC: when the client goes away mid-response the worker connection is closed at once.

    The client closes (FIN) while the worker is thinking: nothing is written to
    the client, so only the EOF tells the daemon that it left (before idle_timeout does).
    """
    events = chat_stream_events(("Hel", "lo"), model="model-a")
    worker.reply([*sse_reply(events[:2], end=False), Stall()])
    with RawClient(daemon.address) as client:
        client.send(request_bytes(target=HASTY_PATH, body=chat_body(stream=True, model="model-a"),
                                  headers=[("x-request-id", "leaves-silent")]))
        client.read_until(b"Hel")
    record = exact_record(daemon, "leaves-silent")
    assert record["outcome"] == "client_disconnect", record


def test_response_timeout_is_an_upstream_timeout_line(daemon: Daemon, worker: FakeWorker) -> None:
    worker.reply([Stall()])
    r = post(daemon, chat_body(model="model-a"), target=HASTY_PATH,
             headers=[("x-request-id", "resp-timeout-1")])
    assert r.status == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    record = exact_record(daemon, "resp-timeout-1")
    assert record["outcome"] == "upstream_timeout"
    assert record["status"] == 504


def test_no_usage_from_the_worker_is_estimated_from_content_deltas(
    daemon: Daemon, worker: FakeWorker
) -> None:
    content = ("one", " two", " three", " four", " five")
    worker.reply(sse_reply(chat_stream_events(content, model="model-a", usage=None)))
    r = post(daemon, chat_body(stream=True, model="model-a"),
             headers=[("x-request-id", "estimated-1")])
    assert r.status == 200 and r.sse()[-1] == "[DONE]"
    record = exact_record(daemon, "estimated-1")
    assert record["outcome"] == "ok"
    assert record["usage_estimated"] is True
    assert record["completion_tokens"] == len(content)
    worker_usage = {"prompt_tokens": 0, "completion_tokens": len(content)}
    assert record["cost"] == expected_cost("model-a", worker_usage)


def test_reported_usage_is_not_estimated(daemon: Daemon, worker: FakeWorker) -> None:
    worker.reply(sse_reply(chat_stream_events(("a", "b"), model="model-b")))
    r = post(daemon, chat_body(stream=True, model="model-b"), headers=[("x-request-id", "reported-1")])
    assert r.status == 200
    record = exact_record(daemon, "reported-1")
    assert record["usage_estimated"] is False
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 3)
    assert record["cost"] == expected_cost("model-b", USAGE)


def test_unpriced_model_has_null_cost(daemon: Daemon, worker: FakeWorker) -> None:
    worker.default = openai_handler(model="no-such-price")
    r = post(daemon, chat_body(model="no-such-price"), headers=[("x-request-id", "unpriced-json")])
    assert r.status == 200
    assert r.header("x-sidecar-cost") is None
    assert "cost" not in r.json()["usage"]
    s = post(daemon, chat_body(stream=True, model="no-such-price", include_usage=True),
             headers=[("x-request-id", "unpriced-sse")])
    usage_chunk = [c for c in s.sse_json() if c != "[DONE]" and c.get("usage")][-1]
    assert "cost" not in usage_chunk["usage"]
    for rid in ("unpriced-json", "unpriced-sse"):
        record = exact_record(daemon, rid)
        assert record["outcome"] == "ok"
        assert record["model"] == "no-such-price"
        assert record["cost"] is None
        assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 3)
    text = metrics_text(daemon)
    assert 'sidecar_cost_total{model="no-such-price"' not in text
    assert metric_samples(text)[("sidecar_tokens_total",
                          frozenset({("model", "no-such-price"), ("kind", "prompt")}))] >= 22


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/passthrough/stream"])
def test_metrics_families_and_active_streams(daemon: Daemon, worker: FakeWorker, target: str) -> None:
    """A stream in flight is an active stream, on a dialect's route and on a passthrough
    one (whose worker answers `text/event-stream`) alike."""
    release = threading.Event()
    held = held_stream(chat_stream_events(("held",), model="model-a"), release)
    worker.reply(held)
    rid = f"held-{target}"
    with RawClient(daemon.address) as client:
        client.send(request_bytes(target=target, body=chat_body(stream=True, model="model-a"),
                                  headers=[("x-request-id", rid)]))
        client.read_until(b"held")
        text = metrics_text(daemon)
        assert metric_samples(text)[("sidecar_active_streams", frozenset())] == 1
        release.set()
        response_tail = client.read_until(b"0\r\n\r\n")
        assert b"[DONE]" in response_tail
    exact_record(daemon, rid)
    text = metrics_text(daemon)
    s = metric_samples(text)
    assert s[("sidecar_active_streams", frozenset())] == 0
    kinds = families(text)
    assert kinds["sidecar_requests"] == "counter"
    assert kinds["sidecar_tokens"] == "counter"
    assert kinds["sidecar_cost"] == "counter"
    assert kinds["sidecar_active_streams"] == "gauge"
    assert kinds["sidecar_time_to_first_byte_seconds"] == "histogram"
    assert kinds["sidecar_upstream_errors"] == "counter"
    assert kinds["sidecar_ledger_write_errors"] == "counter"
    assert s[("sidecar_requests_total", frozenset({("route", "chat"), ("outcome", "ok"),
                                                   ("status", "200")}))] >= 1
    assert s[("sidecar_tokens_total", frozenset({("model", "model-a"), ("kind", "prompt")}))] >= 11
    assert ("sidecar_time_to_first_byte_seconds_count", frozenset({("route", "chat")})) in s
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in s.items()
        if name == "sidecar_time_to_first_byte_seconds_bucket" and dict(labels)["route"] == "chat"
    )
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == s[("sidecar_time_to_first_byte_seconds_count", frozenset({("route", "chat")}))]
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert s[("sidecar_ledger_write_errors_total", frozenset())] == 0


def test_upstream_errors_by_code_in_metrics(daemon: Daemon, worker: FakeWorker) -> None:
    def count(code: str) -> float:
        return metric_samples(metrics_text(daemon)).get(
            ("sidecar_upstream_errors_total", frozenset({("code", code)})), 0.0)

    before = count("upstream_disconnected"), count("upstream_incomplete")
    events = chat_stream_events(("x", "y"), model="model-a")
    worker.reply([*sse_reply(events[:2], end=False), Reset()])
    worker.reply(sse_reply(chat_stream_events(("x",), finish_reason=None, done=False)))
    post(daemon, chat_body(stream=True, model="model-a"), headers=[("x-request-id", "code-1")])
    exact_record(daemon, "code-1")
    r = post(daemon, chat_body(stream=True), headers=[("x-request-id", "code-2")])
    assert r.sse_json()[-1]["error"]["code"] == "upstream_incomplete"
    exact_record(daemon, "code-2")
    assert (count("upstream_disconnected"), count("upstream_incomplete")) == (before[0] + 1, before[1] + 1)


# =============================================================================================
# Rotation and an unwritable ledger (their own daemons)
# =============================================================================================


def test_sighup_reopens_the_ledger_after_a_rename(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    worker.default = openai_handler()
    daemon = make_daemon(worker=worker)
    assert daemon.ledger_path is not None
    for i in range(3):
        assert post(daemon, chat_body(), headers=[("x-request-id", f"before-{i}")]).status == 200
    daemon.wait_ledger(3)
    rotated = daemon.ledger_path.with_name(daemon.ledger_path.name + ".1")
    daemon.ledger_path.rename(rotated)
    # until SIGHUP the daemon keeps appending to the file it has open (now the rotated one)
    assert post(daemon, chat_body(), headers=[("x-request-id", "between")]).status == 200
    daemon.send_signal(signal.SIGHUP)
    assert daemon.wait_log(lambda e: "reloaded" in str(e.get("msg", ""))) is not None
    for i in range(2):
        assert post(daemon, chat_body(), headers=[("x-request-id", f"after-{i}")]).status == 200
    daemon.wait_ledger(2)
    assert [r["request_id"] for r in ledger_records(rotated)] == [
        "before-0", "before-1", "before-2", "between"]
    assert [r["request_id"] for r in ledger_records(daemon.ledger_path)] == ["after-0", "after-1"]


def test_unwritable_ledger_does_not_stop_traffic(worker: FakeWorker, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    config = daemon_config(worker.url, usage_log=str(gone / "usage.jsonl"))
    shutil.rmtree(gone)  # the ledger's directory does not exist when the daemon starts
    worker.default = openai_handler()
    with Daemon(config, tmp_path / "d") as daemon:
        for i in range(4):
            r = post(daemon, chat_body(stream=i % 2 == 1), headers=[("x-request-id", f"lost-{i}")])
            assert r.status == 200
        s = metric_samples(metrics_text(daemon))
        assert s[("sidecar_ledger_write_errors_total", frozenset())] == 4
        assert s[("sidecar_requests_total", frozenset({("route", "chat"), ("outcome", "ok"),
                                                       ("status", "200")}))] == 4
        problems = [e for e in daemon.logs if e.get("level") == "error"]
        assert problems and all(e.get("logger") == "sidecar.ledger" for e in problems), problems
        assert not any("exc" in e for e in daemon.logs)
        assert daemon.alive()
    assert not gone.exists()


def test_ledger_under_proc_does_not_stop_traffic(worker: FakeWorker, tmp_path: Path) -> None:
    config = daemon_config(worker.url, usage_log="/proc/self/no-such-dir/usage.jsonl")
    worker.default = openai_handler()
    with Daemon(config, tmp_path) as daemon:
        for i in range(3):
            assert post(daemon, chat_body(), headers=[("x-request-id", f"proc-{i}")]).status == 200
        s = metric_samples(metrics_text(daemon))
        assert s[("sidecar_ledger_write_errors_total", frozenset())] == 3
        assert daemon.alive()
