#!/usr/bin/env bash
# Reverse-tunnel throughput, side by side, in one run on this machine:
#   requests/s: wrk, keep-alive, a small response;   MB/s: curl, a 100 MB download.
# The same backend (nginx serving static content) sits behind each path:
#   core-server, plain proxy (add DOMAIN PORT);
#   core-server tunnel: core-agent --insecure-plaintext --connections 2 to the HTTP port;
#   core-server tunnel over TLS: core-agent --ca (mkcert) to the HTTPS port;
#   rathole 0.5.0 on its default TCP transport, nodelay;
#   nginx as a plain reverse proxy, one worker (as in proxy.sh): the issue's targets were set
#   from rathole's rate against nginx's (0.72x then), so the run shows that premise too.
# Clients always speak plain HTTP/1.1 to the front; only the agent's link differs.
# Prints the figures and the ratios rathole / nginx, tunnel / rathole (target >= 1.5, both) and tunnel / plain
# proxy requests/s (target >= 0.6), with what each path's forwarding processes spent (CPU
# microseconds per request and seconds per GB, user + system, from /proc/<pid>/stat): the
# worker for the plain proxy; the worker and the agent for a tunnel; rathole's server and
# client. Only loopback traffic; every load is bounded by DURATION or LIMIT. Stops only the
# processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}       # seconds of wrk load per path and round
CONNECTIONS=${CONNECTIONS:-64}
DOWNLOADS=${DOWNLOADS:-3}     # 100 MB downloads per path and round
[ "$DOWNLOADS" -ge 1 ] || { echo "DOWNLOADS must be 1 or more" >&2; exit 1; }
LIMIT=${LIMIT:-60}            # seconds any one download may take
AGENT_OPTIONS=${AGENT_OPTIONS:-}  # more core-agent options, for both agents (e.g. "--threads 2")

source bench/lib.sh
need nginx=nginx wrk=wrk curl=curl mkcert=mkcert
need_rathole
install_core_server core-agent

backend=$(free_port); http=$(free_port); https=$(free_port); udp=$(free_port)
ctl=$(free_port); visitor=$(free_port)
make_100mb
start_backend "$backend"

cleanup_hooks+=(show_err_logs_unless_finished)

# core-server, local mode (plaintext tunnels are served on its HTTP port in local mode only);
# certificates from mkcert with the bench's own CA, which the children (nobody) must read.
make_cert unused unused.bench   # mkcert makes the CA with its first certificate
[ "$(id -u)" != 0 ] || chown -R nobody "$work/caroot"
env CAROOT="$work/caroot" RUST_LOG=warn "$work/core-server" --mode local --http-port "$http" \
  --https-port "$https" --udp-port "$udp" --dir "$work/state" 2>>"$work/core.err" &
pids+=($!)
core_pid=$!
wait_port "$http"
add_route "$udp" plain.bench "$backend"

# allow DOMAIN: the token of a new tunnel for DOMAIN.
allow() {
  "$work/core-server" --udp-port "$udp" tunnel allow "$1" 2>>"$work/allow.err" ||
    { echo "core-server tunnel allow $1 failed" >&2; exit 1; }
}
# agent DOMAIN OPTIONS...: a core-agent serving DOMAIN from the backend.
declare -A agent_pid
agent() {
  local domain=$1 token; shift
  token=$(allow "$domain")
  CORE_AGENT_TOKEN=$token RUST_LOG=warn "$work/core-agent" "$domain" \
    --to "127.0.0.1:$backend" --connections 2 $AGENT_OPTIONS "$@" 2>>"$work/agent-$domain.err" &
  pids+=($!)
  agent_pid[$domain]=$!
}
agent tunnel.bench --insecure-plaintext --connect "127.0.0.1:$http"
agent tls.bench --connect "127.0.0.1:$https" --ca "$work/caroot/rootCA.pem"

# rathole: a server taking the visitors, a client dialing it and forwarding to the backend.
start_rathole "$ctl" "$visitor" "$ctl" "$backend"

nginx_port=$(free_port)
nginx_peer_conf "$backend" "127.0.0.1:$nginx_port"
nginx -c "$work/nginx.conf" 2>>"$work/nginx.err" &
pids+=($!)
nginx_pid=$!
wait_port "$nginx_port"

# Before measuring: every path answers with the backend's page.
declare -A port=([backend]=$backend [plain]=$http [tunnel]=$http [tls]=$http [rathole]=$visitor
  [nginx]=$nginx_port)
declare -A host=([backend]=plain.bench [plain]=plain.bench [tunnel]=tunnel.bench
  [tls]=tls.bench [rathole]=plain.bench [nginx]=plain.bench)
declare -A label=([backend]="backend, direct" [plain]="core-server proxy"
  [tunnel]="core-server tunnel" [tls]="core-server tunnel, TLS" [rathole]="rathole"
  [nginx]="nginx proxy, 1 worker")
paths=(backend plain tunnel tls rathole nginx)
for path in "${paths[@]}"; do
  wait_answering "${label[$path]}" "${port[$path]}" "${host[$path]}"
done

rps() {  # path -> "<requests/s> <requests>" (socket errors or non-2xx answers stop the script)
  local out
  out=$(timeout $((DURATION + LIMIT)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
    -H "Host: ${host[$1]}" "http://127.0.0.1:${port[$1]}/") ||
    { echo "${label[$1]}: wrk failed or timed out: $out" >&2; exit 1; }
  if grep -qE 'Socket errors|Non-2xx' <<<"$out"; then echo "${label[$1]}: $out" >&2; exit 1; fi
  awk '/requests in/ {n = $1} /Requests\/sec/ {r = $2}
       END {if (n > 0) print r, n; else {print "no request done" > "/dev/stderr"; exit 1}}' <<<"$out"
}
mbps() {  # path -> the MB/s of each of DOWNLOADS 100 MB downloads (one cut short stops the script)
  local ok size seconds
  for _ in $(seq "$DOWNLOADS"); do
    read -r ok size seconds <<<"$(transfer_100mb "${port[$1]}" "${host[$1]}" download)"
    [ "$ok" = 1 ] || { echo "${label[$1]}: a download was cut short ($size bytes)" >&2; exit 1; }
    awk -v b="$size" -v t="$seconds" 'BEGIN {printf "%.1f ", b / t / 1e6}'
  done
}

# forwarders PATH: the processes that carry PATH's requests between client and backend,
# whose CPU counts (none for the backend reached directly).
forwarders() {
  case $1 in
    plain) core_worker "$core_pid" ;;
    tunnel | tls) echo "$(core_worker "$core_pid") ${agent_pid[${host[$1]}]}" ;;
    rathole) echo "$rathole_pids" ;;
    nginx) pgrep -P "$nginx_pid" || true ;;
  esac
}
# cpu_per BEFORE AFTER UNITS SCALE: user + system CPU between two `cpu_ticks` readings per unit
# (a request, with SCALE 1e6: microseconds; a byte, with 1e9: seconds per GB).
cpu_per() {
  awk -v b="$1" -v a="$2" -v n="$3" -v s="$4" -v hz="$clock_ticks" \
    'BEGIN {split(b, x); split(a, y); printf "%.2f", (y[1] + y[2] - x[1] - x[2]) / hz * s / n}'
}

# ROUNDS rounds, every path in turn within a round (a drift in the machine's load hits all
# alike), the order rotated by one each round (each path runs first in one round of every
# six); the medians count, printed with their spread (min-max).
declare -A runs_rps runs_mbps cpu_rps cpu_mbps RPS MBPS SPREAD_RPS SPREAD_MBPS CPU_RPS CPU_MBPS
order=("${paths[@]}")
for round in $(seq "$ROUNDS"); do
  for path in "${order[@]}"; do
    serving=$(forwarders "$path")
    before=$(cpu_ticks $serving)
    out=$(rps "$path")
    read -r rate requests <<<"$out"
    runs_rps[$path]+="$rate "
    cpu_rps[$path]+="$(cpu_per "$before" "$(cpu_ticks $serving)" "$requests" 1e6) "
    before=$(cpu_ticks $serving)
    runs_mbps[$path]+="$(mbps "$path")"
    cpu_mbps[$path]+="$(cpu_per "$before" "$(cpu_ticks $serving)" $((DOWNLOADS * 100000000)) 1e9) "
    [ "$(forwarders "$path")" = "$serving" ] ||
      { echo "${label[$path]}: its processes changed during round $round" >&2; exit 1; }
  done
  echo "round $round of $ROUNDS done (order: ${order[*]})"
  order=("${order[@]:1}" "${order[0]}")
done
for path in "${paths[@]}"; do
  whole='{printf "%.0f %.0f %.0f", $1, $2, $3}'
  read -r RPS[$path] low high <<<"$(stats <<<"${runs_rps[$path]}" | awk "$whole")"
  SPREAD_RPS[$path]="$low-$high"
  read -r MBPS[$path] low high <<<"$(stats <<<"${runs_mbps[$path]}")"
  SPREAD_MBPS[$path]="$low-$high"
  CPU_RPS[$path]=-
  CPU_MBPS[$path]=-
  if [ -n "$(forwarders "$path")" ]; then
    CPU_RPS[$path]=$(stats <<<"${cpu_rps[$path]}" | cut -d' ' -f1)
    CPU_MBPS[$path]=$(stats <<<"${cpu_mbps[$path]}" | cut -d' ' -f1)
  fi
done
finished=1

echo
echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end; core-agent options: --connections 2 ${AGENT_OPTIONS}"
echo "medians of $ROUNDS rounds of wrk -t1 -c$CONNECTIONS -d${DURATION}s and of $DOWNLOADS x 100 MB curl downloads"
echo "CPU: user + system of the forwarding processes (worker; worker + agent; rathole's two;"
echo "nginx's worker)"
printf '%-26s %12s %18s %8s %10s %16s %8s\n' "" "requests/s" "spread (min-max)" "us/req" "MB/s" \
  "spread (min-max)" "s/GB"
for path in "${paths[@]}"; do
  printf '%-26s %12s %18s %8s %10s %16s %8s\n' "${label[$path]}" "${RPS[$path]}" \
    "${SPREAD_RPS[$path]}" "${CPU_RPS[$path]}" "${MBPS[$path]}" "${SPREAD_MBPS[$path]}" \
    "${CPU_MBPS[$path]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
echo
echo "rathole / nginx requests/s:       $(ratio "${RPS[rathole]}" "${RPS[nginx]}")  (MB/s: $(ratio "${MBPS[rathole]}" "${MBPS[nginx]}"); the issue's premise: 0.72 both)"
echo "tunnel / rathole requests/s:      $(ratio "${RPS[tunnel]}" "${RPS[rathole]}")  (TLS: $(ratio "${RPS[tls]}" "${RPS[rathole]}"); target >= 1.5)"
echo "tunnel / rathole MB/s:            $(ratio "${MBPS[tunnel]}" "${MBPS[rathole]}")  (TLS: $(ratio "${MBPS[tls]}" "${MBPS[rathole]}"); target >= 1.5)"
echo "tunnel / plain proxy requests/s:  $(ratio "${RPS[tunnel]}" "${RPS[plain]}")  (TLS: $(ratio "${RPS[tls]}" "${RPS[plain]}"); target >= 0.6)"
