#!/usr/bin/env bash
# Certificates on demand, side by side, in one run on this machine, against one real ACME CA
# (pebble, with pebble-challtestsrv as its DNS, answering 127.0.0.1 for every name):
#   first request   time of curl's first HTTPS request for a name new to the server: the
#                   handshake waits for the whole ACME order (the median of NAMES names; the
#                   server's first name, which also registers its ACME account, apart);
#   second request  the next one for the same name, on a new connection: a stored certificate;
#   50 at once      50 concurrent first handshakes for one new name (h2load -c 50): how many
#                   succeed, and how many orders the CA received (the target is exactly 1).
# Through core-server (release mode) and Caddy (on_demand_tls with `ask`, acme_ca set to the
# same pebble), one after the other on the same ports (pebble validates on them). Prints the
# figures and the ratio core-server / Caddy of the first request.
# Only loopback traffic; every wait and load is bounded in count and time. Stops only the
# processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

NAMES=${NAMES:-5}      # new names per server, each asked for twice
BURST=${BURST:-50}     # concurrent first handshakes for one name
LIMIT=${LIMIT:-30}     # seconds any one request (or the burst) may take
SERVERS=${SERVERS:-"core-server caddy"}   # a subset, to iterate faster

source bench/lib.sh
need nginx=nginx caddy=caddy pebble=pebble pebble-challtestsrv=pebble mkcert=mkcert curl=curl \
  h2load=nghttp2-client
install_core_server

http=$(free_port); https=$(free_port); acme=$(free_port); acme_admin=$(free_port)
dns=$(free_port); dns_admin=$(free_port); backend=$(free_port); ask=$(free_port)
show_logs() {  # when the script stops short: what the servers said
  local log
  [ -z "${finished:-}" ] || return 0
  for log in "$work"/*.err "$work"/*.log "$work"/core/logs/core.log; do
    [ -s "$log" ] && { echo; echo "== ${log#"$work"/} (last 10 lines)"; tail -n 10 "$log"; }
  done
  return 0
}
cleanup_hooks+=(show_logs)

# wait_closed PORT: until nothing listens on 127.0.0.1:PORT any more (10 s at most).
wait_closed() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0; sleep 0.1; done
  echo "port $1 still open" >&2; exit 1
}

start_backend "$backend"

# The `ask` endpoint Caddy consults before an on-demand order: names of the bench's zone only,
# as core-server orders only for routed names.
cat > "$work/ask.conf" <<CONF
worker_processes 1; daemon off; pid $work/ask.pid; error_log $work/ask.err;
events { worker_connections 1024; }
http { access_log off;
  server { listen 127.0.0.1:$ask;
    location = /ask { if (\$arg_domain ~ "\\.ondemand\\.test\$") { return 200; } return 404; } } }
CONF
nginx -c "$work/ask.conf" & pids+=($!)

# The CA. Debian's pebble ships no certificate for its own listener: one from mkcert, whose
# root the ACME clients trust for the CA's API (not for the certificates it issues).
make_cert pebble-listener 127.0.0.1 localhost
cat > "$work/pebble.json" <<JSON
{"pebble": {"listenAddress": "127.0.0.1:$acme", "managementListenAddress": "127.0.0.1:$acme_admin",
  "certificate": "$work/pebble-listener.pem", "privateKey": "$work/pebble-listener-key.pem",
  "httpPort": $http, "tlsPort": $https, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
JSON
pebble-challtestsrv -dns01 "127.0.0.1:$dns" -http01 "" -https01 "" -tlsalpn01 "" -defaultIPv6 "" \
  -management "127.0.0.1:$dns_admin" > "$work/challtestsrv.log" 2>&1 & pids+=($!)
wait_port "$dns_admin"
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0 \
  pebble -config "$work/pebble.json" -dnsserver "127.0.0.1:$dns" > "$work/pebble.log" 2>&1 & pids+=($!)
wait_port "$acme"; wait_port "$acme_admin"
directory=https://127.0.0.1:$acme/dir
listener_root=$work/caroot/rootCA.pem
# What pebble issues chains to: a root it makes at each start, the only one curl trusts here.
curl -sS --max-time 5 --cacert "$listener_root" "https://127.0.0.1:$acme_admin/roots/0" > "$work/issuing-root.pem"

orders() { grep -c '^Pebble .* Added order' "$work/pebble.log" || true; }

# seconds NAME: time_total of one HTTPS request for NAME (a new curl, so a new connection),
# checked: the backend's body under a certificate of pebble's; "failed" otherwise.
seconds() {
  local out
  out=$(curl -sS --max-time "$LIMIT" --cacert "$work/issuing-root.pem" \
    --resolve "$1:$https:127.0.0.1" -w '\n%{time_total}' "https://$1:$https/" 2>>"$work/curl.err") &&
    [[ $out == "hello from the backend"* ]] && { tail -n 1 <<<"$out"; return; }
  echo failed
}

# measure WHO ALLOW: the figures for one server; ALLOW NAME readies a name (core-server: `add`).
declare -A account first second burst_ok burst_orders
measure() {
  local who=$1 allow=$2 i name times_first='' times_second='' before out
  name=account-$who.ondemand.test; $allow "$name"
  account[$who]=$(seconds "$name")
  if [ "${account[$who]}" = failed ]; then   # no certificate at all: nothing more to time
    { echo "$who: no HTTPS answer for $name: $(tail -n 1 "$work/curl.err")"
      grep -hsE ' (WARN|ERROR) ' "$work/core/logs/core.log" "$work/caddy.log" | tail -n 3 || true
    } >&2
    burst_orders[$who]=none; return
  fi
  for i in $(seq "$NAMES"); do
    name=name-$i-$who.ondemand.test; $allow "$name"
    times_first+="$(seconds "$name") "
    times_second+="$(seconds "$name") "
  done
  first[$who]=$times_first; second[$who]=$times_second
  name=burst-$who.ondemand.test; $allow "$name"
  before=$(orders)
  out=$(timeout "$LIMIT" h2load -n "$BURST" -c "$BURST" -m 1 --h1 --connect-to "127.0.0.1:$https" \
    "https://$name:$https/" 2>&1) || true
  burst_ok[$who]=$(awk '/^status codes:/ {print $3}' <<<"$out")
  burst_orders[$who]=$(( $(orders) - before ))
  [ "$(seconds "$name")" != failed ] || burst_ok[$who]="${burst_ok[$who]} (then a checked request failed)"
}

# core-server, release mode, in the foreground, its ACME helper trusting pebble's listener.
run_core-server() {
udp=$(free_port)
RUST_LOG=info "$work/core-server" --mode release --foreground --http-port "$http" --https-port "$https" \
  --udp-port "$udp" --dir "$work/core" --acme-directory "$directory" --acme-ca-root "$listener_root" \
  2>>"$work/core.err" &
core_pid=$!; pids+=($core_pid)
wait_port "$https"
core_allow() { add_route "$udp" "$1" "$backend"; }
measure core-server core_allow
kill "$core_pid"; wait "$core_pid" 2>/dev/null || true
wait_closed "$https"; wait_closed "$http"
}

# Caddy on the same ports: on-demand TLS for the names `ask` allows, the same pebble as CA.
run_caddy() {
mkdir -p "$work/caddy"
cat > "$work/Caddyfile" <<CONF
{
	admin off
	http_port $http
	https_port $https
	storage file_system {
		root $work/caddy/data
	}
	acme_ca $directory
	acme_ca_root $listener_root
	on_demand_tls {
		ask http://127.0.0.1:$ask/ask
	}
}
https:// {
	tls {
		on_demand
	}
	reverse_proxy 127.0.0.1:$backend
}
CONF
HOME=$work/caddy XDG_CONFIG_HOME=$work/caddy/config XDG_DATA_HOME=$work/caddy/data \
  caddy run --config "$work/Caddyfile" --adapter caddyfile > "$work/caddy.log" 2>&1 &
pids+=($!)
wait_port "$https"
caddy_allow() { :; }   # `ask` allows the zone
measure caddy caddy_allow
}

for who in $SERVERS; do "run_$who"; done

median() { tr ' ' '\n' | grep -E '^[0-9.]+$' | sort -g | awk '{v[NR] = $1} END {if (NR) printf "%.3f", v[int((NR + 1) / 2)]; else print "none"}'; }
echo
echo "$(nproc) cores; pebble (PEBBLE_VA_NOSLEEP=1), one per run; times in seconds (curl time_total)"
printf '%-14s %22s %22s %24s %20s\n' "" "first, with account" "first (median)" "second (median)" "$BURST at once"
for who in $SERVERS; do
  printf '%-14s %22s %22s %24s %20s\n' "$who" "${account[$who]}" "$(median <<<"${first[$who]:-}")" \
    "$(median <<<"${second[$who]:-}")" "${burst_ok[$who]:-0} ok, ${burst_orders[$who]} orders"
  echo "               first: ${first[$who]:-}  second: ${second[$who]:-}"
done
if [ "$SERVERS" = "core-server caddy" ]; then
  echo
  awk -v a="$(median <<<"${first[core-server]:-}")" -v b="$(median <<<"${first[caddy]:-}")" 'BEGIN {
    if (a + 0 > 0 && b + 0 > 0) printf "first request, core-server / Caddy: %.2f  (core-server %.3f s; target <= 0.3 s)\n", a / b, a }'
  echo "orders for $BURST concurrent first handshakes: core-server ${burst_orders[core-server]}, Caddy ${burst_orders[caddy]} (target: exactly 1)"
fi
finished=1
