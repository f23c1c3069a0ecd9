"""Cross-component invariants under a seeded random chaos workload, through the real daemon.

Every component has tests of its own; this file checks that they agree with each
other when everything happens at once. A seeded plan (reproducible: the same
`SIDECAR_CHAOS_SEED` gives the same requests) draws, per request, a route (the
four dialects, a passthrough route, two routes with their own `upstream:`), a
model (priced, unpriced), a client (raw socket, pipelined keep-alive requests,
a raw socket that leaves mid-response, httpx, the openai SDK), `stream` and
`include_usage`, and what the fake worker does (normal SSE or JSON, usage on
every chunk, no usage, reset / FIN / stall / broken chunk framing / clean end
without terminator mid-stream, a non-2xx answer, no head past
`response_timeout`, its own error event). The requests run concurrently, with
a SIGHUP in the middle of each round (same content; in the second round, changed
prices with requests in flight) and changed prices between the first two rounds
(with a stream held in flight across the change).

Then, once the daemon has written everything:

- the ledger has exactly one line per request, under the `x-request-id` the
  client saw, with the outcome and status the client saw;
- `/metrics` equals the ledger's aggregates (requests by route/outcome/status,
  tokens by model and kind, cost by model as exact decimals, estimated usage,
  durations and time-to-first-byte counts), upstream errors by code equal the
  error frames and error answers the clients got, no stream or client
  connection left active;
- the cost a client got (`usage.cost`, `x-sidecar-cost`) is the ledger's and
  SPEC's formula's for the usage the worker sent and the prices in force when
  the request started;
- the daemon holds no descriptor more than at start once the pool idled out,
  the worker saw every connection of a client that left closed, and RSS does
  not grow from one identical round to the next.

CI runs the defaults (a fixed seed) in about 20 s. A longer or different run:
`SIDECAR_CHAOS_N` (requests per round, default 120), `SIDECAR_CHAOS_ROUNDS`
(default 3), `SIDECAR_CHAOS_THREADS` (concurrent clients, default 12),
`SIDECAR_CHAOS_SEED`; `SIDECAR_CHAOS_LOG=PATH` keeps the daemon's log and what
the workers saw when something disagreed, `SIDECAR_CHAOS_VERBOSE=1` prints the
mix and /metrics. Select these tests alone with `-m chaos`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.harness import (
    DONE,
    LAST_CHUNK,
    Close,
    Daemon,
    FakeWorker,
    RawClient,
    RawResponse,
    Reset,
    Send,
    Sleep,
    Stall,
    Step,
    WorkerIO,
    WorkerRequest,
    chat_completion,
    chat_stream_events,
    chunk,
    daemon_config,
    metric_samples,
    metrics_text,
    request_bytes,
    response_head,
    sse_data,
    sse_events,
    text_completion,
    text_completion_events,
)
from tests.test_e2e_other_dialects import anthropic_events, ev, responses_events

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("SIDECAR_CHAOS_SEED", "20261129"))
N = int(os.environ.get("SIDECAR_CHAOS_N", "120"))
ROUNDS = max(2, int(os.environ.get("SIDECAR_CHAOS_ROUNDS", "3")))
THREADS = int(os.environ.get("SIDECAR_CHAOS_THREADS", "12"))


def ms(base: int) -> str:
    """A short timeout, longer with more concurrent clients: on a busy machine (two CPUs, the
    clients, the fake workers and the daemon in one box) a worker thread that waits for its
    turn must not look like a silent worker."""
    return f"{int(base * max(1.0, THREADS / 12))}ms"

PRICED, CLAUDE, FREE = "m-priced", "m-claude", "m-free"
#: prices as exact decimal strings (the YAML gets the same digits)
PRICES_1: dict[str, dict[str, str]] = {
    PRICED: {"prompt": "0.15", "completion": "0.6", "cached_prompt": "0.075", "reasoning": "0.9"},
    CLAUDE: {"prompt": "3", "completion": "15", "cached_prompt": "0.3", "cache_write": "3.75"},
}
PRICES_2: dict[str, dict[str, str]] = {
    **PRICES_1, PRICED: {"prompt": "0.2", "completion": "0.8", "cached_prompt": "0.1", "reasoning": "1.1"},
}
PRICES_3: dict[str, dict[str, str]] = {
    **PRICES_1, PRICED: {"prompt": "0.25", "completion": "1", "cached_prompt": "0.125"},
    CLAUDE: {"prompt": "2.5", "completion": "12.5"},
}
DEFAULT_ROW = {"prompt": "0.5", "completion": "1.25"}

UPSTREAM_CODES = {"upstream_disconnected", "upstream_timeout", "upstream_protocol_error",
                  "upstream_incomplete", "upstream_unavailable"}
MID_FAILURES = {"reset": "upstream_disconnected", "fin": "upstream_disconnected",
                "stall": "upstream_timeout", "broken": "upstream_protocol_error",
                "no_term": "upstream_incomplete"}
OK_KINDS = ("sse", "json", "usage_every", "no_usage")


@dataclass(frozen=True)
class RouteDef:
    name: str
    path: str  # what clients post to
    dialect: str  # the route's dialect
    shape: str  # the wire shape the worker answers in
    mode: str = "auto"
    own_upstream: bool = False


ROUTE_DEFS = [
    RouteDef("chat", "/v1/chat/completions", "openai-chat", "chat"),
    RouteDef("chat-b", "/b/v1/chat/completions", "openai-chat", "chat", "always", own_upstream=True),
    RouteDef("completions", "/v1/completions", "openai-completions", "completions", "never"),
    RouteDef("messages", "/v1/messages", "anthropic-messages", "anthropic"),
    RouteDef("responses", "/v1/responses", "openai-responses", "responses", own_upstream=True),
    RouteDef("rest", "/v1/other/chat/completions", "passthrough", "chat"),
]
ROUTES = {r.name: r for r in ROUTE_DEFS}


def route_configs(worker2_url: str) -> list[dict[str, Any]]:
    own = {"url": worker2_url, "idle_timeout": ms(500), "response_timeout": ms(700),
           "pool_idle_timeout": "1s", "max_idle_connections": 4}
    out: list[dict[str, Any]] = []
    for r in ROUTE_DEFS:
        if r.dialect == "passthrough":
            out.append({"name": r.name, "match": {"path_prefix": "/v1/"}, "dialect": "passthrough",
                        "heartbeat": "150ms"})
            continue
        route: dict[str, Any] = {"name": r.name, "match": {"path": r.path, "methods": ["POST"]},
                                 "dialect": r.dialect, "upstream_stream": r.mode}
        if r.name in ("chat", "messages"):
            route["heartbeat"] = "150ms"  # comments while a worker is silent (stall, late head)
        if r.own_upstream:
            route["upstream"] = own
        out.append(route)
    return out


def pricing(prices: dict[str, dict[str, str]], default: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"currency": "USD", "models": {
        m: {k: float(v) for k, v in row.items()} for m, row in prices.items()}}
    if default:
        out["default"] = {k: float(v) for k, v in DEFAULT_ROW.items()}
    return out


# =============================================================================================
# The plan
# =============================================================================================


@dataclass
class Plan:
    """One request: who sends it, where, and what the worker answers."""

    rid: str
    index: int
    route: RouteDef
    model: str
    client: str  # raw | leave | pipe | httpx | sdk | held
    stream: bool
    include_usage: bool | None
    behaviour: str
    status: int = 200  # for behaviour "http"
    reset_leave: bool = False  # a leaving client resets rather than closes
    json_doc: bool = False  # behaviour "no_usage": the worker answers one document (else a stream)
    own_rid: bool = True  # the client sends its x-request-id (else the daemon makes one)
    chunked_body: bool = False  # the request body is chunked
    expect_continue: bool = False  # the request says Expect: 100-continue
    leave_at: str = "data"  # leave: early (right after sending) | data (some of the answer)
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event | None = None
    worker_rid: str | None = None  # the x-request-id the worker got

    @property
    def usage(self) -> dict[str, Any]:
        i = self.index
        if self.route.shape == "anthropic":
            return {"input_tokens": 20 + i % 31, "output_tokens": 4 + i % 9,
                    "cache_read_input_tokens": 10 * (i % 5), "cache_creation_input_tokens": i % 4}
        prompt, completion = 20 + i % 47, 5 + i % 13
        cached, reasoning = i % 7, i % 3
        if self.route.shape == "responses":
            return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                    "total_tokens": prompt + completion}
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def body(self) -> dict[str, Any]:
        shape = self.route.shape
        if shape == "anthropic":
            body: dict[str, Any] = {"model": self.model, "max_tokens": 64,
                                    "messages": [{"role": "user", "content": "hi"}]}
        elif shape == "responses":
            body = {"model": self.model, "input": "hi"}
        elif self.route.name == "completions":
            body = {"model": self.model, "prompt": "hi"}
        else:
            body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}]}
        if self.stream:
            body["stream"] = True
            if self.include_usage is not None and shape in ("chat", "completions"):
                body["stream_options"] = {"include_usage": self.include_usage}
        return body

    def headers(self) -> list[tuple[str, str]]:
        out = [("x-chaos-plan", self.rid)]
        if self.own_rid:
            out.append(("x-request-id", self.rid))
        if self.expect_continue:
            out.append(("expect", "100-continue"))
        return out

    def request(self) -> bytes:
        if self.behaviour == "bad_json":
            return request_bytes("POST", self.route.path, b'{"model": "' + self.model.encode() + b'", "mess',
                                 self.headers(), chunked=self.chunked_body)
        path = "/nope" + self.route.path if self.behaviour == "no_route" else self.route.path
        return request_bytes("POST", path, self.body(), self.headers(), chunked=self.chunked_body)


def draw_plans(seed: int, n: int, prefix: str) -> list[Plan]:
    """The round's requests, drawn from `seed` alone (rids differ by `prefix`)."""
    rng = random.Random(seed)
    plans: list[Plan] = []
    i = 0
    while len(plans) < n:
        route = rng.choice(ROUTE_DEFS)
        passthrough = route.dialect == "passthrough"
        client = rng.choices(["raw", "leave", "pipe", "httpx", "sdk"], [4, 2, 2, 3, 2])[0]
        if client == "sdk" and (route.shape not in ("chat", "completions", "responses") or passthrough):
            client = "httpx"
        if client == "leave":
            behaviour = "slow"
        elif passthrough:
            behaviour = rng.choice(["sse", "json", "json", "http", "slow_head"])
        else:
            behaviour = rng.choices(
                ["sse", "json", "usage_every", "no_usage", "reset", "fin", "stall", "broken",
                 "no_term", "http", "slow_head", "worker_error", "sse_close", "sse_length", "sse_eof",
                 "late_head", "bad_json", "no_route"],
                [6, 4, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1])[0]
            if behaviour in ("bad_json", "no_route"):
                client = "raw"  # refused before any worker; a 404 with a body closes the connection
        if behaviour == "usage_every" and route.shape != "chat":
            behaviour = "sse"
        if behaviour == "no_usage" and route.shape not in ("chat", "completions"):
            behaviour = "sse"
        stream = rng.random() < 0.6
        include_usage = rng.choice([None, True, False])
        if passthrough:
            model = PRICED
        elif route.shape == "anthropic":
            model = rng.choice([CLAUDE, CLAUDE, FREE])
        else:
            model = rng.choice([PRICED, PRICED, FREE])
        plan = Plan(f"{prefix}-{i:04d}", i, route, model, client, stream, include_usage, behaviour,
                    status=rng.choice([429, 500, 503]), reset_leave=rng.random() < 0.3,
                    json_doc=rng.random() < 0.5, own_rid=client in ("leave", "held") or rng.random() < 0.8,
                    chunked_body=rng.random() < 0.2, expect_continue=client != "leave" and rng.random() < 0.1,
                    leave_at=rng.choice(["early", "data", "data"]))
        plans.append(plan)
        i += 1
    return plans


# =============================================================================================
# The worker
# =============================================================================================

REGISTRY: dict[str, Plan] = {}


def worker_doc(plan: Plan, with_usage: bool) -> dict[str, Any]:
    usage = plan.usage if with_usage else None
    shape = plan.route.shape
    if shape == "chat":
        return chat_completion("Hello there", model=plan.model, usage=usage, id=f"chatcmpl-{plan.rid}")
    if shape == "completions":
        return text_completion("Hello there", model=plan.model, usage=usage)
    if shape == "anthropic":
        return {"id": f"msg_{plan.rid}", "type": "message", "role": "assistant", "model": plan.model,
                "content": [{"type": "text", "text": "Hello there, friend"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": plan.usage}
    return {"id": f"resp_{plan.rid}", "object": "response", "created_at": 1_741_476_542, "model": plan.model,
            "status": "completed", "error": None, "incomplete_details": None, "output": [
                {"id": f"msg_{plan.rid}", "type": "message", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Hello there, friend", "annotations": [],
                              "logprobs": []}]}],
            "usage": usage}


def worker_events(plan: Plan, *, with_usage: bool = True, every: bool = False) -> tuple[list[bytes], int]:
    """The whole event stream, and how many leading events make 'mid-stream' (some content)."""
    shape = plan.route.shape
    if shape == "chat":
        events = chat_stream_events(("Hel", "lo", " there"), model=plan.model, id=f"chatcmpl-{plan.rid}",
                                    usage=plan.usage, include_usage=with_usage, usage_on_every_chunk=every)
        return events, 2
    if shape == "completions":
        return text_completion_events(("Hel", "lo"), model=plan.model, id=f"cmpl-{plan.rid}",
                                      usage=plan.usage, include_usage=with_usage), 1
    if shape == "anthropic":
        return anthropic_events(worker_doc(plan, True)), 4
    return responses_events(worker_doc(plan, True)), 5


def worker_error_event(plan: Plan, after: int) -> bytes:
    shape = plan.route.shape
    if shape == "anthropic":
        return ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "boom"}})
    if shape == "responses":
        return ev("error", {"type": "error", "code": "server_error", "message": "boom",
                            "sequence_number": after})
    return sse_data({"error": {"message": "boom", "type": "server_error", "code": 500}})


SSE_HEAD = response_head(200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")])


def worker_steps(plan: Plan) -> list[Step]:
    b = plan.behaviour
    if b == "slow_head":
        return [Stall()]
    if b == "http":
        body = json.dumps({"error": {"message": "worker says no", "type": "overloaded",
                                     "code": f"w{plan.status}"}}).encode()
        return [Send(response_head(plan.status, [("content-type", "application/json"),
                                                 ("content-length", str(len(body)))]) + body)]
    if b == "json":
        body = json.dumps(worker_doc(plan, True)).encode()
        return [Send(response_head(200, [("content-type", "application/json"),
                                         ("content-length", str(len(body)))]) + body)]
    if b == "no_usage" and plan.json_doc:
        body = json.dumps(worker_doc(plan, False)).encode()
        return [Send(response_head(200, [("content-type", "application/json"),
                                         ("content-length", str(len(body)))]) + body)]
    events, mid = worker_events(plan, with_usage=b != "no_usage", every=b == "usage_every")
    head = [Send(SSE_HEAD)]
    if b in ("sse", "usage_every", "no_usage"):
        return [*head, *(Send(chunk(e)) for e in events), Send(LAST_CHUNK)]
    if b == "sse_close":  # a whole answer, then the worker closes (llama.cpp after a stream)
        return [*head, *(Send(chunk(e)) for e in events), Send(LAST_CHUNK), Close()]
    if b == "late_head":  # the head late, within response_timeout
        return [Sleep(0.15), *head, *(Send(chunk(e)) for e in events), Send(LAST_CHUNK)]
    if b == "sse_length":
        data = b"".join(events)
        return [Send(response_head(200, [("content-type", "text/event-stream"),
                                         ("content-length", str(len(data)))])),
                *(Send(e) for e in events)]
    if b == "sse_eof":  # framed by the close, after the whole stream
        return [Send(response_head(200, [("content-type", "text/event-stream")])),
                *(Send(e) for e in events), Close()]
    if b == "slow":
        # the first content, then more content every 25 ms for ~1.5 s, then the rest
        more = [events[mid - 1]] * 60
        steps: list[Step] = [*head, *(Send(chunk(e)) for e in events[:mid])]
        for e in more:
            steps += [Sleep(0.025), Send(chunk(e))]
        return [*steps, *(Send(chunk(e)) for e in events[mid:]), Send(LAST_CHUNK)]
    first = [*head, *(Send(chunk(e)) for e in events[:mid])]
    if b == "reset":
        return [*first, Reset()]
    if b == "fin":
        return [*first, Close()]
    if b == "stall":
        return [*first, Stall()]
    if b == "broken":
        return [*first, Send(b"zz\r\nnot a chunk\r\n"), Stall()]
    if b == "no_term":
        return [*first, Send(LAST_CHUNK)]
    if b == "worker_error":
        tail = [Send(chunk(worker_error_event(plan, mid)))]
        if plan.route.shape in ("chat", "completions"):
            tail.append(Send(chunk(DONE)))
        return [*first, *tail, Send(LAST_CHUNK)]
    raise AssertionError(b)


async def chaos_handler(request: WorkerRequest, io: WorkerIO) -> None:
    rid = request.header("x-chaos-plan") or ""
    plan = REGISTRY.get(rid)
    if plan is None:
        raise AssertionError(f"the worker got a request for plan {rid!r}")
    if plan.own_rid and request.header("x-request-id") != plan.rid:
        raise AssertionError(f"{rid}: the worker got x-request-id {request.header('x-request-id')!r}")
    plan.worker_rid = request.header("x-request-id")
    plan.arrived.set()
    if plan.client == "held":
        assert plan.release is not None
        events, mid = worker_events(plan)
        await io.send(SSE_HEAD + b"".join(chunk(e) for e in events[:mid]))
        while not plan.release.is_set():
            if not io.open or io.info.peer_closed:
                return
            await io.sleep(0.01)
        await io.send(b"".join(chunk(e) for e in events[mid:]) + LAST_CHUNK)
        return
    for step in worker_steps(plan):
        await step.run(io)


# =============================================================================================
# The clients
# =============================================================================================


@dataclass
class Seen:
    """What one client saw."""

    status: int | None = None  # None: no response head
    rid: str | None = None
    kind: str = ""  # ok | frame | worker_error | http | left | cut
    code: str | None = None
    cost_body: Decimal | None = None
    cost_header: str | None = None
    has_body_usage: bool = False
    note: str = ""


def loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=Decimal)


def classify(plan: Plan, status: int, headers: dict[str, str], body: bytes, complete: bool = True) -> Seen:
    """What a whole response says, from its bytes."""
    seen = Seen(status, headers.get("x-request-id"), cost_header=headers.get("x-sidecar-cost"))
    if not complete:
        seen.kind = "cut"
        return seen
    if status != 200:
        seen.kind = "http"
        try:
            obj = loads(body)
            seen.code = obj["error"].get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            seen.note = body[:200].decode("latin-1")
        return seen
    ctype = headers.get("content-type", "")
    shape = plan.route.shape
    if "event-stream" not in ctype:
        doc = loads(body)
        usage = doc.get("usage") if isinstance(doc, dict) else None
        seen.kind = "ok"
        if isinstance(usage, dict):
            seen.has_body_usage = True
            seen.cost_body = usage.get("cost")
        return seen
    events = sse_events(body)
    if not events:
        seen.kind = "cut"
        return seen
    tail = body[body.rfind(b"data:"):]
    if b"\n:" in tail or b"\r:" in tail:
        seen.kind, seen.note = "cut", "a comment after the stream's last event"
        return seen
    for _name, data in events:
        if data == "[DONE]":
            continue
        obj = loads(data)
        usage = None
        if shape in ("chat", "completions") or (shape == "anthropic" and obj.get("type") == "message_delta"):
            usage = obj.get("usage")
        elif shape == "responses" and obj.get("type") == "response.completed":
            usage = obj["response"].get("usage")
        if isinstance(usage, dict):
            seen.has_body_usage = True
            if "cost" in usage:
                seen.cost_body = usage["cost"]
    last_name, last = events[-1]
    obj = None if last == "[DONE]" else loads(last)
    if shape in ("chat", "completions"):
        if last == "[DONE]":
            errors = [loads(d) for _, d in events if d != "[DONE]" and "error" in loads(d)]
            if errors:
                seen.kind, seen.code = "worker_error", errors[0]["error"].get("code")
            else:
                seen.kind = "ok"
        elif obj and obj.get("choices") and obj["choices"][0].get("finish_reason") == "error":
            seen.kind, seen.code = "frame", obj["error"]["code"]
        elif obj and "error" in obj:
            seen.kind, seen.code = "worker_error", obj["error"].get("code")
        else:
            seen.kind, seen.note = "cut", last[:200]
    elif shape == "anthropic":
        if obj and obj.get("type") == "message_stop":
            seen.kind = "ok"
        elif last_name == "error" and obj and obj["error"].get("code") in UPSTREAM_CODES:
            seen.kind, seen.code = "frame", obj["error"]["code"]
        elif last_name == "error":
            seen.kind = "worker_error"
        else:
            seen.kind, seen.note = "cut", last[:200]
    else:
        kind = obj.get("type") if obj else None
        if kind == "response.completed":
            seen.kind = "ok"
        elif kind == "response.failed" and (obj["response"].get("error") or {}).get("code") in UPSTREAM_CODES:
            seen.kind, seen.code = "frame", obj["response"]["error"]["code"]
        elif last_name == "error" or kind == "error":
            seen.kind = "worker_error"
        else:
            seen.kind, seen.note = "cut", last[:200]
    return seen


def from_raw(plan: Plan, response: RawResponse) -> Seen:
    return classify(plan, response.status, dict(response.headers), response.body, response.complete)


def run_raw(daemon: Daemon, plan: Plan) -> Seen:
    with RawClient(daemon.address, timeout=15) as client:
        client.send(plan.request())
        return from_raw(plan, client.read_response(15))


def run_leave(daemon: Daemon, plan: Plan) -> Seen:
    client = RawClient(daemon.address, timeout=15)
    try:
        client.send(plan.request())
        seen = Seen(kind="left")
        if plan.leave_at == "early":
            return seen
        if plan.stream or plan.route.dialect == "passthrough":
            head = client.read_until(b"\r\n\r\n", 10).decode("latin-1")
            seen.status = int(head.split(" ", 2)[1])
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "x-request-id":
                    seen.rid = value.strip()
            client.read_until(b"data:", 10)  # some of the stream
        else:
            assert plan.arrived.wait(10), plan
        return seen
    finally:
        if plan.reset_leave:
            client.reset()
        else:
            client.close()


def run_pipe(daemon: Daemon, plans: list[Plan]) -> list[Seen]:
    out: list[Seen] = []
    with RawClient(daemon.address, timeout=15) as client:
        client.send(b"".join(p.request() for p in plans))
        sent = time.monotonic()
        for plan in plans:
            try:
                out.append(from_raw(plan, client.read_response(15)))
            except AssertionError as exc:
                out.append(Seen(kind="missing", note=f"{exc!s:.300} (eof={client.eof}, "
                                f"{time.monotonic() - sent:.3f} s after sending, at {time.time():.3f})"))
    return out


def run_httpx(client: httpx.Client, daemon: Daemon, plan: Plan) -> Seen:
    try:
        with client.stream("POST", daemon.url + plan.route.path, json=plan.body(),
                           headers=dict(plan.headers())) as r:
            body = r.read()
            return classify(plan, r.status_code, dict(r.headers), body)
    except httpx.HTTPError as exc:
        return Seen(kind="cut", note=repr(exc))


def _cost_of(usage: Any) -> Decimal | None:
    extra = getattr(usage, "model_extra", None) or {}
    cost = extra.get("cost")
    return None if cost is None else Decimal(repr(cost)) if isinstance(cost, float) else Decimal(cost)


def run_sdk(daemon: Daemon, plan: Plan) -> Seen:
    """The openai SDK (chat, completions, responses). Its floats are re-read exactly from the raw
    body where the body is whole (non-streaming); streams give what the SDK parsed."""
    prefix = "/b/v1" if plan.route.name == "chat-b" else "/v1"
    with openai.OpenAI(api_key="sk-test", base_url=daemon.url + prefix, max_retries=0, timeout=15) as sdk:
        headers = dict(plan.headers())
        shape = plan.route.shape
        kwargs: dict[str, Any] = {"model": plan.model, "extra_headers": headers}
        if plan.stream:
            kwargs["stream"] = True
            if plan.include_usage is not None and shape != "responses":
                kwargs["stream_options"] = {"include_usage": plan.include_usage}
        try:
            if shape == "chat":
                raw = sdk.chat.completions.with_raw_response.create(
                    messages=[{"role": "user", "content": "hi"}], **kwargs)
            elif shape == "completions":
                raw = sdk.completions.with_raw_response.create(prompt="hi", **kwargs)
            else:
                raw = sdk.responses.with_raw_response.create(input="hi", **kwargs)
        except openai.APIStatusError as exc:
            r = exc.response
            return classify(plan, r.status_code, dict(r.headers), r.content)
        seen = Seen(raw.status_code, raw.headers.get("x-request-id"),
                    cost_header=raw.headers.get("x-sidecar-cost"))
        if not plan.stream:
            return classify(plan, raw.status_code, dict(raw.headers), raw.http_response.content)
        try:
            last: Any = None
            for item in raw.parse():
                last = item
                usage = getattr(item, "usage", None)
                if shape == "responses" and item.type == "response.completed":
                    usage = item.response.usage
                if usage is not None and (shape != "responses" or item.type == "response.completed"):
                    seen.has_body_usage = True
                    cost = _cost_of(usage)
                    if cost is not None:
                        seen.cost_body = cost
        except openai.APIError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            code = body.get("code")
            seen.kind = "frame" if code in UPSTREAM_CODES else "worker_error"
            seen.code = code
            return seen
        if shape == "responses":
            if last is not None and last.type == "response.completed":
                seen.kind = "ok"
            elif last is not None and last.type == "response.failed":
                seen.kind, seen.code = "frame", last.response.error.code
            elif last is not None and last.type == "error":
                seen.kind = "worker_error"
            else:
                seen.kind = "cut"
        else:
            seen.kind = "ok"  # the SDK ended the stream at [DONE] without raising
        return seen


def run_round(daemon: Daemon, plans: list[Plan], *, hup_at: int | None = None,
              reloads: Callable[[], None] | None = None) -> dict[str, Seen]:
    """Run every plan concurrently; a same-content SIGHUP once `hup_at` plans have finished."""
    for p in plans:
        REGISTRY[p.rid] = p
    seen: dict[str, Seen] = {}
    jobs: list[list[Plan]] = []
    pipe: list[Plan] = []
    for p in plans:
        if p.client == "pipe":
            pipe.append(p)
            if len(pipe) == 1 + p.index % 3:
                jobs.append(pipe)
                pipe = []
        else:
            jobs.append([p])
    if pipe:
        jobs.append(pipe)
    done = Counter[str]()
    lock = threading.Lock()
    hupped = threading.Event()
    limits = httpx.Limits(max_connections=THREADS, max_keepalive_connections=THREADS)
    with httpx.Client(timeout=15, limits=limits) as hx:
        def job(group: list[Plan]) -> None:
            p = group[0]
            if p.client == "pipe":
                results = run_pipe(daemon, group)
            elif p.client == "leave":
                results = [run_leave(daemon, p)]
            elif p.client == "httpx":
                results = [run_httpx(hx, daemon, p)]
            elif p.client == "sdk":
                results = [run_sdk(daemon, p)]
            else:
                results = [run_raw(daemon, p)]
            with lock:
                for q, s in zip(group, results, strict=True):
                    seen[q.rid] = s
                done["n"] += len(group)
                fire = hup_at is not None and done["n"] >= hup_at and not hupped.is_set()
                if fire:
                    hupped.set()
            if fire and reloads is not None:
                reloads()

        with ThreadPoolExecutor(THREADS) as pool:
            for f in [pool.submit(job, g) for g in jobs]:
                f.result()
    return seen


# =============================================================================================
# What SPEC says each plan gives
# =============================================================================================


@dataclass
class Expect:
    outcome: str
    status: int
    kind: str
    code: str | None = None


def expected(plan: Plan) -> Expect:
    b = plan.behaviour
    passthrough = plan.route.dialect == "passthrough"
    if plan.client == "leave":
        if plan.leave_at == "early" and (plan.stream or passthrough):
            # gone before it read anything: its head may have been written before the FIN was read
            return Expect("client_disconnect", 0, "left")
        head = plan.stream or passthrough
        return Expect("client_disconnect", 200 if head else 499, "left")
    if b in ("sse", "json", "usage_every", "no_usage", "sse_close", "late_head", "sse_length", "sse_eof") \
            or plan.client == "held":
        return Expect("ok", 200, "ok")
    if b == "http":
        return Expect("upstream_http_error", plan.status, "http", f"w{plan.status}")
    if b == "slow_head":
        return Expect("upstream_timeout", 504, "http", "upstream_timeout")
    if b == "bad_json":
        return Expect("bad_request", 400, "http")
    if b == "no_route":
        return Expect("bad_request", 404, "http")
    assert not passthrough
    if b in MID_FAILURES:
        code = MID_FAILURES[b]
        outcome = "upstream_timeout" if b == "stall" else "upstream_error"
        if plan.stream:
            return Expect(outcome, 200, "frame", code)
        return Expect(outcome, 504 if b == "stall" else 502, "http", code)
    if b == "worker_error":
        if plan.stream:
            return Expect("upstream_error", 200, "worker_error")
        return Expect("upstream_error", 502, "http")
    raise AssertionError(b)


def formula_cost(shape: str, usage: dict[str, Any], row: dict[str, str]) -> Decimal:
    """SPEC's cost formula, exact."""
    p = {k: Decimal(v) for k, v in row.items()}
    if shape == "anthropic":
        total = (usage["input_tokens"] * p["prompt"]
                 + usage.get("cache_read_input_tokens", 0) * p.get("cached_prompt", p["prompt"])
                 + usage.get("cache_creation_input_tokens", 0) * p.get("cache_write", p["prompt"])
                 + usage["output_tokens"] * p["completion"])
        return total / Decimal(1_000_000)
    if shape == "responses":
        prompt, completion = usage["input_tokens"], usage["output_tokens"]
        cached = usage["input_tokens_details"]["cached_tokens"]
        reasoning = usage["output_tokens_details"]["reasoning_tokens"]
    else:
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    total = (max(prompt - cached, 0) * p["prompt"] + cached * p.get("cached_prompt", p["prompt"])
             + max(completion - reasoning, 0) * p["completion"]
             + reasoning * p.get("reasoning", p["completion"]))
    return total / Decimal(1_000_000)


def price_row(model: str, prices: dict[str, dict[str, str]], default: bool) -> dict[str, str] | None:
    if model in prices:
        return prices[model]
    return DEFAULT_ROW if default else None


def ledger_cost(record: dict[str, Any], prices: dict[str, dict[str, str]], default: bool) -> Decimal | None:
    """The cost of a ledger line's openai-shaped tokens (not anthropic: cache writes are not in it)."""
    row = price_row(record["model"], prices, default)
    if row is None:
        return None
    usage = {"prompt_tokens": record["prompt_tokens"] or 0, "completion_tokens": record["completion_tokens"] or 0,
             "prompt_tokens_details": {"cached_tokens": record["cached_tokens"] or 0},
             "completion_tokens_details": {"reasoning_tokens": record["reasoning_tokens"] or 0}}
    return formula_cost("chat", usage, row)


# =============================================================================================
# The checks
# =============================================================================================


def ledger_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the ledger ends in a torn line"
    return [json.loads(line, parse_float=Decimal) for line in text.splitlines()]


def ledger_id(plan: Plan, seen: Seen) -> str:
    """The request id the ledger must use: the client's own, else the one it was given."""
    return plan.rid if plan.own_rid else seen.rid or f"(none given to {plan.rid})"


def check_requests(plans: list[Plan], seen: dict[str, Seen], records: dict[str, dict[str, Any]],
                   tables: dict[str, list[dict[str, dict[str, str]]]], default: bool,
                   problems: list[str]) -> None:
    """Per request: client <-> ledger <-> SPEC (`tables`: the price tables that may have been in
    force when each request started; body, header and ledger must agree on one of them)."""
    for plan in plans:
        prices = tables[plan.rid][0]
        s = seen[plan.rid]
        want = expected(plan)
        record = records.get(ledger_id(plan, s))
        where = f"{plan.rid} {plan.route.name} {plan.client} {plan.behaviour} stream={plan.stream} " \
                f"iu={plan.include_usage} model={plan.model}: saw {s}; ledger {record}"
        if record is None:
            problems.append("no ledger line: " + where)
            continue
        if s.status is not None and s.rid != ledger_id(plan, s):
            problems.append("x-request-id differs: " + where)
        if not plan.own_rid and (s.rid is None or len(s.rid) != 32
                                 or any(c not in "0123456789abcdef" for c in s.rid)):
            problems.append("a made-up x-request-id is not 32 hex digits: " + where)
        if plan.worker_rid is not None and plan.worker_rid != ledger_id(plan, s):
            problems.append(f"the worker got x-request-id {plan.worker_rid}: " + where)
        if s.kind != want.kind:
            problems.append(f"client saw {s.kind}, SPEC says {want.kind}: " + where)
        if (want.code is not None or s.kind == "frame") and s.code != want.code:
            problems.append(f"client saw code {s.code}, SPEC says {want.code}: " + where)
        if record["outcome"] != want.outcome:
            problems.append(f"ledger outcome {record['outcome']}, SPEC says {want.outcome}: " + where)
        client_status = s.status if s.status is not None else 499
        if want.status == 0:  # either
            want.status = client_status = record["status"] if record["status"] in (200, 499) else 499
        if record["status"] != client_status or record["status"] != want.status:
            problems.append(f"ledger status {record['status']}, client {s.status}, want {want.status}: " + where)
        if plan.behaviour in ("bad_json", "no_route"):
            if plan.arrived.is_set():
                problems.append("a refused request reached the worker: " + where)
            want_route = None if plan.behaviour == "no_route" else plan.route.name
            if record["route"] != want_route or record["cost"] is not None or s.cost_header is not None:
                problems.append("ledger route or a cost for a refused request: " + where)
            continue
        if record["route"] != plan.route.name or record["dialect"] != plan.route.dialect:
            problems.append("ledger route/dialect: " + where)
        if plan.route.dialect == "passthrough":
            if s.cost_header is not None:
                problems.append("x-sidecar-cost on passthrough: " + where)
            continue
        if record["request_model"] != plan.model or record["client_stream"] is not plan.stream:
            problems.append("ledger request_model or client_stream: " + where)
        if plan.client != "leave":
            answered_sse = None if plan.behaviour == "slow_head" else not (
                plan.behaviour in ("http", "json") or (plan.behaviour == "no_usage" and plan.json_doc))
            if record["upstream_stream"] is not answered_sse:
                problems.append(f"ledger upstream_stream is not {answered_sse}: " + where)
            if record["model"] != (None if plan.behaviour in ("slow_head", "http") and record["model"] is None
                                   else plan.model):
                problems.append("ledger model is not the one answered: " + where)
        # cost, three ways
        row = price_row(plan.model, prices, default)
        if record["cost"] is not None and plan.route.shape != "anthropic" and not record["usage_estimated"] \
                and record["cost"] not in {ledger_cost(record, t, default) for t in tables[plan.rid]}:
            problems.append(f"ledger cost {record['cost']} != formula of its tokens "
                            f"{ledger_cost(record, prices, default)}: " + where)
        if (record["ttfb_ms"] is None) != (record["status"] == 499):
            problems.append("ttfb_ms null exactly when the client got no response head: " + where)
        if (row is None) != (record["cost"] is None) and record["outcome"] == "ok" and not (
                plan.behaviour == "no_usage" and plan.json_doc):
            problems.append("ledger cost present/absent against the price table: " + where)
        if want.outcome != "ok":
            if s.cost_header is not None:
                problems.append("x-sidecar-cost on a failure: " + where)
            continue
        if plan.behaviour == "no_usage" and plan.json_doc:
            # a document without usage reports none (nothing was streamed to count)
            if record["usage_estimated"] or record["cost"] is not None or record["completion_tokens"]:
                problems.append("a usage or cost for a document without usage: " + where)
            if s.cost_body is not None or s.cost_header is not None:
                problems.append("a cost reached the client for a document without usage: " + where)
            continue
        if plan.behaviour == "no_usage":
            if record["usage_estimated"] is not True:
                problems.append("usage_estimated not true without usage: " + where)
            if s.cost_body is not None or s.cost_header is not None:
                problems.append("a cost reached the client for estimated usage: " + where)
            continue
        if record["usage_estimated"] is not False:
            problems.append("usage_estimated for a worker that sent usage: " + where)
        cost = formula_cost(plan.route.shape, plan.usage, row) if row is not None else None
        for t in tables[plan.rid][1:]:
            other_row = price_row(plan.model, t, default)
            other = formula_cost(plan.route.shape, plan.usage, other_row) if other_row is not None else None
            if record["cost"] == other:
                cost = other  # it started under that table
        if record["cost"] != cost:
            problems.append(f"ledger cost {record['cost']} != SPEC {cost}: " + where)
        if s.cost_body is not None and s.cost_body != cost:
            problems.append(f"body cost {s.cost_body} != SPEC {cost}: " + where)
        if s.cost_header is not None and Decimal(s.cost_header) != cost:
            problems.append(f"x-sidecar-cost {s.cost_header} != SPEC {cost}: " + where)
        if not plan.stream:
            if cost is not None and s.cost_header is None:
                problems.append("no x-sidecar-cost on a priced JSON answer: " + where)
            if cost is not None and s.cost_body is None:
                problems.append("no usage.cost in a priced JSON answer: " + where)
        body_usage_expected = (plan.route.shape not in ("chat", "completions") or plan.include_usage is True)
        if plan.stream and body_usage_expected and cost is not None and s.cost_body is None:
            problems.append("no cost in a priced stream that carries usage: " + where)
        if plan.stream and plan.route.shape in ("chat", "completions") and plan.include_usage is not True \
                and s.has_body_usage:
            problems.append("usage reached a client that did not ask for it: " + where)


def exact_samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], Decimal]:
    """Samples of `name` with their values read exactly from the text."""
    out: dict[frozenset[tuple[str, str]], Decimal] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels_text, _, value = line.rpartition(" ")
            labels: set[tuple[str, str]] = set()
            if "{" in labels_text:
                inner = labels_text[labels_text.index("{") + 1 : labels_text.rindex("}")]
                for part in inner.split('",'):
                    k, _, v = part.partition('="')
                    labels.add((k.strip(","), v.rstrip('"')))
            out[frozenset(labels)] = Decimal(value)
    return out


def check_metrics(daemon: Daemon, records: list[dict[str, Any]], seen: list[Seen],
                  cache_write: dict[str, int], problems: list[str]) -> None:
    """/metrics against the ledger's aggregates and the error codes clients got."""
    text = metrics_text(daemon)
    s = metric_samples(text)

    def by(name: str, key: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for (n, labels), value in s.items():
            if n == name:
                out[dict(labels).get(key, "")] += int(value)
        return out

    got_requests: Counter[tuple[str, str, str]] = Counter()
    for (n, labels), value in s.items():
        if n == "sidecar_requests_total":
            d = dict(labels)
            got_requests[(d.get("route", ""), d.get("outcome", ""), d.get("status", ""))] += int(value)
    want_requests = Counter((r["route"] or "", r["outcome"], str(r["status"])) for r in records)
    if +got_requests != want_requests:
        problems.append(f"sidecar_requests_total {dict(+got_requests)} != ledger {dict(want_requests)}")

    tokens: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        if r["model"] is None:
            continue
        for kind, key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens"),
                          ("cached", "cached_tokens"), ("reasoning", "reasoning_tokens")):
            tokens[(r["model"], kind)] += r[key] or 0
    for model, n in cache_write.items():
        tokens[(model, "cache_write")] += n
    got_tokens: dict[tuple[str, str], int] = defaultdict(int)
    for (n, labels), value in s.items():
        if n == "sidecar_tokens_total":
            d = dict(labels)
            got_tokens[(d["model"], d["kind"])] += int(value)
    want_tokens = {k: v for k, v in tokens.items() if v}
    got_nonzero = {k: v for k, v in got_tokens.items() if v}
    if got_nonzero != want_tokens:
        problems.append(f"sidecar_tokens_total {sorted(got_nonzero.items())} != ledger "
                        f"{sorted(want_tokens.items())}")

    costs: dict[str, Decimal] = defaultdict(Decimal)
    for r in records:
        if r["cost"] is not None:
            costs[r["model"]] += Decimal(r["cost"])
    got_costs = {dict(k)["model"]: v for k, v in exact_samples(text, "sidecar_cost_total").items()}
    if {k: v for k, v in got_costs.items() if v} != {k: v for k, v in costs.items() if v}:
        problems.append(f"sidecar_cost_total {got_costs} != ledger {dict(costs)}")

    estimated = Counter(r["route"] for r in records if r["usage_estimated"])
    got_estimated = +by("sidecar_usage_estimated_total", "route")
    if got_estimated != estimated:
        problems.append(f"sidecar_usage_estimated_total {dict(got_estimated)} != ledger {dict(estimated)}")

    durations = +by("sidecar_request_duration_seconds_count", "route")
    if durations != Counter(r["route"] or "" for r in records):
        problems.append(f"duration histogram counts {dict(durations)} != ledger lines by route")
    ttfb = +by("sidecar_time_to_first_byte_seconds_count", "route")
    want_ttfb = Counter(r["route"] or "" for r in records if r["ttfb_ms"] is not None)
    if ttfb != want_ttfb:
        problems.append(f"ttfb histogram counts {dict(ttfb)} != ledger lines with ttfb_ms {dict(want_ttfb)}")

    codes = +by("sidecar_upstream_errors_total", "code")
    want_codes = Counter(x.code for x in seen if x.code in UPSTREAM_CODES)
    if codes != want_codes:
        problems.append(f"sidecar_upstream_errors_total {dict(codes)} != codes clients got {dict(want_codes)}")

    if any(v for (n, _), v in s.items() if n == "sidecar_ledger_write_errors_total"):
        problems.append("ledger write errors counted")
    for gauge in ("sidecar_active_streams", "sidecar_client_connections"):
        values = [v for (n, _), v in s.items() if n == gauge]
        if values != [0.0]:
            problems.append(f"{gauge} is {values} at rest")


def children(pid: int) -> set[int]:
    """The processes `pid` started (the worker processes of `workers: N`)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(x) for x in f.read().split()}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def reload_with(daemon: Daemon, config: dict[str, Any], workers: int = 1) -> None:
    """Write `config` and SIGHUP; return once every process logged that it reloaded."""
    mark = len(daemon.logs)
    daemon.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    daemon.send_signal(signal.SIGHUP)
    assert wait_for(lambda: sum(str(e.get("msg", "")).startswith("config reloaded")
                                for e in daemon.logs[mark:]) >= workers, 10), daemon.lines[mark:]


def cache_writes(plans: list[Plan], seen: dict[str, Seen], records: dict[str, dict[str, Any]]
                 ) -> dict[str, int]:
    """Anthropic cache-write tokens by model, from each ledger line whose worker usage was seen:
    its `prompt_tokens` is input + cache read + cache creation, and the plan knows the input."""
    out: dict[str, int] = defaultdict(int)
    for p in plans:
        record = records.get(ledger_id(p, seen[p.rid]))
        if p.route.shape != "anthropic" or record is None or record["prompt_tokens"] is None:
            continue
        out[record["model"]] += record["prompt_tokens"] - (record["cached_tokens"] or 0) - p.usage["input_tokens"]
    return out


# =============================================================================================
# The tests
# =============================================================================================


@pytest.fixture
def workers() -> Iterator[tuple[FakeWorker, FakeWorker]]:
    one, two = FakeWorker().start(), FakeWorker().start()
    one.default = two.default = chaos_handler
    try:
        yield one, two
    finally:
        one.stop()
        two.stop()
        REGISTRY.clear()
    assert not one.errors and not two.errors, (one.errors, two.errors)


def chaos_config(one: FakeWorker, two: FakeWorker, prices: dict[str, dict[str, str]], *,
                 default: bool, processes: int = 1) -> dict[str, Any]:
    return daemon_config(
        one.url, workers=processes, routes=route_configs(two.url), pricing=pricing(prices, default),
        upstream={"idle_timeout": ms(400), "response_timeout": ms(600), "pool_idle_timeout": "1s",
                  "max_idle_connections": 8},
        limits={"max_connections": 256, "keepalive_timeout": "5s", "header_timeout": "5s",
                "body_timeout": "5s"},
    )


def settle(daemon: Daemon, workers: tuple[FakeWorker, ...], leavers: list[Plan], problems: list[str]) -> None:
    """Wait until no worker connection is open (the pool idled out) and every request is in
    the ledger; check that each client that left got its worker connection closed."""
    for plan in leavers:
        for w in workers:
            with w._cond:
                requests = [r for r in w.requests if r.header("x-chaos-plan") == plan.rid]
            for r in requests:
                if not w.wait_connection_closed(r, timeout=5):
                    problems.append(f"{plan.rid}: the worker connection stayed open after the client left")
    for w in workers:
        if not w.wait_until(lambda w=w: w.open_connections == 0, timeout=10):
            problems.append(f"worker connections still open after the pool idle timeout: {w.open_connections}")


def run_variant(daemon: Daemon, pair: tuple[FakeWorker, FakeWorker], base: dict[str, Any], *,
                default: bool, rounds: int, processes: int, problems: list[str]) -> list[int]:
    """`rounds` identical rounds, each with a same-content SIGHUP half-way (prices change after
    the first, with a stream held across the change); check everything; return the RSS after
    each round (one process only)."""
    all_plans: list[Plan] = []
    all_seen: dict[str, Seen] = {}
    prices_of: dict[str, list[dict[str, dict[str, str]]]] = {}
    rss: list[int] = []
    daemon_current = [base]

    def same() -> None:
        reload_with(daemon, daemon_current[0], processes)

    def changed_price() -> None:
        daemon_current[0] = {**base, "pricing": pricing(PRICES_3, default)}  # rows replaced, not merged
        reload_with(daemon, daemon_current[0], processes)

    # a warm-up: one plain request per route and dialect, so no first use (of a worker
    # process, a module) stalls the first round's timers
    warm = [Plan(f"chaos{processes}-warm-{i}", i, route, CLAUDE if route.shape == "anthropic" else PRICED,
                 "raw", False, None, "json") for i, route in enumerate(ROUTE_DEFS)]
    all_seen.update(run_round(daemon, warm))
    all_plans += warm
    prices_of.update((p.rid, [PRICES_1]) for p in warm)
    for round_no in range(rounds):
        # round 0 under PRICES_1; round 1 under PRICES_2, changed to PRICES_3 half-way with
        # requests in flight (each one priced by the table in force when it started, the
        # same in its body, header and ledger line); then PRICES_3, a same-content reload
        # half-way through each round
        tables = [[PRICES_1], [PRICES_2, PRICES_3]][round_no] if round_no < 2 else [PRICES_3]
        plans = draw_plans(SEED, N, f"chaos{processes}-r{round_no}")
        seen = run_round(daemon, plans, hup_at=N // 2, reloads=changed_price if round_no == 1 else same)
        for p in plans:
            prices_of[p.rid] = tables
        all_plans += plans
        all_seen.update(seen)
        if round_no == 0:
            # a stream in flight across a reload that changes a price keeps the old one
            held = Plan(f"chaos{processes}-held", 7, ROUTES["chat"], PRICED, "held", True, True, "sse",
                        release=threading.Event())
            REGISTRY[held.rid] = held
            with RawClient(daemon.address, timeout=15) as client:
                client.send(held.request())
                assert held.arrived.wait(10)  # the request started (the worker has it)
                changed = {**base, "pricing": pricing(PRICES_2, default)}
                daemon_current[0] = changed
                reload_with(daemon, changed, processes)
                held.release.set()
                response = client.read_response(15)
            costs = [obj["usage"]["cost"] for obj in (loads(d) for _, d in sse_events(response.body)
                                                      if d != "[DONE]") if obj.get("usage")]
            want = formula_cost("chat", held.usage, PRICES_1[PRICED])
            if costs[-1:] != [want]:
                problems.append(f"a stream across a price reload costs {costs}, not the old price's {want}")
            all_plans.append(held)
            all_seen[held.rid] = Seen(200, held.rid, "ok", cost_body=costs[-1] if costs else None)
            prices_of[held.rid] = [PRICES_1]
        settle(daemon, pair, [p for p in plans if p.client == "leave"], problems)
        if processes == 1:
            rss.append(daemon.rss_kib())
    assert daemon.ledger_path is not None
    want_lines = len(all_plans)
    wait_for(lambda: len(daemon.ledger()) >= want_lines, 10)
    ids = {ledger_id(p, all_seen[p.rid]) for p in all_plans}
    records = ledger_records(daemon.ledger_path)
    counts = Counter(r["request_id"] for r in records)
    dupes = {k: v for k, v in counts.items() if v != 1}
    if dupes:
        problems.append(f"ledger lines not unique: {dupes}")
    strangers = set(counts) - ids
    if strangers:
        problems.append(f"ledger lines for requests never sent: {sorted(strangers)[:10]}")
    by_rid = {r["request_id"]: r for r in records}
    held_record = by_rid.get(f"chaos{processes}-held")
    held_usage = Plan("x", 7, ROUTES["chat"], PRICED, "held", True, True, "sse").usage
    held_cost = formula_cost("chat", held_usage, PRICES_1[PRICED])
    if held_record is None or held_record["cost"] != held_cost:
        problems.append(f"the ledger prices a stream across a price reload at {held_record}, not {held_cost}")
    check_requests([p for p in all_plans if p.client != "held"], all_seen, by_rid, prices_of, default, problems)
    everything = ledger_records(daemon.ledger_path)
    if os.environ.get("SIDECAR_CHAOS_VERBOSE"):
        print("plans:", Counter((p.client, p.behaviour) for p in all_plans))
        print("outcomes:", Counter((r["route"], r["outcome"], r["status"]) for r in everything))
        print("seen:", Counter((s.kind, s.code) for s in all_seen.values()))
        print("costs:", sum(1 for s in all_seen.values() if s.cost_body is not None),
              sum(1 for s in all_seen.values() if s.cost_header is not None))
        print(metrics_text(daemon))
    check_metrics(daemon, everything, list(all_seen.values()), cache_writes(all_plans, all_seen, by_rid), problems)
    return rss


def dump_log(daemon: Daemon, problems: list[str], pair: tuple[FakeWorker, FakeWorker]) -> None:
    """With SIDECAR_CHAOS_LOG=PATH, the daemon's log (and what the workers saw) goes there when
    something disagreed."""
    path = os.environ.get("SIDECAR_CHAOS_LOG")
    if path and problems:
        lines = list(daemon.lines)
        for n, w in enumerate(pair):
            lines += [f"worker{n} request conn={r.connection} #{r.index} {r.header('x-chaos-plan')} "
                      f"body={len(r.body)}" for r in w.requests]
            lines += [f"worker{n} incomplete {h[:300]!r}" for h in w.incomplete]
            lines += [f"worker{n} conn {c}" for c in w.connections]
        Path(path).write_text("\n".join(lines) + "\n")


def test_chaos_one_process(workers: tuple[FakeWorker, FakeWorker], tmp_path: Path) -> None:
    one, two = workers
    base = chaos_config(one, two, PRICES_1, default=False)
    problems: list[str] = []
    with Daemon(base, tmp_path) as daemon:
        # the baseline: one request through each worker, then the pools idle out
        fds_at_start = fd_count(daemon.pid)
        rss = run_variant(daemon, workers, daemon.config, default=False, rounds=ROUNDS, processes=1,
                          problems=problems)
        if not wait_for(lambda: fd_count(daemon.pid) <= fds_at_start, 10):
            problems.append(f"descriptors: {fd_count(daemon.pid)} at rest, {fds_at_start} at start: "
                            f"{sorted(os.readlink(f'/proc/{daemon.pid}/fd/{fd}') for fd in os.listdir(f'/proc/{daemon.pid}/fd'))}")
        if os.environ.get("SIDECAR_CHAOS_VERBOSE"):
            print(f"RSS after each round (KiB): {rss}; descriptors {fd_count(daemon.pid)}, at start {fds_at_start}")
        growth = rss[-1] - rss[-2]
        if growth > 1024:  # observed: tens of KiB a round (native; the Python heap is flat)
            problems.append(f"RSS grew {growth} KiB from one identical round to the next: {rss}")
        errors = daemon.errors()
    dump_log(daemon, problems, workers)
    assert not errors, errors
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems)"


def test_chaos_two_processes_with_a_default_price(workers: tuple[FakeWorker, FakeWorker], tmp_path: Path) -> None:
    one, two = workers
    base = chaos_config(one, two, PRICES_1, default=True, processes=2)
    problems: list[str] = []
    with Daemon(base, tmp_path) as daemon:
        assert wait_for(lambda: len(children(daemon.pid)) == 2, 10)
        fds_at_start = {kid: fd_count(kid) for kid in children(daemon.pid)}
        run_variant(daemon, workers, daemon.config, default=True, rounds=2, processes=2, problems=problems)
        if children(daemon.pid) != set(fds_at_start):
            problems.append(f"worker processes replaced: {fds_at_start} -> {children(daemon.pid)}")
        elif not wait_for(lambda: all(fd_count(k) <= n for k, n in fds_at_start.items()), 10):
            problems.append(f"descriptors of the worker processes: {[fd_count(k) for k in fds_at_start]} "
                            f"at rest, {list(fds_at_start.values())} at start")
        errors = daemon.errors()
    dump_log(daemon, problems, workers)
    assert not errors, errors
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems)"
