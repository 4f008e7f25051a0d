"""docs/spec.md, the product's contract, stays true to the code: settings, metrics, commands.

Fast and offline: it reads the document and the code's own definitions (the Settings
model, the metric registries, the argument parser); no server is started.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.cli import build_parser
from agent.metrics import Metrics
from agent.relay import RelayState
from agent.settings import setting_names

ROOT = Path(__file__).parent.parent
SPEC = (ROOT / "docs" / "spec.md").read_text()
README = (ROOT / "README.md").read_text()


def section(title_start: str) -> str:
    """The text of the `## ` section whose title starts with `title_start`."""
    match = re.search(rf"^## {re.escape(title_start)}.*?$(.*?)(?=^## |\Z)", SPEC, flags=re.M | re.S)
    assert match is not None, f"docs/spec.md has no section '## {title_start}…'"
    return match.group(1)


def settings_table_names() -> set[str]:
    """Every CONFIG_AGENT_ name in the rows of the settings table (section 6)."""
    rows = [line for line in section("6. Settings").splitlines() if line.startswith("| `CONFIG_AGENT_")]
    assert rows, "section 6 has no settings table"
    return {name for row in rows for name in re.findall(r"CONFIG_AGENT_[A-Z0-9_]*[A-Z0-9]", row)}


def registered_names(registry: CollectorRegistry) -> set[str]:
    """Metric names as Prometheus exposes them (counters with `_total`)."""
    names = set()
    for family in registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_settings_table_lists_exactly_the_settings_model() -> None:
    declared = {f"CONFIG_AGENT_{name.upper()}" for name in setting_names()}
    documented = settings_table_names()
    assert declared - documented == set(), "settings missing from docs/spec.md §6"
    assert documented - declared == set(), "unknown settings in docs/spec.md §6"


def test_every_setting_has_its_own_row() -> None:
    table = section("6. Settings")
    for name in setting_names():
        variable = f"CONFIG_AGENT_{name.upper()}"
        assert re.search(rf"^\| `{variable}`(?: / `CONFIG_AGENT_[A-Z_]+`)? \|", table, flags=re.M), variable


def test_every_agent_metric_is_documented() -> None:
    names = registered_names(Metrics("x").registry)
    assert "config_agent_updates_total" in names  # counters are exposed with _total
    missing = sorted(name for name in names if f"`{name}`" not in SPEC)
    assert missing == []


def test_every_relay_metric_is_documented() -> None:
    names = registered_names(RelayState().registry)
    assert names
    missing = sorted(name for name in names if f"`{name}`" not in SPEC)
    assert missing == []


def test_no_unknown_metric_is_documented() -> None:
    known = registered_names(Metrics("x").registry) | registered_names(RelayState().registry)
    metrics = section("5. Metrics")
    documented = set(re.findall(r"`(config_(?:agent_|relay_)?[a-z_]+)`", metrics))
    # Label values and the like are not metric names; only names of known families count.
    prefixes = ("config_version", "config_agent_", "config_relay_")
    assert {n for n in documented if n.startswith(prefixes)} - known == set()


def test_every_command_is_documented() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = section("7. Command line")
    for name in sub.choices:  # type: ignore[union-attr]
        assert re.search(rf"^\| `{re.escape(name)}[ `]", commands, flags=re.M), name


def test_exit_codes_are_documented() -> None:
    commands = section("7. Command line")
    for code in (0, 1, 2, 3, 4, 130):
        assert re.search(rf"^\| {code} \|", commands, flags=re.M), code


def test_channel_forms_match_the_model() -> None:
    from agent.model import channel_for, heartbeat_channel, sharded_channel

    for channel in (channel_for("acme", "ai", "threshold"), heartbeat_channel("acme"),
                    sharded_channel("acme")):
        assert f"`{channel}`" in SPEC, channel


def test_readme_links_the_spec_and_not_the_shared_file() -> None:
    assert "docs/spec.md" in README
    assert "../shared/SPEC.md" not in README
