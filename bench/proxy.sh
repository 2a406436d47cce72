#!/usr/bin/env bash
# Plain-HTTP proxy speed at equal CPU, side by side, in one run on this machine:
#   keep-alive   wrk -t1 -c$CONNECTIONS -d$DURATION, a small response, connections reused;
#   close        the same with 'Connection: close': a new connection for every request. wrk
#                rather than h2load: the same client and the same duration-bound load as
#                keep-alive, so the two differ in that header only. Neither was the steadier
#                here (5 alternate 3 s runs through haproxy: wrk 19k-39k, h2load -n 17k-33k
#                requests/s: the spread is the other work on the 2 cores, hence the rounds);
#   download     DOWNLOADS x 100 MB with curl, MB/s over their total time;
#   upload       DOWNLOADS x 100 MB PUT with curl to the backend, which stores the body whole in
#                memory and answers only then (so the time is the body's crossing), each upload
#                checked: 201/204 and 100,000,000 bytes arrived at the backend.
# Through core-server with ONE worker runtime thread ("core-server, 1 thread", the one the
# targets apply to), nginx (1 worker) and haproxy (1 thread), and core-server with its default
# threads (one per CPU: informational), all in front of the same nginx backend (lib.sh's
# start_backend). ROUNDS rounds, every server in turn for each load within a round, the order
# rotated each round (a drift of the machine's load hits all alike); per load and server: the median, the spread (min-max),
# CPU per request (user and system microseconds, of the serving processes only, from
# /proc/<pid>/stat) or CPU seconds per GB for the transfers; then the ratios core-server / the
# better of nginx and haproxy (requests/s) and / haproxy (MB/s), next to issue 10's targets.
# SERVERS picks columns among core-server-1t nginx haproxy core-server backend (the backend
# directly, no proxy: the ceiling). Only loopback traffic; every load is bounded in time
# (wrk -d and timeout, curl --max-time). Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}          # seconds of each wrk load
CONNECTIONS=${CONNECTIONS:-64}
DOWNLOADS=${DOWNLOADS:-5}         # 100 MB transfers each way per server and round
LIMIT=${LIMIT:-$((DURATION + 30))}  # seconds any one wrk run or transfer may take
SERVERS=${SERVERS:-"core-server-1t nginx haproxy core-server"}
METRICS=${METRICS:-"keepalive close download upload"}

source bench/lib.sh
need nginx=nginx haproxy=haproxy wrk=wrk curl=curl
install_core_server
cleanup_hooks+=(show_err_logs_unless_finished)

name=bench.example
backend=$(free_port)
port=([core-server-1t]=$(free_port) [core-server]=$(free_port) [nginx]=$(free_port)
  [haproxy]=$(free_port) [backend]=$backend)
label=([core-server-1t]="core-server, 1 thread" [core-server]="core-server, default"
  [nginx]="nginx, 1 worker" [haproxy]="haproxy, 1 thread" [backend]="backend, direct")
make_100mb

start_backend "$backend"
kind[backend]=nginx main_pid[backend]=${pids[-1]}

# nginx (1 worker) and haproxy (1 thread) as reverse proxies (lib.sh).
nginx_peer_conf "$backend" "127.0.0.1:${port[nginx]} backlog=4096"
haproxy_peer_conf "$backend" "127.0.0.1:${port[haproxy]}"

# start_core SERVER THREADS: a core-server (plain HTTP on the column's port) routing $name to
# the backend.
start_core() {
  local udp
  udp=$(free_port)
  start_core_server "$1" "$2" "$work" --http-port "${port[$1]}" --https-port "$(free_port)" \
    --udp-port "$udp" --dir "$work/state-$1"
  wait_port "${port[$1]}"
  add_route "$udp" "$name" "$backend"
}
for server in $SERVERS; do
  case $server in
    core-server-1t) start_core core-server-1t 1 ;;
    core-server) start_core core-server "" ;;
    nginx) start_peer nginx nginx nginx -c "$work/nginx.conf" ;;
    haproxy) start_peer haproxy haproxy haproxy -f "$work/haproxy.cfg" -db ;;
    backend) ;;
    *) echo "unknown server '$server'" >&2; exit 1 ;;
  esac
done

# Before measuring: each answers with the backend's body and takes an upload whole; a short
# keep-alive load warms each up (first connections, allocator).
for server in $SERVERS; do
  p=${port[$server]}
  wait_port "$p"
  body=$(curl -sS --max-time 5 -H "Host: $name" "http://127.0.0.1:$p/")
  [ "$body" = "hello from the backend" ] || { echo "${label[$server]}: '$body'" >&2; exit 1; }
  timeout 10 wrk -t1 -c"$CONNECTIONS" -d1s -H "Host: $name" "http://127.0.0.1:$p/" >/dev/null
done

# Each load prints "<rate> <units done> <failures>" (lib.sh's measure).
wrk_load() {  # port, wrk options...
  local p=$1; shift
  wrk_figures timeout "$LIMIT" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H "Host: $name" "$@" \
    "http://127.0.0.1:$p/"
}
keepalive() { wrk_load "$1"; }
close() { wrk_load "$1" -H 'Connection: close'; }
# transfers PORT download|upload: DOWNLOADS transfers of 100 MB (`transfer_100mb`); MB/s over
# their total time, bytes moved, and how many failed.
transfers() {
  local ok size seconds bytes=0 total=0 fails=0
  for _ in $(seq "$DOWNLOADS"); do
    read -r ok size seconds <<<"$(transfer_100mb "$1" "$name" "$2")"
    if [ "$ok" = 1 ]; then
      bytes=$((bytes + size)); total=$(awk -v a="$total" -v b="$seconds" 'BEGIN {print a + b}')
    else
      fails=$((fails + 1))
    fi
  done
  awk -v b="$bytes" -v t="$total" -v f="$fails" 'BEGIN {printf "%.1f %.0f %d\n", (t > 0 ? b / t / 1e6 : 0), b, f}'
}
download() { transfers "$1" download; }
upload() { transfers "$1" upload; }

heading=([keepalive]="keep-alive requests/s (wrk -t1 -c$CONNECTIONS -d${DURATION}s)"
  [close]="new connection per request, requests/s (wrk -t1 -c$CONNECTIONS -d${DURATION}s -H 'Connection: close')"
  [download]="100 MB download MB/s (curl, $DOWNLOADS per round)"
  [upload]="100 MB upload MB/s (curl -T, PUT, $DOWNLOADS per round)")
cpu_per=([keepalive]=us/request [close]=us/request [download]=s/GB [upload]=s/GB)
versus=([keepalive]=best [close]=best [download]=haproxy [upload]=haproxy)
target=([keepalive]=">= 1.0, goal 1.2" [close]=">= 1.0" [download]=">= 1.0" [upload]=">= 1.0")

echo
print_versions wrk nginx haproxy curl
print_settings ROUNDS DURATION CONNECTIONS DOWNLOADS LIMIT SERVERS METRICS
print_servers $SERVERS
run_rounds "$SERVERS" "$METRICS"
echo
echo "Medians of $ROUNDS rounds; CPU of the serving processes only, per request or per GB moved"
echo "(2 cores shared by load generator, proxy and backend: see bench/README.md)."
print_results "$SERVERS" "$METRICS"
finished=1
