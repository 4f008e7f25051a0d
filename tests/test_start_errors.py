"""Start-up failures of the real CLI: one line on stderr naming the setting, exit 1 or 2.

Each case starts `python -m agent run|once|relay` as a user would and breaks one
thing: a port taken, a port or directory it may not use, a socket path that cannot
be a socket, an output or state directory that cannot be a directory, a database
that does not answer. README "Start-up errors" lists the lines.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port

pytestmark = pytest.mark.anyio

# Without CAP_NET_BIND_SERVICE and CAP_DAC_OVERRIDE root is refused like any user; a
# non-root test run is refused anyway.
AS_UNPRIVILEGED = (
    ["setpriv", "--bounding-set=-net_bind_service,-dac_override,-dac_read_search"]
    if os.geteuid() == 0 else []
)


def start(*args: str, env: dict[str, str], prefix: list[str] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `config-agent ARGS` with only `env` as its CONFIG_AGENT_* settings."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIG_AGENT_")}
    # Progress lines (info) are not errors; anything the agent says at warning or above is.
    full_env.update({"CONFIG_AGENT_LOG_LEVEL": "warning", **env})
    return subprocess.run([*(prefix or []), sys.executable, "-m", "agent", *args], env=full_env,
                          text=True, capture_output=True, timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1 or 2 and exactly one stderr line, `config-agent: error: …` with `fragments`."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("config-agent: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def agent_env(db_url: str, redis_url: str, org: str) -> dict[str, str]:
    """What a working agent needs; ports chosen by the kernel, metrics on loopback."""
    return {
        "CONFIG_AGENT_DATABASE_URL": db_url,
        "CONFIG_AGENT_REDIS_URL": redis_url,
        "CONFIG_AGENT_ORG_ID": org,
        "CONFIG_AGENT_HTTP_PORT": "0",
        "CONFIG_AGENT_METRICS_HOST": "127.0.0.1",
        "CONFIG_AGENT_METRICS_PORT": "0",
    }


def test_run_with_the_http_port_taken(agent_env: dict[str, str], taken_port: int) -> None:
    proc = start("run", env={**agent_env, "CONFIG_AGENT_HTTP_PORT": str(taken_port)})
    line = assert_one_line(proc, "CONFIG_AGENT_HTTP_PORT", "address already in use")
    assert line == (f"config-agent: error: cannot listen on 127.0.0.1:{taken_port} "
                    "(CONFIG_AGENT_HTTP_PORT): address already in use")


def test_run_with_the_metrics_port_taken(agent_env: dict[str, str], taken_port: int) -> None:
    proc = start("run", env={**agent_env, "CONFIG_AGENT_METRICS_PORT": str(taken_port)})
    assert_one_line(proc, f"127.0.0.1:{taken_port}", "CONFIG_AGENT_METRICS_PORT", "address already in use")


def test_relay_with_the_metrics_port_taken(agent_env: dict[str, str], taken_port: int) -> None:
    proc = start("relay", env={**agent_env, "CONFIG_AGENT_METRICS_PORT": str(taken_port)})
    assert_one_line(proc, f"127.0.0.1:{taken_port}", "CONFIG_AGENT_METRICS_PORT", "address already in use")


def test_run_on_a_port_it_may_not_use(agent_env: dict[str, str]) -> None:
    if AS_UNPRIVILEGED and not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is missing")
    proc = start("run", env={**agent_env, "CONFIG_AGENT_HTTP_PORT": "80"}, prefix=AS_UNPRIVILEGED)
    assert_one_line(proc, "127.0.0.1:80", "CONFIG_AGENT_HTTP_PORT", "permission denied")


def test_run_with_an_unresolvable_http_host(agent_env: dict[str, str]) -> None:
    proc = start("run", env={**agent_env, "CONFIG_AGENT_HTTP_HOST": "no-such-host.invalid",
                             "CONFIG_AGENT_HTTP_ALLOW_REMOTE": "true",
                             "CONFIG_AGENT_LOG_LEVEL": "error"})
    assert_one_line(proc, "no-such-host.invalid", "CONFIG_AGENT_HTTP_HOST")


def test_run_with_a_socket_path_in_a_missing_directory(agent_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "missing" / "api.sock"
    proc = start("run", env={**agent_env, "CONFIG_AGENT_SOCKET_PATH": str(path)})
    assert_one_line(proc, str(path), "CONFIG_AGENT_SOCKET_PATH", "does not exist")


def test_run_with_a_socket_path_in_a_directory_it_may_not_write(
    agent_env: dict[str, str], tmp_path: Path
) -> None:
    if AS_UNPRIVILEGED and not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is missing")
    directory = tmp_path / "readonly"
    directory.mkdir()
    tmp_path.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(directory, 65534, 65534)  # someone else's, mode 0755
    else:
        directory.chmod(0o555)
    path = directory / "api.sock"
    proc = start("run", env={**agent_env, "CONFIG_AGENT_SOCKET_PATH": str(path)}, prefix=AS_UNPRIVILEGED)
    assert_one_line(proc, str(path), "CONFIG_AGENT_SOCKET_PATH", "permission denied")


def test_run_with_a_socket_path_that_is_a_file(agent_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket")
    proc = start("run", env={**agent_env, "CONFIG_AGENT_SOCKET_PATH": str(path)})
    assert_one_line(proc, str(path), "CONFIG_AGENT_SOCKET_PATH", "not a socket")
    assert path.read_text() == "not a socket"


@pytest.mark.parametrize("setting", ["CONFIG_AGENT_OUTPUT_DIR", "CONFIG_AGENT_STATE_DIR"])
@pytest.mark.parametrize("command", ["run", "once"])
def test_a_directory_setting_that_cannot_be_a_directory(
    agent_env: dict[str, str], tmp_path: Path, command: str, setting: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = start(command, env={**agent_env, setting: str(blocker / "dir")})
    assert_one_line(proc, setting)


def test_once_with_an_unreachable_database_and_no_snapshot(agent_env: dict[str, str], tmp_path: Path) -> None:
    env = {**agent_env, "CONFIG_AGENT_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x",
           "CONFIG_AGENT_OUTPUT_DIR": str(tmp_path / "out"), "CONFIG_AGENT_STATE_DIR": str(tmp_path / "state")}
    proc = start("once", env=env)
    assert_one_line(proc, "CONFIG_AGENT_DATABASE_URL")
    assert proc.returncode == 1


def test_only_our_errors_become_one_line() -> None:
    from agent.cli import describe_failure
    from agent.errors import SinkError

    nested = ExceptionGroup("run", [ExceptionGroup("serve", [SinkError("cannot listen (X): y")])])
    assert describe_failure(nested, None, "run") == ("cannot listen (X): y", 1)
    # A bug next to one of ours keeps its traceback; Ctrl-C is exit 130 without a line.
    assert describe_failure(ExceptionGroup("run", [SinkError("x"), TypeError("bug")]), None, "run") is None
    assert describe_failure(BaseExceptionGroup("run", [KeyboardInterrupt()]), None, "run") == (None, 130)
