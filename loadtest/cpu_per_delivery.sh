#!/usr/bin/env bash
# Gateway CPU per delivery, permessage-deflate fan-out against plain, over real sockets, one run.
#
#   loadtest/cpu_per_delivery.sh                       # 2,000 + 2,000 subscribers, release build
#   SUBSCRIBERS=1000 PUBLICATIONS=400 loadtest/cpu_per_delivery.sh
#   WSGATE_BIN=target/debug/wsgate loadtest/cpu_per_delivery.sh
#
# Starts one gateway (no Redis, --log warn) on a free loopback port and runs
# loadtest/cpu_per_delivery.py against it: SUBSCRIBERS plain and SUBSCRIBERS deflate connections,
# paced publications of a ~1 KB JSON `data` to each group in alternating blocks, gateway user+sys
# CPU from /proc/PID/stat per delivery for each, and the ratio compressed/plain. See the .py for
# the details. Builds the release binary unless WSGATE_BIN names one. Needs python3 with
# `websockets`. Connects to 127.0.0.1 only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUBSCRIBERS=${SUBSCRIBERS:-2000}
PUBLICATIONS=${PUBLICATIONS:-200}
BLOCKS=${BLOCKS:-4}

ulimit -n "$(ulimit -Hn)"
python3 -c 'import websockets' 2>/dev/null || {
    echo "error: python3 needs the websockets package (python3 -m pip install websockets)" >&2
    exit 1
}
if [ -z "${WSGATE_BIN:-}" ]; then
    cargo build --release --quiet --bin wsgate
    WSGATE_BIN=target/release/wsgate
fi
echo "binary: $WSGATE_BIN ($("$WSGATE_BIN" --version)); $(nproc) cores"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
env -u WSGATE_REDIS_URL -u WSGATE_CONFIG -u WSGATE_COMPRESSION \
    "$WSGATE_BIN" --listen "127.0.0.1:$port" --max-connections $((2 * SUBSCRIBERS + 100)) \
    --log warn >"$log" 2>&1 &
gw_pid=$!
cleanup() {
    kill "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
    rm -f "$log"
}
trap cleanup EXIT
for _ in $(seq 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done

if ! python3 loadtest/cpu_per_delivery.py --base "127.0.0.1:$port" --pid "$gw_pid" \
    --subscribers "$SUBSCRIBERS" --publications "$PUBLICATIONS" --blocks "$BLOCKS"; then
    echo "gateway log:" >&2
    tail -20 "$log" >&2
    exit 1
fi
