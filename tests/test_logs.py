"""Logs: JSON lines on request, and never a config value in any log line."""

from __future__ import annotations

import json
import logging

import pytest

from agent.db.writer import ConfigWriter
from agent.logs import JsonFormatter
from tests.agent_harness import agent_state, eventually, running_agent

pytestmark = pytest.mark.anyio
SECRET = "https://hooks.example/very-secret-token-93f1"


async def test_no_value_in_any_log_line(db_url: str, redis_url: str, org: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    writer = await ConfigWriter.open(db_url, redis_url=redis_url)
    await writer.set(org, "webhook", "url", "https://old", actor="t")
    async with running_agent(org_id=org, database_url=db_url, redis_url=redis_url,
                             reconcile_interval=0.2) as agent:
        await writer.set(org, "webhook", "url", SECRET, actor="t")
        await eventually(lambda: agent_state(agent)[("webhook", "url")][0] == SECRET, 2)
        await writer.delete(org, "webhook", "url", actor="t")
        await eventually(lambda: ("webhook", "url") not in agent_state(agent), 2)
    await writer.close()
    assert caplog.records, "the agent logs something"
    formatter = JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        json.loads(line)
        assert "very-secret" not in line and "https://old" not in line
