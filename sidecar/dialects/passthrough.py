"""The `passthrough` dialect: bytes go both ways untouched; no JSON is read, no usage is known.

Pure: no I/O. The exchange streams request and response bodies as they arrive
for a dialect whose `reads_body` is False; this module only supplies the
error body for failures before the response head.
"""

from __future__ import annotations

from sidecar.config import Pricing
from sidecar.dialects.base import (
    Dialect,
    DocumentTranslator,
    RequestPlan,
    StreamTranslator,
    openai_error_body,
)


class PassthroughDialect(Dialect):
    """Forward everything as it is; only errors before the head are the sidecar's own."""

    name = "passthrough"
    reads_body = False

    def plan(self, body: bytes, upstream_stream: str, request_id: str) -> RequestPlan:
        return RequestPlan(request_id, False, False, None, body, False)

    def stream(self, plan: RequestPlan, pricing: Pricing, aggregate: bool) -> StreamTranslator:
        raise NotImplementedError("passthrough does not read streams")

    def document(self, plan: RequestPlan, pricing: Pricing, body: bytes) -> DocumentTranslator:
        raise NotImplementedError("passthrough does not read documents")

    def error_body(self, status: int, code: str, message: str) -> bytes:
        return openai_error_body(status, code, message)


PASSTHROUGH = PassthroughDialect()
