#!/bin/sh
# Read config values from the local config-agent, four ways, with nothing but
# curl and a POSIX shell.
#
#   ./read.sh                       # http://127.0.0.1:8790, no socket, no files
#   CONFIG_AGENT_URL=http://127.0.0.1:8790 \
#   CONFIG_AGENT_SOCKET=/run/config-agent/agent.sock \
#   CONFIG_DIR=/etc/app-config ./read.sh
#
# Each line it prints is `how: value`, e.g. `tcp: 0.75`.
set -eu

url=${CONFIG_AGENT_URL:-http://127.0.0.1:8790}
socket=${CONFIG_AGENT_SOCKET:-}
dir=${CONFIG_DIR:-}

# 1. HTTP over TCP: ?format=raw gives the bare value (strings without quotes).
echo "tcp: $(curl -fsS "$url/v1/configs/ai/threshold?format=raw")"

# 2. The same API over the Unix socket (no port; file permissions decide who may read).
if [ -n "$socket" ]; then
    echo "socket: $(curl -fsS --unix-socket "$socket" "http://localhost/v1/configs/ai/threshold?format=raw")"
fi

if [ -n "$dir" ]; then
    # 3. One file per entry, holding the raw value.
    echo "file: $(cat "$dir/ai/threshold")"

    # 4. configs.env: SERVICE_KEY=value lines, quoted for the shell; `set -a`
    #    exports every variable it defines (for a child process to inherit).
    set -a
    . "$dir/configs.env"
    set +a
    echo "env: $AI_THRESHOLD"
fi
