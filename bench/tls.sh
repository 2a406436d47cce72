#!/usr/bin/env bash
# HTTPS throughput, side by side, in one run on this machine:
#   keep-alive requests/s   wrk, HTTP/1.1 over TLS, CONNECTIONS connections held open;
#   new handshakes/s        h2load, HANDSHAKES clients of one request each: full handshakes;
#   resumed handshakes/s    h2load, 'Connection: close' on every request: each reconnection
#                           resumes the client's session (a ticket);
#   HTTP/2 requests/s       h2load, H2_CLIENTS connections of H2_STREAMS concurrent streams.
# Through core-server (local mode: its certificate from mkcert; with ONE worker runtime thread,
# the column the targets apply to, and with its default threads, informational), nginx (1
# worker) and haproxy (1 thread), every one with an ECDSA P-256 certificate of the same mkcert
# CA, TLS 1.2 and 1.3, ALPN h2 and http/1.1, and the same nginx backend. ROUNDS rounds, every
# server in turn for each load within a round, the order rotated each round (a drift in the
# machine's load hits all alike); per load and server: the median, the spread (min-max) and
# CPU per request (user and system microseconds of the serving processes only, from
# /proc/<pid>/stat; see bench/README.md); then the ratios core-server / the better of nginx
# and haproxy, next to the targets of issues 8 and 10.
# VARIANT=DIR also measures the core-server binaries in DIR, e.g. a scratch build with another
# rustls crypto provider, and prints the ratios variant / core-server.
# Only loopback traffic; every load is bounded in count or duration and by LIMIT seconds.
# Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}           # seconds of wrk load per measurement
CONNECTIONS=${CONNECTIONS:-64}
HANDSHAKES=${HANDSHAKES:-1000}    # new connections per measurement, all opened at once
RESUMED=${RESUMED:-5000}          # requests (so reconnections) per resumed measurement
H2_REQUESTS=${H2_REQUESTS:-100000}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-32}
LIMIT=${LIMIT:-60}                # seconds any one load may take before it counts as failed
VARIANT=${VARIANT:-}
# Which to measure (a subset, to iterate faster).
SERVERS=${SERVERS:-"core-server-1t nginx haproxy core-server${VARIANT:+ variant}"}
METRICS=${METRICS:-"keepalive handshakes resumed multiplexed"}

source bench/lib.sh
need nginx=nginx haproxy=haproxy wrk=wrk h2load=nghttp2-client mkcert=mkcert curl=curl \
  openssl=openssl unshare=util-linux
ulimit -n "$(ulimit -Hn)"   # HANDSHAKES connections at once need the descriptors
install_core_server

name=bench.example
loopback_names "$name"
backend=$(free_port)
port=([core-server]=$(free_port) [core-server-1t]=$(free_port) [nginx]=$(free_port)
  [haproxy]=$(free_port) [variant]=$(free_port))
label=([core-server]="core-server, default" [core-server-1t]="core-server, 1 thread"
  [nginx]="nginx, 1 worker" [haproxy]="haproxy, 1 thread" [variant]="variant")
cleanup_hooks+=(show_err_logs_unless_finished)

start_backend "$backend"
# nginx and haproxy share one certificate and key; core-server makes its own with the same
# mkcert and CA (its helper runs mkcert as the children's user, so that user reads the CA).
make_cert peer "$name"
cat "$work/peer.pem" "$work/peer-key.pem" > "$work/peer-haproxy.pem"
[ "$(id -u)" != 0 ] || chown -R nobody "$work/caroot"   # the children run as nobody

# nginx and haproxy as TLS-terminating reverse proxies (lib.sh). TLS 1.3 is not in nginx
# 1.22's default protocols: named here, as in every distribution's nginx.conf.
nginx_peer_conf "$backend" "127.0.0.1:${port[nginx]} ssl http2 backlog=4096" \
  "ssl_certificate $work/peer.pem; ssl_certificate_key $work/peer-key.pem; ssl_protocols TLSv1.2 TLSv1.3;"
haproxy_peer_conf "$backend" \
  "127.0.0.1:${port[haproxy]} ssl crt $work/peer-haproxy.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2" \
  "http-request set-header X-Forwarded-Proto https"

# core-server, local mode: certificates from mkcert, with the bench's CA. Several instances,
# idle but for the one measured: default threads, one thread, the variant.
if [ -n "$VARIANT" ]; then
  mkdir -m 755 "$work/variant-bin"
  cp "${binaries[@]/#/$VARIANT/}" "$work/variant-bin/"
fi
export CAROOT="$work/caroot"   # core-server's helper makes its certificates with mkcert from it
start_core() {  # which threads [binaries]
  local udp
  udp=$(free_port)
  start_core_server "$1" "$2" "${3:-$work}" --mode local --http-port "$(free_port)" \
    --https-port "${port[$1]}" --udp-port "$udp" --dir "$work/state-$1"
  wait_port "${port[$1]}"
  add_route "$udp" "$name" "$backend"
}

for server in $SERVERS; do
  case $server in
    nginx) start_peer nginx nginx nginx -c "$work/nginx.conf" ;;
    haproxy) start_peer haproxy haproxy haproxy -f "$work/haproxy.cfg" -db ;;
    core-server) start_core core-server "" ;;
    core-server-1t) start_core core-server-1t 1 ;;
    variant) start_core variant "" "$work/variant-bin" ;;
  esac
done

# Before measuring: each answers over HTTP/2 and HTTP/1.1 with the backend's body and a
# certificate the mkcert CA vouches for (core-server's first handshake has mkcert make one:
# waited for, 10 s at most), an ECDSA P-256 key; prints what each negotiates with h2load, and
# whether openssl's session resumes.
https_get() {  # port, curl options...
  local p=$1; shift
  curl -sS --max-time 5 --cacert "$work/caroot/rootCA.pem" --resolve "$name:$p:127.0.0.1" \
    "$@" "https://$name:$p/"
}
s_client() {  # port, options...: a whole request (the TLS 1.3 tickets come after the handshake)
  local p=$1; shift
  printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$name" |
    timeout 10 openssl s_client -connect "127.0.0.1:$p" -servername "$name" -ign_eof "$@" 2>/dev/null
}
for server in $SERVERS; do
  p=${port[$server]}
  wait_port "$p"
  for _ in $(seq 50); do https_get "$p" --max-time 1 -o /dev/null 2>/dev/null && break; sleep 0.2; done
  for version in --http2 --http1.1; do
    body=$(https_get "$p" "$version" -w ' %{http_version}')
    [[ $body == "hello from the backend"* ]] || { echo "${label[$server]} $version: '$body'" >&2; exit 1; }
  done
  key=$(openssl s_client -connect "127.0.0.1:$p" -servername "$name" </dev/null 2>/dev/null |
    openssl x509 -noout -text | awk '/ASN1 OID/ {print $3}')
  [ "$key" = prime256v1 ] || { echo "${label[$server]} serves a '$key' key, not P-256" >&2; exit 1; }
  resumes=$(s_client "$p" -sess_out "$work/session" >/dev/null &&
    s_client "$p" -sess_in "$work/session" | awk -F, '/^(New|Reused),/ {print $1}')
  printf '%-24s %s %s\n' "${label[$server]}:" "$(timeout "$LIMIT" h2load -n 1 --connect-to "127.0.0.1:$p" \
    "https://$name:$p/" | awk '/^TLS Protocol|^Cipher|^Server Temp Key|^Application protocol/' |
    paste -sd ' ')" "session: ${resumes:-none}"
done

# Each measurement prints "<rate> <requests done> <failed requests>" (lib.sh's measure); a load
# cut short by LIMIT prints "0 0 all".
keepalive() {
  wrk_figures with_hosts timeout "$LIMIT" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "https://$name:$1/"
}
h2load_run() {  # port, h2load options...
  local p=$1 out; shift
  out=$(timeout "$LIMIT" h2load --connect-to "127.0.0.1:$p" "$@" "https://$name:$p/") ||
    { echo "0 0 all"; return; }
  awk '/^finished in/ {rps = $4} /^requests:/ {total = $2} /^status codes:/ {ok = $3}
       END {printf "%.0f %d %d\n", rps, ok, total - ok}' <<<"$out"
}
handshakes() { h2load_run "$1" -n "$HANDSHAKES" -c "$HANDSHAKES" -m 1 --h1; }
resumed() { h2load_run "$1" -n "$RESUMED" -c "$CONNECTIONS" -m 1 --h1 -H 'Connection: close'; }
multiplexed() { h2load_run "$1" -n "$H2_REQUESTS" -c "$H2_CLIENTS" -m "$H2_STREAMS"; }

heading=([keepalive]="HTTPS keep-alive requests/s (wrk -t1 -c$CONNECTIONS -d${DURATION}s, HTTP/1.1)"
  [handshakes]="new handshakes/s (h2load -n $HANDSHAKES -c $HANDSHAKES -m 1 --h1: one request per connection)"
  [resumed]="resumed handshakes/s (h2load -n $RESUMED -c $CONNECTIONS -m 1 --h1 -H 'Connection: close')"
  [multiplexed]="HTTP/2 requests/s (h2load -n $H2_REQUESTS -c $H2_CLIENTS -m $H2_STREAMS)")
cpu_per=([keepalive]=us/request [handshakes]=us/request [resumed]=us/request [multiplexed]=us/request)
versus=([keepalive]=best [handshakes]=best [resumed]=best [multiplexed]=best)
target=([keepalive]=">= 1.0, issues 8 and 10" [handshakes]=">= 1.0, issue 8" [resumed]=">= 1.0, issue 8"
  [multiplexed]=">= 1.0, issues 8 and 10")

echo
print_versions wrk h2load nginx haproxy curl openssl
print_settings ROUNDS DURATION CONNECTIONS HANDSHAKES RESUMED H2_REQUESTS H2_CLIENTS H2_STREAMS LIMIT SERVERS METRICS
print_servers $SERVERS
run_rounds "$SERVERS" "$METRICS"
echo
echo "Medians of $ROUNDS rounds; ECDSA P-256 certificates from one mkcert CA; CPU of the serving"
echo "processes only (2 cores shared by load generator, proxy and backend: see bench/README.md)."
print_results "$SERVERS" "$METRICS"

# variant / core-server, per measurement.
variant_ratios() {
  local metric
  echo
  for metric in $METRICS; do
    printf '%-22s variant / core-server: %.2f\n' "$metric" \
      "$(awk -v a="$(median_of "variant.$metric")" -v b="$(median_of "core-server.$metric")" 'BEGIN {print a / b}')"
  done
}
[[ " $SERVERS " != *" variant "* || " $SERVERS " != *" core-server "* ]] || variant_ratios
finished=1
