# Helpers shared by loadtest/compare.sh and loadtest/scenarios.sh (sourced, not run).
#
# Every server started here listens on 127.0.0.1 only, on a free port, and is stopped by its
# process id when the script exits. Nothing connects anywhere but loopback.

# shellcheck shell=bash

LOADTEST_PIDS=()

say() { printf '==> %s\n' "$*" >&2; }

# Shared start of a run: raise the fd limit, make OUT absolute, stop every server on exit, and
# choose the CPU pinning (PIN=1 on 2+ cores: servers on SERVER_CPUS, default 0, the generator on
# GEN_CPUS, default 1). $1 names what runs on the server side, for the PINNING line.
prepare_run() {
    ulimit -n "$(ulimit -Hn)"
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    trap stop_all EXIT
    if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
        SERVER_CPUS=${SERVER_CPUS:-0}
        GEN_CPUS=${GEN_CPUS:-1}
        PINNING="$1 pinned to cpu $SERVER_CPUS, generator to cpu $GEN_CPUS (taskset)"
    else
        SERVER_CPUS=
        GEN_CPUS=
        PINNING="no pinning"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    local port=$1
    for _ in $(seq 200); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: nothing listens on 127.0.0.1:$port" >&2
    return 1
}

# Stops every process started through `start_bg` (by id), newest first, each one gone before
# the next is signalled (so Redis outlives the servers that use it).
stop_all() {
    local i
    for ((i = ${#LOADTEST_PIDS[@]} - 1; i >= 0; i--)); do
        kill "${LOADTEST_PIDS[$i]}" 2>/dev/null || true
        wait "${LOADTEST_PIDS[$i]}" 2>/dev/null || true
    done
    LOADTEST_PIDS=()
}

# start_bg LOG CMD...: starts CMD in the background (pinned to SERVER_CPUS when set), records its
# pid in LOADTEST_PIDS and in BG_PID (not in a subshell: call it directly).
start_bg() {
    local log=$1
    shift
    if [ -n "${SERVER_CPUS:-}" ]; then
        taskset -c "$SERVER_CPUS" "$@" >"$log" 2>&1 &
    else
        "$@" >"$log" 2>&1 &
    fi
    BG_PID=$!
    LOADTEST_PIDS+=("$BG_PID")
}

# start_redis DIR: a fresh Redis (no persistence) on a free port; sets REDIS_PORT, REDIS_PID.
start_redis() {
    local dir=$1
    command -v redis-server >/dev/null || install_apt redis-server
    REDIS_PORT=$(free_port)
    start_bg "$dir/redis-$REDIS_PORT.log" redis-server --port "$REDIS_PORT" \
        --bind 127.0.0.1 --save '' --appendonly no --daemonize no
    REDIS_PID=$BG_PID
    wait_port "$REDIS_PORT"
}

install_apt() {
    say "installing $* (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null 2>&1 || {
        "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 || true
        "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
    }
}

# Builds (unless given) the gateway and the generator; sets WSGATE_BIN and LOADGEN_BIN.
build_binaries() {
    if [ -z "${WSGATE_BIN:-}" ] || [ -z "${LOADGEN_BIN:-}" ]; then
        say "cargo build --release -p wsgate -p wsgate-loadgen --bins"
        cargo build --release --quiet -p wsgate -p wsgate-loadgen --bins
    fi
    WSGATE_BIN=${WSGATE_BIN:-target/release/wsgate}
    LOADGEN_BIN=${LOADGEN_BIN:-target/release/wsgate-loadgen}
}

# start_wsgate DIR PORT NODE_ID [FLAGS...]: one gateway node; its pid in BG_PID. No drain window
# on SIGTERM: the generator is gone by then, and each run starts a fresh node.
start_wsgate() {
    local dir=$1 port=$2 node=$3
    shift 3
    start_bg "$dir/wsgate-$node.log" env -u WSGATE_REDIS_URL -u WSGATE_CONFIG \
        -u WSGATE_COMPRESSION -u WSGATE_JWT_SECRET -u WSGATE_API_KEYS \
        "$WSGATE_BIN" --listen "127.0.0.1:$port" --node-id "$node" --log warn --drain-seconds 0 "$@"
}

# node_fanout_latency PORT: one line on the node's own share of the latency, from its
# `wsgate_fanout_latency_seconds` histogram (a publication's arrival to its last recipient's
# write): the mean, and the bucket bound under which 99% of the fan-outs finished.
node_fanout_latency() {
    python3 - "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
buckets, total, count = [], 0.0, 0
for line in text.splitlines():
    if line.startswith("wsgate_fanout_latency_seconds_bucket{"):
        le = line.split('le="', 1)[1].split('"', 1)[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    elif line.startswith("wsgate_fanout_latency_seconds_sum"):
        total = float(line.rsplit(" ", 1)[1])
    elif line.startswith("wsgate_fanout_latency_seconds_count"):
        count = int(float(line.rsplit(" ", 1)[1]))
if not count:
    print("node fan-out latency: no samples")
    sys.exit(0)
p99 = next(le for le, n in sorted(buckets) if n >= 0.99 * count)
print(f"node fan-out latency (arrival to the last recipient's write, {count} fan-outs): "
      f"mean {total / count * 1e3:.3f} ms, p99 under {p99 * 1e3:g} ms")
PY
}

# The machine, for the record.
machine() {
    local model
    model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
    echo "machine: $(nproc) cores ($model), $(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r)"
}

# generator ARGS...: the load generator, pinned to GEN_CPUS when set.
generator() {
    if [ -n "${GEN_CPUS:-}" ]; then
        taskset -c "$GEN_CPUS" "$LOADGEN_BIN" "$@"
    else
        "$LOADGEN_BIN" "$@"
    fi
}
