"""The daemon never loads OpenSSL (sidecar.no_tls): a stand-in takes the place of `ssl`.

The real `sidecar run` process serves streams with no libssl or libcrypto mapped;
the stand-in refuses TLS with an error that says why; and where it cannot stay
(the real `ssl` or asyncio already loaded, or a uvloop that reads more of `ssl`
than it has), the real module is used and everything works as before. The last
two run in fresh interpreters, since this one has loaded `ssl` already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

from sidecar import no_tls
from tests.harness import REPO, Daemon, FakeWorker, chat_body, openai_handler, post


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter with the repo importable."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def test_the_daemon_serves_without_openssl(
    worker: FakeWorker, make_daemon: Callable[..., Daemon]
) -> None:
    worker.default = openai_handler("vllm")
    daemon = make_daemon(worker=worker)
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "/" in line}
    assert libraries, "no mapped files read"
    assert not [lib for lib in libraries if "libssl" in lib or "libcrypto" in lib or "_ssl." in lib]
    response = post(daemon, chat_body(stream=True))
    assert response.status == 200
    assert response.sse_json()[-1] == "[DONE]"


def test_the_stand_in_refuses_tls_and_says_why() -> None:
    result = python(
        """
        import sys
        from sidecar import no_tls
        assert no_tls.install()
        import asyncio, ssl
        assert ssl is sys.modules["ssl"] and ssl.__doc__.startswith("sidecar's stand-in")
        assert issubclass(ssl.SSLWantReadError, ssl.SSLError) and issubclass(ssl.SSLError, OSError)
        for use in (ssl.create_default_context, ssl.SSLContext):
            try:
                use()
            except NotImplementedError as exc:
                assert str(exc) == no_tls.REFUSAL, exc
            else:
                raise AssertionError(use)

        async def main():
            try:
                await asyncio.open_connection("127.0.0.1", 9, ssl=True)
            except NotImplementedError as exc:
                return str(exc)

        import uvloop
        print(uvloop.run(main()))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == no_tls.REFUSAL


def test_not_installed_where_ssl_is_loaded_already() -> None:
    import ssl  # this interpreter has the real one (the test clients need it)

    assert no_tls.install() is False
    assert sys.modules["ssl"] is ssl and hasattr(ssl, "OPENSSL_VERSION")


def test_the_real_ssl_when_uvloop_needs_more_than_the_stand_in_has() -> None:
    """A uvloop release that reads a name the stand-in lacks: install() says False, takes the
    stand-in and what was imported beside it back, and uvloop runs on the real `ssl`."""
    result = python(
        """
        import sys
        from sidecar import no_tls
        make = no_tls.stand_in
        def lacking():
            module = make()
            del module.MemoryBIO  # uvloop reads it when it is imported
            return module
        no_tls.stand_in = lacking
        assert no_tls.install() is False
        assert not [n for n in sys.modules if n.partition(".")[0] in ("ssl", "asyncio", "uvloop")]
        import asyncio, ssl, uvloop
        assert hasattr(ssl, "OPENSSL_VERSION")
        async def main():
            await asyncio.sleep(0)
            return "ran"
        print(uvloop.run(main()))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran"
