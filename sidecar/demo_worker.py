"""A small OpenAI-compatible demo worker for `sidecar demo` (and nothing else).

It answers POST /v1/chat/completions and /v1/completions with canned text,
as one JSON document or as an SSE stream (usage only when asked, like vLLM),
and GET /v1/models. It is a toy: no model, no batching; it exists so that a
newcomer can see the daemon work without installing an inference server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import cast

import h11
import orjson

_WORDS = ["sidecar", "keeps", "every", "stream", "honest:", "usage", "counted,", "cost", "computed,", "failures", "reported", "as", "failures", "and", "never", "as", "a", "clean", "stop."]
_ids = itertools.count(1)


class DemoWorker(asyncio.Protocol):
    """One connection to the demo worker (keep-alive, one request at a time)."""

    def __init__(self, delay: float = 0.02) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.request: h11.Request | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                assert self.transport is not None
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, []
            elif isinstance(event, h11.Data):
                self.body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                asyncio.get_running_loop().create_task(self._answer())
                return
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _send(self, event: h11.Event) -> None:
        assert self.transport is not None
        data = self.conn.send(event)
        if data and not self.transport.is_closing():
            self.transport.write(data)

    async def _answer(self) -> None:
        assert self.request is not None
        path = self.request.target.partition(b"?")[0]
        try:
            request = orjson.loads(b"".join(self.body) or b"{}")
        except orjson.JSONDecodeError:
            request = None
        if path == b"/v1/models":
            await self._json(200, {"object": "list", "data": [{"id": "demo", "object": "model"}]})
        elif not isinstance(request, dict):
            await self._json(400, {"error": {"message": "bad JSON", "type": "invalid_request_error"}})
        elif path in (b"/v1/chat/completions", b"/v1/completions"):
            await self._complete(request, chat=path == b"/v1/chat/completions")
        else:
            await self._json(404, {"error": {"message": "not found", "type": "not_found"}})
        if self.conn.our_state is not h11.DONE:  # must close, or the client left mid-answer
            assert self.transport is not None
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self._pump()

    async def _json(self, status: int, doc: dict) -> None:
        body = orjson.dumps(doc)
        self._send(
            h11.Response(
                status_code=status,
                headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
            )
        )
        self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())

    async def _complete(self, request: dict, chat: bool) -> None:
        model = request.get("model") or "demo"
        max_tokens = request.get("max_tokens") or len(_WORDS)
        words = [w + " " for w in _WORDS[: max(1, min(int(max_tokens), len(_WORDS)))]]
        prompt_tokens = 12
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        ident = f"{'chatcmpl' if chat else 'cmpl'}-demo{next(_ids)}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        text = "".join(words)
        if not request.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            await self._json(
                200,
                {"id": ident, "object": kind, "created": created, "model": model,
                 "choices": [choice], "usage": usage},
            )
            return
        self._send(
            h11.Response(
                status_code=200,
                headers=[("content-type", "text/event-stream"), ("cache-control", "no-cache")],
            )
        )
        base = {"id": ident, "object": kind + ".chunk" if chat else kind, "created": created, "model": model}

        def event(choice: dict) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

        if chat:
            self._send(h11.Data(data=event({"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})))
        for word in words:
            await asyncio.sleep(self.delay)
            piece = {"content": word} if chat else None
            choice = {"index": 0, "delta": piece, "finish_reason": None} if chat else {"index": 0, "text": word, "finish_reason": None}
            self._send(h11.Data(data=event(choice)))
        final = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "", "finish_reason": "stop"}
        self._send(h11.Data(data=event(final)))
        options = request.get("stream_options") or {}
        if options.get("include_usage"):
            self._send(h11.Data(data=b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"))
        self._send(h11.Data(data=b"data: [DONE]\n\n"))
        self._send(h11.EndOfMessage())


async def start_demo_worker(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start the demo worker; returns the server (its socket tells the port)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(DemoWorker, host, port)
