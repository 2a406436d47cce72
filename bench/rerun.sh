#!/usr/bin/env bash
# Hot replacement under load: reruns core-server N times while wrk sends keep-alive requests
# through it, then prints the failed requests and the time from each rerun to the new worker
# serving (median and worst). A rerun is what an operator types: `core-server --mode release`,
# which returns once the new instance serves, so its duration is the handover time.
# Only loopback traffic; the load is bounded by its duration. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

RERUNS=${RERUNS:-100}
PAUSE=${PAUSE:-0.1}            # seconds between reruns
CONNECTIONS=${CONNECTIONS:-32}

source bench/lib.sh
need nginx=nginx wrk=wrk
install_core_server
backend=$(free_port); http=$(free_port); https=$(free_port); udp=$(free_port)
core() { RUST_LOG=warn "$work/core-server" --udp-port "$udp" "$@"; }
stop_core() { core stop >/dev/null 2>&1; }
cleanup_hooks+=(stop_core)

cat > "$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend; location / { return 200 "hello\n"; } } }
CONF
nginx -c "$work/backend.conf" & pids+=($!)

start=(--mode release --http-port "$http" --https-port "$https" --dir "$work/state")
core "${start[@]}" >/dev/null
core add bench.example "$backend" >/dev/null

duration=$(awk -v n="$RERUNS" -v p="$PAUSE" 'BEGIN {printf "%d", n * (p + 0.25) + 5}')
wrk -t1 -c"$CONNECTIONS" -d"${duration}s" -H 'Host: bench.example' "http://127.0.0.1:$http/" > "$work/wrk.txt" &
wrk_pid=$!
pids+=($wrk_pid)
sleep 1

: > "$work/handover-ms"
for i in $(seq "$RERUNS"); do
  t0=$(date +%s%N)
  core "${start[@]}" >/dev/null
  echo $(( ($(date +%s%N) - t0) / 1000000 )) >> "$work/handover-ms"
  sleep "$PAUSE"
done
wait "$wrk_pid"

requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt")
sort -n "$work/handover-ms" > "$work/sorted"
median=$(awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}' "$work/sorted")
worst=$(tail -1 "$work/sorted")
echo
echo "$RERUNS reruns under wrk -t1 -c$CONNECTIONS for ${duration}s ($(nproc) cores)"
echo "requests:             ${requests}"
echo "failed requests:      $(( ${errors:-0} + ${non2xx:-0} )) (socket errors ${errors:-0}, non-2xx ${non2xx:-0})"
echo "rerun to new worker:  median ${median} ms, worst ${worst} ms"
grep -E "Socket errors|Non-2xx" "$work/wrk.txt" || true
