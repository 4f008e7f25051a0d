"""The shared file set (SPEC §4): layout, modes, shell-safe env file, atomic swaps.

Real files, real subprocess readers, a Store fed with Change objects.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent.sinks.changes import ChangeSummary
from agent.sinks.envfile import render_env
from agent.sinks.files import FileSink
from agent.sinks.render import configs_body
from agent.store import Store
from tests.builders import change

ORG = "acme"




def store_with(entries: dict[tuple[str, str], Any]) -> Store:
    """A loaded store holding `entries` (version 1 each)."""
    store = Store(ORG)
    changes = [change(s, k, v, 1, i + 1) for i, ((s, k), v) in enumerate(sorted(entries.items()))]
    store.apply(changes, revision=len(changes), source="warmload")
    return store


def generations(root: Path) -> list[str]:
    """Generation directories present under `root`."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith("..") and p.name != "..data")


def test_layout_modes_and_contents(tmp_path: Path) -> None:
    root = tmp_path / "out"
    store = store_with(
        {
            ("ai", "threshold"): 0.9,
            ("ai", "model"): "gpt-4",
            ("webhook", "url"): "https://example.com/h?a=1&b=2",
            ("features", "flags"): {"dark": True, "list": [1, "x"]},
        }
    )
    sink = FileSink(root, file_mode=0o640, dir_mode=0o750)
    assert sink.write(store.snapshot) is True
    assert os.readlink(root / "..data") == generations(root)[0]
    for name in ("configs.json", "configs.env", "ai", "webhook", "features"):
        assert os.readlink(root / name) == f"..data/{name}"
    assert (root / "configs.json").read_bytes() == configs_body(store.snapshot)
    assert (root / "configs.env").read_bytes() == render_env(store.snapshot)
    assert (root / "ai/threshold").read_bytes() == b"0.9"
    assert (root / "ai/model").read_bytes() == b"gpt-4"
    assert (root / "webhook/url").read_bytes() == b"https://example.com/h?a=1&b=2"
    assert json.loads((root / "features/flags").read_bytes()) == {"dark": True, "list": [1, "x"]}
    data = root / "..data"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(data / "ai").st_mode) == 0o750
    for path in ("configs.json", "configs.env", "ai/threshold", "features/flags"):
        assert stat.S_IMODE(os.stat(data / path).st_mode) == 0o640, path


def test_unchanged_content_is_not_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "out"
    store = store_with({("ai", "threshold"): 0.9})
    assert FileSink(root).write(store.snapshot) is True
    before = os.readlink(root / "..data")
    inode = os.stat(root / "configs.json").st_ino
    # A new sink (an agent restart) compares with what is on disk.
    assert FileSink(root).write(store.snapshot) is False
    # A new snapshot generation with identical content (synced, same revision) is no change either.
    store.apply([], revision=store.snapshot.revision, source="reconcile")
    sink = FileSink(root)
    assert sink.write(store.snapshot) is False
    assert sink.write(store.snapshot) is False
    assert os.readlink(root / "..data") == before
    assert os.stat(root / "configs.json").st_ino == inode


def test_changes_and_deletions_swap_the_whole_set(tmp_path: Path) -> None:
    root = tmp_path / "out"
    store = store_with({("ai", "threshold"): 0.9, ("ai", "model"): "a", ("email", "retries"): 3})
    sink = FileSink(root)
    sink.write(store.snapshot)
    first = os.readlink(root / "..data")
    store.apply(
        [
            change("ai", "model", None, 2, 4, deleted=True),
            change("email", "retries", None, 2, 5, deleted=True),
            change("sms", "sender", "acme", 1, 6),
        ],
        revision=6,
        source="pubsub",
    )
    assert sink.write(store.snapshot) is True
    current = os.readlink(root / "..data")
    assert current != first
    # The retired generation stays a moment for readers still inside it, then goes.
    assert generations(root) == sorted([first, current])
    assert sink.remove_retired(now=time.monotonic() + 0.5) is True
    assert sink.remove_retired(now=time.monotonic() + 1.5) is False
    assert generations(root) == [current]
    assert sorted(os.listdir(root / "ai")) == ["threshold"]
    assert not os.path.lexists(root / "email")  # the link of a vanished service
    assert (root / "sms/sender").read_bytes() == b"acme"
    doc = json.loads((root / "configs.json").read_bytes())
    assert doc["revision"] == 6 and set(doc["configs"]) == {"ai", "sms"}
    assert "EMAIL_RETRIES" not in (root / "configs.env").read_text()


def test_reserved_service_names_do_not_shadow_our_files(tmp_path: Path) -> None:
    root = tmp_path / "out"
    store = store_with({("configs.json", "x"): 1, ("ai", "t"): 2})
    FileSink(root).write(store.snapshot)
    assert json.loads((root / "configs.json").read_bytes())["configs"]["configs.json"]["x"]["value"] == 1
    assert (root / "ai/t").read_bytes() == b"2"


NASTY = {
    ("app", "quote"): "it's a 'test'",
    ("app", "subst"): "$(touch pwned) `touch pwned2` ${HOME} $HOME",
    ("app", "newline"): "line1\nline2\n",
    ("app", "backslash"): "a\\b\\'c",
    ("app", "unicode"): "héllo — ✓",
    ("app", "semicolon"): "x; touch pwned3 #",
    ("app", "empty"): "",
    ("app", "number"): 0.9,
    ("app", "object"): {"a": [1, "it's"]},
    ("app", "nul"): "a\u0000b",
    ("my-svc", "max.retries"): 5,
    ("a-b", "c"): "collides with a/b-c",
    ("a", "b-c"): "collides with a-b/c",
    ("3d", "mode"): "not an identifier",
}


def test_env_file_is_safe_to_source(tmp_path: Path) -> None:
    root = tmp_path / "out"
    FileSink(root).write(store_with(NASTY).snapshot)
    script = 'set -a; . ./configs.env; set +a; env -0'
    result = subprocess.run(
        ["/bin/sh", "-c", script], cwd=root, capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"}
    )
    env = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    assert not list(root.glob("pwned*")) and not list(tmp_path.glob("pwned*"))
    expected = {
        "APP_QUOTE": "it's a 'test'",
        "APP_SUBST": "$(touch pwned) `touch pwned2` ${HOME} $HOME",
        "APP_NEWLINE": "line1\nline2\n",
        "APP_BACKSLASH": "a\\b\\'c",
        "APP_UNICODE": "héllo — ✓",
        "APP_SEMICOLON": "x; touch pwned3 #",
        "APP_EMPTY": "",
        "APP_NUMBER": "0.9",
        "APP_OBJECT": '{"a":[1,"it\'s"]}',
        "MY_SVC_MAX_RETRIES": "5",
    }
    for name, value in expected.items():
        assert env.get(name) == value, name
    # Left out, deterministically, and said so.
    text = (root / "configs.env").read_text()
    for name in ("APP_NUL", "A_B_C", "3D_MODE"):
        assert name not in env
    assert "# omitted A_B_C: used by a/b-c, a-b/c" in text
    assert "# omitted 3d/mode: 3D_MODE is not a shell variable name" in text
    assert "# omitted app/nul: the value contains a NUL byte" in text
    # Same input, same bytes.
    assert render_env(store_with(NASTY).snapshot) == render_env(store_with(dict(reversed(NASTY.items()))).snapshot)
    # The per-key files keep values a shell cannot.
    assert (root / "app/nul").read_bytes() == b"a\x00b"


@pytest.mark.anyio
async def test_run_coalesces_and_reports_each_swap(tmp_path: Path) -> None:
    root = tmp_path / "out"
    store = Store(ORG)
    sink = FileSink(root)
    summaries: list[ChangeSummary] = []
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(5):
            tg.start_soon(lambda: sink.run(store, on_swapped=summaries.append))
            await anyio.sleep(0.05)
            assert not (root / "..data").exists()  # nothing is written before the first load
            store.apply([change("ai", "t", 1, 1, 1)], revision=1, source="warmload")
            while not (root / "configs.json").exists():  # noqa: ASYNC110 (polls state outside the loop)
                await anyio.sleep(0.01)
            for revision in range(2, 202):  # a burst, faster than writes
                store.apply([change("ai", "t", revision, revision, revision)], revision=revision, source="pubsub")
            store.apply([change("ai", "gone", 1, 1, 202)], revision=202, source="pubsub")
            store.apply([change("ai", "gone", None, 2, 203, deleted=True)], revision=203, source="pubsub")
            while json.loads((root / "configs.json").read_bytes())["revision"] != 203:  # noqa: ASYNC110 (polls state outside the loop)
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert (root / "ai/t").read_bytes() == b"201"
    assert 1 <= len(summaries) < 20  # coalesced: far fewer swaps than changes
    merged = summaries[0]
    for summary in summaries[1:]:
        merged = merged.merge(summary)
    assert merged.revision == 203
    assert [(c.service, c.key, c.version, c.deleted) for c in merged.changes] == [
        ("ai", "gone", 2, True),
        ("ai", "t", 201, False),
    ]


# Reads the set in a loop, as apps do, and reports anything inconsistent.
READER = textwrap.dedent(
    r"""
    import json, os, sys
    root, stop = sys.argv[1], sys.argv[2]
    stats = {"resolved": 0, "visible": 0, "vanished": 0, "raced": 0, "errors": []}

    def raw(value):
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    def check(doc, files, env, where):
        expected = {f"{s}/{k}": raw(e["value"]) for s, keys in doc["configs"].items() for k, e in keys.items()}
        if files != expected:
            bad = sorted(p for p in set(files) | set(expected) if files.get(p) != expected.get(p))
            stats["errors"].append(f"{where}: rev {doc['revision']}: {bad[:3]}")
        if env is not None:
            lines = env.splitlines()
            if lines[0] != f"# config-agent: org acme, revision {doc['revision']}":
                stats["errors"].append(f"{where}: env header {lines[0]!r} vs rev {doc['revision']}")
            for path, value in expected.items():
                name = path.replace("/", "_").upper()
                if f"{name}='{value}'" not in lines:
                    stats["errors"].append(f"{where}: env lacks {name} at rev {doc['revision']}")

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    while not os.path.exists(stop):
        # Like a Kubernetes reader: resolve ..data once, read everything below it.
        try:
            base = os.path.join(root, os.readlink(os.path.join(root, "..data")))
            doc = json.loads(read(os.path.join(base, "configs.json")))
            env = read(os.path.join(base, "configs.env")).decode()
            files = {}
            for service in os.listdir(base):
                if service.startswith("configs."):
                    continue
                for key in os.listdir(os.path.join(base, service)):
                    files[f"{service}/{key}"] = read(os.path.join(base, service, key)).decode()
            check(doc, files, env, "resolved")
            stats["resolved"] += 1
        except FileNotFoundError:
            stats["vanished"] += 1  # that generation was retired while we read it: retry
        except ValueError as exc:
            stats["errors"].append(f"resolved: partial or bad file: {exc}")
        # Through the visible names: consistent whenever no swap happened in between.
        try:
            doc = json.loads(read(os.path.join(root, "configs.json")))
            files = {}
            for service, keys in doc["configs"].items():
                for key in keys:
                    files[f"{service}/{key}"] = read(os.path.join(root, service, key)).decode()
            again = json.loads(read(os.path.join(root, "configs.json")))
            if again["revision"] == doc["revision"]:
                check(doc, files, None, "visible")
                stats["visible"] += 1
            else:
                stats["raced"] += 1
        except FileNotFoundError:
            stats["raced"] += 1  # an entry deleted between reading configs.json and its file
        except ValueError as exc:
            stats["errors"].append(f"visible: partial or bad file: {exc}")
    print(json.dumps(stats))
    """
)


@pytest.mark.anyio
@pytest.mark.slow
async def test_readers_never_see_partial_or_mixed_sets(tmp_path: Path) -> None:
    root = tmp_path / "out"
    stop = tmp_path / "stop"
    keys = [(f"svc{i % 4}", f"key{i}") for i in range(24)]
    store = store_with({ident: f"initial-{n}" for n, ident in enumerate(keys)})
    sink = FileSink(root)
    sink.write(store.snapshot)
    swaps: list[int] = []
    versions = {ident: 1 for ident in keys}
    reader = await anyio.open_process([sys.executable, "-c", READER, str(root), str(stop)])
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: sink.run(store, on_swapped=lambda s: swaps.append(s.revision)))
            revision = store.snapshot.revision
            for n in range(2000):
                revision += 1
                ident = keys[n % len(keys)]
                versions[ident] += 1
                deleted = n % 97 == 5  # now and then an entry disappears (and comes back later)
                value: Any = revision if n % 2 else f"v-{revision}"
                if n % 11 == 0:
                    value = {"rev": revision, "list": [n]}
                store.apply(
                    [change(*ident, value, versions[ident], revision, deleted=deleted)],
                    revision=revision,
                    source="pubsub",
                )
                await anyio.sleep(0.002)  # rapid, yet slow enough for many separate swaps
            with anyio.fail_after(10):
                while json.loads((root / "configs.json").read_bytes())["revision"] != revision:  # noqa: ASYNC110 (polls state outside the loop)
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        stop.touch()
        assert reader.stdout is not None
        with anyio.fail_after(30):
            output = b"".join([chunk async for chunk in reader.stdout])
            await reader.wait()
    finally:
        if reader.returncode is None:
            reader.kill()
    stats = json.loads(output)
    assert stats["errors"] == []
    assert len(swaps) > 50, "too few swaps to mean anything"
    assert stats["resolved"] > 50 and stats["visible"] > 20, stats

    # Once quiet, the retired generations are removed.
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: sink.run(store))
        with anyio.fail_after(5):
            while generations(root) != [os.readlink(root / "..data")]:  # noqa: ASYNC110 (polls the disk)
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
