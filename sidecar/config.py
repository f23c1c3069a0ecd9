"""Configuration: load the YAML file, interpolate the environment, validate, build frozen objects.

Every key of the file is described once, in the declarative tables near the end of this module
(`_UPSTREAM_KEYS`, `_LIMITS_KEYS`, ...): a key name, the parser for its value and its default.
Validation walks those tables and collects *every* problem as ``"key.path: message"`` (list items
as ``routes[2].match.path``) before raising one `ConfigError`; it never stops at the first one.

This module is pure: no sockets, no asyncio, no logging. Only `load_config` touches the outside
world (it reads the file, and `os.environ` when no environment mapping is given). It must never
let anything but `ConfigError` escape from loading, whatever the file contains.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

import yaml

from sidecar.routes import is_ambiguous_path

__all__ = [
    "DIALECTS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "UPSTREAM_STREAM_MODES",
    "Address",
    "Config",
    "ConfigError",
    "Limits",
    "Price",
    "Pricing",
    "RouteConfig",
    "RouteMatch",
    "UpstreamConfig",
    "config_from_dict",
    "load_config",
    "parse_address",
    "parse_duration",
    "parse_size",
]

DIALECTS = (
    "openai-chat",
    "openai-completions",
    "anthropic-messages",
    "openai-responses",
    "passthrough",
)
UPSTREAM_STREAM_MODES = ("auto", "always", "never")
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# A sockaddr_un path holds 108 bytes on Linux, the terminating NUL included.
_MAX_UNIX_PATH = 107
# Longest duration accepted (about 31 years); keeps event-loop timer arithmetic finite.
_MAX_DURATION = 1e9


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists every problem as "key.path: message"."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------------------------
# Value objects
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen or connect: a TCP host and port, or a unix socket path."""

    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{_host_for_display(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The worker to forward to, and the timeouts and pool size used with it."""

    url: str
    address: Address
    host_header: str
    connect_timeout: float = 5.0
    response_timeout: float = 600.0
    idle_timeout: float = 60.0
    max_idle_connections: int = 64
    pool_idle_timeout: float = 4.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits applied to client connections (and the largest SSE event taken from the worker)."""

    max_request_body: int = 10 * MiB
    max_header_bytes: int = 64 * KiB
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 4096
    max_event_size: int = 1 * MiB
    send_timeout: float = 60.0  # a client that takes no byte of its answer this long is gone


@dataclass(frozen=True, slots=True)
class Price:
    """A price row, per 1,000,000 tokens, as exact decimals (never built through float math)."""

    prompt: Decimal
    completion: Decimal
    cached_prompt: Decimal | None = None
    reasoning: Decimal | None = None
    cache_write: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Pricing:
    """The price table: one row per exact model name, and an optional default row."""

    currency: str = "USD"
    models: Mapping[str, Price] = field(default_factory=lambda: MappingProxyType({}))
    default: Price | None = None

    def price_for(self, model: str | None) -> Price | None:
        """The row for exactly `model`, else the default row, else None (no cost is reported)."""
        if model is not None:
            row = self.models.get(model)
            if row is not None:
                return row
        return self.default


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a request must look like to take a route: exact path or path prefix, and methods."""

    path: str | None = None
    path_prefix: str | None = None
    methods: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route: its match, dialect, upstream streaming mode, heartbeat and (merged) upstream."""

    name: str
    match: RouteMatch
    dialect: str
    upstream_stream: str
    heartbeat: float | None
    upstream: UpstreamConfig


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    listen: Address
    admin_listen: Address | None
    upstream: UpstreamConfig
    limits: Limits
    usage_log: str | None
    pricing: Pricing
    routes: tuple[RouteConfig, ...]
    workers: int = 1
    drain_timeout: float = 30.0
    worker_timeout: float = 30.0  # workers: N: a process silent to its parent this long is replaced
    log_format: str = "auto"
    log_level: str = "info"
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Scalar parsers (public ones raise ValueError with a message fit to follow "key.path: ")
# ---------------------------------------------------------------------------------------------

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = 6
_repr.maxdict = 6
_repr.maxlevel = 3


def _show(value: Any) -> str:
    """A short, YAML-ish rendering of a value for messages (bounded even for huge inputs)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, int) and value.bit_length() > 192:  # repr() refuses > 4300 digits
        return f"a {value.bit_length()}-bit number"
    return _repr.repr(value)


_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from "250ms", "5s", "2m", "1h", or a plain (non-negative) number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration like 5s, 250ms, 2m or 1h, got {_show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"a duration must not be negative, got {_show(value)}")
        match = _DURATION_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"expected a duration like 5s, 250ms, 2m or 1h, got {_show(value)}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        if isinstance(value, float) and math.isnan(value):
            raise ValueError("expected a duration like 5s, got NaN")
        if value < 0:
            raise ValueError(f"a duration must not be negative, got {_show(value)}")
        seconds = float(value) if value <= _MAX_DURATION else math.inf
    if seconds > _MAX_DURATION:
        raise ValueError(f"duration too long: {_show(value)}")
    return seconds


_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024 * GiB,
}
_MAX_SIZE = 2**62


def parse_size(value: Any) -> int:
    """Bytes from "512KiB", "10MiB", "1GiB", "100B", "64KB", "10MB" (decimal) or an integer."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f"expected a size like 10MiB, 512KiB or a number of bytes, got {_show(value)}"
        )
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"a size must not be negative, got {_show(value)}")
        match = _SIZE_RE.fullmatch(text)
        if match is None or len(text) > 40:
            raise ValueError(
                f"expected a size like 10MiB, 512KiB or a number of bytes, got {_show(value)}"
            )
        unit = match.group(2)
        factor = _SIZE_UNITS.get(unit.lower())
        if factor is None:
            raise ValueError(
                f"unknown size unit {_show(unit)} in {_show(value)}"
                " (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB for powers of 1000)"
            )
        amount = Decimal(match.group(1)) * factor
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a size in bytes, got {_show(value)}")
        if value < 0:
            raise ValueError(f"a size must not be negative, got {_show(value)}")
        if value > _MAX_SIZE:
            raise ValueError(f"size too large: {_show(value)}")
        amount = Decimal(value) if isinstance(value, int) else Decimal(str(value))
    if amount != amount.to_integral_value():
        raise ValueError(f"a size must be a whole number of bytes, got {_show(value)}")
    if amount > _MAX_SIZE:
        raise ValueError(f"size too large: {_show(value)}")
    return int(amount)


_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def _host_for_display(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_host(host: str, original: Any) -> str:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {_show(original)}") from None
        return host
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"invalid host name in {_show(original)}")
    return host


def _check_port(text: str, original: Any, *, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ValueError(f"invalid port in {_show(original)}")
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        low = 0 if allow_zero else 1
        raise ValueError(f"port must be between {low} and 65535 in {_show(original)}")
    return port


def _split_host_port(
    text: str, original: Any, *, default_port: int | None
) -> tuple[str, int | None]:
    """Split "host:port", "[v6]:port" (and "host", "[v6]" when a default port exists)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {_show(original)}")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise ValueError(f"only IPv6 addresses go in brackets, got {_show(original)}")
        if rest == "" and default_port is not None:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:port, got {_show(original)}")
        return host, _check_port(rest[1:], original, allow_zero=default_port is None)
    if text.count(":") > 1:
        raise ValueError(
            f"write IPv6 addresses in brackets, like [::1]:8080, got {_show(original)}"
        )
    if ":" not in text:
        if default_port is not None:
            return text, None
        raise ValueError(f"expected host:port, [IPv6]:port or unix:/path, got {_show(original)}")
    host, port_text = text.split(":", 1)
    return host, _check_port(port_text, original, allow_zero=default_port is None)


def _unix_address(path: str, original: Any) -> Address:
    if not path:
        raise ValueError(
            f"a unix socket needs a path, like unix:/run/sidecar.sock, got {_show(original)}"
        )
    if "\x00" in path:
        raise ValueError("a unix socket path must not contain NUL")
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_UNIX_PATH:
        raise ValueError(f"unix socket path longer than {_MAX_UNIX_PATH} bytes: {_show(path)}")
    return Address("unix", path=path)


def parse_address(value: Any) -> Address:
    """An address to listen on: "host:port", "[::1]:port", "unix:/path"; a bare port is 127.0.0.1.

    Port 0 is allowed (the system picks a free port).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {value}")
        return Address("tcp", host="127.0.0.1", port=value)
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, [IPv6]:port or unix:/path, got {_show(value)}")
    text = value.strip()
    if text.startswith("unix:"):
        return _unix_address(text[5:], value)
    if "://" in text:
        raise ValueError(f"expected host:port or unix:/path, not a URL, got {_show(value)}")
    if text.isascii() and text.isdigit():
        return Address("tcp", host="127.0.0.1", port=_check_port(text, value, allow_zero=True))
    host, port = _split_host_port(text, value, default_port=None)
    assert port is not None
    if host == "":
        host = "127.0.0.1"
    return Address("tcp", host=_check_host(host, value), port=port)


def _parse_upstream_url(value: Any) -> tuple[str, Address, str]:
    """(url, address, Host header) from "http://host[:port][/]" or "unix:/path"."""
    if not isinstance(value, str):
        raise ValueError(f"expected http://host:port or unix:/path, got {_show(value)}")
    url = value.strip()
    lowered = url.lower()
    if lowered.startswith("unix:"):
        return url, _unix_address(url[5:], value), "localhost"
    if lowered.startswith("https://"):
        raise ValueError(
            "https is not supported (sidecar speaks plain HTTP to the worker); use http://"
        )
    if not lowered.startswith("http://"):
        raise ValueError(f"expected http://host:port or unix:/path, got {_show(value)}")
    rest = url[7:]
    if "@" in rest.partition("/")[0]:  # the user info itself is not shown: it may be a password
        shown = "http://***@" + rest.partition("/")[0].rpartition("@")[2]
        raise ValueError(f"the worker URL must not contain user info, got {_show(shown)}")
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise ValueError(f"the worker URL must not contain {what}, got {_show(value)}")
    authority, _, path = rest.partition("/")
    if path:
        raise ValueError(
            f"the worker URL must not have a path (requests keep their own), got {_show(value)}"
        )
    if not authority:
        raise ValueError(f"the worker URL has no host, got {_show(value)}")
    host, port = _split_host_port(authority, value, default_port=80)
    if port is None:
        port = 80
    address = Address("tcp", host=_check_host(host, value), port=port)
    return url, address, f"{_host_for_display(host)}:{port}"


# ---------------------------------------------------------------------------------------------
# Environment interpolation (string values only, before validation)
# ---------------------------------------------------------------------------------------------


class _Unresolved:
    """Stands for a string whose interpolation failed (the problem is already reported)."""

    def __repr__(self) -> str:
        return "<unresolved>"


_UNRESOLVED: Any = _Unresolved()
_INTERP_RE = re.compile(r"\$(?:(\$)|\{([^}]*)\}|(\{))")
_VAR_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
# No schema key is deeper than this; deeper values are wrong anyway and are left as they are.
_MAX_INTERP_DEPTH = 8
_MAX_INTERP_NODES = 100_000


def _interpolate_str(text: str, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if "$" not in text:
        return text
    failed = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal failed
        if match.group(1) is not None:
            return "$"
        if match.group(3) is not None:
            problems.append(f"{path}: unterminated ${{ in {_show(text)} (write $$ for a literal $)")
            failed = True
            return ""
        inner = match.group(2)
        var = _VAR_RE.fullmatch(inner)
        if var is None:
            problems.append(
                f"{path}: invalid variable reference ${{{inner}}}; use ${{NAME}} or ${{NAME:-default}}"
            )
            failed = True
            return ""
        name, default = var.group(1), var.group(2)
        if default is not None and "${" in default:
            problems.append(f"{path}: nested ${{...}} inside a default is not supported")
            failed = True
            return ""
        current = env.get(name)
        if default is not None:
            return current if current else default
        if current is None:
            problems.append(f"{path}: environment variable {name} is not set")
            failed = True
            return ""
        return current

    result = _INTERP_RE.sub(substitute, text)
    return _UNRESOLVED if failed else result


def _interpolate(
    value: Any,
    path: str,
    env: Mapping[str, str],
    problems: list[str],
    budget: list[int],
    depth: int,
) -> Any:
    if isinstance(value, str):
        return _interpolate_str(value, path, env, problems)
    if depth >= _MAX_INTERP_DEPTH or budget[0] <= 0:
        return value
    if isinstance(value, Mapping):
        budget[0] -= len(value) + 1
        return {
            k: _interpolate(v, _join(path, k), env, problems, budget, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        budget[0] -= len(value) + 1
        return [
            _interpolate(v, f"{path}[{i}]", env, problems, budget, depth + 1)
            for i, v in enumerate(value)
        ]
    return value


# ---------------------------------------------------------------------------------------------
# Table-driven validation machinery
# ---------------------------------------------------------------------------------------------


class _Invalid:
    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Any = _Invalid()  # a parser's result when it reported (or inherited) a problem
_REQUIRED: Any = object()  # a key with no default
_OMIT: Any = object()  # a key that is left out of the result when absent

# A parser takes (raw value, key path, problem list) and returns the parsed value or _INVALID.
Parser = Callable[[Any, str, list[str]], Any]

_SIMPLE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _join(path: str, key: Any) -> str:
    if isinstance(key, str) and _SIMPLE_KEY_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    shown = json.dumps(key, ensure_ascii=False) if isinstance(key, str) else _show(key)
    return f"{path}[{shown}]"


@dataclass(frozen=True, slots=True)
class _Key:
    parse: Parser
    default: Any = _REQUIRED


def _leaf(fn: Callable[[Any], Any]) -> Parser:
    """A parser from a function that raises ValueError with a message."""

    def parse(value: Any, path: str, problems: list[str]) -> Any:
        if value is _UNRESOLVED:
            return _INVALID
        try:
            return fn(value)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            return _INVALID

    return parse


def _optional(parser: Parser) -> Parser:
    """`null` or an empty string (`${VAR:-}` with VAR unset) gives None; anything else goes
    to `parser`."""

    def parse(value: Any, path: str, problems: list[str]) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parser(value, path, problems)

    return parse


def _section(
    keys: Mapping[str, _Key],
    build: Callable[[dict[str, Any]], Any] | None = None,
    check: Callable[[dict[str, Any], str, list[str]], bool] | None = None,
) -> Parser:
    """A parser for a mapping with a fixed set of keys (`null` counts as an empty mapping)."""

    def parse(value: Any, path: str, problems: list[str]) -> Any:
        if value is _UNRESOLVED:
            return _INVALID
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            where = path or "(top level)"
            problems.append(f"{where}: expected a mapping of keys, got {_show(value)}")
            return _INVALID
        ok = True
        for key in value:
            if not isinstance(key, str) or key not in keys:
                problems.append(f"{_join(path, key)}: unknown key")
                ok = False
        out: dict[str, Any] = {}
        for name, spec in keys.items():
            sub = _join(path, name)
            if name not in value:
                if spec.default is _REQUIRED:
                    problems.append(f"{sub}: required")
                    ok = False
                elif spec.default is not _OMIT:
                    out[name] = spec.default
                continue
            parsed = spec.parse(value[name], sub, problems)
            if parsed is _INVALID:
                ok = False
            out[name] = parsed
        # The check runs on every written key, valid or not (an invalid one is _INVALID), so
        # that its problems are reported along with the keys' own.
        if check is not None and not check(out, path, problems):
            ok = False
        if not ok:
            return _INVALID
        return build(out) if build is not None else out

    return parse


def _list_of(item: Parser, *, nonempty_message: str | None = None) -> Parser:
    """A parser for a YAML sequence, giving a tuple (`null` counts as an empty list)."""

    def parse(value: Any, path: str, problems: list[str]) -> Any:
        if value is _UNRESOLVED:
            return _INVALID
        if value is None:
            value = []
        if not isinstance(value, list | tuple):
            problems.append(f"{path}: expected a list, got {_show(value)}")
            return _INVALID
        if not value and nonempty_message:
            problems.append(f"{path}: {nonempty_message}")
            return _INVALID
        results = [item(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        if any(r is _INVALID for r in results):
            return _INVALID
        return tuple(results)

    return parse


def _mapping_of(item: Parser) -> Parser:
    """A parser for a mapping from free-form, non-empty string keys to `item` values."""

    def parse(value: Any, path: str, problems: list[str]) -> Any:
        if value is _UNRESOLVED:
            return _INVALID
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {_show(value)}")
            return _INVALID
        ok = True
        out: dict[str, Any] = {}
        for key, raw in value.items():
            sub = _join(path, key)
            if not isinstance(key, str) or not key:
                problems.append(f"{sub}: a name must be a non-empty string (quote it in YAML)")
                ok = False
                continue
            parsed = item(raw, sub, problems)
            if parsed is _INVALID:
                ok = False
            else:
                out[key] = parsed
        return MappingProxyType(out) if ok else _INVALID

    return parse


# ----- leaf value functions (raise ValueError) -----


def _duration(*, positive: bool = True) -> Parser:
    def fn(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {_show(value)}")
        return seconds

    return _leaf(fn)


# What YAML reads as False, also as text (`${HEARTBEAT:-off}` interpolates to a string).
_OFF = frozenset({"off", "no", "false", "n", "none", "null"})


def _heartbeat(value: Any) -> float | None:
    if value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(
            f"must be greater than 0 (use off or null for no heartbeat), got {_show(value)}"
        )
    return seconds


def _size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"must be greater than 0, got {_show(value)}")
    return size


def _integer(low: int, high: int = 2**31) -> Parser:
    def fn(value: Any) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            text = value.strip()
            if re.fullmatch(r"[+-]?[0-9]{1,18}", text):
                number = int(text)
        elif isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            number = int(value)
        if number is None:
            raise ValueError(f"expected a whole number, got {_show(value)}")
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {_show(value)}")
        return number

    return _leaf(fn)


def _choice(options: tuple[str, ...], what: str, *, fold_case: bool = False) -> Parser:
    def fn(value: Any) -> str:
        text = value.lower() if fold_case and isinstance(value, str) else value
        if not isinstance(text, str) or text not in options:
            raise ValueError(
                f"unknown {what} {_show(value)} (expected one of: {', '.join(options)})"
            )
        return text

    return _leaf(fn)


def _text(what: str) -> Parser:
    def fn(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected {what}, got {_show(value)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"must not contain control characters, got {_show(value)}")
        return value

    return _leaf(fn)


def _route_path(value: Any, *, prefix: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a path like /v1/chat/completions, got {_show(value)}")
    if not value.startswith("/"):
        raise ValueError('must start with "/"')
    if any(c in value for c in "?# ") or any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError(
            f"must be a plain path (no query, fragment, spaces or controls), got {_show(value)}"
        )
    if not value.isascii():
        raise ValueError(f"must be ASCII, percent-encoded as clients send it, got {_show(value)}")
    # Requests whose raw path has these match no route, so neither would this one.
    if is_ambiguous_path(value.encode("ascii") + (b"x" if prefix else b"")):
        raise ValueError(
            "can never match: request paths with . or .. segments, //, backslashes or encoded"
            f" slashes and dots (%2F, %5C, %2E) match no route, got {_show(value)}"
        )
    return value


def _route_path_prefix(value: Any) -> str:
    return _route_path(value, prefix=True)


_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _method(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"expected an HTTP method like POST, got {_show(value)}")
    return value.upper()


_MAX_PRICE = Decimal(10) ** 30
_MAX_PRICE_PLACES = 60
_MAX_PRICE_TEXT = 60


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a price (a number per 1,000,000 tokens), got {_show(value)}")
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, float):
        text = getattr(value, "text", None) or repr(value)
    elif abs(value) > _MAX_PRICE:  # before str(), which refuses more than 4300 digits
        raise ValueError(f"price too large: {_show(value)}")
    else:
        text = str(value)
    if len(text) > _MAX_PRICE_TEXT:  # (the text as written: a YAML float's repr drops digits)
        raise ValueError(
            f"a price may be written with at most {_MAX_PRICE_TEXT} characters, got {len(text)}"
        )
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(
            f"expected a price (a number per 1,000,000 tokens), got {_show(value)}"
        ) from None
    if not number.is_finite():
        raise ValueError(f"a price must be a finite number, got {_show(value)}")
    if number < 0:
        raise ValueError(f"a price must not be negative, got {_show(value)}")
    if number > _MAX_PRICE:
        raise ValueError(f"price too large: {_show(value)}")
    if not number:
        return Decimal(0)  # -0 and 0E-9 too
    if int(number.as_tuple().exponent) < -_MAX_PRICE_PLACES:  # 1e-200000: costs are exact ints
        raise ValueError(
            f"a price may have at most {_MAX_PRICE_PLACES} decimal places, got {_show(value)}"
        )
    return number  # exact, every digit written


# ---------------------------------------------------------------------------------------------
# The tables: every config key, its parser and its default
# ---------------------------------------------------------------------------------------------

_UPSTREAM_KEYS: dict[str, _Key] = {
    "url": _Key(_leaf(_parse_upstream_url)),
    "connect_timeout": _Key(_duration(), 5.0),
    "response_timeout": _Key(_duration(), 600.0),
    "idle_timeout": _Key(_duration(), 60.0),
    "max_idle_connections": _Key(_integer(0, 1_000_000), 64),
    "pool_idle_timeout": _Key(_duration(), 4.0),
}
# A route's `upstream:` takes the same keys; the ones it leaves out come from the top level.
_ROUTE_UPSTREAM_KEYS = {name: _Key(key.parse, _OMIT) for name, key in _UPSTREAM_KEYS.items()}

_DEFAULT_LIMITS = Limits()
_LIMITS_KEYS: dict[str, _Key] = {
    "max_request_body": _Key(_leaf(_size), _DEFAULT_LIMITS.max_request_body),
    "max_header_bytes": _Key(_leaf(_size), _DEFAULT_LIMITS.max_header_bytes),
    "header_timeout": _Key(_duration(), _DEFAULT_LIMITS.header_timeout),
    "body_timeout": _Key(_duration(), _DEFAULT_LIMITS.body_timeout),
    "keepalive_timeout": _Key(_duration(), _DEFAULT_LIMITS.keepalive_timeout),
    "max_connections": _Key(_integer(1, 10_000_000), _DEFAULT_LIMITS.max_connections),
    "max_event_size": _Key(_leaf(_size), _DEFAULT_LIMITS.max_event_size),
    "send_timeout": _Key(_duration(), _DEFAULT_LIMITS.send_timeout),
}

_PRICE_KEYS: dict[str, _Key] = {
    "prompt": _Key(_leaf(_decimal)),
    "completion": _Key(_leaf(_decimal)),
    "cached_prompt": _Key(_optional(_leaf(_decimal)), None),
    "reasoning": _Key(_optional(_leaf(_decimal)), None),
    "cache_write": _Key(_optional(_leaf(_decimal)), None),
}
_price = _section(_PRICE_KEYS, build=lambda d: Price(**d))

_PRICING_KEYS: dict[str, _Key] = {
    "currency": _Key(_text("a currency code like USD"), "USD"),
    "models": _Key(_mapping_of(_price), MappingProxyType({})),
    "default": _Key(_optional(_price), None),
}


def _check_match(out: dict[str, Any], path: str, problems: list[str]) -> bool:
    """Exactly one of path and path_prefix is written (valid or not)."""
    if out["path"] is None and out["path_prefix"] is None:
        problems.append(f"{path}: needs path (exact) or path_prefix")
        return False
    if out["path"] is not None and out["path_prefix"] is not None:
        problems.append(f"{path}: has both path and path_prefix; use one of them")
        return False
    return True


def _build_match(out: dict[str, Any]) -> RouteMatch:
    methods = out["methods"]
    if methods is not None:
        methods = tuple(dict.fromkeys(methods))  # drop repeats, keep order
    return RouteMatch(path=out["path"], path_prefix=out["path_prefix"], methods=methods)


_MATCH_KEYS: dict[str, _Key] = {
    "path": _Key(_leaf(_route_path), None),
    "path_prefix": _Key(_leaf(_route_path_prefix), None),
    "methods": _Key(
        _optional(
            _list_of(
                _leaf(_method), nonempty_message="must not be empty (leave it out for any method)"
            )
        ),
        None,
    ),
}

_ROUTE_KEYS: dict[str, _Key] = {
    "name": _Key(_text("a route name")),
    "match": _Key(_section(_MATCH_KEYS, build=_build_match, check=_check_match)),
    "dialect": _Key(_choice(DIALECTS, "dialect")),
    "upstream_stream": _Key(_choice(UPSTREAM_STREAM_MODES, "upstream_stream mode"), "auto"),
    "heartbeat": _Key(_optional(_leaf(_heartbeat)), None),
    "upstream": _Key(_section(_ROUTE_UPSTREAM_KEYS), None),
}


def _routes(value: Any, path: str, problems: list[str]) -> Any:
    """The route list, plus a check that names are unique (done on the raw names)."""
    parsed = _list_of(_section(_ROUTE_KEYS))(value, path, problems)
    if isinstance(value, list | tuple):
        seen: dict[str, int] = {}
        for i, raw in enumerate(value):
            name = raw.get("name") if isinstance(raw, Mapping) else None
            if not isinstance(name, str):
                continue
            if name in seen:
                problems.append(
                    f"{path}[{i}].name: duplicate route name {_show(name)} (also {path}[{seen[name]}])"
                )
                parsed = _INVALID
            else:
                seen[name] = i
    return parsed


def _upstream_from(values: dict[str, Any], base: UpstreamConfig | None = None) -> UpstreamConfig:
    fields = dict(values)
    if base is not None and not fields:
        return base
    if "url" in fields:
        fields["url"], fields["address"], fields["host_header"] = fields["url"]
    if base is None:
        return UpstreamConfig(**fields)
    return replace(base, **fields)


def _build_config(out: dict[str, Any]) -> Config:
    upstream: UpstreamConfig = out["upstream"]
    routes = tuple(
        RouteConfig(
            name=r["name"],
            match=r["match"],
            dialect=r["dialect"],
            upstream_stream=r["upstream_stream"],
            heartbeat=r["heartbeat"],
            upstream=upstream if r["upstream"] is None else _upstream_from(r["upstream"], upstream),
        )
        for r in out["routes"]
    )
    return Config(**{**out, "routes": routes})


_TOP_KEYS: dict[str, _Key] = {
    "listen": _Key(_leaf(parse_address), Address("tcp", host="127.0.0.1", port=8080)),
    "admin_listen": _Key(_optional(_leaf(parse_address)), None),
    "upstream": _Key(_section(_UPSTREAM_KEYS, build=_upstream_from)),
    "limits": _Key(_section(_LIMITS_KEYS, build=lambda d: Limits(**d)), _DEFAULT_LIMITS),
    "usage_log": _Key(_optional(_text("a file path")), None),
    "pricing": _Key(_section(_PRICING_KEYS, build=lambda d: Pricing(**d)), Pricing()),
    "routes": _Key(_routes, ()),
    "workers": _Key(_integer(1, 1024), 1),
    "drain_timeout": _Key(_duration(positive=False), 30.0),
    "worker_timeout": _Key(_duration(), 30.0),
    "log_format": _Key(_choice(LOG_FORMATS, "log_format", fold_case=True), "auto"),
    "log_level": _Key(_choice(LOG_LEVELS, "log_level", fold_case=True), "info"),
}
_WILDCARD_HOSTS = frozenset(("", "0.0.0.0", "::"))


def _check_listeners(out: dict[str, Any], path: str, problems: list[str]) -> bool:
    """The admin port cannot be the client port: `run` could not bind both."""
    listen, admin = out["listen"], out["admin_listen"]
    if not isinstance(listen, Address) or not isinstance(admin, Address) or listen.kind != admin.kind:
        return True
    if listen.kind == "unix":
        clash = listen.path == admin.path
    else:
        clash = listen.port == admin.port != 0 and (
            listen.host == admin.host or listen.host in _WILDCARD_HOSTS or admin.host in _WILDCARD_HOSTS
        )
    if clash:
        problems.append(f"{_join(path, 'admin_listen')}: {admin} is taken by listen ({listen})")
    return not clash


_config = _section(_TOP_KEYS, build=_build_config, check=_check_listeners)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def config_from_dict(raw: Any, env: Mapping[str, str] | None = None, *, source: str = "") -> Config:
    """Validate an already-parsed mapping; `${VAR}` comes from `env` (default: os.environ)."""
    if env is None:
        env = os.environ
    if not isinstance(raw, Mapping):
        where = source or "(top level)"
        kind = "an empty document" if raw is None else _show(raw)
        raise ConfigError(
            [f"{where}: expected a mapping of keys at the top level, got {kind}"], source
        )
    problems: list[str] = []
    interpolated = _interpolate(raw, "", env, problems, [_MAX_INTERP_NODES], 0)
    result = _config(interpolated, "", problems)
    if problems or result is _INVALID:
        raise ConfigError(problems or ["(top level): invalid configuration"], source)
    return replace(result, source=source)


# libyaml's parser when PyYAML was built with it (much faster); the same safe constructors.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _StrictLoader(_SafeLoader):
    """SafeLoader that keeps what the config was written as.

    - A float keeps its text, so a price is the exact decimal written (`_WrittenFloat`).
    - A date-like scalar stays a string: no key holds a date, and a value that failed as a
      date (`2001-02-30`) is then reported by the key's own check, with its key path.
    - A constructor's own failure (`!!binary` that is not base64) is a YAML error with a
      line, never a Python exception.

    Duplicate keys are found before construction, by `_duplicate_keys`, with key paths.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # PyYAML's constructors raise anything
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"invalid {node.tag.rpartition(':')[2]} value: {detail}",
                node.start_mark,
            ) from None

    def construct_exact_float(self, node: yaml.ScalarNode) -> float:
        value: float = self.construct_yaml_float(node)
        text = str(self.construct_scalar(node)).replace("_", "")
        try:
            Decimal(text)
        except InvalidOperation:  # 1:30.5 (sexagesimal), .inf, .nan: the float says it all
            return value
        return _WrittenFloat(value, text)


class _WrittenFloat(float):
    """A YAML float that keeps the text it was written as: a price is the exact decimal of
    that text (`0.1234567890123456789`), never of the nearest binary float."""

    text: str

    def __new__(cls, value: float, text: str) -> _WrittenFloat:
        number = super().__new__(cls, value)
        number.text = text
        return number


_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_exact_float)
_StrictLoader.add_constructor(_TIMESTAMP_TAG, _StrictLoader.construct_yaml_str)


def _duplicate_keys(loader: Any, node: yaml.Node, path: str = "") -> list[str]:
    """Every key written twice in one mapping, as "key.path: duplicate key (lines 4 and 5)".

    Keys that a merge (`<<: *anchor`) brings in may be overridden: only keys written in the
    mapping itself count. Each node is visited once (aliases share nodes).
    """
    problems: list[str] = []
    seen_nodes: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(node, path)]
    while pending:
        current, where = pending.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            pending.extend((item, f"{where}[{i}]") for i, item in enumerate(current.value))
        elif isinstance(current, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in current.value:
                if key_node.tag == _MERGE_TAG:
                    pending.append((value_node, where))
                    continue
                line = key_node.start_mark.line + 1
                earlier: int | None = None
                key: Any = None
                if isinstance(key_node, yaml.ScalarNode):
                    key = loader.construct_object(key_node)
                    with contextlib.suppress(TypeError):  # unhashable: construction says so
                        earlier = first_line.get(key)
                        first_line.setdefault(key, line)
                sub = _join(where, key)
                if earlier is not None:
                    lines = f"line {line}" if earlier == line else f"lines {earlier} and {line}"
                    problems.append(f"{sub}: duplicate key ({lines}); write each key once")
                pending.append((value_node, sub))
    problems.sort()
    return problems


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    """The document, and its duplicate-key problems (the last value of a duplicate is kept,
    so the rest of the file is still checked)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        duplicates = _duplicate_keys(loader, node)
        return loader.construct_document(node), duplicates
    finally:
        loader.dispose()


def _yaml_problem(source: str, exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if isinstance(exc, yaml.YAMLError) and mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        kind = "error" if isinstance(exc, yaml.constructor.ConstructorError) else "syntax error"
        return f"{source}: YAML {kind} at {where}: {problem or exc}"
    if isinstance(exc, RecursionError):
        return f"{source}: YAML nested too deeply"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return f"{source}: invalid YAML: {detail}"


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a YAML config file; raises ConfigError listing all problems."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"], source) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory, not a file"], source) from None
    except PermissionError:
        raise ConfigError([f"{source}: permission denied"], source) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"], source) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not valid UTF-8 (byte {exc.start})"], source) from None
    try:
        raw, duplicates = _load_yaml(text)
    except Exception as exc:  # whatever the file holds: a ConfigError
        raise ConfigError([_yaml_problem(source, exc)], source) from None
    try:
        config = config_from_dict(raw, env, source=source)
    except ConfigError as exc:
        raise ConfigError(duplicates + exc.problems, source) from None
    if duplicates:
        raise ConfigError(duplicates, source)
    return config
