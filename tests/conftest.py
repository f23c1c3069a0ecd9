"""Shared pytest fixtures: fake workers and real daemons (see tests/harness.py).

- `worker`: a started `FakeWorker` for one test; its script errors fail the test.
- `make_daemon(config=None, *, worker=None, **overrides)`: start a real daemon
  for one test (config from `harness.daemon_config(worker.url, **overrides)`
  unless a whole `config` dict is given); stopped at teardown, and a daemon
  that logged an error or a traceback fails the test.
- `module_worker` / `make_module_daemon`: the same, shared by a whole module
  (a daemon start costs ~0.5 s).
- `w`: `module_worker`, reset for one test (queued handlers, default and
  records cleared); its script errors fail the test.

A daemon's stderr is printed at teardown, so a failing test shows its log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sidecar
from tests.harness import REPO, Daemon, FakeWorker, daemon_config, serving

if sidecar.COMPILED and any(REPO.glob("*__mypyc*.so")):
    # An in-place build (tests/run.sh) leaves mypyc's shared library at the top of the checkout,
    # outside the package an editable install maps: a sidecar the tests start from another
    # directory finds it through PYTHONPATH.
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite runs on the build tests/run.sh made (SIDECAR_TEST_BUILD), and never on
    compiled modules older than their source: an in-place .so shadows its .py, so an edit
    made after `setup.py build_ext --inplace` would otherwise go untested."""
    wanted = os.environ.get("SIDECAR_TEST_BUILD")
    if wanted is not None and (wanted == "compiled") != sidecar.COMPILED:
        pytest.exit(f"SIDECAR_TEST_BUILD={wanted} but sidecar.COMPILED is {sidecar.COMPILED}", 2)
    # (the modules' code is in the one shared library; their own .so files are stubs that a
    # rebuild leaves alone when they do not change)
    built = [*(REPO / "sidecar").rglob("*.so"), *REPO.glob("*__mypyc*.so")]
    newest_build = max((path.stat().st_mtime for path in built), default=None)
    stale = [
        str(source.relative_to(REPO))
        for stub in (REPO / "sidecar").rglob("*.so")
        if (source := stub.with_name(stub.name.split(".", 1)[0] + ".py")).exists()
        and newest_build is not None
        and source.stat().st_mtime > newest_build
    ]
    if stale:
        pytest.exit(
            "compiled modules older than their source: " + ", ".join(sorted(stale))
            + " (rebuild: SIDECAR_MYPYC=1 .venv/bin/python setup.py build_ext --inplace;"
            " or delete sidecar/**/*.so to test the pure package)",
            2,
        )


class DaemonFactory:
    """Starts daemons into one directory and stops them all at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.daemons: list[Daemon] = []

    def __call__(
        self,
        config: dict[str, Any] | None = None,
        *,
        worker: FakeWorker | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        **overrides: Any,
    ) -> Daemon:
        """A daemon on `config` (or `daemon_config(worker.url, **overrides)`), started unless
        `start` is False (then the caller starts it; it is stopped at the end either way)."""
        if config is None:
            if worker is None:
                raise TypeError("make_daemon needs a config or a worker")
            config = daemon_config(worker.url, **overrides)
        elif overrides:
            raise TypeError("give either a whole config or overrides, not both")
        name = f"sidecar{len(self.daemons)}"
        daemon = Daemon(config, self.directory, env=env, name=name)
        self.daemons.append(daemon)
        return daemon.start() if start else daemon

    def close(self) -> list[str]:
        """Stop every daemon; return the error lines they logged (and print their logs)."""
        errors: list[str] = []
        for daemon in self.daemons:
            code = daemon.stop()
            print(f"--- {daemon.config_path.name} (exit {code}) ---")
            print("\n".join(daemon.lines))
            errors += daemon.errors()
        return errors


@pytest.fixture
def worker() -> Iterator[FakeWorker]:
    w = FakeWorker().start()
    try:
        yield w
    finally:
        w.stop()
    assert not w.errors, f"fake worker errors: {w.errors}"


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    factory = DaemonFactory(tmp_path)
    yield factory
    errors = factory.close()
    assert not errors, "the daemon logged errors:\n" + "\n".join(errors)


@pytest.fixture(scope="module")
def module_worker() -> Iterator[FakeWorker]:
    w = FakeWorker().start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def make_module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    factory = DaemonFactory(tmp_path_factory.mktemp("daemon"))
    yield factory
    errors = factory.close()
    assert not errors, "the daemon logged errors:\n" + "\n".join(errors)


@pytest.fixture
def w(module_worker: FakeWorker) -> Iterator[FakeWorker]:
    yield from serving(module_worker)
