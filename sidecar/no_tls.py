"""The daemon runs without OpenSSL: a stand-in for the `ssl` module.

sidecar speaks plain HTTP/1.1 on both sides (an https:// upstream is refused
when the config is read), yet asyncio and uvloop import `ssl` when they are
imported, and with it libssl and libcrypto: about 4 MiB of resident memory, a
seventh of what the daemon holds when idle. `sidecar run` and `sidecar demo`
call `install()` before anything imports asyncio: `ssl` is then a stand-in that
has the names those imports read and refuses any use of TLS with an error that
says why. Where the real `ssl` or asyncio is already loaded (sidecar started
inside a process that uses them), or where asyncio or uvloop will not import
beside the stand-in (a release that reads more of `ssl` at import time), the
real module is used, as without this.
"""

from __future__ import annotations

import sys
import types
from typing import Any, NoReturn

#: what the stand-in says when something tries to use TLS through it
REFUSAL = "TLS is not available in the sidecar daemon: it speaks plain HTTP on both sides"

_IMPORTED_WITH_IT = ("ssl", "asyncio", "uvloop")


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise NotImplementedError(REFUSAL)


def stand_in() -> types.ModuleType:
    """A module with what asyncio and uvloop read of `ssl` when they are imported."""
    module = types.ModuleType("ssl", "sidecar's stand-in for ssl: " + REFUSAL)

    class SSLError(OSError):
        pass

    class SSLContext:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _refuse()

    errors: dict[str, type[BaseException]] = {"SSLError": SSLError}
    for name in (
        "SSLWantReadError",
        "SSLWantWriteError",
        "SSLSyscallError",
        "SSLZeroReturnError",
        "SSLEOFError",
        "SSLCertVerificationError",
    ):
        errors[name] = type(name, (SSLError,), {})
    names: dict[str, Any] = {
        **errors,
        "CertificateError": errors["SSLCertVerificationError"],
        "SSLContext": SSLContext,
        "SSLObject": SSLContext,
        "MemoryBIO": SSLContext,
        "create_default_context": _refuse,
        "SSL_ERROR_WANT_READ": 2,
        "SSL_ERROR_WANT_WRITE": 3,
        "SSL_ERROR_SYSCALL": 5,
    }
    for name, value in names.items():
        if isinstance(value, type):
            value.__module__ = "ssl"
        setattr(module, name, value)
    return module


def install() -> bool:
    """Import asyncio and uvloop with the stand-in as `ssl`. True if it is in place; False
    if the real `ssl` is (it or asyncio was loaded already, or they need more of it)."""
    if any(name in sys.modules for name in _IMPORTED_WITH_IT):
        return False
    sys.modules["ssl"] = stand_in()
    try:
        import asyncio  # noqa: F401

        import uvloop  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n.partition(".")[0] in _IMPORTED_WITH_IT]:
            del sys.modules[name]
        return False
    return True
