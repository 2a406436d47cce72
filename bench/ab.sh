#!/usr/bin/env bash
# This tree's core-server against an earlier commit's, in one run: plain-HTTP keep-alive
# requests/s through each, ROUNDS times in turn (so a drift in the machine's load hits both
# alike), medians and their ratio. For telling what a change costs or gains.
#   bench/ab.sh REV        e.g. bench/ab.sh 9c8f458
# REV is built in a temporary worktree with its own target directory (target/ab, kept, so a
# second run only rebuilds what changed). Only loopback traffic; every load is bounded by
# DURATION. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."

REV=${1:?usage: bench/ab.sh REV}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-64}

source bench/lib.sh
need nginx=nginx wrk=wrk
install_core_server
mkdir -p "$work/new" "$work/old"
mv "${binaries[@]/#/$work/}" "$work/new/"

tree="$work/tree"
git worktree add -q --detach "$tree" "$REV"
remove_tree() { git worktree remove --force "$tree"; }
cleanup_hooks+=(remove_tree)
repo=$PWD
# An earlier revision may predate the ACME helper (then its supervisor starts none).
(cd "$tree" && cargo build --release -q --bins --target-dir "$repo/target/ab")
for binary in "${binaries[@]}"; do
  if [ -e "target/ab/release/$binary" ]; then cp "target/ab/release/$binary" "$work/old/"; fi
done
chmod 755 "$work/new" "$work/old"

backend=$(free_port)
start_backend "$backend"


rps() {  # which (old|new) -> requests/s through a fresh instance of it
  local bin=$work/$1 http udp pid
  http=$(free_port); udp=$(free_port)
  rm -rf "$work/state"
  RUST_LOG=warn "$bin/core-server" --http-port "$http" --https-port "$(free_port)" \
    --udp-port "$udp" --dir "$work/state" 2>>"$work/core-$1.err" &
  pid=$!; pids+=($pid)
  wait_port "$http"
  for _ in $(seq 50); do
    "$bin/core-server" --udp-port "$udp" add bench.example "$backend" >/dev/null 2>&1 && break
    sleep 0.1
  done
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H 'Host: bench.example' "http://127.0.0.1:$http/" |
    awk '/Requests\/sec/ {print $2}'
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

declare -a OLD NEW
for round in $(seq "$ROUNDS"); do
  OLD+=("$(rps old)"); NEW+=("$(rps new)")
  echo "round $round: $REV ${OLD[-1]}, this tree ${NEW[-1]}"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
old=$(median "${OLD[@]}"); new=$(median "${NEW[@]}")
echo
echo "$(nproc) cores; wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds in turn; medians"
echo "$REV: $old requests/s;  this tree ($(git rev-parse --short HEAD)): $new requests/s"
awk -v a="$new" -v b="$old" 'BEGIN {printf "this tree / %s: %.2f\n", "'"$REV"'", a/b}'
