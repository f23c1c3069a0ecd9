"""SPEC "Command line" statements no other module pins, checked on real processes.

`sidecar --version` (console script and `python -m sidecar` alike), the `-c` default
(`$SIDECAR_CONFIG`, then `config/sidecar.yaml` in the current directory), and
`sidecar check` on a file with several problems at once, `${VAR}` unset with and
without a default among them: exit 2, every problem on its own `key.path: message` line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import __version__
from tests.harness import REPO


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        console_script: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGS` (or the installed `sidecar` script) with exactly `env` added
    to a copy of the environment from which `$SIDECAR_CONFIG` is removed."""
    full = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    if console_script:
        script = Path(sys.executable).parent / "sidecar"
        if not script.exists():
            pytest.skip("no installed sidecar console script beside this interpreter")
        command = [str(script), *args]
    else:
        command = [sys.executable, "-m", "sidecar", *args]
    return subprocess.run(command, cwd=cwd or REPO, env=full, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize("console_script", [False, True], ids=["python-m", "script"])
def test_version_is_one_line_naming_the_program_and_exits_0(console_script: bool) -> None:
    result = cli("--version", console_script=console_script)
    assert result.returncode == 0, result
    assert result.stdout == f"sidecar {__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)
    assert result.stderr == ""


def worker_config(port: int) -> str:
    return f'upstream: {{url: "http://127.0.0.1:{port}"}}\n'


@pytest.mark.parametrize(
    ("sidecar_config", "cwd_config", "expected"),
    [
        ("env.yaml", True, "env"),      # $SIDECAR_CONFIG wins over ./config/sidecar.yaml
        (None, True, "cwd"),            # unset: ./config/sidecar.yaml
        ("missing.yaml", True, None),   # named but absent: an error, never a fallback
    ],
    ids=["env-first", "then-cwd", "env-missing"],
)
def test_check_without_c_uses_sidecar_config_then_config_sidecar_yaml(
    tmp_path: Path, sidecar_config: str | None, cwd_config: bool, expected: str | None
) -> None:
    (tmp_path / "env.yaml").write_text(worker_config(27201))
    if cwd_config:
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "sidecar.yaml").write_text(worker_config(27202))
    env = {"SIDECAR_CONFIG": str(tmp_path / sidecar_config)} if sidecar_config else {}
    result = cli("check", cwd=tmp_path, env=env)
    if expected is None:
        assert result.returncode == 2, result
        assert str(tmp_path / "missing.yaml") in result.stderr
        return
    assert result.returncode == 0, result
    port = 27201 if expected == "env" else 27202
    assert result.stdout.endswith(f": ok (0 routes, worker http://127.0.0.1:{port})\n"), result


def test_check_reports_every_problem_at_once_one_per_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "upstream:\n"
        "  url: ${SIDECAR_TEST_UNSET_URL}\n"
        "  idle_timeout: ${SIDECAR_TEST_UNSET_IDLE:-5s}\n"   # unset with a default: fine
        "  connect_timeout: 1.5s\n"                          # fractions are fine
        "  colour: blue\n"
        "limits: {max_request_body: 10MB, body_timeout: 1h, header_timeout: 0}\n"
        "bogus: 1\n"
        "routes:\n"
        "  - name: ok\n"
        "    match: {path: /v1/chat/completions, methods: [POST]}\n"
        "    dialect: openai-chat\n"
        "    heartbeat: 250ms\n"
        "  - name: dup\n"
        "    match: {path_prefix: /v1/, nope: 1}\n"
        "    dialect: passthrough\n"
        "  - name: bad\n"
        "    match: {path: v1/x}\n"
        "    dialect: passthrough\n"
        "    upstream: {url: 'http://127.0.0.1:1', zzz: 2}\n"
    )
    result = cli("check", "-c", str(path), env={"SIDECAR_TEST_UNSET_URL": "",
                                                 "SIDECAR_TEST_UNSET_IDLE": ""})  # empty: the default
    assert result.returncode == 2, result
    lines = result.stdout.splitlines()
    assert sorted(lines) == sorted([
        'upstream.url: expected http://host:port or unix:/path, got ""',  # set but empty
        "upstream.colour: unknown key",
        "limits.header_timeout: must be greater than 0, got 0",
        "bogus: unknown key",
        "routes[1].match.nope: unknown key",
        'routes[2].match.path: must start with "/"',
        "routes[2].upstream.zzz: unknown key",
    ]), result.stdout
    assert result.stderr == result.stdout


def test_check_names_an_unset_variable_without_a_default(tmp_path: Path) -> None:
    path = tmp_path / "unset.yaml"
    path.write_text("upstream: {url: '${SIDECAR_TEST_NEVER_SET}', idle_timeout: '${X_NEVER:-2m}'}\n")
    result = cli("check", "-c", str(path))
    assert result.returncode == 2, result
    assert result.stdout == "upstream.url: environment variable SIDECAR_TEST_NEVER_SET is not set\n"


@pytest.mark.parametrize("args", [(), ("launch",), ("check", "--bogus")],
                         ids=["no-command", "unknown-command", "unknown-option"])
def test_a_command_line_it_cannot_run_prints_the_usage_and_exits_2(args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result
    assert result.stderr.startswith("usage: sidecar"), result.stderr
    assert result.stdout == ""
