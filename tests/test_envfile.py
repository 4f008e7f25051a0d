"""configs.env against a real agent, sourced by real shells: nothing runs, every value arrives intact.

Entries are written through PostgreSQL; the agent writes the file set; bash, dash and
`env -i sh` source it. A config writer must never gain code execution in the app.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent.db.writer import ConfigWriter
from agent.errors import UsageError
from agent.settings import load_settings
from tests.agent_harness import eventually, metric, running_agent

pytestmark = pytest.mark.anyio

SHELLS = ("bash", "dash", "sh")
BIG = 262_000  # a string whose JSON form is just under the 256 KiB value limit


def values(marker: Path) -> dict[tuple[str, str], Any]:
    """Hostile values under harmless names: each must arrive byte for byte."""
    return {
        ("app", "quote"): "it's a 'test' \"too\"",
        ("app", "subst"): f"$(touch {marker}) `touch {marker}` ${{HOME}} $HOME $((1+1))",
        ("app", "newlines"): "line1\nline2\r\n\n",
        ("app", "backslash"): "a\\b\\'c\\n\\",
        ("app", "unicode"): "héllo — ✓ \u2028 😀",
        ("app", "semicolon"): f"x'; touch {marker}; echo '",
        ("app", "empty"): "",
        ("app", "number"): 0.9,
        ("app", "int"): 3,
        ("app", "bool"): False,
        ("app", "null"): None,
        ("app", "object"): {"a": [1, "it's", "$(x)"], "b": {"c": None}},
        ("app", "near_limit"): "y" * (128 * 1024 - len("APP_NEAR_LIMIT=") - 1),
        # Left out of configs.env, kept elsewhere.
        ("app", "huge"): "x" * BIG,
        ("app", "over_limit"): "z" * (128 * 1024 - len("APP_OVER_LIMIT=")),
        ("a-b", "c"): "collides with a/b-c and a_b/c",
        ("a", "b-c"): "collides with a-b/c and a_b/c",
        ("a_b", "c"): "collides with a-b/c and a/b-c",
        ("3d", "mode"): "not an identifier",
    }


def dangerous(script: Path) -> dict[tuple[str, str], str]:
    """Entries whose plain names would take over programs the app starts."""
    return {
        ("bash", "env"): str(script),
        ("ld", "preload"): "/nonexistent/evil.so",
        ("ld", "library_path"): "/tmp/evil",
        ("node", "options"): "--require /tmp/evil.js",
        ("python", "startup"): "/tmp/evil.py",
        ("java", "tool_options"): "-javaagent:/tmp/evil.jar",
        ("prompt", "command"): f"sh {script}",
        ("git", "ssh_command"): f"sh {script}",
        ("https", "proxy"): "http://evil.example:3128",
        ("ssl", "cert_file"): "/tmp/evil.pem",
        ("bash", "func_ls"): "() { sh /tmp/evil; }",
    }


def expected_env(doc: dict[str, Any], prefix: str, *, omit: set[str]) -> dict[str, str]:
    """What sourcing must yield: strings raw, other values as their compact JSON text."""
    env = {}
    for service, keys in doc["configs"].items():
        for key, entry in keys.items():
            name = prefix + f"{service}_{key}".upper().replace(".", "_").replace("-", "_")
            value = entry["value"]
            env[name] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return {name: value for name, value in env.items() if name not in omit}


async def source(shell: str, root: Path) -> dict[str, str]:
    """Variables after `set -a; . ./configs.env` in `shell` with an empty environment."""
    script = "set -a; . ./configs.env; set +a; exec /usr/bin/env -0"
    with anyio.fail_after(30):
        result = await anyio.run_process(["env", "-i", shell, "-c", script], cwd=root, check=False)
    assert result.returncode == 0, (shell, result.stderr.decode(errors="replace")[-500:])
    assert result.stderr == b"", (shell, result.stderr[-500:])
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    return {name: value for name, value in pairs if name not in ("PWD", "SHLVL", "_", "OLDPWD")}


async def write_all(writer: ConfigWriter, org: str, entries: dict[tuple[str, str], Any]) -> None:
    for (service, key), value in entries.items():
        await writer.set(org, service, key, value, actor="t")


DENIED = {"BASH_ENV", "LD_PRELOAD", "LD_LIBRARY_PATH", "NODE_OPTIONS", "PYTHON_STARTUP",
          "JAVA_TOOL_OPTIONS", "PROMPT_COMMAND", "GIT_SSH_COMMAND", "HTTPS_PROXY", "SSL_CERT_FILE",
          "BASH_FUNC_LS"}


async def test_dangerous_names_are_left_out_and_run_nothing(
        db_url: str, redis_url: str, org: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker, script = tmp_path / "pwned", tmp_path / "evil.sh"
    script.write_text(f"/usr/bin/touch {marker}\n")
    entries: dict[tuple[str, str], Any] = dict(dangerous(script)) | {("app", "x"): "kept"}
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await write_all(writer, org, entries)
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="agent.files")
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out) as agent:
        for shell in SHELLS:
            # What an app's entrypoint does: source, then start programs (bash reads BASH_ENV).
            ran = await anyio.run_process(["env", "-i", shell, "-c", "set -a; . ./configs.env; set +a; "
                                           "bash -c true; sh -c true; /usr/bin/env"], cwd=out, check=False)
            assert not marker.exists(), f"{shell}: a program started after sourcing ran {script}"
            assert (ran.returncode, ran.stderr) == (0, b""), (shell, ran.stderr)
            assert await source(shell, out) == {"APP_X": "kept"}, shell
        text = (out / "configs.env").read_text()
        assert "# omitted bash/env: BASH_ENV is on the deny list" in text
        assert metric(agent, "config_agent_files_skipped", {"reason": "env_denied"}) == len(DENIED)
        assert agent.status.document(agent.store.snapshot)["files"]["skipped"] == {"env_denied": len(DENIED)}
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert f"file set leaves out {len(DENIED)} (env_denied): bash/env: BASH_ENV is on the deny list" in logged
        assert "evil" not in logged  # names only, never a value


async def test_any_value_arrives_exactly_as_configs_json_holds_it(
        db_url: str, redis_url: str, org: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "pwned"
    entries = values(marker)
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await write_all(writer, org, entries)
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="agent.files")
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out) as agent:
        doc = json.loads((out / "configs.json").read_bytes())
        assert sum(len(keys) for keys in doc["configs"].values()) == len(entries)
        # (A NUL byte cannot reach us: PostgreSQL's jsonb refuses \u0000; see test_files.)
        left_out = {"APP_HUGE", "APP_OVER_LIMIT", "A_B_C", "3D_MODE"}
        expected = expected_env(doc, "", omit=left_out)
        for shell in SHELLS:
            got = await source(shell, out)
            assert set(got) == set(expected), (shell, set(got) ^ set(expected))
            for name, value in expected.items():
                assert got[name] == value, (shell, name)
        # The brief form: plain `.` in an empty environment, nothing printed, nothing run.
        plain = await anyio.run_process(["env", "-i", "sh", "-c", ". ./configs.env"], cwd=out,
                                        check=False)
        assert (plain.returncode, plain.stdout, plain.stderr) == (0, b"", b"")
        assert not marker.exists(), "sourcing configs.env ran a command"
        # The left-out values stay in the per-key files, and each omission is said so.
        assert (out / "app/huge").read_bytes() == b"x" * BIG
        text = (out / "configs.env").read_text()
        assert "# omitted A_B_C: used by a/b-c, a-b/c, a_b/c" in text
        assert "# omitted app/huge: APP_HUGE=value is" in text
        assert text.count("\n# omitted ") == len(left_out)
        for reason, count in {"env_collision": 3, "env_too_large": 2, "env_not_identifier": 1}.items():
            assert metric(agent, "config_agent_files_skipped", {"reason": reason}) == count, reason
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "(env_collision): A_B_C: used by a/b-c, a-b/c, a_b/c\n" in logged + "\n"
        assert "xxxx" not in logged  # names only, never a value


async def test_prefix_keeps_every_name_and_applies_the_deny_list_to_the_result(
        db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    script = tmp_path / "evil.sh"
    entries: dict[tuple[str, str], Any] = dict(dangerous(script)) | {("app", "x"): 1, ("3d", "mode"): "ok"}
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await write_all(writer, org, entries)
    out = tmp_path / "out"
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out,
                             env_prefix="CFG_") as agent:
        doc = json.loads((out / "configs.json").read_bytes())
        expected = expected_env(doc, "CFG_", omit=set())
        assert len(expected) == len(entries)
        for shell in SHELLS:
            assert await source(shell, out) == expected, shell
        assert metric(agent, "config_agent_files_skipped", {"reason": "env_denied"}) == 0
    # A prefix that itself is denied leaves everything out, and says so.
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out,
                             env_prefix="LD_") as agent:
        await eventually(lambda: b"LD_APP_X" in (out / "configs.env").read_bytes(), 5, "rewritten")
        assert await source("sh", out) == {}
        assert metric(agent, "config_agent_files_skipped", {"reason": "env_denied"}) == len(entries)


def test_prefix_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIG_AGENT_ENV_PREFIX", "APP_")
    assert load_settings().env_prefix == "APP_"
    for bad in ("app_", "1X", "A-B", "A B", "A=B"):
        monkeypatch.setenv("CONFIG_AGENT_ENV_PREFIX", bad)
        with pytest.raises(UsageError, match="CONFIG_AGENT_ENV_PREFIX"):
            load_settings()


async def test_many_big_values_never_make_exec_fail(
        db_url: str, redis_url: str, org: str, tmp_path: Path) -> None:
    # 24 values of 100 KB: each fits in one variable, together they exceed ARG_MAX (2 MiB).
    entries = {("big", f"v{n:02d}"): chr(ord("a") + n) * 100_000 for n in range(24)}
    async with await ConfigWriter.open(db_url, redis_url=redis_url) as writer:
        await write_all(writer, org, entries)
    out = tmp_path / "out"
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url, output_dir=out) as agent:
        got = await source("bash", out)  # `env` is an exec: E2BIG would fail it
        assert 5 <= len(got) < len(entries)
        # Deterministic: the first names in sorted order are kept.
        assert sorted(got) == [f"BIG_V{n:02d}" for n in range(len(got))]
        assert all(got[f"BIG_V{n:02d}"] == entries[("big", f"v{n:02d}")] for n in range(len(got)))
        assert metric(agent, "config_agent_files_skipped", {"reason": "env_budget"}) == len(entries) - len(got)
