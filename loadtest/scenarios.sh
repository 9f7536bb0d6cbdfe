#!/usr/bin/env bash
# Every load scenario against one wsgate node (with Redis, as deployed), without and with
# permessage-deflate, in one run; prints one table and keeps each run's JSON.
#
#   loadtest/scenarios.sh                        # all scenarios, defaults below
#   ONLY="fanout idle" MODES=off loadtest/scenarios.sh
#   CONNECTIONS=2000 IDLE_CONNECTIONS=3000 DURATION=5 loadtest/scenarios.sh
#
# Scenarios (wsgate-loadgen --scenario ...; each on a fresh node and a fresh Redis):
#   fanout        one topic, CONNECTIONS subscribers, RATE publications/s (paced: each
#                 publication is one frame per connection per write)
#   fanout-burst  the same with BURST publications back to back per tick (the writer can batch)
#   topics        CONNECTIONS topics with one subscriber each, TOPIC_RATE publications/s
#   users         CONNECTIONS users, USER_RATE direct messages/s (POST /api/ws/send)
#   idle          IDLE_CONNECTIONS connections each subscribed to one topic, held: RSS per
#                 connection
#   storm         STORM_CONNECTIONS connects with HS256 JWTs (the node runs --jwt-secret)
#   latency       publish-to-receive latency at LATENCY_RATE x CONNECTIONS / LATENCY_TOPICS
#                 deliveries/s (defaults: 1,000 topics of 10 subscribers, 5,000 publications/s
#                 through Redis PUBLISH = 50,000 deliveries/s), LATENCY_RUNS times, unpinned (with
#                 the node and Redis sharing one core, each waits for the other: p99 grows
#                 several-fold), each time with the node's workers unpinned and pinned
#                 (--pin-workers off/on); prints the node's own share from its fan-out
#                 histogram, and the generator's plain Redis subscriber beside it
# Modes (MODES): off = no deflate offered, SIZE-byte data; on = permessage-deflate offered and
# required on every connection, DEFLATE_SIZE-byte data (wsgate compresses payloads of 256 bytes
# and more, so a 100-byte one would go out plain either way).
#
# Publications go over HTTP (`POST /api/publish`, which runs FCALL wsgate_publish in Redis) unless
# PUBLISH=redis|fcall. Pinning as in compare.sh: node + Redis on SERVER_CPUS (cpu 0), the
# generator on GEN_CPUS (cpu 1); PIN=0 turns it off. Also measures the loopback write floor
# (loadtest/tools/send_floor.c, unpinned) in the same run, as the reference for CPU per delivery;
# with the latency scenario also the paced floor (loadtest/tools/latency_floor.c: its fan-out
# pattern written by one C process to one epoll reader, CPU per write and latency percentiles).
# The generator's own settings pass through its environment variables: LOADGEN_RECEIVE=epoll
# (read with tokio instead of io_uring), LOADGEN_PROBE=false (no plain Redis subscriber beside).
# Results go to OUT (default target/loadtest/scenarios-<time>). Connects to 127.0.0.1 only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

CONNECTIONS=${CONNECTIONS:-10000}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-15000}
STORM_CONNECTIONS=${STORM_CONNECTIONS:-10000}
SIZE=${SIZE:-100}
DEFLATE_SIZE=${DEFLATE_SIZE:-1000}
RATE=${RATE:-5}
BURST=${BURST:-32}
TOPIC_RATE=${TOPIC_RATE:-5000}
USER_RATE=${USER_RATE:-5000}
DURATION=${DURATION:-20}
LATENCY_TOPICS=${LATENCY_TOPICS:-1000}
LATENCY_RATE=${LATENCY_RATE:-5000}
LATENCY_DURATION=${LATENCY_DURATION:-10}
LATENCY_RUNS=${LATENCY_RUNS:-3}
PUBLISH=${PUBLISH:-http}
ONLY=${ONLY:-"fanout fanout-burst topics users idle storm latency"}
MODES=${MODES:-"off on"}
PIN=${PIN:-1}
OUT=${OUT:-target/loadtest/scenarios-$(date +%Y%m%d-%H%M%S)}
JWT_SECRET=loadtest-secret-$RANDOM$RANDOM

prepare_run "node + Redis"
build_binaries

{
    echo "loadtest/scenarios.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), $("$WSGATE_BIN" --version)"
    machine
    echo "one node + Redis; publish via $PUBLISH; pinning: $PINNING"
} | tee "$OUT/header.txt"

# The loopback write floor, same run.
if command -v cc >/dev/null; then
    cc -O2 -o "$OUT/send_floor" loadtest/tools/send_floor.c
    "$OUT/send_floor" "$CONNECTIONS" 20 1 | sed 's/^/floor, one write per frame: /' | tee -a "$OUT/header.txt"
    "$OUT/send_floor" "$CONNECTIONS" 4 32 | sed 's/^/floor, 32 frames per writev: /' | tee -a "$OUT/header.txt"
    # The latency scenario's pattern with nothing but one C writer and one epoll reader: the
    # CPU per paced write and the tail this machine gives before any gateway or Redis runs.
    case " $ONLY " in *" latency "*)
        cc -O2 -o "$OUT/latency_floor" loadtest/tools/latency_floor.c
        "$OUT/latency_floor" "$CONNECTIONS" $((CONNECTIONS / LATENCY_TOPICS)) "$LATENCY_RATE" \
            "$LATENCY_DURATION" | sed 's/^/floor, paced fan-out (no gateway, no Redis): /' \
            | tee -a "$OUT/header.txt" || echo "floor, paced fan-out: not measured" ;;
    esac
fi

# run NAME MODE GENERATOR-ARGS...: a fresh Redis and node, then the generator.
run() {
    local name=$1 mode=$2
    shift 2
    local dir="$OUT/$name-$mode" port flags=() comp=() size=$SIZE
    mkdir -p "$dir"
    start_redis "$dir"
    port=$(free_port)
    [ "$name" = storm ] && flags=(--jwt-secret "$JWT_SECRET")
    # Extra node flags for this run (word-split on purpose).
    # shellcheck disable=SC2206
    flags+=(${NODE_FLAGS:-})
    if [ "$mode" = on ]; then
        comp=(--compression)
        size=$DEFLATE_SIZE
    fi
    start_wsgate "$dir" "$port" "scn-$name" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
        --max-connections 40000 "${flags[@]}"
    local pid=$BG_PID
    wait_port "$port"
    sleep 1
    say "$name, compression $mode (node pid $pid)"
    generator run --ws "127.0.0.1:$port" --pid "$pid" --aux-pid "$REDIS_PID" --size "$size" \
        --redis "127.0.0.1:$REDIS_PORT" --label "$name/$mode" "${comp[@]}" "$@" \
        --json "$dir/result.json" | tee "$dir/table.txt" || true
    node_fanout_latency "$port" | tee -a "$dir/table.txt" || true
    stop_all
    RESULTS+=("$dir/result.json")
    sleep 2
}

RESULTS=()
for mode in $MODES; do
    for s in $ONLY; do
        case $s in
            fanout) run fanout "$mode" --scenario fanout --connections "$CONNECTIONS" \
                --rate "$RATE" --duration "$DURATION" --publish "$PUBLISH" ;;
            fanout-burst) run fanout-burst "$mode" --scenario fanout --connections "$CONNECTIONS" \
                --rate "$BURST" --burst "$BURST" --duration "$((DURATION / 2))" --publish "$PUBLISH" ;;
            topics) run topics "$mode" --scenario topics --connections "$CONNECTIONS" \
                --rate "$TOPIC_RATE" --duration "$DURATION" --publish "$PUBLISH" ;;
            users) run users "$mode" --scenario users --connections "$CONNECTIONS" \
                --rate "$USER_RATE" --duration "$DURATION" \
                --publish "$([ "$PUBLISH" = fcall ] && echo http || echo "$PUBLISH")" ;;
            idle) run idle "$mode" --scenario idle --connections "$IDLE_CONNECTIONS" --settle 3 ;;
            storm) run storm "$mode" --scenario storm --connections "$STORM_CONNECTIONS" \
                --jwt-secret "$JWT_SECRET" ;;
            latency)
                # Alternately with the node's workers placed by the kernel and pinned one per
                # CPU (--pin-workers on), so that the two compare within one sitting.
                for i in $(seq "$LATENCY_RUNS"); do
                    for pin in off on; do
                        SERVER_CPUS='' GEN_CPUS='' NODE_FLAGS="--pin-workers $pin" \
                            run "latency-pin-$pin-$i" "$mode" --scenario topics \
                            --connections "$CONNECTIONS" --topics "$LATENCY_TOPICS" \
                            --rate "$LATENCY_RATE" --duration "$LATENCY_DURATION" --publish redis
                    done
                done ;;
            *) echo "error: unknown scenario $s" >&2; exit 2 ;;
        esac
    done
done

{
    echo
    echo "all runs:"
    "$LOADGEN_BIN" compare --no-ratios "${RESULTS[@]}"
} | tee "$OUT/summary.md"
echo "results: $OUT"
