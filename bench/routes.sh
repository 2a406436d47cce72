#!/usr/bin/env bash
# Scale of routes (issue 10, item 4): what 100,000 registered domains cost.
#   add latency  a sender that waits for each reply, timing each: p50/p99/max of SAMPLE adds of
#                new domains when the table reaches 1k, 20k and ROUTES routes (the routes in
#                between are registered by a sender keeping WINDOW commands in flight);
#   requests/s   wrk -t1 -c$CONNECTIONS keep-alive to one domain, on two core-servers side by
#                side, each with ONE worker runtime thread: one with that 1 route, one with
#                ROUTES routes; ROUNDS rounds, the two in turn (lib.sh's run_rounds), the median,
#                spread and worker CPU per request of each, and their ratio;
#   rerun        the instance with ROUTES routes rerun RERUNS times: from starting the new binary
#                to its worker serving (its log says "took over"), and until the old one exited.
# Targets: p99 add < 10 ms, requests/s at ROUTES >= 0.95 of 1 route, rerun < 1 s.
# BINARIES=DIR measures the core-server binaries in DIR instead of building this tree (to
# compare two builds). Only loopback traffic; every load and wait is bounded. Stops only what
# it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUTES=${ROUTES:-100000}
SAMPLE=${SAMPLE:-1000}         # timed adds at each size
WINDOW=${WINDOW:-64}           # commands in flight while registering the rest
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}        # seconds per wrk round
CONNECTIONS=${CONNECTIONS:-64}
LIMIT=${LIMIT:-$((DURATION + 30))}  # seconds any one wrk run may take
RERUNS=${RERUNS:-3}
BINARIES=${BINARIES:-}

source bench/lib.sh
need nginx=nginx wrk=wrk python3=python3 curl=curl
if [ -n "$BINARIES" ]; then cp "${binaries[@]/#/$BINARIES/}" "$work/"; else install_core_server; fi
cleanup_hooks+=(show_err_logs_unless_finished)
print_settings ROUTES SAMPLE WINDOW ROUNDS DURATION CONNECTIONS RERUNS BINARIES
print_versions wrk nginx

backend=$(free_port)
start_backend "$backend"

# The two instances, as lib.sh's columns: "one" keeps 1 route, "many" gets ROUTES.
label=([one]="1 route" [many]="$ROUTES routes")
declare -A https udp
for server in one many; do port[$server]=$(free_port); https[$server]=$(free_port); udp[$server]=$(free_port); done
start_args() { echo --http-port "${port[$1]}" --https-port "${https[$1]}" --udp-port "${udp[$1]}" --dir "$work/$1"; }
stop_instances() { local server; for server in one many; do "$work/core-server" --udp-port "${udp[$server]}" stop >/dev/null 2>&1 || true; done; }
cleanup_hooks+=(stop_instances)
for server in one many; do
  # shellcheck disable=SC2046 # the arguments, split on purpose
  start_core_server "$server" 1 "$work" $(start_args "$server")
  wait_port "${port[$server]}"
  add_route "${udp[$server]}" bench.example "$backend"
done

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

echo
echo "add latency, one sender waiting for each reply, $SAMPLE adds at each size:"
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

keepalive() {
  wrk_figures timeout "$LIMIT" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H 'Host: bench.example' \
    "http://127.0.0.1:$1/"
}
heading[keepalive]="requests/s, wrk -t1 -c$CONNECTIONS -d${DURATION}s keep-alive to one domain, 1 worker runtime thread each:"
cpu_per[keepalive]=us/request versus[keepalive]=one target[keepalive]=">= 0.95"
echo
run_rounds "one many" keepalive
print_results "one many" keepalive | grep -v "^  ${label[one]} / ${label[one]}:"

echo
echo "rerun with $ROUTES routes (new binary started -> its worker serves; -> old one exited):"
old=${main_pid[many]}
for i in $(seq "$RERUNS"); do
  log=$work/rerun-$i.err
  : > "$log"
  t0=$(date +%s%N)
  # shellcheck disable=SC2046 # the arguments, split on purpose
  TOKIO_WORKER_THREADS=1 RUST_LOG=info "$work/core-server" $(start_args many) 2>"$log" &
  pids+=($!)
  served=""
  for _ in $(seq 2000); do
    if grep -q 'took over from core-server pid' "$log"; then
      served=$(( ($(date +%s%N) - t0) / 1000000 )); break
    fi
    sleep 0.005
  done
  [ -n "$served" ] || { echo "the rerun did not take over within 10 s:" >&2; cat "$log" >&2; exit 1; }
  for _ in $(seq 6000); do kill -0 "$old" 2>/dev/null || break; sleep 0.005; done
  kill -0 "$old" 2>/dev/null && { echo "the old instance (pid $old) still runs 30 s on" >&2; exit 1; }
  gone=$(( ($(date +%s%N) - t0) / 1000000 ))
  status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Host: bench.example' "http://127.0.0.1:${port[many]}/")
  echo "  rerun $i: serving after ${served} ms, old instance gone after ${gone} ms (then: HTTP $status)"
  old=${pids[-1]}
done
finished=1
