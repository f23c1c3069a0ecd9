"""Dialects: one module per API shape, all behind `sidecar.dialects.base.Dialect`.

`get_dialect(name)` is the only lookup by name; nothing else in the daemon
ever tests which dialect it holds.
"""

from __future__ import annotations

from sidecar.dialects.anthropic import ANTHROPIC_MESSAGES
from sidecar.dialects.base import Dialect
from sidecar.dialects.openai import OPENAI_CHAT, OPENAI_COMPLETIONS
from sidecar.dialects.openai_responses import OPENAI_RESPONSES
from sidecar.dialects.passthrough import PASSTHROUGH

_REGISTRY: dict[str, Dialect] = {
    d.name: d
    for d in (OPENAI_CHAT, OPENAI_COMPLETIONS, ANTHROPIC_MESSAGES, OPENAI_RESPONSES, PASSTHROUGH)
}


def get_dialect(name: str) -> Dialect:
    """The dialect registered under `name` (config validation guarantees it exists)."""
    return _REGISTRY[name]


def register(dialect: Dialect) -> None:
    """Add a dialect (used by the dialect modules that arrive later)."""
    _REGISTRY[dialect.name] = dialect
