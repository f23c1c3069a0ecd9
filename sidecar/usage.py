"""Token usage and cost arithmetic.

What it is for: turning the usage objects that workers report (OpenAI chat /
completions, OpenAI Responses, Anthropic Messages) into one `Usage` record,
merging the several usage reports a stream may carry, and pricing a `Usage`
exactly with `Decimal` per the SPEC's formulas (prices are per 1,000,000
tokens).

What it must never do: I/O of any kind, import asyncio or socket, or use
binary floats in the arithmetic. The cost injected into the client's JSON
(`cost_json_number`), the ledger and the metrics keep exact decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Context, Decimal
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # only attribute access is needed at run time
    from sidecar.config import Price

__all__ = [
    "Usage",
    "anthropic_cost",
    "cost_header_value",
    "cost_json_number",
    "cost_literal",
    "estimated_usage",
    "openai_cost",
    "usage_from_anthropic",
    "usage_from_openai",
    "usage_from_responses",
    "usage_or_estimate",
]

# Exact arithmetic: token counts are ints and prices are short decimals, so
# 60 significant digits never round; scaleb(-6) is an exact exponent shift.
_CTX = Context(prec=60)

_COUNT_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
    "input_tokens_uncached",
    "total_tokens",
)


@dataclass(slots=True)
class Usage:
    """Token counts of one request, as reported by the worker (or estimated).

    `prompt_tokens` is the dialect's whole input: for Anthropic it is
    input + cache read + cache creation (the SPEC's ledger rule), and the raw
    uncached `input_tokens` is kept in `input_tokens_uncached` for pricing.
    `None` means "not reported".
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens / cache_read_input_tokens
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens
    cache_write_tokens: int | None = None  # anthropic cache_creation_input_tokens
    estimated: bool = False  # counted from the stream, not reported by the worker
    input_tokens_uncached: int | None = None  # anthropic raw input_tokens
    total_tokens: int | None = None  # the worker's own total (OpenAI shapes), never priced

    def merge_max(self, other: Usage) -> None:
        """Merge another report into this one: per field the largest value wins.

        `None` loses to any int. For Anthropic-shaped usage the derived
        `prompt_tokens` is recomputed from the merged parts, so reports that
        each carry only some of the parts still add up. An estimate (counted from
        the stream while no report had come) gives way to the worker's first real
        report: its counts are never a value the worker reported.
        """
        if self.estimated and not other.estimated and other.seen:
            for name in _COUNT_FIELDS:
                setattr(self, name, None)
            self.estimated = False
        was_seen = self.seen
        if not was_seen and self.total_tokens is None:
            # no count yet (a stream's first report): the other's are the largest, each one
            # taken as the loop below takes it (written out: getattr/setattr per field cost
            # about twenty times more)
            self.prompt_tokens = other.prompt_tokens
            self.completion_tokens = other.completion_tokens
            self.cached_tokens = other.cached_tokens
            self.reasoning_tokens = other.reasoning_tokens
            self.cache_write_tokens = other.cache_write_tokens
            self.input_tokens_uncached = other.input_tokens_uncached
            self.total_tokens = other.total_tokens
        else:
            for name in _COUNT_FIELDS:
                theirs = getattr(other, name)
                if theirs is None:
                    continue
                mine = getattr(self, name)
                if mine is None or theirs > mine:
                    setattr(self, name, theirs)
        if self.input_tokens_uncached is not None:
            derived = (
                self.input_tokens_uncached
                + (self.cached_tokens or 0)
                + (self.cache_write_tokens or 0)
            )
            if self.prompt_tokens is None or derived > self.prompt_tokens:
                self.prompt_tokens = derived
        if other.seen:
            # Estimated only while every report that counted was an estimate.
            self.estimated = other.estimated and (self.estimated or not was_seen)

    @property
    def seen(self) -> bool:
        """True when any count was reported."""
        return not (
            self.prompt_tokens is None
            and self.completion_tokens is None
            and self.cached_tokens is None
            and self.reasoning_tokens is None
            and self.cache_write_tokens is None
            and self.input_tokens_uncached is None
        )


def _count(obj: Any, key: str) -> int | None:
    """A non-negative int at obj[key], else None (missing, null, bool, float, str...)."""
    if not isinstance(obj, dict):  # parsed JSON: a dict (an ABC check costs ten times more)
        return None
    value = obj.get(key)
    if type(value) is not int or value < 0:  # bool is a subclass of int: excluded
        return None
    return value


def usage_from_openai(obj: Any) -> Usage:
    """Usage from an OpenAI chat/completions `usage` object.

    Reads prompt_tokens, completion_tokens, total_tokens,
    prompt_tokens_details.cached_tokens and
    completion_tokens_details.reasoning_tokens; anything missing, null or of
    the wrong type is treated as not reported.
    """
    return _read_usage(obj, "prompt_tokens", "completion_tokens", "prompt_tokens_details",
                       "completion_tokens_details", "total_tokens")


def usage_from_responses(obj: Any) -> Usage:
    """Usage from an OpenAI Responses `response.usage` object.

    input_tokens (which already includes the cached ones), output_tokens,
    input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens.
    """
    return _read_usage(obj, "input_tokens", "output_tokens", "input_tokens_details",
                       "output_tokens_details", None)


def _read_usage(
    obj: Any,
    prompt_key: str,
    completion_key: str,
    prompt_details: str,
    completion_details: str,
    total_key: str | None,
) -> Usage:
    """The counts of an OpenAI-shaped usage object under these names (cached and reasoning
    tokens inside the two details objects); anything missing, null, negative or not an
    integer is not reported."""
    # `_count` written out (and each details object looked into here): once per answer,
    # and seven calls cost as much again
    if not isinstance(obj, dict):
        return Usage()
    get = obj.get
    prompt = get(prompt_key)
    completion = get(completion_key)
    total = get(total_key) if total_key is not None else None
    cached = get(prompt_details)
    if cached is not None:
        cached = cached.get("cached_tokens") if isinstance(cached, dict) else None
    reasoning = get(completion_details)
    if reasoning is not None:
        reasoning = reasoning.get("reasoning_tokens") if isinstance(reasoning, dict) else None
    return Usage(  # by position: keyword arguments cost a third more
        prompt if type(prompt) is int and prompt >= 0 else None,  # prompt_tokens
        completion if type(completion) is int and completion >= 0 else None,  # completion_tokens
        cached if type(cached) is int and cached >= 0 else None,  # cached_tokens
        reasoning if type(reasoning) is int and reasoning >= 0 else None,  # reasoning_tokens
        None,  # cache_write_tokens
        False,  # estimated
        None,  # input_tokens_uncached
        total if type(total) is int and total >= 0 else None,  # total_tokens
    )


def usage_from_anthropic(obj: dict[str, Any]) -> Usage:
    """Usage from an Anthropic Messages `usage` object.

    `prompt_tokens` = input + cache_read + cache_creation (when any of them is
    reported), `cached_tokens` = cache_read_input_tokens,
    `cache_write_tokens` = cache_creation_input_tokens, raw input_tokens in
    `input_tokens_uncached`; `reasoning_tokens` stays None (thinking is output).
    """
    raw_input = _count(obj, "input_tokens")
    cache_read = _count(obj, "cache_read_input_tokens")
    cache_write = _count(obj, "cache_creation_input_tokens")
    parts = (raw_input, cache_read, cache_write)
    prompt = None if all(p is None for p in parts) else sum(p or 0 for p in parts)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=_count(obj, "output_tokens"),
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
        input_tokens_uncached=raw_input,
    )


def estimated_usage(content_deltas: int) -> Usage:
    """Usage counted from the stream: one completion token per content-bearing delta."""
    return Usage(completion_tokens=max(content_deltas, 0), estimated=True)


def usage_or_estimate(usage: Usage, content_deltas: int) -> Usage:
    """The worker's usage if it reported any, else an estimate from the stream."""
    return usage if usage.seen else estimated_usage(content_deltas)


def _price(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


#: price rows as integers, by id(row); each entry holds its row, so while the entry exists
#: the row is alive and its id cannot be reused by another object
_INTEGER_ROWS: dict[tuple[int, bool], tuple[Any, tuple[int, ...]]] = {}


def _integer_prices(price: Price, anthropic: bool) -> tuple[int, ...]:
    """The four prices of a formula as integers at one shared exponent, which comes last.

    The Decimal arithmetic per request then becomes int arithmetic and one exponent
    shift, with the same exact result. Worked out once per price row.
    """
    key = (id(price), anthropic)
    entry = _INTEGER_ROWS.get(key)
    if entry is not None:
        return entry[1]
    if anthropic:
        row = (
            price.prompt,
            _price(price.cached_prompt, price.prompt),
            _price(price.cache_write, price.prompt),
            price.completion,
        )
    else:
        row = (
            price.prompt,
            _price(price.cached_prompt, price.prompt),
            price.completion,
            _price(price.reasoning, price.completion),
        )
    exact = [Decimal(p) for p in row]  # rows built in code may hold ints
    exponent = min(int(p.as_tuple().exponent) for p in exact)
    ints = (*(int(p.scaleb(-exponent, _CTX)) for p in exact), exponent)
    if len(_INTEGER_ROWS) > 4096:  # many reloads of many rows: start over
        _INTEGER_ROWS.clear()
    _INTEGER_ROWS[key] = (price, ints)
    return ints


def _per_million(total: int, exponent: int) -> Decimal:
    # Exact: an int converts exactly and shifting the exponent never rounds.
    return Decimal(total).scaleb(exponent - 6, _CTX)


def openai_cost(usage: Usage, price: Price) -> Decimal:
    """Exact cost of an OpenAI-shaped usage (chat, completions, responses).

    ((prompt - cached) x prompt + cached x cached_prompt
     + (completion - reasoning) x completion + reasoning x reasoning) / 1e6,
    `cached_prompt` defaulting to `prompt` and `reasoning` to `completion`;
    missing counts are 0. A cached (reasoning) count above the prompt
    (completion) count is a worker bug; the uncached part is then taken as 0,
    so a cost is never negative.
    """
    prompt = usage.prompt_tokens or 0
    cached = usage.cached_tokens or 0
    completion = usage.completion_tokens or 0
    reasoning = usage.reasoning_tokens or 0
    p_prompt, p_cached, p_completion, p_reasoning, exponent = _integer_prices(price, False)
    total = (
        max(prompt - cached, 0) * p_prompt
        + cached * p_cached
        + max(completion - reasoning, 0) * p_completion
        + reasoning * p_reasoning
    )
    return _per_million(total, exponent)


def anthropic_cost(usage: Usage, price: Price) -> Decimal:
    """Exact cost of an Anthropic-shaped usage.

    (input x prompt + cache_read x cached_prompt + cache_creation x cache_write
     + output x completion) / 1e6, `cached_prompt` and `cache_write` defaulting
    to `prompt`; `reasoning` is not used. `input` is the raw uncached
    input_tokens, else prompt_tokens minus the cache parts.
    """
    cache_read = usage.cached_tokens or 0
    cache_write = usage.cache_write_tokens or 0
    if usage.input_tokens_uncached is not None:
        raw_input = usage.input_tokens_uncached
    else:
        raw_input = max((usage.prompt_tokens or 0) - cache_read - cache_write, 0)
    output = usage.completion_tokens or 0
    p_prompt, p_cached, p_write, p_completion, exponent = _integer_prices(price, True)
    total = (
        raw_input * p_prompt + cache_read * p_cached + cache_write * p_write + output * p_completion
    )
    return _per_million(total, exponent)


#: the cost last written, its text and that text as bytes: a request's one cost is written
#: up to five times (`usage.cost` in the body, `x-sidecar-cost`, the ledger, the access log,
#: the metrics), worked out once. One tuple, so that a thread never reads one cost with
#: another's text.
_last_cost_text: tuple[Decimal | None, str, bytes] = (None, "", b"")


def _cost_texts(cost: Decimal) -> tuple[Decimal | None, str, bytes]:
    """(cost, `cost_header_value(cost)`, its ASCII bytes), kept as the last ones. Each
    caller below first looks whether `cost` is the last one: the same (immutable) object,
    held here, has the same text."""
    global _last_cost_text
    if not cost.is_finite():
        raise ValueError(f"cost is not finite: {cost!r}")
    text = "0" if cost.is_zero() else format(cost.normalize(_CTX), "f")
    last = _last_cost_text = (cost, text, text.encode("ascii"))
    return last


def cost_header_value(cost: Decimal) -> str:
    """Fixed-point text of a cost: no exponent, no needless trailing zeros.

    Decimal("0.0000103") -> "0.0000103", Decimal("1.50") -> "1.5", 0 -> "0".
    Exact: every digit of the Decimal is kept.
    """
    last = _last_cost_text
    return last[1] if cost is last[0] else _cost_texts(cost)[1]


def cost_json_number(cost: Decimal) -> orjson.Fragment:
    """The value injected as `usage.cost` in a client's JSON (written by orjson): the exact
    fixed-point number, as in `x-sidecar-cost` and the ledger (`0.0000103`, never a binary
    float's `1.03e-05`, nor one rounded to 17 digits)."""
    return orjson.Fragment(cost_literal(cost))


def cost_literal(cost: Decimal) -> bytes:
    """The exact JSON number literal of a cost, for the ledger (b"0.0000103")."""
    last = _last_cost_text
    return last[2] if cost is last[0] else _cost_texts(cost)[2]
