#!/usr/bin/env bash
# A distant agent: a core-server tunnel and rathole, side by side, with the agent (rathole's
# client) a long round trip away from the proxy (rathole's server), in one run on this machine:
# 100 MB downloads and uploads, MB/s, with curl.
#
# The distance is `delay_link` (tests/src/delay_link.rs): a forwarder on loopback holding each
# direction RTT_MS/2 milliseconds, with at most 4 MiB in flight each way, as TCP would have
# (this kernel has no netem; it models no slow start or loss). Both the agent's connections and rathole's control and data
# channels cross it; clients and the backend (nginx) are next to their end.
# Prints the figures and the ratios tunnel / rathole. Only loopback traffic; every transfer is
# bounded by LIMIT. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
RTT_MS=${RTT_MS:-50}         # an even number of milliseconds: half goes each way
[ $((RTT_MS % 2)) = 0 ] || { echo "RTT_MS must be even" >&2; exit 1; }
TRANSFERS=${TRANSFERS:-2}     # 100 MB downloads and as many uploads per path and round
LIMIT=${LIMIT:-60}            # seconds any one transfer may take

source bench/lib.sh
need nginx=nginx curl=curl
need_rathole
install_core_server core-agent
# A debug build (its dependencies optimised, as for the tests) forwards far more than the
# link lets through; a release build of the tests' package would rebuild the others' crates.
cargo build -q -p core-server-tests --bin delay_link
cp target/debug/delay_link "$work/"

backend=$(free_port); http=$(free_port); https=$(free_port); udp=$(free_port)
ctl=$(free_port); visitor=$(free_port)
make_100mb
start_backend "$backend"
cleanup_hooks+=(show_err_logs_unless_finished)

# start_link TO: a new path RTT_MS long to 127.0.0.1:TO (its port, once it listens, in
# $work/link-TO: see link_port).
start_link() {
  "$work/delay_link" "127.0.0.1:$1" $((RTT_MS / 2)) >"$work/link-$1" 2>>"$work/delay_link.err" &
  pids+=($!)
}
link_port() {
  for _ in $(seq 50); do [ -s "$work/link-$1" ] && { cat "$work/link-$1"; return; }; sleep 0.1; done
  echo "delay_link to port $1 did not start" >&2; exit 1
}

RUST_LOG=info "$work/core-server" --mode local --http-port "$http" --https-port "$https" \
  --udp-port "$udp" --dir "$work/state" 2>>"$work/core.err" &
pids+=($!)
wait_port "$http"
token=$("$work/core-server" --udp-port "$udp" tunnel allow tunnel.bench 2>>"$work/allow.err")
start_link "$http"
start_link "$ctl"
link_http=$(link_port "$http")
link_ctl=$(link_port "$ctl")
CORE_AGENT_TOKEN=$token RUST_LOG=info "$work/core-agent" tunnel.bench --to "127.0.0.1:$backend" \
  --insecure-plaintext --connect "127.0.0.1:$link_http" 2>>"$work/agent.err" &
pids+=($!)

start_rathole "$ctl" "$visitor" "$link_ctl" "$backend"

declare -A port=([tunnel]=$http [rathole]=$visitor)
declare -A label=([tunnel]="core-server tunnel" [rathole]="rathole")
paths=(tunnel rathole)
for path in "${paths[@]}"; do
  wait_answering "${label[$path]}" "${port[$path]}" tunnel.bench
done

# transfers PATH download|upload: the MB/s of each of TRANSFERS transfers of 100 MB
# (`transfer_100mb`; one that did not go whole stops the script).
transfers() {
  local ok size seconds
  for _ in $(seq "$TRANSFERS"); do
    read -r ok size seconds <<<"$(transfer_100mb "${port[$1]}" tunnel.bench "$2")"
    [ "$ok" = 1 ] || { echo "${label[$1]}: a $2 did not go whole ($size bytes)" >&2; exit 1; }
    awk -v b="$size" -v t="$seconds" 'BEGIN {printf "%.1f ", b / t / 1e6}'
  done
}

declare -A runs_down runs_up
order=("${paths[@]}")
for round in $(seq "$ROUNDS"); do
  for path in "${order[@]}"; do
    runs_down[$path]+="$(transfers "$path" download)"
    runs_up[$path]+="$(transfers "$path" upload)"
  done
  echo "round $round of $ROUNDS done (order: ${order[*]})"
  order=("${order[@]:1}" "${order[0]}")
done
finished=1

echo
echo "$(nproc) cores; round trip ${RTT_MS} ms (delay_link, at most 4 MiB in flight each way)"
echo "medians of $ROUNDS rounds of $TRANSFERS x 100 MB curl downloads and uploads"
grep -o 'round trip [^)]*' "$work/agent.err" | head -1 | sed 's/^/core-agent: /' || true
grep -o 'round trip [^)]*' "$work/core.err" | head -1 | sed 's/^/worker:     /' || true
printf '%-22s %10s %16s %10s %16s\n' "" "download" "spread (min-max)" "upload" "spread (min-max)"
declare -A DOWN UP
for path in "${paths[@]}"; do
  read -r "DOWN[$path]" low_down high_down <<<"$(stats <<<"${runs_down[$path]}")"
  read -r "UP[$path]" low_up high_up <<<"$(stats <<<"${runs_up[$path]}")"
  printf '%-22s %10s %16s %10s %16s\n' "${label[$path]}" "${DOWN[$path]}" "$low_down-$high_down" \
    "${UP[$path]}" "$low_up-$high_up"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
echo
echo "tunnel / rathole download MB/s: $(ratio "${DOWN[tunnel]}" "${DOWN[rathole]}")"
echo "tunnel / rathole upload MB/s:   $(ratio "${UP[tunnel]}" "${UP[rathole]}")"
