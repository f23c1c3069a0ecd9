"""Tests for the worker presets in config/: each one loads, honours the environment
variables the Docker image and the systemd unit set, and passes `sidecar check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import load_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "config").glob("*.yaml"))
WORKER_PRESETS = ["vllm.yaml", "sglang.yaml", "ollama.yaml", "tgi.yaml"]


def test_worker_presets_exist() -> None:
    names = {p.name for p in PRESETS}
    for name in WORKER_PRESETS:
        assert name in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_with_defaults(path: Path) -> None:
    config = load_config(path, env={})
    dialects = {r.dialect for r in config.routes}
    assert "openai-chat" in dialects
    assert config.routes[-1].dialect == "passthrough"  # the worker's other endpoints
    assert config.admin_listen is not None  # /healthz for the Docker HEALTHCHECK


@pytest.mark.parametrize("name", WORKER_PRESETS)
def test_preset_follows_container_environment(name: str) -> None:
    env = {
        "SIDECAR_LISTEN": "0.0.0.0:18080",
        "SIDECAR_ADMIN_LISTEN": "0.0.0.0:19090",
        "SIDECAR_UPSTREAM": "http://worker.internal:1234",
        "SIDECAR_USAGE_LOG": "/tmp/ledger.jsonl",
    }
    config = load_config(REPO / "config" / name, env=env)
    assert config.listen.port == 18080 and config.listen.host == "0.0.0.0"
    assert config.admin_listen is not None and config.admin_listen.port == 19090
    assert config.upstream.url == "http://worker.internal:1234"
    assert config.usage_log == "/tmp/ledger.jsonl"
    # below the worker's keep-alive (uvicorn's 5 s for vLLM/SGLang)
    assert config.upstream.pool_idle_timeout < 5


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_sidecar_check_accepts_preset(path: Path) -> None:
    try:
        import sidecar.cli  # noqa: F401
    except ImportError:
        pytest.skip("sidecar.cli not written yet")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
