"""The README stays true to the code: its commands parse, its settings table is the Settings model."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.settings import setting_names

README = (Path(__file__).parent.parent / "README.md").read_text()


def code_blocks(languages: tuple[str, ...] = ("sh", "bash", "")) -> list[str]:
    """Fenced code blocks in one of `languages`, parsed line by line."""
    blocks, current, lang = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
                current = []
            else:
                if lang in languages:
                    blocks.append("\n".join(current))
                lang = None
        elif lang is not None:
            current.append(line)
    return blocks


def cli_lines() -> list[str]:
    lines = []
    for block in code_blocks():
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in re.split(r"&&", line):
                part = part.strip()
                if part.startswith(("config-agent ", ".venv/bin/config-agent ")):
                    lines.append(part)
    return lines


def test_readme_shows_cli_commands() -> None:
    assert len(cli_lines()) >= 12


@pytest.mark.parametrize("line", cli_lines())
def test_every_readme_command_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    build_parser().parse_args(argv)


def test_settings_table_matches_the_settings_model() -> None:
    documented = set()
    for row in re.findall(r"^\| `(CONFIG_AGENT_[A-Z_]+)`(?: / `(CONFIG_AGENT_[A-Z_]+)`)? \|", README, flags=re.M):
        documented.update(name for name in row if name)
    declared = {f"CONFIG_AGENT_{name.upper()}" for name in setting_names()}
    assert documented == declared


def test_every_command_is_documented() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert re.search(rf"^\|.*`{name}[ `]", README, flags=re.M), name


def test_quick_start_has_exactly_the_two_tested_commands() -> None:
    quick = README.split("## Quick start")[1].split("##")[0]
    block = re.search(r"```sh\n(.*?)```", quick, flags=re.S)
    assert block is not None
    commands = [ln for ln in block.group(1).splitlines() if ln and not ln.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/config-agent demo",
        "./scripts/test",
    ]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "\n./scripts/test\n" in ci
