#!/usr/bin/env bash
# A normal client's requests/s while the proxy is flooded, side by side in one run:
#   1. no flood; 2. while SLOW slowloris connections trickle a header byte every 5 s;
#   3. while IDLE idle keep-alive connections are open (and the memory each one costs).
# core-server (default threads) vs nginx (1 worker), the same nginx backend behind both.
# Prints the figures and the ratios core-server / nginx. Only loopback traffic; every load is
# bounded by DURATION and the connection counts. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}      # seconds of wrk load per measurement
CONNECTIONS=${CONNECTIONS:-16}
SLOW=${SLOW:-2000}
IDLE=${IDLE:-10000}
# Client connections each proxy may hold: nginx's worker_connections and core-server's
# --max-connections alike (core-server's default, half the 20,000 descriptors here, would
# evict idle connections of the 10,000 flood to make room: not the same flood as nginx's).
MAX_CONNECTIONS=${MAX_CONNECTIONS:-19000}

source bench/lib.sh
need nginx=nginx wrk=wrk curl=curl
install_core_server
ulimit -n "$(ulimit -Hn)"   # 10,000 held connections need the descriptors, here and in the proxies
# The proxies' logs go with the work directory: show what they said before it is removed.
show_logs() {
  local log
  for log in "$work"/core.err "$work"/nginx.err "$work"/backend.err; do
    [ -s "$log" ] && { echo; echo "== ${log##*/} (last 20 lines)"; tail -n 20 "$log"; }
  done
  return 0
}
cleanup_hooks+=(show_logs)


backend=$(free_port); core=$(free_port); nginx_proxy=$(free_port); udp=$(free_port)
start_backend "$backend"

# nginx: one worker, room for the flood, its default timeouts (client_header_timeout 60s,
# keepalive_timeout 75s) longer than a measurement, as core-server's (--header-timeout 30s).
cat > "$work/nginx.conf" <<CONF
worker_processes 1; worker_rlimit_nofile 20000; daemon off; pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections $MAX_CONNECTIONS; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$backend; keepalive 512; }
  server { listen 127.0.0.1:$nginx_proxy backlog=4096 deferred;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header Host \$host; } } }
CONF
nginx -c "$work/nginx.conf" & pids+=($!)

RUST_LOG=warn "$work/core-server" --http-port "$core" --https-port "$(free_port)" \
  --udp-port "$udp" --dir "$work/state" --max-connections "$MAX_CONNECTIONS" 2>>"$work/core.err" &
core_pid=$!; pids+=($core_pid)
for p in "$backend" "$nginx_proxy" "$core"; do wait_port "$p"; done
for _ in $(seq 50); do
  "$work/core-server" --udp-port "$udp" add bench.example "$backend" >/dev/null 2>&1 && break
  sleep 0.1
done

rps() {  # port -> requests/s of a normal keep-alive client
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 2s -H 'Host: bench.example' \
    "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {r=$2} /Socket errors|Non-2xx/ {sub(/^ +/, ""); e=e (e ? "; " : "") $0}
                                 END {print r (e ? " (" e ")" : "")}'
}
rss_kb() {  # pids... -> their total VmRSS in kB
  local total=0 pid
  [ $# -gt 0 ] || { echo "no process to measure" >&2; exit 1; }
  for pid in "$@"; do total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status"))); done
  echo "$total"
}
core_worker() { pgrep -P "$core_pid" -x core-server-wor; }   # children of the pid we started
nginx_worker() { pgrep -P "$(cat "$work/nginx.pid")"; }

declare -A R
wait_open() {  # file -> once the holder writing it has opened its connections (at most 120 s)
  for _ in $(seq 1200); do grep -q '^open' "$1" && return; sleep 0.1; done
  echo "the connections never opened" >&2; exit 1
}
flooded() {  # name port mode count -> requests/s while the flood holds its connections
  local name=$1 port=$2 mode=$3 count=$4 held
  held=$(mktemp -p "$work")
  # Held a little longer than wrk runs: "still open" says how many the proxy kept meanwhile.
  python3 bench/hold_connections.py "$port" "$count" "$mode" $((DURATION + 3)) >"$held" &
  local holder=$!; pids+=($holder)
  wait_open "$held"
  R[$name,$mode,open]=$(awk '/^open/ {print $2}' "$held")
  R[$name,$mode]=$(rps "$port")
  wait "$holder" || true
  R[$name,$mode,left]=$(awk '/^still open/ {print $3}' "$held")
}
memory() {  # name port pid-function -> kB per idle connection
  local name=$1 port=$2 before after held
  before=$(rss_kb $($3))
  held=$(mktemp -p "$work")
  python3 bench/hold_connections.py "$port" "$IDLE" idle 8 >"$held" &
  local holder=$!; pids+=($holder)
  wait_open "$held"
  sleep 2
  after=$(rss_kb $($3))
  R[$name,kb]=$(awk -v a="$after" -v b="$before" -v n="$(awk '/^open/ {print $2}' "$held")" \
    'BEGIN {printf "%.1f", (a - b) / n}')
  wait "$holder" || true
}

for proxy in core-server nginx; do
  port=$([ $proxy = core-server ] && echo "$core" || echo "$nginx_proxy")
  R[$proxy,none]=$(rps "$port")
  # Before the floods: memory freed after a flood stays with the allocator and hides the growth.
  memory $proxy "$port" "$([ $proxy = core-server ] && echo core_worker || echo nginx_worker)"
  flooded $proxy "$port" slowloris "$SLOW"
  flooded $proxy "$port" idle "$IDLE"
done

echo
echo "$(nproc) cores; a normal client: wrk -t1 -c$CONNECTIONS -d${DURATION}s --timeout 2s;" \
  "[held: opened / still open when wrk is done]"
printf '%-14s %14s %30s %30s %12s\n' "" "no flood" "$SLOW slowloris" "$IDLE idle keep-alive" "kB per idle"
for proxy in core-server nginx; do
  printf '%-14s %14s %30s %30s %12s\n' "$proxy" "${R[$proxy,none]}" \
    "${R[$proxy,slowloris]} [${R[$proxy,slowloris,open]}/${R[$proxy,slowloris,left]} held]" \
    "${R[$proxy,idle]} [${R[$proxy,idle,open]}/${R[$proxy,idle,left]} held]" "${R[$proxy,kb]}"
done
ratio() { awk -v a="${1%% *}" -v b="${2%% *}" 'BEGIN {printf "%.2f", a/b}'; }
echo
echo "core-server / nginx requests/s: no flood $(ratio "${R[core-server,none]}" "${R[nginx,none]}"), slowloris $(ratio "${R[core-server,slowloris]}" "${R[nginx,slowloris]}"), idle $(ratio "${R[core-server,idle]}" "${R[nginx,idle]}")"
echo "memory per idle connection: core-server ${R[core-server,kb]} kB, nginx ${R[nginx,kb]} kB"
