"""`configs.env`: every entry as a shell variable, safe to `set -a; . configs.env`.

    AI_THRESHOLD='0.9'
    WEBHOOK_URL='https://example.com/hook?a=1&b=2'

Names are `{SERVICE}_{KEY}` upper-cased with `.` and `-` mapped to `_`. Every
value is single-quoted (a `'` inside becomes `'\\''`), so no content can run a
command or expand anything. Strings are written raw, other JSON values as JSON
text. Entries that cannot be represented are left out, deterministically, and
listed in a comment: a name that is not a shell identifier (starts with a
digit), a name two entries map to (neither is written: an app must not read
another entry's value by accident), and a value containing a NUL byte (a shell
variable cannot hold one).
"""

from __future__ import annotations

import re
from collections import defaultdict

from agent.sinks.render import raw_value
from agent.store import Snapshot

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_name(service: str, key: str) -> str:
    """The variable name of an entry (may not be a valid identifier; see render_env)."""
    return f"{service}_{key}".upper().replace(".", "_").replace("-", "_")


def shell_quote(text: str) -> str:
    """Single-quote `text` for POSIX sh: nothing inside is special except `'` itself."""
    return "'" + text.replace("'", "'\\''") + "'"


def render_env(snapshot: Snapshot) -> bytes:
    """The `configs.env` content of a snapshot."""
    by_name: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for service, key in snapshot.entries:
        by_name[env_name(service, key)].append((service, key))
    lines = [f"# config-agent: org {snapshot.org_id}, revision {snapshot.revision}"]
    omitted: list[str] = []
    for name in sorted(by_name):
        owners = sorted(by_name[name])
        if len(owners) > 1:
            listed = ", ".join(f"{s}/{k}" for s, k in owners)
            omitted.append(f"# omitted {name}: used by {listed}")
            continue
        service, key = owners[0]
        if not _IDENTIFIER.match(name):
            omitted.append(f"# omitted {service}/{key}: {name} is not a shell variable name")
            continue
        text = raw_value(snapshot.entries[(service, key)].value).decode()
        if "\0" in text:
            omitted.append(f"# omitted {service}/{key}: the value contains a NUL byte")
            continue
        lines.append(f"{name}={shell_quote(text)}")
    return ("\n".join(lines + omitted) + "\n").encode()
