#!/usr/bin/env bash
# RSS per idle connection, with and without permessage-deflate negotiated.
#
#   loadtest/rss.sh                    # N=10000, release build, 1 round
#   N=2000 ROUNDS=3 loadtest/rss.sh
#   WSGATE_BIN=target/debug/wsgate loadtest/rss.sh
#
# For each mode (none, then deflate) a fresh gateway starts on a free loopback port (no Redis,
# --max-connections 2N, --log warn); loadtest/idle_clients.py reads its VmRSS, opens N idle
# connections with Python `websockets` (compression None, or "deflate", which offers
# permessage-deflate and must get it on every connection), waits for every `connection` message
# and for RSS to settle, reads VmRSS again; the gateway is then stopped. Prints
# KiB per connection = (RSS with N connections - RSS before) / N for both modes and the
# difference. Each connection also costs kernel socket memory, which RSS does not count.
#
# Builds the release binary (`cargo build --release`) unless WSGATE_BIN names a binary: release
# is what deployments run (the allocator sees the same sizes either way; a debug build's RSS
# before connections is larger, which cancels out). Needs python3 with `websockets`. Raises
# `ulimit -n` to the hard limit; N must stay below it. Connects to 127.0.0.1 only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

N=${N:-10000}
ROUNDS=${ROUNDS:-1}

ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -le $((N + 100)) ]; then
    echo "error: ulimit -n is $(ulimit -n); N=$N connections need more (lower N)" >&2
    exit 1
fi
python3 -c 'import websockets' 2>/dev/null || {
    echo "error: python3 needs the websockets package (python3 -m pip install websockets)" >&2
    exit 1
}

if [ -z "${WSGATE_BIN:-}" ]; then
    cargo build --release --quiet --bin wsgate
    WSGATE_BIN=target/release/wsgate
fi
echo "binary: $WSGATE_BIN ($("$WSGATE_BIN" --version))"
echo "connections per mode: $N, rounds: $ROUNDS"

gw_pid=
stop_gateway() {
    if [ -n "$gw_pid" ]; then
        kill "$gw_pid" 2>/dev/null || true
        wait "$gw_pid" 2>/dev/null || true
        gw_pid=
    fi
}
trap stop_gateway EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# measure MODE: prints the RESULT line of one fresh gateway with N connections in MODE.
measure() {
    local mode=$1 port log
    port=$(free_port)
    log=$(mktemp)
    env -u WSGATE_REDIS_URL -u WSGATE_CONFIG -u WSGATE_COMPRESSION \
        "$WSGATE_BIN" --listen "127.0.0.1:$port" --max-connections $((2 * N)) --log warn \
        >"$log" 2>&1 &
    gw_pid=$!
    for _ in $(seq 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    local out rc=0
    out=$(python3 loadtest/idle_clients.py --url "ws://127.0.0.1:$port/ws" --pid "$gw_pid" \
        --n "$N" --compression "$mode") || rc=$?
    stop_gateway
    if [ "$rc" -ne 0 ]; then
        echo "error: idle_clients.py failed ($rc) in mode $mode: $out" >&2
        echo "gateway log:" >&2
        tail -20 "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    # Let the kernel finish closing the previous connections before the next gateway starts.
    sleep 2
    echo "$out" | grep '^RESULT'
}

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }

plain_all=()
deflate_all=()
for round in $(seq "$ROUNDS"); do
    plain=$(measure none)
    echo "round $round: $plain"
    deflate=$(measure deflate)
    echo "round $round: $deflate"
    plain_all+=("$(echo "$plain" | field kib_per_connection)")
    deflate_all+=("$(echo "$deflate" | field kib_per_connection)")
done

python3 - "${plain_all[*]}" "${deflate_all[*]}" <<'EOF'
import statistics, sys
plain = [float(x) for x in sys.argv[1].split()]
deflate = [float(x) for x in sys.argv[2].split()]
p, d = statistics.median(plain), statistics.median(deflate)
print(f"RSS per idle connection, without compression: {p:.2f} KiB")
print(f"RSS per idle connection, with permessage-deflate negotiated: {d:.2f} KiB")
print(f"difference (deflate - plain): {d - p:+.2f} KiB per connection"
      + (f" (median of {len(plain)} rounds)" if len(plain) > 1 else ""))
EOF
