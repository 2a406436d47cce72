#!/usr/bin/env bash
# Hot replacement under load: reruns core-server N times while clients send requests through
# it, then prints the failed requests of each load and the time from each rerun to the new
# instance owning the sockets (median and worst). The loads, all at once:
#   HTTP        wrk, keep-alive HTTP/1.1 on the HTTP port;
#   HTTPS       wrk, keep-alive HTTP/1.1 over TLS;
#   new TLS     h2load --h1, 'Connection: close' on every request: a TLS connection (a resumed
#               handshake) per request;
#   HTTP/2      h2load, multiplexed streams over TLS (reconnecting on each drain's GOAWAY).
# Local mode (certificates from mkcert, with a CA of the bench's own): a rerun is what an
# operator types, `core-server` again; it stays attached, so the script starts it in the
# background and times it until `core-server status` names it as the running instance.
# Only loopback traffic; every load is bounded by its duration. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

RERUNS=${RERUNS:-100}
PAUSE=${PAUSE:-0.1}            # seconds between reruns
CONNECTIONS=${CONNECTIONS:-16} # per load

source bench/lib.sh
need nginx=nginx wrk=wrk h2load=nghttp2-client mkcert=mkcert unshare=util-linux
install_core_server
name=bench.example
loopback_names "$name"
backend=$(free_port); http=$(free_port); https=$(free_port); udp=$(free_port)
core() { CAROOT="$work/caroot" RUST_LOG=warn "$work/core-server" --udp-port "$udp" "$@"; }
stop_core() { core stop >/dev/null 2>&1; }
cleanup_hooks+=(stop_core)

start_backend "$backend"
make_cert throwaway localhost   # makes the bench's CA
[ "$(id -u)" != 0 ] || chown -R nobody "$work/caroot"   # the children run as nobody

start=(--mode local --http-port "$http" --https-port "$https" --dir "$work/state")
running_pid() { core status 2>/dev/null | awk '/supervisor/ {print $3; exit}'; }
# rerun: starts an instance; returns once it owns the sockets (10 s at most).
rerun() {
  CAROOT="$work/caroot" RUST_LOG=warn "$work/core-server" --udp-port "$udp" "${start[@]}" \
    >>"$work/core.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1000); do
    [ "$(running_pid)" = "$pid" ] && return
    sleep 0.01
  done
  echo "core-server pid $pid did not take over within 10 s" >&2; tail "$work/core.log" >&2; exit 1
}
rerun
add_route "$udp" "$name" "$backend"
for _ in $(seq 50); do   # the first handshake has mkcert make the certificate
  curl -sf --max-time 1 --cacert "$work/caroot/rootCA.pem" --resolve "$name:$https:127.0.0.1" \
    -o /dev/null "https://$name:$https/" && break
  sleep 0.2
done

duration=$(awk -v n="$RERUNS" -v p="$PAUSE" 'BEGIN {printf "%d", n * (p + 0.3) + 5}')
url="https://$name:$https/"
wrk -t1 -c"$CONNECTIONS" -d"${duration}s" -H "Host: $name" "http://127.0.0.1:$http/" \
  > "$work/http.txt" & loads=($!)
with_hosts wrk -t1 -c"$CONNECTIONS" -d"${duration}s" "$url" > "$work/https.txt" & loads+=($!)
# (h2load -D never ends with 'Connection: close': rounds of a bounded count instead.)
new_tls() {
  local end=$(( $(date +%s) + duration ))
  while [ "$(date +%s)" -lt "$end" ]; do
    with_hosts h2load --h1 -n 500 -c"$CONNECTIONS" -H 'Connection: close' "$url"
  done
}
new_tls > "$work/new-tls.txt" & loads+=($!)
with_hosts h2load -D "$duration" -c"$CONNECTIONS" -m 10 "$url" > "$work/h2.txt" & loads+=($!)
pids+=("${loads[@]}")
sleep 1

: > "$work/handover-ms"
for i in $(seq "$RERUNS"); do
  t0=$(date +%s%N)
  rerun
  echo $(( ($(date +%s%N) - t0) / 1000000 )) >> "$work/handover-ms"
  sleep "$PAUSE"
done
wait "${loads[@]}"

wrk_line() {  # label file
  local requests errors non2xx
  requests=$(awk '/requests in/ {print $1}' "$2")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$2")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$2")
  printf '%-9s %9s requests, %s failed (socket errors %s, non-2xx %s)\n' "$1" "$requests" \
    "$(( ${errors:-0} + ${non2xx:-0} ))" "${errors:-0}" "${non2xx:-0}"
}
h2load_line() {  # label file: the sum of its runs
  awk -v label="$1" '/^requests:/ {gsub(",", ""); ok += $8; f += $10; e += $12; t += $14}
    END {printf "%-9s %9d requests, %d failed (failed %d, errored %d, timeout %d)\n", label, ok, f + e + t, f, e, t}' "$2"
}
sort -n "$work/handover-ms" > "$work/sorted"
median=$(awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}' "$work/sorted")
worst=$(tail -1 "$work/sorted")
echo
echo "$RERUNS reruns under load for ${duration}s, $CONNECTIONS connections per load ($(nproc) cores)"
wrk_line HTTP "$work/http.txt"
wrk_line HTTPS "$work/https.txt"
h2load_line "new TLS" "$work/new-tls.txt"
h2load_line HTTP/2 "$work/h2.txt"
echo "rerun to new instance: median ${median} ms, worst ${worst} ms"
echo "(h2load neither retries nor reconnects: it counts as failed the HTTP/2 streams a drain's"
echo " GOAWAY refuses, which RFC 9113 section 8.7 lets a client retry, as browsers do; nginx"
echo " reloads under the same h2load fail alike. tests/tests/rerun.rs, whose HTTP/2 client"
echo " resends only what was never sent, sees 0 failed.)"
