#!/usr/bin/env bash
# Scale of routes (issue 10, item 4): what 100,000 registered domains cost.
#   add latency  a sender that waits for each reply, timing each: p50/p99/max of SAMPLE adds of
#                new domains when the table reaches 1k, 20k and ROUTES routes (the routes in
#                between are registered by a sender keeping WINDOW commands in flight);
#   requests/s   wrk -t1 -c64 keep-alive to one domain, on two instances side by side (both at
#                TOKIO_WORKER_THREADS=1): one with that 1 route, one with ROUTES routes, in
#                ROUNDS interleaved rounds (A B A B ...); the median of each and their ratio,
#                and the worker's CPU time per request (user + system, from /proc), which
#                depends less on how the 2 cores were shared;
#   rerun        the instance with ROUTES routes rerun RERUNS times: from starting the new binary
#                to its worker serving (its log says "took over"), and until the old one exited.
# Targets: p99 add < 10 ms, requests/s at ROUTES within 5% of 1 route, rerun < 1 s.
# Only loopback traffic; every load and wait is bounded. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUTES=${ROUTES:-100000}
SAMPLE=${SAMPLE:-1000}         # timed adds at each size
WINDOW=${WINDOW:-64}           # commands in flight while registering the rest
ROUNDS=${ROUNDS:-3}            # interleaved wrk rounds per instance
DURATION=${DURATION:-5}        # seconds per wrk round
CONNECTIONS=${CONNECTIONS:-64}
RERUNS=${RERUNS:-3}
BINARIES=${BINARIES:-}         # a directory of core-server binaries to measure instead of building

source bench/lib.sh
need nginx=nginx wrk=wrk python3=python3 curl=curl
if [ -n "$BINARIES" ]; then cp "${binaries[@]/#/$BINARIES/}" "$work/"; else install_core_server; fi
cleanup_hooks+=(show_err_logs_unless_finished)

backend=$(free_port)
start_backend "$backend"

# An instance NAME: its ports and state directory; start_instance NAME starts it (attached,
# in the background), returns once it serves HTTP.
declare -A http https udp
for name in one many; do http[$name]=$(free_port); https[$name]=$(free_port); udp[$name]=$(free_port); done
core_pid=()
start_instance() {
  TOKIO_WORKER_THREADS=1 RUST_LOG=info "$work/core-server" --http-port "${http[$1]}" \
    --https-port "${https[$1]}" --udp-port "${udp[$1]}" --dir "$work/$1" >>"$work/$1.err" 2>&1 &
  pids+=($!)
  core_pid[${#core_pid[@]}]=$!
  wait_port "${http[$1]}"
}
stop_instances() { local name; for name in one many; do "$work/core-server" --udp-port "${udp[$name]}" stop >/dev/null 2>&1 || true; done; }
cleanup_hooks+=(stop_instances)

# The sender: `fill UDP FROM TO` registers bulkNNNNNN.example for NNNNNN in [FROM, TO) with
# WINDOW in flight; `time UDP FROM TO` one at a time, printing p50/p99/max in ms.
cat > "$work/adds.py" <<'PY'
import socket, sys, time
mode, port, start, end, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(10)
server = ("127.0.0.1", port)
def command(n):
    return b"add bulk%06d.example %d" % (n, 1024 + n % 60000)
def reply():
    try:
        answer = s.recv(512)
    except socket.timeout:
        sys.exit("no reply within 10 s")
    if answer != b"ok":
        sys.exit("reply: %r" % answer)
if mode == "fill":
    sent, done = start, start
    while done < end:
        while sent < end and sent - done < window:
            s.sendto(command(sent), server); sent += 1
        reply(); done += 1
else:
    times = []
    for n in range(start, end):
        t0 = time.perf_counter()
        s.sendto(command(n), server)
        reply()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print("p50 %6.2f ms  p99 %6.2f ms  max %6.2f ms" % (pick(0.5), pick(0.99), times[-1]))
PY
adds() { timeout 600 python3 "$work/adds.py" "$1" "${udp[many]}" "$2" "$3" "$WINDOW"; }

start_instance one
start_instance many
add_route "${udp[one]}" bench.example "$backend"
add_route "${udp[many]}" bench.example "$backend"

echo "add latency, one sender waiting for each reply, $SAMPLE adds at each size ($(nproc) cores):"
t0=$(date +%s%N)
registered=1
for size in 1000 20000 "$ROUTES"; do
  [ "$size" -le "$ROUTES" ] || continue
  from=$(( size - SAMPLE > registered ? size - SAMPLE : registered ))
  [ "$from" -le "$registered" ] || adds fill "$registered" "$from"
  printf '  at %6d routes: %s\n' "$size" "$(adds time "$from" "$size")"
  registered=$size
done
echo "  (registered $ROUTES routes in $(( ($(date +%s%N) - t0) / 1000000 )) ms, $WINDOW in flight between samples)"
ls -l "$work/many" | awk '/routes/ {print "  on disk: " $NF " " $5 " bytes"}'

# cpu_ticks PID: user + system clock ticks the process used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
worker_of() { pgrep -P "$1" -x core-server-wor; }
# measure NAME SUPERVISOR_PID: one wrk round; appends requests/s to rps_NAME and the worker's
# CPU microseconds per request to us_NAME.
measure() {
  local worker before requests
  worker=$(worker_of "$2"); before=$(cpu_ticks "$worker")
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H 'Host: bench.example' "http://127.0.0.1:${http[$1]}/" \
    > "$work/wrk.txt"
  grep -q 'Non-2xx' "$work/wrk.txt" && { echo "non-2xx answers from $1:" >&2; cat "$work/wrk.txt" >&2; exit 1; }
  requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
  eval "rps_$1+=($(awk '/Requests\/sec/ {printf "%d", $2}' "$work/wrk.txt"))"
  eval "us_$1+=($(awk -v t="$(( $(cpu_ticks "$worker") - before ))" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
    'BEGIN {printf "%.1f", t * 1e6 / hz / n}'))"
}
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
rps_one=(); rps_many=(); us_one=(); us_many=()
for round in $(seq "$ROUNDS"); do
  measure one "${core_pid[0]}"; measure many "${core_pid[1]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
echo
echo "requests/s, wrk -t1 -c$CONNECTIONS -d${DURATION}s keep-alive, TOKIO_WORKER_THREADS=1, $ROUNDS rounds interleaved:"
echo "  1 route:       median $(median "${rps_one[@]}") req/s (${rps_one[*]}), worker $(median "${us_one[@]}") us CPU/request (${us_one[*]})"
echo "  $ROUTES routes: median $(median "${rps_many[@]}") req/s (${rps_many[*]}), worker $(median "${us_many[@]}") us CPU/request (${us_many[*]})"
echo "  ratio $ROUTES/1 route: requests/s $(ratio "$(median "${rps_many[@]}")" "$(median "${rps_one[@]}")") (target >= 0.95)," \
  "CPU/request $(ratio "$(median "${us_many[@]}")" "$(median "${us_one[@]}")")"

echo
echo "rerun with $ROUTES routes (new binary started -> its worker serves; -> old one exited):"
for i in $(seq "$RERUNS"); do
  old=${core_pid[-1]}
  # Only what the log gets from now on is searched (it holds a line per add).
  offset=$(( $(stat -c %s "$work/many.err") + 1 ))
  t0=$(date +%s%N)
  start_instance many
  served=""
  for _ in $(seq 2000); do
    if tail -c +"$offset" "$work/many.err" | grep -q 'took over from core-server pid'; then
      served=$(( ($(date +%s%N) - t0) / 1000000 )); break
    fi
    sleep 0.005
  done
  [ -n "$served" ] || { echo "the rerun did not take over within 10 s" >&2; exit 1; }
  for _ in $(seq 6000); do kill -0 "$old" 2>/dev/null || break; sleep 0.005; done
  kill -0 "$old" 2>/dev/null && { echo "the old instance (pid $old) still runs 30 s on" >&2; exit 1; }
  gone=$(( ($(date +%s%N) - t0) / 1000000 ))
  status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Host: bench.example' "http://127.0.0.1:${http[many]}/")
  echo "  rerun $i: serving after ${served} ms, old instance gone after ${gone} ms (then: HTTP $status)"
done
finished=1
