#!/usr/bin/env bash
# Memory per connection, side by side in one run: COUNT idle client connections held open (or
# as many as the open-file limit leaves room for at two descriptors each, what a WebSocket takes
# in a proxy and haproxy reserves for any connection), of each kind:
#   idle keep-alive: each made one request, then idles;
#   idle WebSocket:  each upgraded to a WebSocket (a real backend, Python's `websockets`), then
#                    idles;
# against core-server (TOKIO_WORKER_THREADS=1), nginx (1 worker) and haproxy (1 thread), each
# started afresh for each mode (MODES). For each: the serving process's RSS (VmRSS of the core-server
# worker, the nginx worker, haproxy) before, with the connections open, and SETTLE seconds after
# they all closed; bytes per connection; and a normal client's requests/s (wrk -t1 -c64)
# before and while the COUNT connections are open. Only loopback traffic; every load and wait
# is bounded. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-10000}
DURATION=${DURATION:-5}        # seconds of wrk load per measurement
CONNECTIONS=${CONNECTIONS:-64} # wrk's connections
SETTLE=${SETTLE:-5}            # seconds after the connections closed before the last RSS reading
PROXIES=${PROXIES:-"core-server nginx haproxy"}
MODES=${MODES:-"idle websocket"}
MAX_CONNECTIONS=$((2 * COUNT + 1000))

source bench/lib.sh
need nginx=nginx haproxy=haproxy wrk=wrk pgrep=procps
need_debian_python websockets=python3-websockets
# CORE_SERVER_BINARIES=DIR: core-server's binaries from DIR (a build to compare), not built here.
if [ -n "${CORE_SERVER_BINARIES:-}" ]; then
  cp "${binaries[@]/#/$CORE_SERVER_BINARIES/}" "$work/"
else
  install_core_server
fi
cleanup_hooks+=(show_err_logs_unless_finished)
# The holder, the backends and the proxies each hold COUNT or 2 x COUNT descriptors; as root,
# raise the hard limit too (the supervisor gives the worker its soft limit raised to the hard).
ulimit -Hn $((2 * MAX_CONNECTIONS)) 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
# Two descriptors per held connection, and room for the load's: where the limit cannot be
# raised to that, fewer than COUNT.
HELD=$(( COUNT < ($(ulimit -n) - 1000) / 2 ? COUNT : ($(ulimit -n) - 1000) / 2 ))

backend=$(free_port); ws_backend=$(free_port); proxy_port=$(free_port)
start_backend "$backend"
/usr/bin/python3 bench/websocket_backend.py "$ws_backend" 2>>"$work/ws_backend.err" & pids+=($!)
wait_port "$ws_backend"

# Each proxy on $proxy_port: / to the HTTP backend, /ws (Host ws.example for core-server, which
# routes by Host) to the WebSocket backend. Timeouts longer than a measurement, so no held
# connection is closed by the proxy meanwhile.
start_nginx() {
  cat > "$work/nginx.conf" <<CONF
worker_processes 1; worker_rlimit_nofile $(ulimit -n); daemon off; pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections $MAX_CONNECTIONS; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  upstream app { server 127.0.0.1:$backend; keepalive 512; }
  server { listen 127.0.0.1:$proxy_port backlog=4096 deferred;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header Host \$host; }
    location /ws { proxy_pass http://127.0.0.1:$ws_backend; proxy_http_version 1.1;
                   proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection upgrade;
                   proxy_read_timeout 300s; } } }
CONF
  start_peer nginx nginx nginx -c "$work/nginx.conf"
  proxy_pid=${main_pid[nginx]}
  wait_port "$proxy_port"
  serving() { pgrep -P "$proxy_pid"; }
}
start_haproxy() {
  cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  # haproxy reserves two descriptors per connection, and stops if the limit is below that.
  maxconn $(( ($(ulimit -n) - 100) / 2 ))
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout tunnel 300s
  timeout http-keep-alive 300s
frontend web
  bind 127.0.0.1:$proxy_port defer-accept
  use_backend ws if { path_beg /ws }
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:$backend
backend ws
  server ws 127.0.0.1:$ws_backend
CONF
  start_peer haproxy haproxy haproxy -f "$work/haproxy.cfg" -db
  proxy_pid=${main_pid[haproxy]}
  wait_port "$proxy_port"
  serving() { echo "$proxy_pid"; }
}
label[core]=core-server
start_core-server() {
  local udp
  udp=$(free_port)
  start_core_server core 1 "$work" --http-port "$proxy_port" --https-port "$(free_port)" \
    --udp-port "$udp" --dir "$work/state" --max-connections "$MAX_CONNECTIONS" \
    --header-timeout 120s --idle-timeout 5m --backend-timeout 300s
  proxy_pid=${main_pid[core]}
  wait_port "$proxy_port"
  add_route "$udp" bench.example "$backend"
  add_route "$udp" ws.example "$ws_backend"
  serving() { core_worker "$proxy_pid"; }
}
stop_proxy() {
  kill "$proxy_pid"
  for _ in $(seq 100); do kill -0 "$proxy_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$proxy_pid" 2>/dev/null || true
  wait "$proxy_pid" 2>/dev/null || true
}

rss_kb() {  # the serving process's VmRSS in kB
  local pid
  pid=$(serving) || { echo "no serving process to measure" >&2; exit 1; }
  awk '/^VmRSS/ {print $2}' "/proc/$pid/status"
}
rps() {  # requests/s of a normal keep-alive client, and its failed requests in brackets
  wrk_figures timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 2s \
    -H 'Host: bench.example' "http://127.0.0.1:$proxy_port/" | awk '{print $1 ($3 != 0 ? " (" $3 " failed)" : "")}'
}
wait_line() {  # file pattern -> once the holder wrote a line matching it (180 s at most)
  for _ in $(seq 1800); do grep -q "$2" "$1" && return; sleep 0.1; done
  echo "the holder never printed '$2'" >&2; exit 1
}

declare -A R
measure() {  # proxy mode
  local proxy=$1 mode=$2 held holder before open after opened
  start_"$proxy"
  R[$proxy,$mode,rps0]=$(rps)
  before=$(rss_kb)
  held=$(mktemp -p "$work")
  python3 bench/hold_connections.py "$proxy_port" "$HELD" "$mode" $((DURATION + 5)) >"$held" &
  holder=$!; pids+=($holder)
  wait_line "$held" '^open'
  sleep 2
  open=$(rss_kb)
  R[$proxy,$mode,rps]=$(rps)
  wait_line "$held" '^still open'   # the holder closes them all and exits
  wait "$holder" || true
  sleep "$SETTLE"
  after=$(rss_kb)
  opened=$(awk '/^open/ {print $2}' "$held")
  R[$proxy,$mode,held]="$opened/$(awk '/^still open/ {print $3}' "$held")"
  R[$proxy,$mode,bytes]=$(awk -v a="$open" -v b="$before" -v n="$opened" \
    'BEGIN {printf "%.0f", n ? (a - b) * 1024 / n : 0}')
  R[$proxy,$mode,mb]=$(awk -v b="$before" -v o="$open" -v a="$after" \
    'BEGIN {printf "%.0f / %.0f / %.0f", b / 1024, o / 1024, a / 1024}')
  stop_proxy
}

for mode in $MODES; do
  for proxy in $PROXIES; do
    measure "$proxy" "$mode"
  done
done
finished=1

echo
echo "$(nproc) cores; $HELD connections held (open-file limit $(ulimit -n));" \
  "load: wrk -t1 -c$CONNECTIONS -d${DURATION}s;"
echo "RSS of the serving process, MB: before / open / ${SETTLE}s after all closed;" \
  "held/left: connections opened / still open when the load ended"
print_versions wrk nginx haproxy
for mode in $MODES; do
  echo
  printf '%-12s %-10s %12s %20s %12s %22s %12s\n' "$mode" "" "bytes/conn" "RSS MB" "req/s before" \
    "req/s with them open" "held/left"
  for proxy in $PROXIES; do
    printf '%-12s %-10s %12s %20s %12s %22s %12s\n' "" "$proxy" "${R[$proxy,$mode,bytes]}" \
      "${R[$proxy,$mode,mb]}" "${R[$proxy,$mode,rps0]}" "${R[$proxy,$mode,rps]}" "${R[$proxy,$mode,held]}"
  done
done
