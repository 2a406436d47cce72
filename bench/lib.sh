# Shared by the bench scripts: tools, a work directory cleaned up on exit, free ports.
# Every process a script starts goes into `pids`; only those are stopped.

# need TOOL=PACKAGE...: installs the Debian packages of the tools that are missing.
need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

# The release binaries, copied into $work where an unprivileged worker can execute them.
work=$(mktemp -d /tmp/core-server-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup_hooks=()
cleanup() {
  local hook pid
  for hook in "${cleanup_hooks[@]}"; do $hook || true; done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A cleanup hook: when the script stops short (it never set finished=1), what the servers said
# in their $work/*.err logs, before the work directory goes.
show_err_logs_unless_finished() {
  local log
  [ -z "${finished:-}" ] || return 0
  for log in "$work"/*.err; do
    [ -s "$log" ] && { echo; echo "== ${log##*/} (last 10 lines)"; tail -n 10 "$log"; }
  done
  return 0
}

binaries=(core-server core-server-worker core-server-acme)
# install_core_server [PACKAGE...]: builds them with the core-server binaries in ONE cargo build
# (two builds of different package sets unify features differently and rebuild each other's
# binaries every run) and copies them all into $work.
install_core_server() {
  cargo build --release -q "${binaries[@]/#/-p}" "${@/#/-p}"
  cp "${binaries[@]/#/target/release/}" "${@/#/target/release/}" "$work/"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT: until something listens on 127.0.0.1:PORT (10 s at most).
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

# start_backend PORT: the app behind every proxy, nginx answering "hello from the backend"
# with two workers, so it is never the bottleneck; returns once it listens.
start_backend() {
  cat > "$work/backend.conf" <<CONF
worker_processes 2; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$1; root $work; location = / { return 200 "hello from the backend\n"; } } }
CONF
  nginx -c "$work/backend.conf" & pids+=($!)
  wait_port "$1"
}

# add_route UDP DOMAIN PORT: routes DOMAIN on the core-server listening for commands on UDP,
# retrying while it starts (5 s at most).
add_route() {
  for _ in $(seq 50); do
    "$work/core-server" --udp-port "$1" add "$2" "$3" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "core-server on UDP port $1 did not accept 'add $2 $3'" >&2; exit 1
}

# make_cert NAME HOST...: an ECDSA P-256 certificate for the HOSTs from mkcert, signed by the
# bench's own CA in $work/caroot (made on first use, trusted by nothing else):
# $work/NAME.pem (certificate), $work/NAME-key.pem (PKCS#8 key).
make_cert() {
  local name=$1; shift
  CAROOT="$work/caroot" mkcert -ecdsa -cert-file "$work/$name.pem" -key-file "$work/$name-key.pem" \
    "$@" >>"$work/mkcert.log" 2>&1 || { cat "$work/mkcert.log" >&2; exit 1; }
}

# loopback_names NAME...: the names that with_hosts resolves to 127.0.0.1.
loopback_names() { { cat /etc/hosts; echo "127.0.0.1 $*"; } > "$work/hosts"; }

# with_hosts CMD...: runs CMD in a mount namespace of its own where /etc/hosts also holds the
# loopback_names, so that a client without a --resolve option (wrk) connects to 127.0.0.1 and
# sends the name as SNI. The machine's /etc/hosts is left as it is.
with_hosts() { unshare --mount sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$work/hosts" "$@"; }


# rathole on PATH (cargo install puts it in ~/.cargo/bin); its 0.5.0 builds without --locked.
need_rathole() {
  PATH=$PATH:$HOME/.cargo/bin
  command -v rathole >/dev/null || cargo install rathole
}

# need_debian_python MODULE=PACKAGE...: installs the Debian packages of the Python modules that
# Debian's own interpreter cannot import; run such scripts with /usr/bin/python3 (Debian's
# packages install for it, whatever python3 comes first on PATH).
need_debian_python() {
  local missing=() pair
  for pair in "$@"; do
    /usr/bin/python3 -c "import ${pair%%=*}" 2>/dev/null || missing+=("${pair#*=}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 "${missing[@]}"
  fi
}
