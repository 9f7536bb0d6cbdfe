#!/usr/bin/env bash
# wsgate against Socket.IO 4 (+ @socket.io/redis-adapter) and nginx + nchan (over Redis), in one
# run: the same fan-out scenario, the same load generator, and every figure as a ratio to wsgate.
#
#   loadtest/compare.sh                              # defaults below
#   CONNECTIONS=2000 RATE=10 DURATION=10 loadtest/compare.sh
#   TARGETS="wsgate nchan" MODES=off loadtest/compare.sh
#
# For each target and each mode (MODES: off = paced, no permessage-deflate offered; on = paced,
# offered and required; burst = no deflate, BURST_SIZE publications back to back once a second
# for DURATION/2 seconds, so a server that drains a connection's whole queue in one vectored
# write can batch, where paced fan-out is one frame per write for every server), on a fresh Redis: two nodes sharing that Redis, CONNECTIONS subscribers
# on one topic split evenly over the two nodes, publications of a SIZE-byte JSON `data` at RATE
# per second for DURATION seconds (BURST back to back per tick) posted over HTTP to the first
# node, so half of every fan-out crosses Redis to the other node. The generator
# (wsgate-loadgen) is the same for all three; it speaks wsgate's protocol, engine.io v4 framing
# (`40`, `42[...]`, `2`/`3`) for Socket.IO, and plain WebSocket for nchan's /sub/<channel>.
#
# Pinning: with 2 or more cores the servers (both nodes and Redis) run on SERVER_CPUS (default:
# cpu 0) and the generator on GEN_CPUS (default: cpu 1), with `taskset`, so that the generator's
# work never lands on the servers' core and each server gets the same single core (wsgate then
# runs one tokio worker, nchan one nginx worker, Socket.IO its one event loop). PIN=0 turns it
# off. Server CPU is the two nodes' user+sys seconds over the publishing window (Redis's CPU is
# reported on its own row); RSS per connection is (RSS of both nodes with everyone connected -
# before) / connections.
#
# Installs when missing: nginx-light and libnginx-mod-nchan (apt-get), redis-server (apt-get),
# socket.io@4, @socket.io/redis-adapter@8 and redis@4 (npm, into PEERS_DIR, default
# target/loadtest-peers/socketio: git-ignored, nothing of theirs is committed). Builds the release
# gateway and generator unless WSGATE_BIN and LOADGEN_BIN are set. Results (JSON per run, logs)
# go to OUT (default target/loadtest/compare-<time>). Connects to 127.0.0.1 only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

CONNECTIONS=${CONNECTIONS:-10000}
SIZE=${SIZE:-100}
RATE=${RATE:-5}
BURST=${BURST:-1}
BURST_SIZE=${BURST_SIZE:-32}
DURATION=${DURATION:-20}
TARGETS=${TARGETS:-"wsgate socketio nchan"}
MODES=${MODES:-"off on burst"}
PIN=${PIN:-1}
PEERS_DIR=${PEERS_DIR:-target/loadtest-peers/socketio}
OUT=${OUT:-target/loadtest/compare-$(date +%Y%m%d-%H%M%S)}

prepare_run "servers (both nodes + Redis)"

# --- the peers ------------------------------------------------------------------------------
for t in $TARGETS; do
    case $t in
        nchan)
            if [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || ! command -v nginx >/dev/null; then
                install_apt nginx-light libnginx-mod-nchan
            fi
            ;;
        socketio)
            if [ ! -d "$PEERS_DIR/node_modules/@socket.io/redis-adapter" ]; then
                say "npm install socket.io@4 @socket.io/redis-adapter@8 redis@4 (into $PEERS_DIR)"
                mkdir -p "$PEERS_DIR"
                (cd "$PEERS_DIR" && npm install --no-audit --no-fund --silent \
                    socket.io@4 @socket.io/redis-adapter@8 redis@4 >/dev/null)
            fi
            ;;
        wsgate) ;;
        *) echo "error: unknown target $t" >&2; exit 2 ;;
    esac
done
PEERS_DIR=$(cd "$PEERS_DIR" 2>/dev/null && pwd || echo "$PEERS_DIR")
build_binaries

versions() {
    case $1 in
        wsgate) "$WSGATE_BIN" --version ;;
        socketio) echo "socket.io $(node -p "require('$PEERS_DIR/node_modules/socket.io/package.json').version") + @socket.io/redis-adapter $(node -p "require('$PEERS_DIR/node_modules/@socket.io/redis-adapter/package.json').version"), node $(node --version)" ;;
        nchan) echo "$(nginx -v 2>&1 | sed 's/.*: //') + nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null)" ;;
    esac
}

# start_nodes TARGET MODE DIR: two nodes on Redis; sets NODE_PORTS (a,b) and NODE_PIDS (a,b).
start_nodes() {
    local target=$1 mode=$2 dir=$3 p1 p2 pids=()
    p1=$(free_port)
    p2=$(free_port)
    while [ "$p2" = "$p1" ]; do p2=$(free_port); done
    case $target in
        wsgate)
            local comp=off
            [ "$mode" = on ] && comp=on
            for n in 1 2; do
                local port=$p1
                [ $n = 2 ] && port=$p2
                start_wsgate "$dir" "$port" "cmp-$n" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
                    --max-connections $((CONNECTIONS * 2 + 1000)) --compression "$comp"
                pids+=("$BG_PID")
            done
            ;;
        socketio)
            local deflate=0
            [ "$mode" = on ] && deflate=1
            for port in "$p1" "$p2"; do
                start_bg "$dir/socketio-$port.log" env NODE_PATH="$PEERS_DIR/node_modules" \
                    PORT="$port" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" DEFLATE="$deflate" \
                    node loadtest/peers/socketio-server.js
                pids+=("$BG_PID")
            done
            ;;
        nchan)
            local deflate=off
            [ "$mode" = on ] && deflate=on
            for port in "$p1" "$p2"; do
                local ndir="$dir/nchan-$port"
                mkdir -p "$ndir"
                sed -e "s#@PORT@#$port#g; s#@REDIS@#redis://127.0.0.1:$REDIS_PORT#g" \
                    -e "s#@DIR@#$ndir#g; s#@DEFLATE@#$deflate#g" \
                    loadtest/peers/nchan.conf.template >"$ndir/nginx.conf"
                start_bg "$ndir/stdout.log" nginx -p "$ndir" -c "$ndir/nginx.conf"
                pids+=("$BG_PID")
            done
            ;;
    esac
    wait_port "$p1"
    wait_port "$p2"
    NODE_PORTS="127.0.0.1:$p1,127.0.0.1:$p2"
    NODE_PIDS="${pids[0]},${pids[1]}"
}

{
    echo "loadtest/compare.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    machine
    echo "scenario: fan-out, one topic, $CONNECTIONS subscribers over 2 nodes sharing one Redis," \
        "$SIZE-byte data, $RATE publications/s (burst $BURST) for ${DURATION}s over HTTP to node 1"
    echo "pinning: $PINNING"
    for t in $TARGETS; do echo "$t: $(versions "$t")"; done
} | tee "$OUT/header.txt"

# The loopback write floor, same run: what one write per frame, and 32 frames per writev, cost
# any server here (loadtest/tools/send_floor.c, unpinned).
if command -v cc >/dev/null; then
    cc -O2 -o "$OUT/send_floor" loadtest/tools/send_floor.c
    "$OUT/send_floor" "$CONNECTIONS" 20 1 | sed 's/^/floor, one write per frame: /' | tee -a "$OUT/header.txt"
    "$OUT/send_floor" "$CONNECTIONS" 4 32 | sed 's/^/floor, 32 frames per writev: /' | tee -a "$OUT/header.txt"
fi

for mode in $MODES; do
    files=()
    for t in $TARGETS; do
        dir="$OUT/$t-$mode"
        mkdir -p "$dir"
        start_redis "$dir"
        start_nodes "$t" "$mode" "$dir"
        sleep 1
        say "$t, compression $mode: nodes $NODE_PORTS (pids $NODE_PIDS), redis pid $REDIS_PID"
        comp=()
        [ "$mode" = on ] && comp=(--compression)
        pace=(--rate "$RATE" --burst "$BURST" --duration "$DURATION")
        [ "$mode" = burst ] && pace=(--rate "$BURST_SIZE" --burst "$BURST_SIZE" \
            --duration "$((DURATION / 2))")
        generator run --target "$t" --scenario fanout --ws "$NODE_PORTS" \
            --http "${NODE_PORTS%%,*}" --connections "$CONNECTIONS" --size "$SIZE" \
            "${pace[@]}" "${comp[@]}" \
            --pid "$NODE_PIDS" --aux-pid "$REDIS_PID" --label "$t" \
            --json "$dir/result.json" | tee "$dir/table.txt" || true
        stop_all
        files+=("$dir/result.json")
        sleep 2
    done
    {
        echo
        case $mode in
            off) echo "paced, compression off (ratios: value / wsgate's):" ;;
            on) echo "paced, compression on (ratios: value / wsgate's):" ;;
            burst) echo "bursts of $BURST_SIZE, compression off (ratios: value / wsgate's):" ;;
        esac
        "$LOADGEN_BIN" compare "${files[@]}"
    } | tee "$OUT/compare-$mode.md"
done
echo "results: $OUT"
