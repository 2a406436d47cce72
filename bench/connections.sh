#!/usr/bin/env bash
# Memory per connection, side by side in one run: COUNT idle client connections held open (or
# as many as the open-file limit leaves room for at two descriptors each, what a WebSocket takes
# in a proxy and haproxy reserves for any connection), of each kind:
#   idle keep-alive: each made one request, then idles;
#   idle WebSocket:  each upgraded to a WebSocket (a real backend, Python's `websockets`), then
#                    idles;
# against core-server (TOKIO_WORKER_THREADS=1), nginx (1 worker) and haproxy (1 thread), each
# started afresh for each kind. For each: the serving process's RSS (VmRSS of the core-server
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
KINDS=${KINDS:-"idle websocket"}
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

backend=$(free_port); ws_backend=$(free_port); port=$(free_port)
start_backend "$backend"
/usr/bin/python3 bench/websocket_backend.py "$ws_backend" 2>>"$work/ws_backend.err" & pids+=($!)
wait_port "$ws_backend"

# Each proxy on $port: / to the HTTP backend, /ws (Host ws.example for core-server, which
# routes by Host) to the WebSocket backend. Timeouts longer than a measurement, so no held
# connection is closed by the proxy meanwhile.
start_nginx() {
  cat > "$work/nginx.conf" <<CONF
worker_processes 1; worker_rlimit_nofile $(ulimit -n); daemon off; pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections $MAX_CONNECTIONS; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  upstream app { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$port backlog=4096;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header Host \$host; }
    location /ws { proxy_pass http://127.0.0.1:$ws_backend; proxy_http_version 1.1;
                   proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection upgrade;
                   proxy_read_timeout 300s; } } }
CONF
  nginx -c "$work/nginx.conf" 2>>"$work/nginx.err" & proxy_pid=$!
  wait_port "$port"
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
  bind 127.0.0.1:$port
  use_backend ws if { path_beg /ws }
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:$backend
backend ws
  server ws 127.0.0.1:$ws_backend
CONF
  haproxy -f "$work/haproxy.cfg" -db 2>>"$work/haproxy.err" & proxy_pid=$!
  wait_port "$port"
  serving() { echo "$proxy_pid"; }
}
start_core-server() {
  local udp
  udp=$(free_port)
  TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$work/core-server" --http-port "$port" \
    --https-port "$(free_port)" --udp-port "$udp" --dir "$work/state" \
    --max-connections "$MAX_CONNECTIONS" --header-timeout 120s --idle-timeout 5m \
    --backend-timeout 300s 2>>"$work/core.err" & proxy_pid=$!
  wait_port "$port"
  add_route "$udp" bench.example "$backend"
  add_route "$udp" ws.example "$ws_backend"
  # The worker, a child of the supervisor we started (the other child is the ACME helper).
  serving() { pgrep -P "$proxy_pid" -x core-server-wor; }
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
rps() {  # requests/s of a normal keep-alive client, and any errors in brackets
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 2s -H 'Host: bench.example' \
    "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {r=$2} /Socket errors|Non-2xx/ {sub(/^ +/, ""); e=e (e ? "; " : "") $0}
                                    END {printf "%.0f%s\n", r, (e ? " (" e ")" : "")}'
}
wait_line() {  # file pattern -> once the holder wrote a line matching it (180 s at most)
  for _ in $(seq 1800); do grep -q "$2" "$1" && return; sleep 0.1; done
  echo "the holder never printed '$2'" >&2; exit 1
}

declare -A R
measure() {  # proxy kind
  local proxy=$1 kind=$2 held holder before open after opened
  start_"$proxy"
  R[$proxy,$kind,rps0]=$(rps)
  before=$(rss_kb)
  held=$(mktemp -p "$work")
  python3 bench/hold_connections.py "$port" "$HELD" "$kind" $((DURATION + 5)) >"$held" &
  holder=$!; pids+=($holder)
  wait_line "$held" '^open'
  sleep 2
  open=$(rss_kb)
  R[$proxy,$kind,rps]=$(rps)
  wait_line "$held" '^still open'   # the holder closes them all and exits
  wait "$holder" || true
  sleep "$SETTLE"
  after=$(rss_kb)
  opened=$(awk '/^open/ {print $2}' "$held")
  R[$proxy,$kind,held]="$opened/$(awk '/^still open/ {print $3}' "$held")"
  R[$proxy,$kind,bytes]=$(awk -v a="$open" -v b="$before" -v n="$opened" \
    'BEGIN {printf "%.0f", n ? (a - b) * 1024 / n : 0}')
  R[$proxy,$kind,mb]=$(awk -v b="$before" -v o="$open" -v a="$after" \
    'BEGIN {printf "%.0f / %.0f / %.0f", b / 1024, o / 1024, a / 1024}')
  stop_proxy
}

for kind in $KINDS; do
  for proxy in $PROXIES; do
    measure "$proxy" "$kind"
  done
done
finished=1

echo
echo "$(nproc) cores; $HELD connections held (open-file limit $(ulimit -n));" \
  "load: wrk -t1 -c$CONNECTIONS -d${DURATION}s;"
echo "RSS of the serving process, MB: before / open / ${SETTLE}s after all closed;" \
  "held/left: connections opened / still open when the load ended"
echo "$(nginx -v 2>&1); $(haproxy -v | head -1); $(wrk -v 2>&1 | head -1)"
for kind in $KINDS; do
  echo
  printf '%-12s %-10s %12s %20s %12s %22s %12s\n' "$kind" "" "bytes/conn" "RSS MB" "req/s before" \
    "req/s with them open" "held/left"
  for proxy in $PROXIES; do
    printf '%-12s %-10s %12s %20s %12s %22s %12s\n' "" "$proxy" "${R[$proxy,$kind,bytes]}" \
      "${R[$proxy,$kind,mb]}" "${R[$proxy,$kind,rps0]}" "${R[$proxy,$kind,rps]}" "${R[$proxy,$kind,held]}"
  done
done
