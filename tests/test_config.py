"""Tests for sidecar.config: scalar parsers, the SPEC example, interpolation, every problem class
with its exact key path, route upstream inheritance, file errors, and a fuzzed loader."""

from __future__ import annotations

import copy
import string
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import (
    DIALECTS,
    Address,
    Config,
    ConfigError,
    Limits,
    Price,
    Pricing,
    config_from_dict,
    load_config,
    parse_address,
    parse_duration,
    parse_size,
)

# Copied verbatim from /work/shared/SPEC.md, section "Config (YAML)".
SPEC_YAML = """\
listen: 127.0.0.1:8080          # client-facing; host:port or unix:/path
admin_listen: 127.0.0.1:9090    # optional: /healthz /readyz /metrics
upstream:
  url: http://127.0.0.1:8000    # the worker; http://host:port or unix:/path
  connect_timeout: 5s
  response_timeout: 10m         # request sent -> response head received (a worker
                                # sends no head while the request waits for a slot)
  idle_timeout: 60s             # longest silence inside a response body
  max_idle_connections: 64      # keep-alive pool to the worker
  pool_idle_timeout: 4s         # drop pooled connections idle this long (below the
                                # worker's own keep-alive: llama.cpp's is 5s, and it
                                # also closes after every streamed response)
limits:
  max_request_body: 10MiB
  max_header_bytes: 64KiB
  header_timeout: 10s           # client must send its whole head within this
  body_timeout: 60s             # ... and its whole request body within this
  keepalive_timeout: 75s        # an idle client connection is closed after this
  max_connections: 4096         # open client connections, idle ones included
usage_log: /var/lib/sidecar/usage.jsonl   # optional ledger, JSON lines
pricing:                        # price per 1,000,000 tokens
  currency: USD
  models:
    "Qwen/Qwen3-32B": {prompt: 0.10, completion: 0.30, cached_prompt: 0.05, reasoning: 0.30}
    "claude-like":    {prompt: 3.0, completion: 15.0, cached_prompt: 0.30, cache_write: 3.75}
  default: {prompt: 0.0, completion: 0.0}  # optional; omit -> no cost field
routes:                         # first match wins; no match -> 404
  - name: chat
    match: {path: /v1/chat/completions, methods: [POST]}
    dialect: openai-chat        # openai-chat | openai-completions | anthropic-messages | openai-responses | passthrough
    upstream_stream: auto       # auto | always | never
    heartbeat: 15s              # optional SSE comment while the worker is silent
  - name: rest
    match: {path_prefix: /v1/}
    dialect: passthrough
"""

MINIMAL: dict[str, Any] = {"upstream": {"url": "http://127.0.0.1:8000"}}


_SPEC_RAW = yaml.safe_load(SPEC_YAML)


def spec_raw() -> dict[str, Any]:
    return copy.deepcopy(_SPEC_RAW)


def problems_of(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, env or {})
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


# ------------------------------------------------------------------------------------------------
# parse_duration / parse_size / parse_address
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("10m", 600.0),
        ("1.5s", 1.5),
        (" 5 s ", 5.0),
        ("0s", 0.0),
        ("7", 7.0),
        (7, 7.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(value: Any, seconds: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        None,
        [1, 2],
        {"s": 1},
        "",
        "s",
        "5x",
        "5 days",
        "5S",
        "-5s",
        -1,
        -0.5,
        float("nan"),
        float("inf"),
        "1e3",
        "5s5",
        "1h30m",
        10**12,
        "99999999999h",
    ],
)
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value), "the message must say what is wrong"


def test_parse_duration_message_shows_the_value() -> None:
    with pytest.raises(ValueError, match=r"expected a duration like 5s.*got \[1, 2\]"):
        parse_duration([1, 2])


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512KiB", 512 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("100B", 100),
        ("64KB", 64_000),
        ("10MB", 10_000_000),
        ("1GB", 10**9),
        ("2TB", 2 * 10**12),
        ("1TiB", 1024**4),
        ("1.5KiB", 1536),
        (" 10 MiB ", 10 * 1024 * 1024),
        ("10mib", 10 * 1024 * 1024),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
        (2048.0, 2048),
    ],
)
def test_parse_size_accepts(value: Any, size: int) -> None:
    result = parse_size(value)
    assert result == size
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [
        True,
        None,
        [1],
        "",
        "MiB",
        "10M",
        "10 megabytes",
        "1.5B",
        "0.1KiB",
        -1,
        "-1KiB",
        1.5,
        float("inf"),
        float("nan"),
        "1" * 50,
        2**70,
    ],
)
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value)


def test_parse_size_unknown_unit_message_lists_units() -> None:
    with pytest.raises(ValueError, match=r'unknown size unit "M".*MiB'):
        parse_size("10M")


@pytest.mark.parametrize(
    ("value", "expected", "text"),
    [
        ("127.0.0.1:8080", Address("tcp", host="127.0.0.1", port=8080), "127.0.0.1:8080"),
        ("0.0.0.0:80", Address("tcp", host="0.0.0.0", port=80), "0.0.0.0:80"),
        ("localhost:0", Address("tcp", host="localhost", port=0), "localhost:0"),
        ("[::1]:9000", Address("tcp", host="::1", port=9000), "[::1]:9000"),
        ("[::]:9000", Address("tcp", host="::", port=9000), "[::]:9000"),
        (
            "worker.internal:8000",
            Address("tcp", host="worker.internal", port=8000),
            "worker.internal:8000",
        ),
        (":9090", Address("tcp", host="127.0.0.1", port=9090), "127.0.0.1:9090"),
        ("9090", Address("tcp", host="127.0.0.1", port=9090), "127.0.0.1:9090"),
        (9090, Address("tcp", host="127.0.0.1", port=9090), "127.0.0.1:9090"),
        (
            "unix:/run/sidecar.sock",
            Address("unix", path="/run/sidecar.sock"),
            "unix:/run/sidecar.sock",
        ),
    ],
)
def test_parse_address_accepts(value: Any, expected: Address, text: str) -> None:
    address = parse_address(value)
    assert address == expected
    assert str(address) == text


@pytest.mark.parametrize(
    "value",
    [
        "::1:8080",  # IPv6 without brackets
        "[::1]",  # no port
        "[::1",  # unclosed bracket
        "[127.0.0.1]:80",  # brackets around IPv4
        "[zz::1]:80",
        "localhost",  # no port
        "localhost:",  # empty port
        "localhost:99999",
        "localhost:-1",
        "localhost:http",
        "bad host:80",
        "http://127.0.0.1:8080",
        "unix:",
        "unix:/" + "a" * 200,
        "unix:/a\x00b",
        70000,
        -1,
        True,
        None,
        [1],
        "",
    ],
)
def test_parse_address_rejects(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(value)
    assert str(info.value)


# ------------------------------------------------------------------------------------------------
# The SPEC example and defaults
# ------------------------------------------------------------------------------------------------


def test_spec_example_loads_with_the_right_values(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(SPEC_YAML)
    config = load_config(path, env={})
    assert isinstance(config, Config)
    assert config.source == str(path)
    assert config.listen == Address("tcp", host="127.0.0.1", port=8080)
    assert config.admin_listen == Address("tcp", host="127.0.0.1", port=9090)

    up = config.upstream
    assert up.url == "http://127.0.0.1:8000"
    assert up.address == Address("tcp", host="127.0.0.1", port=8000)
    assert up.host_header == "127.0.0.1:8000"
    assert (up.connect_timeout, up.response_timeout, up.idle_timeout) == (5.0, 600.0, 60.0)
    assert (up.max_idle_connections, up.pool_idle_timeout) == (64, 4.0)

    assert config.limits == Limits(
        max_request_body=10 * 1024 * 1024,
        max_header_bytes=64 * 1024,
        header_timeout=10.0,
        body_timeout=60.0,
        keepalive_timeout=75.0,
        max_connections=4096,
        max_event_size=1024 * 1024,
    )
    assert config.usage_log == "/var/lib/sidecar/usage.jsonl"

    pricing = config.pricing
    assert pricing.currency == "USD"
    assert set(pricing.models) == {"Qwen/Qwen3-32B", "claude-like"}
    qwen = pricing.models["Qwen/Qwen3-32B"]
    assert qwen == Price(
        prompt=Decimal("0.10"),
        completion=Decimal("0.30"),
        cached_prompt=Decimal("0.05"),
        reasoning=Decimal("0.30"),
    )
    # Exact decimals, not binary floats: 0.10 is exactly one tenth.
    assert qwen.prompt * 3 == Decimal("0.3")
    assert str(qwen.prompt) == "0.10"
    claude = pricing.models["claude-like"]
    assert claude.cache_write == Decimal("3.75")
    assert claude.reasoning is None
    assert pricing.default == Price(prompt=Decimal(0), completion=Decimal(0))
    assert pricing.price_for("claude-like") is claude
    assert pricing.price_for("unknown-model") is pricing.default
    assert pricing.price_for(None) is pricing.default

    chat, rest = config.routes
    assert chat.name == "chat"
    assert chat.match.path == "/v1/chat/completions"
    assert chat.match.path_prefix is None
    assert chat.match.methods == ("POST",)
    assert (chat.dialect, chat.upstream_stream, chat.heartbeat) == ("openai-chat", "auto", 15.0)
    assert chat.upstream == config.upstream
    assert rest.name == "rest"
    assert (rest.match.path, rest.match.path_prefix, rest.match.methods) == (None, "/v1/", None)
    assert (rest.dialect, rest.upstream_stream, rest.heartbeat) == ("passthrough", "auto", None)

    assert (config.workers, config.drain_timeout, config.log_format, config.log_level) == (
        1,
        30.0,
        "auto",
        "info",
    )


def test_minimal_config_gets_the_defaults() -> None:
    config = config_from_dict(MINIMAL, {})
    assert config.listen == Address("tcp", host="127.0.0.1", port=8080)
    assert config.admin_listen is None
    assert config.limits == Limits()
    assert config.limits.max_request_body == 10 * 1024 * 1024
    assert config.limits.max_event_size == 1024 * 1024
    assert config.usage_log is None
    assert config.pricing == Pricing()
    assert config.pricing.price_for("anything") is None
    assert config.routes == ()
    up = config.upstream
    assert (up.connect_timeout, up.response_timeout, up.idle_timeout) == (5.0, 600.0, 60.0)
    assert (up.max_idle_connections, up.pool_idle_timeout) == (64, 4.0)
    assert config.source == ""


def test_empty_sections_mean_defaults() -> None:
    raw = {**MINIMAL, "limits": None, "pricing": {"models": None}, "routes": None}
    config = config_from_dict(raw, {})
    assert config.limits == Limits()
    assert dict(config.pricing.models) == {}
    assert config.routes == ()


@pytest.mark.parametrize(
    ("url", "address", "host_header"),
    [
        ("http://127.0.0.1:8000", Address("tcp", host="127.0.0.1", port=8000), "127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", Address("tcp", host="127.0.0.1", port=8000), "127.0.0.1:8000"),
        ("http://worker", Address("tcp", host="worker", port=80), "worker:80"),
        ("HTTP://worker:81", Address("tcp", host="worker", port=81), "worker:81"),
        ("http://[::1]:8000", Address("tcp", host="::1", port=8000), "[::1]:8000"),
        ("http://[::1]", Address("tcp", host="::1", port=80), "[::1]:80"),
        ("unix:/run/worker.sock", Address("unix", path="/run/worker.sock"), "localhost"),
    ],
)
def test_upstream_url_forms(url: str, address: Address, host_header: str) -> None:
    up = config_from_dict({"upstream": {"url": url}}, {}).upstream
    assert up.url == url
    assert up.address == address
    assert up.host_header == host_header


def test_methods_are_upper_cased_and_deduplicated() -> None:
    raw = {
        **MINIMAL,
        "routes": [
            {
                "name": "r",
                "match": {"path": "/x", "methods": ["post", "GET", "POST"]},
                "dialect": "passthrough",
            }
        ],
    }
    assert config_from_dict(raw, {}).routes[0].match.methods == ("POST", "GET")


@pytest.mark.parametrize("value", [False, None, "off", "OFF", "no", "false", "none", "", "  "])
def test_heartbeat_off(value: Any) -> None:
    raw = {
        **MINIMAL,
        "routes": [
            {"name": "r", "match": {"path": "/x"}, "dialect": "passthrough", "heartbeat": value}
        ],
    }
    assert config_from_dict(raw, {}).routes[0].heartbeat is None


def test_heartbeat_off_in_yaml_text(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\n"
        "routes:\n- {name: r, match: {path: /x}, dialect: passthrough, heartbeat: off}\n"
    )
    assert load_config(path, env={}).routes[0].heartbeat is None


def test_heartbeat_off_from_the_environment() -> None:
    # `${HEARTBEAT:-off}` is the string "off", not YAML's False
    raw = {
        **MINIMAL,
        "routes": [
            {"name": r, "match": {"path": f"/{r}"}, "dialect": "passthrough",
             "heartbeat": "${HEARTBEAT:-off}"}
            for r in ("a",)
        ],
    }
    assert config_from_dict(raw, {}).routes[0].heartbeat is None
    assert config_from_dict(raw, {"HEARTBEAT": "2s"}).routes[0].heartbeat == 2.0
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, {"HEARTBEAT": "offf"})
    assert info.value.problems[0].startswith("routes[0].heartbeat: expected a duration")


def test_an_empty_optional_value_is_unset() -> None:
    # `usage_log: ${USAGE_LOG:-}` and the like: empty means "not set", not an error
    raw = {**MINIMAL, "admin_listen": "${ADMIN:-}", "usage_log": "${USAGE_LOG:-}",
           "pricing": {"models": {"m": {"prompt": 1, "completion": 2, "cached_prompt": ""}}}}
    config = config_from_dict(raw, {})
    assert (config.admin_listen, config.usage_log) == (None, None)
    assert config.pricing.models["m"].cached_prompt is None
    config = config_from_dict(raw, {"ADMIN": "127.0.0.1:9", "USAGE_LOG": "/tmp/u.jsonl"})
    assert config.admin_listen == Address("tcp", host="127.0.0.1", port=9)
    assert config.usage_log == "/tmp/u.jsonl"


def test_extensions_and_case_folding() -> None:
    raw = {
        **MINIMAL,
        "workers": 4,
        "drain_timeout": "0s",
        "log_format": "JSON",
        "log_level": "Debug",
        "limits": {"max_event_size": "2MiB"},
        "admin_listen": ":9091",
    }
    config = config_from_dict(raw, {})
    assert (config.workers, config.drain_timeout) == (4, 0.0)
    assert (config.log_format, config.log_level) == ("json", "debug")
    assert config.limits.max_event_size == 2 * 1024 * 1024
    assert config.admin_listen == Address("tcp", host="127.0.0.1", port=9091)


def test_prices_are_the_exact_decimals_of_the_yaml_text(tmp_path: Path) -> None:
    # more digits than a binary float holds: the price is what was written, not its float
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:8000', connect_timeout: 1.5}\n"
        "pricing:\n  models:\n"
        "    m: {prompt: 0.1234567890123456789, completion: 12345678901234567890.5,\n"
        "        cached_prompt: 1_000.25, reasoning: 1e-7}\n"
        "routes:\n- {name: r, match: {path: /x}, dialect: passthrough}\n"
    )
    config = load_config(path, env={})
    price = config.pricing.models["m"]
    assert price.prompt == Decimal("0.1234567890123456789")
    assert price.completion == Decimal("12345678901234567890.5")
    assert price.cached_prompt == Decimal("1000.25")
    assert price.reasoning == Decimal("1e-7")
    assert config.upstream.connect_timeout == 1.5


def test_prices_keep_every_written_digit(tmp_path: Path) -> None:
    # beyond the 28 digits of Python's default decimal context, as YAML float and as string
    digits = "0.12345678901234567890123456789"
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:8000'}\n"
        f"pricing:\n  models:\n    m: {{prompt: {digits}, completion: '{digits}1'}}\n"
    )
    price = load_config(path, env={}).pricing.models["m"]
    assert (price.prompt, price.completion) == (Decimal(digits), Decimal(digits + "1"))
    # a YAML float written with too many digits is named by its length, not by its float
    path.write_text(path.read_text().replace(digits, "0." + "1" * 60, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == ["pricing.models.m.prompt: a price may be written with at most 60 characters, got 62"]
    assert Decimal("1e-60") == config_from_dict(
        {**MINIMAL, "pricing": {"models": {"m": {"prompt": "1e-60", "completion": "0E-100"}}}}, {}
    ).pricing.models["m"].prompt


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e400", 'price too large: "1e400"'),
        ("1e31", 'price too large: "1e31"'),
        (10**31, "price too large: 10000000000000000000000000000000"),
        pytest.param(10**5000, "price too large: a 16610-bit number", id="5001-digits"),
        (float("inf"), "a price must be a finite number, got inf"),
        ("-inf", 'a price must be a finite number, got "-inf"'),
        ("NaN", 'a price must be a finite number, got "NaN"'),
        # costs are worked out in integers at the smallest exponent of a row
        ("1e-2000000", 'a price may have at most 60 decimal places, got "1e-2000000"'),
        ("1.5e-60", 'a price may have at most 60 decimal places, got "1.5e-60"'),
        ("0." + "1" * 59, "a price may be written with at most 60 characters, got 61"),
    ],
)
def test_prices_must_be_finite_and_at_most_1e30(value: Any, message: str) -> None:
    raw = {**MINIMAL, "pricing": {"models": {"m": {"prompt": value, "completion": 1}}}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, {})
    assert info.value.problems == [f"pricing.models.m.prompt: {message}"]


def test_prices_are_exact_decimals() -> None:
    raw = {
        **MINIMAL,
        "pricing": {
            "currency": "EUR",
            "models": {
                "a": {"prompt": "0.10", "completion": 1e-05, "cached_prompt": 3, "reasoning": None},
                "gpt-3.5": {"prompt": 0.1, "completion": 0.2},
            },
        },
    }
    pricing = config_from_dict(raw, {}).pricing
    assert pricing.currency == "EUR"
    a = pricing.models["a"]
    assert a.prompt == Decimal("0.10")
    assert a.completion == Decimal("0.00001")
    assert a.cached_prompt == Decimal(3)
    assert a.reasoning is None
    for value in (a.prompt, a.completion, a.cached_prompt):
        assert isinstance(value, Decimal)
    assert pricing.models["gpt-3.5"].prompt + pricing.models["gpt-3.5"].completion == Decimal("0.3")
    assert pricing.default is None
    assert pricing.price_for("b") is None


def test_config_objects_are_frozen() -> None:
    config = config_from_dict(MINIMAL, {})
    with pytest.raises(AttributeError):
        config.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pricing.models["x"] = Price(Decimal(1), Decimal(1))  # type: ignore[index]


# ------------------------------------------------------------------------------------------------
# Environment interpolation
# ------------------------------------------------------------------------------------------------


def test_interpolation_from_env_with_defaults_and_literal_dollars() -> None:
    raw = {
        "listen": "127.0.0.1:${PORT:-8080}",
        "admin_listen": "${ADMIN:-127.0.0.1:9090}",
        "upstream": {
            "url": "${WORKER_URL}",
            "connect_timeout": "${T:-5s}",
            "max_idle_connections": "${POOL:-8}",
        },
        "limits": {"max_request_body": "${BODY:-1MiB}"},
        "usage_log": "/var/log/$$HOME/${NAME:-ledger}.jsonl",
        "pricing": {"models": {"m": {"prompt": "${P:-0.5}", "completion": "1"}}},
    }
    env = {"WORKER_URL": "http://10.0.0.2:9000", "PORT": "18080", "T": "", "POOL": "3"}
    config = config_from_dict(raw, env)
    assert config.listen.port == 18080  # env overrides the default
    assert config.admin_listen == Address("tcp", host="127.0.0.1", port=9090)
    assert config.upstream.url == "http://10.0.0.2:9000"
    assert config.upstream.address == Address("tcp", host="10.0.0.2", port=9000)
    assert config.upstream.connect_timeout == 5.0  # set but empty -> the default, as in the shell
    assert config.upstream.max_idle_connections == 3
    assert config.limits.max_request_body == 1024 * 1024
    assert config.usage_log == "/var/log/$HOME/ledger.jsonl"
    assert config.pricing.models["m"].prompt == Decimal("0.5")


def test_interpolation_missing_variable_names_the_key() -> None:
    assert problems_of({"upstream": {"url": "${WORKER_URL}"}}) == [
        "upstream.url: environment variable WORKER_URL is not set"
    ]


def test_interpolation_reports_every_missing_variable_with_list_paths() -> None:
    raw = {
        **MINIMAL,
        "routes": [
            {"name": "a", "match": {"path": "/a"}, "dialect": "passthrough"},
            {
                "name": "${N1}-${N2}",
                "match": {"path": "/b", "methods": ["${M}"]},
                "dialect": "passthrough",
            },
        ],
    }
    assert problems_of(raw) == [
        "routes[1].name: environment variable N1 is not set",
        "routes[1].name: environment variable N2 is not set",
        "routes[1].match.methods[0]: environment variable M is not set",
    ]


def test_interpolation_set_but_empty_without_default_is_empty() -> None:
    assert problems_of({"upstream": {"url": "${U}"}}, {"U": ""}) == [
        'upstream.url: expected http://host:port or unix:/path, got ""'
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://${HOST", "upstream.url: unterminated ${"),
        ("http://${}:80", "upstream.url: invalid variable reference ${}"),
        ("http://${1X}:80", "upstream.url: invalid variable reference ${1X}"),
        ("http://${A-b}:80", "upstream.url: invalid variable reference ${A-b}"),
        ("http://${A:-${B}}:80", "upstream.url: nested ${...} inside a default is not supported"),
    ],
)
def test_interpolation_syntax_errors(text: str, message: str) -> None:
    (problem,) = problems_of({"upstream": {"url": text}})
    assert problem.startswith(message)


def test_interpolation_leaves_keys_lone_dollars_and_non_strings_alone() -> None:
    raw = {
        **MINIMAL,
        "usage_log": "/tmp/$x/a$",
        "pricing": {"models": {"${NOT_A_VAR}": {"prompt": 1, "completion": 2}}},
    }
    config = config_from_dict(raw, {"NOT_A_VAR": "nope", "x": "nope"})
    assert config.usage_log == "/tmp/$x/a$"
    assert set(config.pricing.models) == {"${NOT_A_VAR}"}


def test_interpolated_value_is_not_interpolated_again() -> None:
    config = config_from_dict({**MINIMAL, "usage_log": "${A}"}, {"A": "/x/${B}", "B": "no"})
    assert config.usage_log == "/x/${B}"


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TEST_WORKER", "http://127.0.0.1:4321")
    config = config_from_dict({"upstream": {"url": "${SIDECAR_TEST_WORKER}"}})
    assert config.upstream.address.port == 4321


# ------------------------------------------------------------------------------------------------
# Every class of problem, with its exact key path
# ------------------------------------------------------------------------------------------------


def with_route(**route: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "r", "match": {"path": "/v1/x"}, "dialect": "passthrough"}
    base.update(route)
    return {
        **MINIMAL,
        "routes": [{"name": "first", "match": {"path": "/"}, "dialect": "passthrough"}, base],
    }


CASES: list[tuple[dict[str, Any], str]] = [
    # unknown keys, at each level
    ({**MINIMAL, "limits": {"max_body": 1}}, "limits.max_body: unknown key"),
    ({**MINIMAL, "listn": "x"}, "listn: unknown key"),
    ({"upstream": {"url": "http://a:1", "timeout": "5s"}}, "upstream.timeout: unknown key"),
    (with_route(matches={}), "routes[1].matches: unknown key"),
    (with_route(match={"path": "/x", "host": "a"}), "routes[1].match.host: unknown key"),
    (with_route(upstream={"urll": "x"}), "routes[1].upstream.urll: unknown key"),
    (
        {**MINIMAL, "pricing": {"models": {"gpt-3.5": {"prompt": 1, "completion": 1, "input": 2}}}},
        'pricing.models["gpt-3.5"].input: unknown key',
    ),
    ({**MINIMAL, "pricing": {"model": {}}}, "pricing.model: unknown key"),
    ({**MINIMAL, 7: 1}, "[7]: unknown key"),
    # required keys
    ({}, "upstream: required"),
    ({"upstream": {}}, "upstream.url: required"),
    ({"upstream": None}, "upstream.url: required"),
    (
        with_route(name=None) | {"routes": [{"match": {"path": "/"}, "dialect": "passthrough"}]},
        "routes[0].name: required",
    ),
    ({**MINIMAL, "routes": [{"name": "a", "dialect": "passthrough"}]}, "routes[0].match: required"),
    ({**MINIMAL, "routes": [{"name": "a", "match": {"path": "/"}}]}, "routes[0].dialect: required"),
    (
        {**MINIMAL, "pricing": {"models": {"m": {"prompt": 1}}}},
        "pricing.models.m.completion: required",
    ),
    ({**MINIMAL, "pricing": {"default": {"completion": 1}}}, "pricing.default.prompt: required"),
    # wrong types
    (
        {"upstream": {"url": "http://a:1", "connect_timeout": [1, 2]}},
        "upstream.connect_timeout: expected a duration like 5s, 250ms, 2m or 1h, got [1, 2]",
    ),
    ({"upstream": "http://a:1"}, 'upstream: expected a mapping of keys, got "http://a:1"'),
    ({**MINIMAL, "limits": [1]}, "limits: expected a mapping of keys, got [1]"),
    (
        {**MINIMAL, "limits": {"max_request_body": "lots"}},
        "limits.max_request_body: expected a size",
    ),
    (
        {**MINIMAL, "limits": {"max_connections": "many"}},
        'limits.max_connections: expected a whole number, got "many"',
    ),
    (
        {**MINIMAL, "limits": {"max_connections": 1.5}},
        "limits.max_connections: expected a whole number",
    ),
    (
        {**MINIMAL, "limits": {"max_connections": True}},
        "limits.max_connections: expected a whole number",
    ),
    ({**MINIMAL, "routes": {"name": "a"}}, "routes: expected a list"),
    ({**MINIMAL, "routes": ["chat"]}, 'routes[0]: expected a mapping of keys, got "chat"'),
    (with_route(name=3), "routes[1].name: expected a route name, got 3"),
    (with_route(name=""), 'routes[1].name: expected a route name, got ""'),
    ({**MINIMAL, "usage_log": 5}, "usage_log: expected a file path, got 5"),
    ({**MINIMAL, "pricing": {"currency": ""}}, "pricing.currency: expected a currency code"),
    ({**MINIMAL, "pricing": {"models": ["m"]}}, "pricing.models: expected a mapping"),
    (
        {**MINIMAL, "pricing": {"models": {1.5: {"prompt": 1, "completion": 1}}}},
        "pricing.models[1.5]: a name must be a non-empty string",
    ),
    ({**MINIMAL, "workers": "two"}, "workers: expected a whole number"),
    # zero or negative where meaningless
    (
        {"upstream": {"url": "http://a:1", "connect_timeout": 0}},
        "upstream.connect_timeout: must be greater than 0",
    ),
    (
        {"upstream": {"url": "http://a:1", "idle_timeout": "-1s"}},
        "upstream.idle_timeout: a duration must not be negative",
    ),
    (
        {"upstream": {"url": "http://a:1", "max_idle_connections": -1}},
        "upstream.max_idle_connections: must be between 0 and",
    ),
    (
        {**MINIMAL, "limits": {"max_request_body": 0}},
        "limits.max_request_body: must be greater than 0",
    ),
    (
        {**MINIMAL, "limits": {"header_timeout": "0ms"}},
        "limits.header_timeout: must be greater than 0",
    ),
    (
        {**MINIMAL, "limits": {"max_connections": 0}},
        "limits.max_connections: must be between 1 and",
    ),
    ({**MINIMAL, "workers": 0}, "workers: must be between 1 and"),
    ({**MINIMAL, "drain_timeout": -1}, "drain_timeout: a duration must not be negative"),
    (with_route(heartbeat=0), "routes[1].heartbeat: must be greater than 0"),
    (with_route(heartbeat=True), "routes[1].heartbeat: expected a duration"),
    # addresses and URLs
    (
        {**MINIMAL, "listen": "localhost"},
        'listen: expected host:port, [IPv6]:port or unix:/path, got "localhost"',
    ),
    (
        {**MINIMAL, "admin_listen": "1.2.3.4:99999"},
        "admin_listen: port must be between 0 and 65535",
    ),
    ({**MINIMAL, "listen": "::1:80"}, "listen: write IPv6 addresses in brackets"),
    ({"upstream": {"url": "https://a:1"}}, "upstream.url: https is not supported"),
    (
        {"upstream": {"url": "ftp://a:1"}},
        'upstream.url: expected http://host:port or unix:/path, got "ftp://a:1"',
    ),
    ({"upstream": {"url": "http://a:1/v1"}}, "upstream.url: the worker URL must not have a path"),
    ({"upstream": {"url": "http://a:0"}}, "upstream.url: port must be between 1 and 65535"),
    (
        {"upstream": {"url": "http://u:p@a:1"}},
        "upstream.url: the worker URL must not contain user info",
    ),
    ({"upstream": {"url": "http://"}}, "upstream.url: the worker URL has no host"),
    ({"upstream": {"url": "unix:"}}, "upstream.url: a unix socket needs a path"),
    (
        {"upstream": {"url": 8000}},
        "upstream.url: expected http://host:port or unix:/path, got 8000",
    ),
    (with_route(upstream={"url": "https://b:2"}), "routes[1].upstream.url: https is not supported"),
    # routes
    (with_route(match={"path": "v1/x"}), 'routes[1].match.path: must start with "/"'),
    (with_route(match={"path_prefix": "v1"}), 'routes[1].match.path_prefix: must start with "/"'),
    (with_route(match={"path": "/v1?x=1"}), "routes[1].match.path: must be a plain path"),
    (with_route(match={}), "routes[1].match: needs path (exact) or path_prefix"),
    (with_route(match={"methods": ["GET"]}), "routes[1].match: needs path (exact) or path_prefix"),
    (
        with_route(match={"path": "/a", "path_prefix": "/b"}),
        "routes[1].match: has both path and path_prefix; use one of them",
    ),
    (
        with_route(match={"path": "/a", "methods": "POST"}),
        'routes[1].match.methods: expected a list, got "POST"',
    ),
    (with_route(match={"path": "/a", "methods": []}), "routes[1].match.methods: must not be empty"),
    (
        with_route(match={"path": "/a", "methods": ["GET", "P OST"]}),
        'routes[1].match.methods[1]: expected an HTTP method like POST, got "P OST"',
    ),
    (
        with_route(match={"path": "/a", "methods": ["GET", 1]}),
        "routes[1].match.methods[1]: expected an HTTP method",
    ),
    (
        with_route(dialect="openai"),
        'routes[1].dialect: unknown dialect "openai" (expected one of: '
        + ", ".join(DIALECTS)
        + ")",
    ),
    (
        with_route(upstream_stream="sometimes"),
        'routes[1].upstream_stream: unknown upstream_stream mode "sometimes"',
    ),
    (with_route(name="first"), 'routes[1].name: duplicate route name "first" (also routes[0])'),
    (with_route(upstream="http://b:1"), "routes[1].upstream: expected a mapping of keys"),
    (
        with_route(upstream={"idle_timeout": "soon"}),
        "routes[1].upstream.idle_timeout: expected a duration",
    ),
    # pricing values
    (
        {**MINIMAL, "pricing": {"models": {"m": {"prompt": -1, "completion": 1}}}},
        "pricing.models.m.prompt: a price must not be negative, got -1",
    ),
    (
        {**MINIMAL, "pricing": {"models": {"m": {"prompt": "cheap", "completion": 1}}}},
        'pricing.models.m.prompt: expected a price (a number per 1,000,000 tokens), got "cheap"',
    ),
    (
        {**MINIMAL, "pricing": {"models": {"m": {"prompt": 1, "completion": True}}}},
        "pricing.models.m.completion: expected a price",
    ),
    (
        {**MINIMAL, "pricing": {"models": {"m": {"prompt": float("nan"), "completion": 1}}}},
        "pricing.models.m.prompt: a price must be a finite number",
    ),
    (
        {
            **MINIMAL,
            "pricing": {"models": {"m": {"prompt": 1, "completion": 1, "cached_prompt": "-0.1"}}},
        },
        "pricing.models.m.cached_prompt: a price must not be negative",
    ),
    (
        {
            **MINIMAL,
            "pricing": {"models": {"m": {"prompt": 1, "completion": 1, "cache_write": [1]}}},
        },
        "pricing.models.m.cache_write: expected a price",
    ),
    (
        {**MINIMAL, "pricing": {"models": {"m": "cheap"}}},
        'pricing.models.m: expected a mapping of keys, got "cheap"',
    ),
    (
        {**MINIMAL, "pricing": {"models": {"Qwen/Qwen3-32B": {"prompt": 1, "completion": -2}}}},
        'pricing.models["Qwen/Qwen3-32B"].completion: a price must not be negative',
    ),
    (
        {**MINIMAL, "pricing": {"default": {"prompt": 1, "completion": "x"}}},
        "pricing.default.completion: expected a price",
    ),
    # the admin port on the client port: `run` could not bind both
    ({**MINIMAL, "listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:8080"},
     "admin_listen: 127.0.0.1:8080 is taken by listen (127.0.0.1:8080)"),
    ({**MINIMAL, "listen": "0.0.0.0:8080", "admin_listen": "127.0.0.1:8080"},
     "admin_listen: 127.0.0.1:8080 is taken by listen (0.0.0.0:8080)"),
    ({**MINIMAL, "listen": "unix:/run/s.sock", "admin_listen": "unix:/run/s.sock"},
     "admin_listen: unix:/run/s.sock is taken by listen (unix:/run/s.sock)"),
    # enums
    ({**MINIMAL, "log_level": "verbose"}, 'log_level: unknown log_level "verbose"'),
    ({**MINIMAL, "log_format": 1}, "log_format: unknown log_format 1"),
]


@pytest.mark.parametrize(("raw", "expected"), CASES, ids=[c[1][:60] for c in CASES])
def test_each_problem_class_names_its_key_path(raw: dict[str, Any], expected: str) -> None:
    problems = problems_of(raw)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(("listen", "admin"), [("127.0.0.1:8080", "127.0.0.2:8080"),
                                             ("127.0.0.1:0", "127.0.0.1:0"),
                                             ("127.0.0.1:8080", "unix:/run/admin.sock")])
def test_an_admin_port_apart_from_the_client_port_is_fine(listen: str, admin: str) -> None:
    config = config_from_dict({**MINIMAL, "listen": listen, "admin_listen": admin}, {})
    assert str(config.admin_listen) == admin


def test_a_password_in_the_worker_url_is_refused_without_being_shown() -> None:
    (problem,) = problems_of({"upstream": {"url": "http://admin:S3CRET@worker:8000"}})
    assert problem.startswith("upstream.url: the worker URL must not contain user info"), problem
    assert "S3CRET" not in problem and "admin" not in problem and "worker:8000" in problem
    # an `@` after the authority is no user info: that URL's problem is its path
    (problem,) = problems_of({"upstream": {"url": "http://worker:8000/v1@x"}})
    assert problem.startswith("upstream.url: the worker URL must not have a path"), problem


def test_non_mapping_top_level_is_one_clean_problem() -> None:
    assert problems_of([1, 2]) == [
        "(top level): expected a mapping of keys at the top level, got [1, 2]"
    ]
    assert problems_of(None) == [
        "(top level): expected a mapping of keys at the top level, got an empty document"
    ]


def test_all_problems_are_reported_at_once() -> None:
    raw = {
        "listen": "nowhere",
        "bogus": 1,
        "upstream": {"url": "${WORKER_URL}", "connect_timeout": [1, 2]},
        "limits": {"max_body": 1, "max_header_bytes": "big"},
        "pricing": {"models": {"m": {"prompt": -1}}},
        "routes": [
            {"name": "a", "match": {"path": "v1"}, "dialect": "openai"},
            {"name": "a", "match": {}, "dialect": "passthrough", "upstream_stream": "x"},
            {"name": "c", "match": {"path": "/c"}, "dialect": "passthrough"},
            {"name": "d", "match": {"path": "/x", "path_prefix": "/y", "methods": ["GE T"]},
             "dialect": "passthrough"},
            {"name": "e", "match": {"methods": ["POST"], "extra": 1}, "dialect": "passthrough"},
        ],
    }
    problems = problems_of(raw)
    expected_prefixes = [
        "listen: expected host:port",
        "bogus: unknown key",
        "upstream.url: environment variable WORKER_URL is not set",
        "upstream.connect_timeout: expected a duration like 5s",
        "limits.max_body: unknown key",
        "limits.max_header_bytes: expected a size",
        "pricing.models.m.prompt: a price must not be negative",
        "pricing.models.m.completion: required",
        'routes[0].match.path: must start with "/"',
        'routes[0].dialect: unknown dialect "openai"',
        "routes[1].match: needs path (exact) or path_prefix",
        'routes[1].upstream_stream: unknown upstream_stream mode "x"',
        'routes[1].name: duplicate route name "a" (also routes[0])',
        # the match's own check is made beside its keys' problems
        'routes[3].match.methods[0]: expected an HTTP method like POST, got "GE T"',
        "routes[3].match: has both path and path_prefix; use one of them",
        "routes[4].match.extra: unknown key",
        "routes[4].match: needs path (exact) or path_prefix",
    ]
    for prefix in expected_prefixes:
        assert sum(p.startswith(prefix) for p in problems) == 1, (prefix, problems)
    assert len(problems) == len(expected_prefixes), problems
    assert not any("routes[2]" in p for p in problems)


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("path", "//v1/models"),
        ("path", "/v1//models"),
        ("path", "/v1/./models"),
        ("path", "/v1/../models"),
        ("path", "/v1/."),
        ("path", "/v1%2Fmodels"),
        ("path", "/v1%2emodels"),
        ("path", "/v1/%6Dodels"),
        ("path", "/v1\\models"),
        ("path_prefix", "//"),
        ("path_prefix", "/v1/../"),
        ("path_prefix", "/v1%2f"),
    ],
)
def test_a_route_that_can_never_match_is_refused(key: str, path: str) -> None:
    # SPEC: such request paths match no route, so a route written with one is dead
    raw = {**MINIMAL, "routes": [{"name": "r", "match": {key: path}, "dialect": "passthrough"}]}
    (problem,) = problems_of(raw)
    assert problem.startswith(f"routes[0].match.{key}: can never match:"), problem


@pytest.mark.parametrize("prefix", ["/", "/v1/", "/v1/.", "/v1/..", "/v1%2", "/v1/.well-known"])
def test_a_prefix_may_end_in_what_a_longer_path_makes_valid(prefix: str) -> None:
    raw = {**MINIMAL, "routes": [{"name": "r", "match": {"path_prefix": prefix},
                                  "dialect": "passthrough"}]}
    assert config_from_dict(raw, {}).routes[0].match.path_prefix == prefix


def test_a_route_path_must_be_ascii() -> None:
    raw = {**MINIMAL, "routes": [{"name": "r", "match": {"path": "/v1/café"},
                                  "dialect": "passthrough"}]}
    assert problems_of(raw) == [
        'routes[0].match.path: must be ASCII, percent-encoded as clients send it, got "/v1/café"'
    ]


def test_error_message_is_the_problem_list() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"upstream": {}, "x": 1}, {})
    assert str(info.value) == "x: unknown key\nupstream.url: required"


# ------------------------------------------------------------------------------------------------
# Route-level upstream override
# ------------------------------------------------------------------------------------------------


def test_route_upstream_inherits_unspecified_keys() -> None:
    raw = {
        "upstream": {
            "url": "http://127.0.0.1:8000",
            "connect_timeout": "2s",
            "idle_timeout": "30s",
            "max_idle_connections": 10,
        },
        "routes": [
            {
                "name": "embed",
                "match": {"path": "/v1/embeddings"},
                "dialect": "passthrough",
                "upstream": {"url": "unix:/run/embed.sock", "idle_timeout": "5s"},
            },
            {
                "name": "slow",
                "match": {"path_prefix": "/v1/"},
                "dialect": "passthrough",
                "upstream": {"response_timeout": "1h"},
            },
            {"name": "plain", "match": {"path": "/x"}, "dialect": "passthrough"},
            {"name": "empty", "match": {"path": "/y"}, "dialect": "passthrough", "upstream": None},
        ],
    }
    config = config_from_dict(raw, {})
    top = config.upstream
    embed, slow, plain, empty = (r.upstream for r in config.routes)

    assert embed.url == "unix:/run/embed.sock"
    assert embed.address == Address("unix", path="/run/embed.sock")
    assert embed.host_header == "localhost"
    assert embed.idle_timeout == 5.0
    assert embed.connect_timeout == 2.0  # inherited from the top level
    assert embed.max_idle_connections == 10  # inherited
    assert embed.response_timeout == 600.0  # the top level's default

    assert (
        slow.url == top.url and slow.address == top.address and slow.host_header == top.host_header
    )
    assert slow.response_timeout == 3600.0
    assert (slow.connect_timeout, slow.idle_timeout) == (2.0, 30.0)

    assert plain is top
    assert empty is top
    assert top.response_timeout == 600.0  # the override did not leak upwards


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return info.value.problems


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    assert load_problems(path) == [f"{path}: no such file"]


def test_relative_missing_file_keeps_the_given_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_problems(Path("config/x.yaml")) == ["config/x.yaml: no such file"]


def test_directory(tmp_path: Path) -> None:
    assert load_problems(tmp_path) == [f"{tmp_path}: is a directory, not a file"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstream: {url: [}\n", ": YAML syntax error at line 1, column 18"),
        ("a: 1\n b: 2\n", ": YAML syntax error at line 2"),
        ("- 1\n- 2\n", ": expected a mapping of keys at the top level, got [1, 2]"),
        ("just text\n", ': expected a mapping of keys at the top level, got "just text"'),
        ("", ": expected a mapping of keys at the top level, got an empty document"),
        (
            "# only comments\n",
            ": expected a mapping of keys at the top level, got an empty document",
        ),
        ("a: 1\n---\nb: 2\n", ": YAML syntax error"),
        ("a: !!int abc\n", ": YAML error at line 1, column 4: invalid int value: invalid literal"),
        ("a: !!binary 'a'\n", ": YAML error at line 1, column 4: failed to decode base64 data"),
        ("a: !!python/object:os.system {}\n", ": YAML error at line 1, column 4: could not"),
    ],
)
def test_bad_yaml_is_one_clean_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    problems = load_problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}{expected}"), problems


def test_duplicate_keys_are_reported_with_key_paths_beside_every_other_problem(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: nope\n"
        "upstream: {url: 'http://127.0.0.1:1'}\n"
        "limits:\n  header_timeout: 5s\n  header_timeout: 6s\n"
        "routes:\n"
        "- {name: r, match: {path: /x, path: /y}, dialect: passthrough}\n"
        "- name: s\n  match: {path: /z}\n  dialect: bad\n"
        "listen: 127.0.0.1:1\n"
    )
    assert load_problems(path) == [
        "limits.header_timeout: duplicate key (lines 4 and 5); write each key once",
        "listen: duplicate key (lines 1 and 11); write each key once",
        "routes[0].match.path: duplicate key (line 7); write each key once",
        'routes[1].dialect: unknown dialect "bad" (expected one of: openai-chat,'
        " openai-completions, anthropic-messages, openai-responses, passthrough)",
    ]


def test_a_merge_key_brings_in_keys_that_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstream: &up\n  url: http://127.0.0.1:1\n  connect_timeout: 5s\n"
        "routes:\n"
        "- name: r\n  match: {path_prefix: /r/}\n  dialect: passthrough\n"
        "  upstream:\n    <<: *up\n    connect_timeout: 1s\n"
    )
    config = load_config(path, env={})
    assert config.upstream.connect_timeout == 5.0
    assert config.routes[0].upstream.connect_timeout == 1.0
    # a key written twice beside the merge is still a duplicate
    path.write_text(path.read_text() + "    connect_timeout: 2s\n")
    assert load_problems(path) == [
        "routes[0].upstream.connect_timeout: duplicate key (lines 10 and 11); write each key once"
    ]


@pytest.mark.parametrize("text", ["2001-02-30", "2001-01-01", "!!timestamp x"])
def test_a_date_is_a_string_checked_by_its_key(tmp_path: Path, text: str) -> None:
    # no key holds a date: one that looks like a date gets the key's own message and path
    path = tmp_path / "c.yaml"
    path.write_text(f"upstream: {{url: 'http://127.0.0.1:1'}}\ndrain_timeout: {text}\n")
    shown = text.removeprefix("!!timestamp ")
    assert load_problems(path) == [
        f'drain_timeout: expected a duration like 5s, 250ms, 2m or 1h, got "{shown}"'
    ]
    # and a model named like a date is a model name
    path.write_text(
        "upstream: {url: 'http://127.0.0.1:1'}\n"
        "pricing: {models: {2024-01-01: {prompt: 1, completion: 2}}}\n"
    )
    assert list(load_config(path, env={}).pricing.models) == ["2024-01-01"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"upstream: {url: '\xff'}\n")
    assert load_problems(path) == [f"{path}: not valid UTF-8 (byte 17)"]


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfupstream: {url: 'http://127.0.0.1:1'}\n")
    assert load_config(path, env={}).upstream.address.port == 1


def test_key_problems_from_a_file_have_no_file_prefix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(SPEC_YAML.replace("path: /v1/chat/completions", "path: v1/chat/completions"))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == ['routes[0].match.path: must start with "/"']
    assert info.value.source == str(path)


# ------------------------------------------------------------------------------------------------
# Fuzzing: nothing but ConfigError ever escapes
# ------------------------------------------------------------------------------------------------

KEY_WORDS = sorted(
    {
        "listen",
        "admin_listen",
        "upstream",
        "url",
        "connect_timeout",
        "response_timeout",
        "idle_timeout",
        "max_idle_connections",
        "pool_idle_timeout",
        "limits",
        "max_request_body",
        "max_header_bytes",
        "header_timeout",
        "body_timeout",
        "keepalive_timeout",
        "max_connections",
        "max_event_size",
        "usage_log",
        "pricing",
        "currency",
        "models",
        "default",
        "prompt",
        "completion",
        "cached_prompt",
        "reasoning",
        "cache_write",
        "routes",
        "name",
        "match",
        "path",
        "path_prefix",
        "methods",
        "dialect",
        "upstream_stream",
        "heartbeat",
        "workers",
        "drain_timeout",
        "log_format",
        "log_level",
        "bogus",
    }
)
SCALAR_WORDS = [
    "5s",
    "250ms",
    "10MiB",
    "-1",
    "0",
    "http://127.0.0.1:8000",
    "https://x",
    "unix:/tmp/s",
    "unix:",
    "/v1/",
    "v1",
    "POST",
    "auto",
    "never",
    "openai-chat",
    "passthrough",
    "${X}",
    "${X:-5s}",
    "$$",
    "${",
    "[::1]:80",
    ":0",
    "1e309",
    "NaN",
    "0.10",
    "",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(SCALAR_WORDS),
    st.decimals(allow_nan=True),
    st.binary(max_size=4),
)
keys = st.one_of(st.sampled_from(KEY_WORDS), st.text(max_size=6), st.integers(), st.none())
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=25,
)


def must_load_or_raise_config_error(call: Any) -> None:
    try:
        result = call()
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and ": " in p for p in exc.problems), exc.problems
    else:
        assert isinstance(result, Config)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw=values, env=st.dictionaries(st.sampled_from(["X", "Y"]), st.text(max_size=5)))
def test_fuzz_arbitrary_dicts(raw: Any, env: dict[str, str]) -> None:
    must_load_or_raise_config_error(lambda: config_from_dict(raw, env))


def _set_in(tree: Any, path: list[Any], value: Any) -> None:
    for step in path[:-1]:
        tree = tree[step]
    tree[path[-1]] = value


def _leaf_paths(tree: Any, prefix: list[Any]) -> list[list[Any]]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, [*prefix, k])] + [prefix]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in _leaf_paths(v, [*prefix, i])] + [prefix]
    return [prefix]


SPEC_LEAF_PATHS = [p for p in _leaf_paths(spec_raw(), []) if p]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(SPEC_LEAF_PATHS), values), min_size=1, max_size=4))
def test_fuzz_spec_example_with_replaced_values(edits: list[tuple[list[Any], Any]]) -> None:
    raw = spec_raw()
    for path, value in edits:
        try:
            _set_in(raw, path, copy.deepcopy(value))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced a parent
    must_load_or_raise_config_error(lambda: config_from_dict(raw, {}))


YAML_ALPHABET = string.ascii_letters[:8] + string.digits[:4] + ":-[]{},&*!|>'\"#%@`?$ \n\t/."


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.text(alphabet=YAML_ALPHABET, max_size=80)))
def test_fuzz_arbitrary_yaml_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    must_load_or_raise_config_error(lambda: load_config(path, env={}))


@FUZZ
@given(
    cut=st.integers(0, len(SPEC_YAML)),
    junk=st.text(alphabet=YAML_ALPHABET, max_size=6),
    length=st.integers(0, 8),
)
def test_fuzz_mangled_spec_yaml(
    tmp_path_factory: pytest.TempPathFactory, cut: int, junk: str, length: int
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(SPEC_YAML[:cut] + junk + SPEC_YAML[cut + length :])
    must_load_or_raise_config_error(lambda: load_config(path, env={}))


def test_yaml_alias_bombs_and_cycles_are_harmless(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        bomb += f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    bomb += "routes: *j\nupstream: {url: 'http://a:1'}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    problems = load_problems(path)
    assert any(p == "a: unknown key" for p in problems)

    path.write_text("upstream: &u {url: 'http://a:1', x: *u}\n")
    assert load_problems(path) == ["upstream.x: unknown key"]
