"""`configs.env`: every entry as a shell variable, safe to `set -a; . configs.env`.

    AI_THRESHOLD='0.9'
    WEBHOOK_URL='https://example.com/hook?a=1&b=2'

Names are `{PREFIX}{SERVICE}_{KEY}` upper-cased with `.` and `-` mapped to `_`
(PREFIX is `CONFIG_AGENT_ENV_PREFIX`, empty by default). Every value is
single-quoted (a `'` inside becomes `'\\''`), so no content can run a command or
expand anything, in bash, dash or any POSIX sh. Strings are written raw, other
JSON values as their compact JSON text (`0.9`, `true`, `{"a":1}`): exactly the
bytes of the per-key file.

Entries that cannot be safe variables are left out, deterministically, listed
in a comment at the end and returned in `EnvFile.omitted` (the file sink counts
and logs them); they stay in `configs.json` and the per-key files:

- `env_not_identifier`: the name is not a shell identifier (starts with a digit);
- `env_denied`: the name is on the deny list below (it changes how programs load
  code, find executables or libraries, trust TLS peers, route traffic, or how a
  shell behaves): a config writer must never gain code execution in the app;
- `env_collision`: two entries map to one name (`a-b/c` and `a/b-c`): neither is
  written, so an app never reads another entry's value by accident;
- `env_nul`: the value holds a NUL byte (a variable cannot);
- `env_too_large`: `NAME=value` is over Linux's 128 KiB limit for one
  environment string (MAX_ARG_STRLEN): once exported, every later exec would
  fail with "Argument list too long";
- `env_budget`: the variables written so far (by sorted name) already fill
  ENV_BUDGET, half of the usual 2 MiB that a process's arguments and
  environment may take together.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from agent.model import NAME_RE
from agent.sinks.render import raw_value
from agent.store import Snapshot

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Linux: one "NAME=value\0" string of argv or envp (32 pages of 4 KiB).
MAX_ARG_STRLEN = 128 * 1024
# Every exported "NAME=value\0" plus its 8-byte pointer, together; the rest of
# ARG_MAX (2 MiB with the default 8 MiB stack) is left to the app's own
# environment and arguments.
ENV_BUDGET = 1024 * 1024

# Names no entry may take. The service and key are joined by `_`, so a name
# without `_` (PATH, IFS, ENV, PS4, …) cannot occur; those are listed anyway so
# that the list reads as what it protects, whatever the naming rule becomes.
DENIED_NAMES = frozenset({
    # The shell itself: start-up files, parsing, prompts, search paths.
    "ENV", "BASH_ENV", "IFS", "PATH", "CDPATH", "HOME", "SHELL", "SHELLOPTS", "BASHOPTS",
    "PS0", "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND", "PROMPT_DIRTRIM", "GLOBIGNORE",
    "EXECIGNORE", "FIGNORE", "HISTFILE", "INPUTRC", "MAIL", "MAILPATH", "MAILCHECK",
    "OPTIND", "OPTARG", "POSIXLY_CORRECT", "PWD", "OLDPWD", "UID", "EUID", "PPID",
    "TMPDIR", "TERM", "TERMINFO", "TZ", "TZDIR", "LANG", "LANGUAGE", "USER", "LOGNAME",
    # Programs that other programs start.
    "EDITOR", "VISUAL", "PAGER", "MANPAGER", "BROWSER", "LESSOPEN", "LESSCLOSE",
    # The C library: loaders, charset modules, resolver, locales.
    "GCONV_PATH", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "NLSPATH", "LOCPATH",
    "LIBRARY_PATH",
    # Language runtimes that load code or options named in the environment.
    "CLASSPATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "RUBYOPT",
    "RUBYLIB", "PERLLIB", "PERLIO", "PHPRC", "PHP_INI_SCAN_DIR", "TCLLIBPATH",
    "ERL_AFLAGS", "ERL_FLAGS", "ERL_ZFLAGS", "ELIXIR_ERL_OPTIONS", "R_PROFILE",
    "R_PROFILE_USER", "R_ENVIRON", "R_ENVIRON_USER", "R_LIBS", "R_LIBS_USER",
    "PKG_CONFIG_PATH", "GOFLAGS", "GODEBUG", "GOPATH", "GOROOT", "GOTOOLCHAIN",
    # Trust and routing: who a program talks to, and which certificates it believes.
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "KUBECONFIG", "KRB5_CONFIG", "KRB5CCNAME",
    "DISPLAY", "DBUS_SESSION_BUS_ADDRESS",
})
DENIED_PREFIXES = (
    "LD_", "BASH_", "PYTHON", "PERL5", "RUBY", "GEM_", "BUNDLE_", "NODE_", "NPM_CONFIG_",
    "JAVA_", "DOTNET_", "CORECLR_", "COMPLUS_", "LUA_", "MALLOC_", "GLIBC_", "GCONV_",
    "LC_", "GIT_", "SSH_", "SSL_", "OPENSSL_", "XDG_", "COMP_", "HIST", "KUBERNETES_",
    "AWS_", "GOOGLE_", "AZURE_", "DOCKER_", "CONFIG_AGENT_",
)


@dataclass(frozen=True, slots=True)
class Omitted:
    """An entry left out of part of the file set, and why (a bounded reason)."""

    reason: str
    service: str
    key: str
    # What to say about it in a comment or a log line (names only, never a value).
    detail: str


@dataclass(frozen=True, slots=True)
class EnvFile:
    """The `configs.env` bytes and the entries they leave out."""

    body: bytes
    omitted: tuple[Omitted, ...]


def env_name(service: str, key: str, prefix: str = "") -> str:
    """The variable name of an entry (may not be a valid identifier; see build_env)."""
    return prefix + f"{service}_{key}".upper().replace(".", "_").replace("-", "_")


def is_denied(name: str) -> bool:
    """True when `name` is on the deny list (exact names and prefixes)."""
    return name in DENIED_NAMES or name.startswith(DENIED_PREFIXES)


def shell_quote(text: str) -> str:
    """Single-quote `text` for POSIX sh: nothing inside is special except `'` itself."""
    return "'" + text.replace("'", "'\\''") + "'"


def render_env(snapshot: Snapshot, prefix: str = "") -> bytes:
    """The `configs.env` content of a snapshot."""
    return build_env(snapshot, prefix).body


def build_env(snapshot: Snapshot, prefix: str = "") -> EnvFile:
    """`configs.env` of a snapshot, with what it leaves out (same input, same bytes)."""
    lines = [f"# config-agent: org {snapshot.org_id}, revision {snapshot.revision}"]
    omitted: list[Omitted] = []
    budget = ENV_BUDGET
    for name, owners in sorted(_names(snapshot, prefix, omitted).items()):
        if len(owners) > 1:
            listed = ", ".join(f"{s}/{k}" for s, k in owners)
            omitted += [Omitted("env_collision", s, k, f"{name}: used by {listed}") for s, k in owners]
            continue
        service, key = owners[0]
        reason, detail = _check_name(name)
        text = raw_value(snapshot.entries[(service, key)].value).decode()
        if reason is None:
            reason, detail = _check_value(name, text, budget)
        if reason is not None:
            omitted.append(Omitted(reason, service, key, f"{service}/{key}: {detail}"))
            continue
        budget -= _env_cost(name, text)
        lines.append(f"{name}={shell_quote(text)}")
    # One comment per name (a collision lists every owner once).
    comments = dict.fromkeys(f"# omitted {o.detail}" for o in omitted)
    return EnvFile(("\n".join(lines + list(comments)) + "\n").encode(), tuple(omitted))


def _names(snapshot: Snapshot, prefix: str, omitted: list[Omitted]) -> dict[str, list[tuple[str, str]]]:
    """Entries by variable name, sorted; names that break the naming rule go to `omitted`."""
    by_name: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for service, key in sorted(snapshot.entries):
        if not (NAME_RE.fullmatch(service) and NAME_RE.fullmatch(key)):
            # Only a tampered source can get here; never echo such a name into the file.
            omitted.append(Omitted("invalid_name", service, key, "an invalid entry name"))
            continue
        by_name[env_name(service, key, prefix)].append((service, key))
    return by_name


def _check_name(name: str) -> tuple[str | None, str]:
    if not _IDENTIFIER.fullmatch(name):
        return "env_not_identifier", f"{name} is not a shell variable name"
    if is_denied(name):
        return "env_denied", f"{name} is on the deny list (set CONFIG_AGENT_ENV_PREFIX)"
    return None, ""


def _check_value(name: str, text: str, budget: int) -> tuple[str | None, str]:
    if "\0" in text:
        return "env_nul", "the value contains a NUL byte"
    size = len(name) + 1 + len(text.encode()) + 1
    if size > MAX_ARG_STRLEN:
        return "env_too_large", f"{name}=value is {size} bytes, over the {MAX_ARG_STRLEN} a variable may hold"
    if _env_cost(name, text) > budget:
        return "env_budget", f"{name} would take configs.env over {ENV_BUDGET} bytes"
    return None, ""


def _env_cost(name: str, text: str) -> int:
    """What one exported variable takes of ARG_MAX: its string, NUL and pointer."""
    return len(name) + 1 + len(text.encode()) + 1 + 8
