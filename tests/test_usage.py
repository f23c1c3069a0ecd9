"""Tests for sidecar.usage: reading usage objects, merging, exact cost arithmetic."""

from __future__ import annotations

import json
import random
from decimal import Context, Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import Price
from sidecar.usage import (
    _COUNT_FIELDS,
    Usage,
    anthropic_cost,
    cost_header_value,
    cost_json_number,
    cost_literal,
    estimated_usage,
    openai_cost,
    usage_from_anthropic,
    usage_from_openai,
    usage_from_responses,
    usage_or_estimate,
)
from tests.builds import attribute_names

D = Decimal
QWEN = Price(prompt=D("0.10"), completion=D("0.30"), cached_prompt=D("0.05"), reasoning=D("0.30"))
CLAUDE = Price(prompt=D("3.0"), completion=D("15.0"), cached_prompt=D("0.30"), cache_write=D("3.75"))


# -- reading usage objects -------------------------------------------------------


def test_openai_usage_full() -> None:
    u = usage_from_openai(
        {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 20},
        }
    )
    assert u == Usage(
        prompt_tokens=100, completion_tokens=50, cached_tokens=40, reasoning_tokens=20,
        total_tokens=150,
    )
    assert u.seen and not u.estimated


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"prompt_tokens": None, "completion_tokens": None},
        {"prompt_tokens": "12", "completion_tokens": 3.0},
        {"prompt_tokens": True, "completion_tokens": False},
        {"prompt_tokens": -1},
        {"prompt_tokens_details": None, "completion_tokens_details": None},
        {"prompt_tokens_details": [1], "completion_tokens_details": "x"},
        {"prompt_tokens_details": {"cached_tokens": None}},
        {"prompt_tokens_details": {"cached_tokens": True}},
    ],
)
def test_openai_usage_tolerates_junk(obj: dict) -> None:
    u = usage_from_openai(obj)
    assert u == Usage()
    assert not u.seen


def test_openai_usage_partial() -> None:
    u = usage_from_openai({"prompt_tokens": 7, "completion_tokens": "x", "prompt_tokens_details": {}})
    assert u == Usage(prompt_tokens=7)
    assert u.seen


def test_responses_usage() -> None:
    u = usage_from_responses(
        {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 6},
            "output_tokens": 87,
            "output_tokens_details": {"reasoning_tokens": 12},
            "total_tokens": 123,
        }
    )
    assert u == Usage(prompt_tokens=36, completion_tokens=87, cached_tokens=6, reasoning_tokens=12)
    assert usage_from_responses({"input_tokens": None, "output_tokens_details": None}) == Usage()


#: JSON values a usage field may hold, junk included
_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=False),
    st.text(max_size=3), st.lists(st.integers(), max_size=2),
)
_details = st.one_of(_junk, st.dictionaries(
    st.sampled_from(["cached_tokens", "reasoning_tokens", "x"]), _junk, max_size=3))
_usage_obj = st.dictionaries(
    st.sampled_from([
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
        "completion_tokens_details", "input_tokens", "output_tokens", "input_tokens_details",
        "output_tokens_details",
    ]),
    st.one_of(_junk, _details),
    max_size=9,
)


@given(st.one_of(_usage_obj, _junk))
def test_openai_and_responses_usage_read_each_field_as_count_does(obj: object) -> None:
    """usage_from_openai and usage_from_responses (written out for speed) read what
    `_count` reads, field by field (in the details objects, when they are objects)."""
    from sidecar.usage import _count

    def _sub(obj: object, key: str) -> object:
        return obj.get(key) if isinstance(obj, dict) else None

    assert usage_from_openai(obj) == Usage(  # type: ignore[arg-type]
        prompt_tokens=_count(obj, "prompt_tokens"),
        completion_tokens=_count(obj, "completion_tokens"),
        cached_tokens=_count(_sub(obj, "prompt_tokens_details"), "cached_tokens"),
        reasoning_tokens=_count(_sub(obj, "completion_tokens_details"), "reasoning_tokens"),
        total_tokens=_count(obj, "total_tokens"),
    )
    assert usage_from_responses(obj) == Usage(  # type: ignore[arg-type]
        prompt_tokens=_count(obj, "input_tokens"),
        completion_tokens=_count(obj, "output_tokens"),
        cached_tokens=_count(_sub(obj, "input_tokens_details"), "cached_tokens"),
        reasoning_tokens=_count(_sub(obj, "output_tokens_details"), "reasoning_tokens"),
    )


def test_anthropic_usage_prompt_is_sum_of_parts() -> None:
    u = usage_from_anthropic(
        {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 30,
        }
    )
    assert u.prompt_tokens == 140
    assert u.completion_tokens == 5
    assert u.cached_tokens == 100
    assert u.cache_write_tokens == 30
    assert u.input_tokens_uncached == 10
    assert u.reasoning_tokens is None
    assert usage_from_anthropic({"output_tokens": 3}) == Usage(completion_tokens=3)
    assert usage_from_anthropic({"input_tokens": None, "cache_read_input_tokens": "1"}) == Usage()


# -- merging -----------------------------------------------------------------------


def test_merge_max_per_field() -> None:
    u = Usage()
    u.merge_max(Usage(prompt_tokens=10, completion_tokens=1))
    u.merge_max(Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=3))
    u.merge_max(Usage(completion_tokens=5))  # a smaller later value never wins
    u.merge_max(Usage())
    assert u == Usage(prompt_tokens=10, completion_tokens=7, cached_tokens=3)


def _merge_max_by_loop(mine: Usage, other: Usage) -> None:
    """`Usage.merge_max` as it was written before its first-report shortcut: every field
    through the per-field loop (the reference)."""
    if mine.estimated and not other.estimated and other.seen:
        for name in _COUNT_FIELDS:
            setattr(mine, name, None)
        mine.estimated = False
    was_seen = mine.seen
    for name in _COUNT_FIELDS:
        theirs = getattr(other, name)
        if theirs is not None and (getattr(mine, name) is None or theirs > getattr(mine, name)):
            setattr(mine, name, theirs)
    if mine.input_tokens_uncached is not None:
        derived = (
            mine.input_tokens_uncached + (mine.cached_tokens or 0) + (mine.cache_write_tokens or 0)
        )
        if mine.prompt_tokens is None or derived > mine.prompt_tokens:
            mine.prompt_tokens = derived
    if other.seen:
        mine.estimated = other.estimated and (mine.estimated or not was_seen)


_COUNT = st.none() | st.integers(0, 50)
_USAGES = st.builds(
    Usage, _COUNT, _COUNT, _COUNT, _COUNT, _COUNT, st.booleans(), _COUNT, _COUNT
)


@given(st.lists(_USAGES, min_size=1, max_size=4))
def test_merge_max_is_the_per_field_loop(reports: list[Usage]) -> None:
    """Merged report by report, from an empty usage or from the first one, as the loop did."""
    for start in (Usage(), Usage(**{f: getattr(reports[0], f) for f in attribute_names(Usage)})):
        fast, slow = Usage(**{f: getattr(start, f) for f in attribute_names(Usage)}), start
        for report in reports:
            fast.merge_max(report)
            _merge_max_by_loop(slow, report)
            assert fast == slow


def test_merge_max_anthropic_start_then_delta() -> None:
    # message_start carries input and cache parts, message_delta the output
    u = usage_from_anthropic(
        {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 100,
         "cache_creation_input_tokens": 0}
    )
    u.merge_max(usage_from_anthropic({"output_tokens": 42}))
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (110, 42, 100)
    # parts arriving in different reports still add up
    v = usage_from_anthropic({"input_tokens": 200})
    v.merge_max(usage_from_anthropic({"input_tokens": 5, "cache_read_input_tokens": 100}))
    assert v.prompt_tokens == 300
    assert anthropic_cost(v, CLAUDE) == D("0.00063")  # 200*3 + 100*0.30 = 630 / 1e6


def test_merge_estimated_flag() -> None:
    u = Usage()
    u.merge_max(estimated_usage(3))
    assert u.estimated and u.completion_tokens == 3
    u.merge_max(Usage(completion_tokens=2))  # a real report: no longer an estimate
    assert not u.estimated
    u.merge_max(estimated_usage(9))
    assert not u.estimated and u.completion_tokens == 9
    r = Usage(prompt_tokens=1)
    r.merge_max(estimated_usage(1))
    assert not r.estimated


def test_an_estimate_gives_way_to_the_first_real_report() -> None:
    """A stream priced early from an estimate (a finish chunk whose usage counted nothing),
    then the worker's usage: its counts, not the larger of them and the estimate."""
    u = estimated_usage(5)
    u.merge_max(Usage(prompt_tokens=11, completion_tokens=2, total_tokens=13))
    assert u == Usage(prompt_tokens=11, completion_tokens=2, total_tokens=13)
    u.merge_max(Usage(completion_tokens=1))  # from here on, reports merge as ever
    assert (u.completion_tokens, u.estimated) == (2, False)
    v = estimated_usage(5)
    v.merge_max(Usage())  # a report that counts nothing leaves the estimate
    assert v == estimated_usage(5)


def test_usage_or_estimate() -> None:
    real = Usage(prompt_tokens=3, completion_tokens=4)
    assert usage_or_estimate(real, 99) is real
    est = usage_or_estimate(Usage(), 17)
    assert est == Usage(completion_tokens=17, estimated=True)
    assert est.seen
    assert usage_or_estimate(Usage(), 0) == Usage(completion_tokens=0, estimated=True)


# -- cost -------------------------------------------------------------------------


def test_openai_cost_cached_and_reasoning() -> None:
    u = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400, reasoning_tokens=200)
    # (600*0.10 + 400*0.05 + 300*0.30 + 200*0.30) / 1e6 = (60 + 20 + 90 + 60) / 1e6
    assert openai_cost(u, QWEN) == D("0.00023")
    distinct = Price(prompt=D("1"), completion=D("2"), cached_prompt=D("0.5"), reasoning=D("7"))
    # 600*1 + 400*0.5 + 300*2 + 200*7 = 600 + 200 + 600 + 1400 = 2800
    assert openai_cost(u, distinct) == D("0.0028")


def test_openai_cost_defaults() -> None:
    price = Price(prompt=D("0.2"), completion=D("0.6"))  # cached -> prompt, reasoning -> completion
    u = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400, reasoning_tokens=200)
    assert openai_cost(u, price) == D("0.0005")  # 1000*0.2 + 500*0.6 = 500
    assert openai_cost(Usage(), price) == 0
    assert openai_cost(Usage(completion_tokens=10), price) == D("0.000006")
    assert openai_cost(Usage(prompt_tokens=7), price) == D("0.0000014")


def test_openai_cost_never_negative() -> None:
    # a worker reporting more cached than prompt tokens: the uncached part is 0
    u = Usage(prompt_tokens=10, cached_tokens=50, completion_tokens=1, reasoning_tokens=5)
    assert openai_cost(u, QWEN) == (50 * D("0.05") + 5 * D("0.30")) / 1000000


def test_openai_cost_spec_example_header() -> None:
    price = Price(prompt=D("0.10"), completion=D("0.30"))
    u = Usage(prompt_tokens=13, completion_tokens=30)
    cost = openai_cost(u, price)
    assert cost == D("0.0000103")
    assert cost_header_value(cost) == "0.0000103"
    assert cost_literal(cost) == b"0.0000103"
    assert orjson.dumps({"cost": cost_json_number(cost)}) == b'{"cost":0.0000103}'


def test_cost_in_json_keeps_every_digit() -> None:
    """A binary float keeps 17 significant digits at most; the cost written into a client's
    JSON is the exact decimal, as in `x-sidecar-cost` and the ledger."""
    cost = D("12345.678901234567891")
    assert orjson.dumps([cost_json_number(cost)]) == b"[12345.678901234567891]"
    assert orjson.dumps([cost_json_number(D("0E-12"))]) == b"[0]"


def test_anthropic_cost_formula() -> None:
    u = usage_from_anthropic(
        {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100,
         "cache_creation_input_tokens": 30}
    )
    # 10*3 + 100*0.30 + 30*3.75 + 5*15 = 30 + 30 + 112.5 + 75 = 247.5
    assert anthropic_cost(u, CLAUDE) == D("0.0002475")
    plain = Price(prompt=D("3"), completion=D("15"))  # cached_prompt, cache_write -> prompt
    assert anthropic_cost(u, plain) == D("0.000495")  # (10 + 100 + 30)*3 + 5*15 = 495
    # thinking is output: reasoning is never used
    with_reasoning = Price(prompt=D("3"), completion=D("15"), reasoning=D("1000"))
    assert anthropic_cost(u, with_reasoning) == anthropic_cost(u, plain)


def test_anthropic_cost_without_raw_input() -> None:
    # a Usage built by hand (no input_tokens_uncached): input = prompt - parts
    u = Usage(prompt_tokens=140, completion_tokens=5, cached_tokens=100, cache_write_tokens=30)
    assert anthropic_cost(u, CLAUDE) == D("0.0002475")


@pytest.mark.parametrize("prompt", [130, 129, 0, None])
def test_anthropic_cost_without_raw_input_all_cached_or_fewer_is_no_uncached_input(prompt: int | None) -> None:
    # prompt == cache read + cache creation: no uncached input token; fewer (a worker's
    # inconsistent counts, or none at all): still none, never a negative count
    u = Usage(prompt_tokens=prompt, completion_tokens=5, cached_tokens=100, cache_write_tokens=30)
    assert anthropic_cost(u, CLAUDE) == D("0.0002175")  # 100*0.30 + 30*3.75 + 5*15 = 217.5
    assert anthropic_cost(Usage(prompt_tokens=prompt, completion_tokens=5), CLAUDE) == (
        D(prompt or 0) * 3 + 5 * 15) / 1000000


@pytest.mark.parametrize(
    ("cost", "text"),
    [
        (D("0.0000103"), "0.0000103"),
        (D("1.03E-5"), "0.0000103"),
        (D(0), "0"),
        (D("0E-12"), "0"),
        (D("-0"), "0"),
        (D("1.50"), "1.5"),
        (D("100"), "100"),
        (D("1E+2"), "100"),
        (D("2.000000"), "2"),
        (D("1E-10"), "0.0000000001"),
        (D("1.23456789012345E-14"), "0.0000000000000123456789012345"),
    ],
)
def test_cost_header_value(cost: Decimal, text: str) -> None:
    assert cost_header_value(cost) == text
    assert cost_literal(cost) == text.encode()


def test_cost_header_value_rejects_non_finite() -> None:
    with pytest.raises(ValueError):
        cost_header_value(D("NaN"))


def test_cost_header_value_written_again_is_the_same_text() -> None:
    """The text of the cost last written is kept for that object only: the same cost
    written again (as a request writes it up to four times) is the same text, and any
    other cost is worked out anew, a non-finite one refused every time."""
    rng = random.Random(4)
    costs = [D(rng.randrange(10**9)).scaleb(-rng.randrange(15)) for _ in range(2000)]
    costs += [D("1.50"), D("1.5"), D("1.500"), D(0), D("0E-9"), D("-0")]
    for cost in costs:
        fresh = format(cost.normalize(Context(prec=60)), "f") if not cost.is_zero() else "0"
        assert cost_header_value(cost) == fresh
        assert cost_header_value(cost) == fresh
        assert cost_literal(cost) == fresh.encode()
        for bad in (D("NaN"), D("Infinity"), D("-Infinity")):
            with pytest.raises(ValueError):
                cost_header_value(bad)
            with pytest.raises(ValueError):
                cost_header_value(bad)


@given(
    st.decimals(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False, places=None)
)
def test_cost_header_value_is_exact_fixed_point(cost: Decimal) -> None:
    text = cost_header_value(cost)
    assert "e" not in text.lower()
    assert D(text) == cost  # exact, nothing rounded
    if "." in text:
        assert not text.endswith("0") and not text.endswith(".")
    lit = cost_literal(cost)
    assert json.loads(lit, parse_float=Decimal, parse_int=Decimal) == cost


@given(
    prompt=st.integers(0, 10**7),
    cached=st.integers(0, 10**7),
    completion=st.integers(0, 10**6),
    reasoning=st.integers(0, 10**6),
    prices=st.lists(st.integers(0, 100_000_000), min_size=4, max_size=4),
)
def test_openai_cost_matches_integer_arithmetic(
    prompt: int, cached: int, completion: int, reasoning: int, prices: list[int]
) -> None:
    pp, pc, pcache, preas = prices  # micro-units per 1M tokens
    price = Price(
        prompt=D(pp).scaleb(-6), completion=D(pc).scaleb(-6),
        cached_prompt=D(pcache).scaleb(-6), reasoning=D(preas).scaleb(-6),
    )
    u = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
              reasoning_tokens=reasoning)
    exact = (max(prompt - cached, 0) * pp + cached * pcache
             + max(completion - reasoning, 0) * pc + reasoning * preas)  # units of 1e-12
    cost = openai_cost(u, price)
    assert cost == D(exact).scaleb(-12)
    assert D(cost_header_value(cost)) * 10**12 == exact


_PRICE_TEXT = st.one_of(
    st.decimals(min_value=0, max_value=10**4, allow_nan=False, allow_infinity=False, places=None),
    st.sampled_from([D("1E+2"), D("0"), D("0.000"), D("2.5E-7"), D("12345678901234567890.5")]),
)


@given(
    counts=st.lists(st.integers(0, 10**9), min_size=5, max_size=5),
    prices=st.lists(_PRICE_TEXT, min_size=5, max_size=5),
    defaults=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_costs_equal_the_decimal_formula_digit_for_digit(
    counts: list[int], prices: list[Decimal], defaults: list[bool]
) -> None:
    """The per-row integer prices give the very Decimal the formula gives (value and exponent),
    for any exponents and with the defaulted prices; each example is a new row (and ids of
    collected rows get reused, which must never hand a new row an old row's integers)."""
    prompt, completion, cached, reasoning, write = counts
    pp, pc, pcache, preas, pwrite = prices
    price = Price(prompt=pp, completion=pc, cached_prompt=None if defaults[0] else pcache,
                  reasoning=None if defaults[1] else preas, cache_write=None if defaults[2] else pwrite)
    wide = Context(prec=200)

    def same_digits(got: Decimal, want: Decimal) -> bool:
        # the daemon keeps 60 significant digits (prices have at most 60 characters): past
        # them the value is the exact one rounded to 60 digits
        if len(want.as_tuple().digits) > 60:
            return got == Context(prec=60).plus(want)
        return got == want and got.as_tuple() == want.as_tuple()

    def formula(terms: list[tuple[int, Decimal]]) -> Decimal:
        products = [wide.multiply(D(n), p) for n, p in terms]
        total = wide.add(wide.add(products[0], products[1]), wide.add(products[2], products[3]))
        return total.scaleb(-6, wide)

    cache_p = pp if price.cached_prompt is None else pcache
    reas_p = pc if price.reasoning is None else preas
    write_p = pp if price.cache_write is None else pwrite
    terms = [(max(prompt - cached, 0), pp), (cached, cache_p),
             (max(completion - reasoning, 0), pc), (reasoning, reas_p)]
    want = formula(terms)
    u = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
              reasoning_tokens=reasoning)
    got = openai_cost(u, price)
    assert same_digits(got, want)
    a = Usage(prompt_tokens=prompt + cached + write, completion_tokens=completion,
              cached_tokens=cached, cache_write_tokens=write, input_tokens_uncached=prompt)
    terms = [(prompt, pp), (cached, cache_p), (write, write_p), (completion, pc)]
    want = formula(terms)
    got = anthropic_cost(a, price)
    assert same_digits(got, want)


def _int_cost(u: tuple[int, int, int, int], micro: tuple[int, int, int, int]) -> int:
    prompt, completion, cached, reasoning = u
    pp, pc, pcache, preas = micro
    return (prompt - cached) * pp + cached * pcache + (completion - reasoning) * pc + reasoning * preas


def test_million_request_total_is_exact() -> None:
    """A million requests' costs add up exactly (no binary-float drift)."""
    rng = random.Random(20261127)
    prices_text = ("0.10", "0.30", "0.05", "0.70")  # per 1M tokens; 0.1 is no binary fraction
    price = Price(prompt=D(prices_text[0]), completion=D(prices_text[1]),
                  cached_prompt=D(prices_text[2]), reasoning=D(prices_text[3]))
    micro = tuple(int(D(p) * 10**6) for p in prices_text)
    pool = []
    for _ in range(5000):
        prompt = rng.randrange(0, 40000)
        completion = rng.randrange(0, 4000)
        pool.append((prompt, completion, rng.randrange(0, prompt + 1), rng.randrange(0, completion + 1)))
    # Every distinct request goes through the real functions and is checked exactly.
    literals = []
    ints = []
    for u in pool:
        cost = openai_cost(Usage(*u), price)
        exact = _int_cost(u, micro)
        assert cost.scaleb(12) == exact
        literals.append(D(cost_literal(cost).decode()))  # what the ledger holds
        ints.append(exact)
    # A million requests drawn from the pool, summed the ledger's way (Decimal from the
    # exact literals) and as integers (units of 1e-12).
    picks = [rng.randrange(len(pool)) for _ in range(1_000_000)]
    total = sum((literals[i] for i in picks), D(0))
    exact_total = sum(ints[i] for i in picks)
    assert total.scaleb(12) == exact_total
    assert D(cost_header_value(total)).scaleb(12) == exact_total
