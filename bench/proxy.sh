#!/usr/bin/env bash
# Plain-HTTP proxy throughput, side by side, in one run on this machine:
#   requests/s: wrk, keep-alive, a small response;   MB/s: curl, a 100 MB download.
# The same backend (nginx serving static content) sits behind each proxy:
#   core-server (default threads, and TOKIO_WORKER_THREADS=1), nginx (1 worker), haproxy (1 thread).
# Prints the figures and the ratios core-server / nginx (req/s) and core-server / haproxy (MB/s).
# Only loopback traffic; every load is bounded by DURATION. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}      # seconds of wrk load per proxy
CONNECTIONS=${CONNECTIONS:-64}
DOWNLOADS=${DOWNLOADS:-9}     # 100 MB downloads per proxy; the median counts

source bench/lib.sh
need nginx=nginx haproxy=haproxy wrk=wrk curl=curl
install_core_server


backend=$(free_port); core=$(free_port); nginx_proxy=$(free_port); haproxy_port=$(free_port)
udp=$(free_port)
head -c 100000000 /dev/zero > "$work/100mb"
chmod 644 "$work/100mb"

# The backend: nginx serving static content, two workers so it is never the bottleneck.
start_backend "$backend"

# nginx as a reverse proxy, one worker, pooled keep-alive connections to the backend.
cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$nginx_proxy;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$remote_addr; }
  } }
CONF
nginx -c "$work/nginx.conf" & pids+=($!)

# haproxy, one thread.
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option forwardfor
frontend web
  bind 127.0.0.1:$haproxy_port
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:$backend
CONF
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

# core-server.
start_core() {
  env ${1:+TOKIO_WORKER_THREADS=$1} RUST_LOG=warn "$work/core-server" --http-port "$core" \
    --https-port "$(free_port)" --udp-port "$udp" --dir "$work/state" 2>>"$work/core.err" &
  core_pid=$!
  pids+=($core_pid)
  wait_port "$core"
  for _ in $(seq 50); do
    "$work/core-server" --udp-port "$udp" add bench.example "$backend" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "core-server did not answer" >&2; exit 1
}
stop_core() { kill "$core_pid"; wait "$core_pid" 2>/dev/null || true; }

for p in "$backend" "$nginx_proxy" "$haproxy_port"; do wait_port "$p"; done

rps() {  # port -> requests/s
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H 'Host: bench.example' "http://127.0.0.1:$1/" \
    | awk '/Requests\/sec/ {print $2}'
}
mbps() {  # port -> median MB/s of the 100 MB download
  for _ in $(seq "$DOWNLOADS"); do
    curl -sS -o /dev/null -H 'Host: bench.example' -w '%{speed_download}\n' "http://127.0.0.1:$1/100mb"
  done | sort -n | awk '{v[NR]=$1} END {printf "%.1f\n", v[int((NR+1)/2)]/1e6}'
}

declare -A RPS MBPS
measure() { RPS[$1]=$(rps "$2"); MBPS[$1]=$(mbps "$2"); }

measure "backend, direct" "$backend"
start_core "";  measure "core-server" "$core"; stop_core
start_core 1;   measure "core-server, 1 thread" "$core"; stop_core
measure "nginx, 1 worker" "$nginx_proxy"
measure "haproxy, 1 thread" "$haproxy_port"

echo
echo "$(nproc) cores; wrk -t1 -c$CONNECTIONS -d${DURATION}s; median of $DOWNLOADS x 100 MB downloads with curl"
printf '%-24s %12s %12s\n' "" "requests/s" "MB/s"
for name in "backend, direct" "core-server" "core-server, 1 thread" "nginx, 1 worker" "haproxy, 1 thread"; do
  printf '%-24s %12s %12s\n' "$name" "${RPS[$name]}" "${MBPS[$name]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
echo
echo "core-server / nginx requests/s:            $(ratio "${RPS[core-server]}" "${RPS[nginx, 1 worker]}")  (1 thread: $(ratio "${RPS[core-server, 1 thread]}" "${RPS[nginx, 1 worker]}"); target >= 1.0)"
echo "core-server / haproxy MB/s:                $(ratio "${MBPS[core-server]}" "${MBPS[haproxy, 1 thread]}")  (1 thread: $(ratio "${MBPS[core-server, 1 thread]}" "${MBPS[haproxy, 1 thread]}"); target >= 0.9)"
