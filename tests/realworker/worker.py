"""Helpers to run a real llama.cpp llama-server, and the sidecar daemon in front of it, in tests.

Finds the llama-server binary that build.sh left in the cache (it never builds: that takes
minutes and is CI's job, `bash tests/realworker/build.sh`), writes the tiny random model
(make_model.py) into the same cache, starts both processes on free loopback ports and stops them.

Only loopback addresses are used; every process started here is stopped by the same object that
started it (by its pid, never by name).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SH = HERE / "build.sh"
PRESET = REPO / "config" / "llama-cpp.yaml"
ALIAS = "tiny-llama"


def pinned_version() -> str:
    """The llama-cpp-python version build.sh pins (build.sh is the one place it is written)."""
    match = re.search(r"^VERSION=(\S+)$", BUILD_SH.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VERSION= line in {BUILD_SH}")
    return match.group(1)


def cache_dir() -> Path:
    """The build cache of the pinned version (same rule as build.sh)."""
    root = os.environ.get("SIDECAR_TEST_CACHE") or str(Path.home() / ".cache" / "sidecar-tests")
    return Path(root) / f"llama-server-{pinned_version()}"


def binary_path() -> Path:
    """Where build.sh puts llama-server (it may not be there yet)."""
    return cache_dir() / "bin" / "llama-server"


def tree_path() -> Path:
    """The unpacked llama.cpp tree (gguf-py, vocab files, chat templates)."""
    return cache_dir() / "src" / f"llama_cpp_python-{pinned_version()}" / "vendor" / "llama.cpp"


def missing_reason() -> str | None:
    """Why the real worker cannot run here, or None when it can."""
    if not os.access(binary_path(), os.X_OK):
        return f"llama-server not built (run: bash {BUILD_SH.relative_to(REPO)}); looked for {binary_path()}"
    if not (tree_path() / "gguf-py").is_dir():
        return f"llama.cpp tree missing at {tree_path()} (run build.sh)"
    try:
        import numpy  # noqa: F401
    except ImportError:
        return "numpy is not installed (needed to write the tiny model)"
    return None


def ensure_model(*, layers: int = 2, width: int = 64, seed: int = 42) -> Path:
    """The cached tiny model of this shape and seed, written on first use."""
    sys.path.insert(0, str(HERE))
    try:
        import make_model
    finally:
        sys.path.remove(str(HERE))
    return make_model.ensure_model(
        tree_path(), cache_dir() / "models", layers=layers, width=width, seed=seed
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port (or the process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class LlamaServer:
    """One llama-server process on a free loopback port, logging to a file."""

    def __init__(
        self,
        model: Path,
        log_path: Path,
        *,
        slots: int = 2,
        ctx: int = 1024,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self.log_path = log_path
        self.slots = slots
        self.ctx = ctx
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL, http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LlamaServer:
        """Start the server and wait until GET /health answers 200 (the model is loaded)."""
        self.port = free_port()
        # -c is the total context, split over -np slots; -v logs every request and each cancel.
        args = [
            str(binary_path()),
            "-m",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(self.ctx * self.slots),
            "-np",
            str(self.slots),
            "--seed",
            "42",
            "--alias",
            ALIAS,
            "-t",
            "1",
            "--no-warmup",
            "--no-webui",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"llama-server not healthy within {timeout}s:\n{self.log_text()[-3000:]}"
        )

    def log_text(self) -> str:
        """Everything the server logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """The current length of the log, to read only what comes after it."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        """What the server logged after `offset` (from log_offset())."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server (a worker dying mid-stream)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop the server and close its log."""
        if self.proc is not None:
            _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


class Sidecar:
    """The sidecar daemon (`python -m sidecar run -c CONFIG`) as a subprocess."""

    def __init__(self, config: Path, env: dict[str, str], log_path: Path) -> None:
        self.config = config
        self.env = env
        self.log_path = log_path
        self.port = 0
        self.admin_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The client-facing base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Sidecar:
        """Start the daemon on free ports and wait until it accepts connections."""
        self.port = free_port()
        self.admin_port = free_port()
        env = dict(os.environ)
        env.update(self.env)
        env["SIDECAR_LISTEN"] = f"127.0.0.1:{self.port}"
        env["SIDECAR_ADMIN_LISTEN"] = f"127.0.0.1:{self.admin_port}"
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_port(self.port, self.proc, timeout, "sidecar")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.log_text()[-3000:]}") from None
        return self

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
