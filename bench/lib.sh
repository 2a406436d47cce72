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

# make_100mb: $work/100mb, 100 MB of zeros: what the backend serves as GET /100mb, and what
# uploads send.
make_100mb() {
  head -c 100000000 /dev/zero > "$work/100mb"
  chmod 644 "$work/100mb"
}

# transfer_100mb PORT HOST download|upload: one 100 MB transfer with curl through
# 127.0.0.1:PORT for HOST (a download of /100mb, or a PUT of $work/100mb to the backend's
# /upload/body); prints "<ok> <bytes> <seconds>", ok 1 only if it went whole (a download of
# 200 and 100 MB; an upload answered 201 or 204 with the backend holding the whole body).
# 'Expect: 100-continue' is left out (each proxy answers it its own way, and curl waits a
# second for an answer that does not come). Bounded by LIMIT.
transfer_100mb() {
  local code size seconds ok=0
  if [ "$3" = download ]; then
    read -r code size seconds < <(curl -sS -o /dev/null --max-time "$LIMIT" -H "Host: $2" \
      -w '%{http_code} %{size_download} %{time_total}\n' "http://127.0.0.1:$1/100mb" || true)
    [ "$code" = 200 ] && [ "$size" = 100000000 ] && ok=1
  else
    rm -f "$sink/upload/body"
    read -r code size seconds < <(curl -sS -o /dev/null --max-time "$LIMIT" -H "Host: $2" \
      -H 'Expect:' -T "$work/100mb" -w '%{http_code} %{size_upload} %{time_total}\n' \
      "http://127.0.0.1:$1/upload/body" || true)
    [[ $code == 20[14] ]] && [ "$(stat -c %s "$sink/upload/body" 2>/dev/null)" = 100000000 ] && ok=1
  fi
  echo "$ok ${size:-0} ${seconds:-0}"
}

# start_backend PORT: the app behind every proxy, nginx answering "hello from the backend"
# with two workers, so it is never the bottleneck; returns once it listens. PUT /upload/NAME
# stores the body whole as $sink/upload/NAME (in memory: tmpfs), answering only once it is all in.
start_backend() {
  make_upload_sink
  cat > "$work/backend.conf" <<CONF
worker_processes 2; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$1; root $work; location = / { return 200 "hello from the backend\n"; }
    location /upload/ { root $sink; dav_methods PUT; client_max_body_size 0; client_body_temp_path $sink/tmp; } } }
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

# start_rathole CONTROL VISITOR REMOTE BACKEND: rathole 0.5.0 on its default TCP transport,
# nodelay: a server on 127.0.0.1:CONTROL taking visitors on 127.0.0.1:VISITOR, and a client
# dialing 127.0.0.1:REMOTE (CONTROL, or a path to it) and forwarding to 127.0.0.1:BACKEND.
# Their pids in rathole_pids; returns once visitors are taken.
start_rathole() {
  cat > "$work/server.toml" <<CONF
[server]
bind_addr = "127.0.0.1:$1"
default_token = "bench"
[server.services.app]
bind_addr = "127.0.0.1:$2"
nodelay = true
CONF
  cat > "$work/client.toml" <<CONF
[client]
remote_addr = "127.0.0.1:$3"
default_token = "bench"
[client.services.app]
local_addr = "127.0.0.1:$4"
nodelay = true
CONF
  rathole --server "$work/server.toml" >"$work/rathole-server.err" 2>&1 & pids+=($!)
  rathole_pids=$!
  rathole --client "$work/client.toml" >"$work/rathole-client.err" 2>&1 & pids+=($!)
  rathole_pids+=" $!"
  wait_port "$2"
}

# wait_answering LABEL PORT HOST: until 127.0.0.1:PORT answers for HOST with the backend's page
# (a tunnel's agent may still be connecting, a TLS one waiting for its certificate: 20 s at
# most); stops the script if it never does.
wait_answering() {
  local body
  for _ in $(seq 100); do
    body=$(curl -sS --max-time 2 -H "Host: $3" "http://127.0.0.1:$2/" 2>/dev/null) || true
    [ "$body" = "hello from the backend" ] && return
    sleep 0.2
  done
  echo "$1: '$body'" >&2; exit 1
}

# ---- Side-by-side measurements (proxy.sh, tls.sh): the servers, CPU per request, rounds,
# ---- medians and spread, the versions of everything measured.

# make_upload_sink: $sink, a directory in memory (tmpfs) for the backend's uploads, writable by
# its workers (nginx's compiled-in user, nobody), removed on exit.
make_upload_sink() {
  sink=$(mktemp -d /dev/shm/core-server-bench.XXXXXX)
  chmod 755 "$sink"
  mkdir "$sink/upload" "$sink/tmp"
  [ "$(id -u)" != 0 ] || chown nobody "$sink/upload" "$sink/tmp"
  cleanup_hooks+=(remove_upload_sink)
}
remove_upload_sink() { rm -rf "$sink"; }

# print_settings VAR...: each VAR=value, so that a run can be repeated as it was.
print_settings() {
  local var
  printf 'settings:   '
  for var in "$@"; do printf ' %s="%s"' "$var" "${!var}"; done
  echo
}

# print_versions TOOL...: the machine, this tree's commit, the compiler and each TOOL's version.
print_versions() {
  local tool dirty=
  git diff --quiet HEAD 2>/dev/null || dirty=" with uncommitted changes"
  echo "machine:     $(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "core-server: commit $(git rev-parse --short HEAD)$dirty, $(rustc --version)"
  for tool in "$@"; do
    printf '%-12s %s\n' "$tool:" "$(case $tool in
      wrk) wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}' ;;
      nginx) nginx -v 2>&1 ;;
      haproxy) haproxy -v | awk 'NR == 1 {print $1, $2, $3}' ;;
      curl) curl --version | head -n1 | cut -d' ' -f1-2 ;;
      h2load) h2load --version ;;
      openssl) openssl version ;;
    esac)"
  done
}

# The columns of a side-by-side run, each a server (port, label) whose CPU is read from
# /proc/<pid>/stat: what serves (serving_pids) depends on its kind.
declare -A port label kind main_pid threads

# serving_pids SERVER: the processes that serve SERVER's requests, those whose CPU counts:
# core-server's worker (its supervisor, acme helper and the backend are not counted), nginx's
# workers (not its idle master), haproxy's one process.
serving_pids() {
  case ${kind[$1]} in
    core-server) core_worker "${main_pid[$1]}" ;;
    nginx) pgrep -P "${main_pid[$1]}" || true ;;
    haproxy) echo "${main_pid[$1]}" ;;
  esac
}
# core_worker SUPERVISOR: the pid of the supervisor's core-server-worker child (its name is cut
# to 15 characters), none while there is none.
core_worker() { pgrep -P "$1" -x core-server-wor || true; }
# runtime_threads PID: how many tokio runtime worker threads PID runs.
runtime_threads() { cat /proc/"$1"/task/*/comm 2>/dev/null | grep -c '^tokio-rt-worker$' || true; }

# start_core_server SERVER THREADS BIN_DIR ARGS...: a core-server from BIN_DIR with ARGS (its
# stderr in $work/SERVER.err) as column SERVER; returns once its worker runs, with THREADS
# runtime threads ("" for the worker's default, one per CPU) as TOKIO_WORKER_THREADS asks.
# Checked, not assumed.
start_core_server() {
  local server=$1 want=$2 bin=$3 worker= count=0
  shift 3
  env ${want:+TOKIO_WORKER_THREADS=$want} RUST_LOG=warn "$bin/core-server" "$@" \
    2>>"$work/$server.err" &
  pids+=($!)
  kind[$server]=core-server main_pid[$server]=$! threads[$server]=$want
  for _ in $(seq 100); do
    worker=$(core_worker "${main_pid[$server]}")
    [ -z "$worker" ] || count=$(runtime_threads "$worker")
    [ "$count" = 0 ] || break
    sleep 0.1
  done
  sleep 0.3   # the runtime starts its threads one after the other
  count=$(runtime_threads "$worker")
  [ "$count" != 0 ] || { echo "${label[$server]}: no worker with a runtime within 10 s" >&2; exit 1; }
  if [ -n "$want" ] && [ "$count" != "$want" ]; then
    echo "${label[$server]}: its worker runs $count runtime threads, not $want" >&2; exit 1
  fi
}
# start_peer SERVER KIND CMD...: runs CMD (nginx or haproxy in the foreground, stderr to
# $work/SERVER.err) as column SERVER of KIND.
start_peer() {
  local server=$1
  kind[$server]=$2
  shift 2
  "$@" 2>>"$work/$server.err" &
  pids+=($!)
  main_pid[$server]=$!
}
# print_servers SERVER...: each column's label, port and serving processes (with the worker's
# runtime threads for core-server), so a reader sees what was measured.
print_servers() {
  local server pid
  for server in "$@"; do
    printf '%-24s port %-6s serving pids:' "${label[$server]}" "${port[$server]}"
    for pid in $(serving_pids "$server"); do
      printf ' %s (%s%s, CPUs %s)' "$pid" "$(cat "/proc/$pid/comm")" \
        "$([ "${kind[$server]}" != core-server ] || echo ", $(runtime_threads "$pid") runtime threads")" \
        "$(awk '/^Cpus_allowed_list/ {print $2}' "/proc/$pid/status")"
    done
    echo
  done
}

# cpu_ticks PID...: "<user> <system>" clock ticks the PIDs have run so far (fields 14 and 15 of
# /proc/<pid>/stat, counted after the parenthesised name); a process that is gone counts 0.
cpu_ticks() {
  local pid
  for pid in "$@"; do cat "/proc/$pid/stat" 2>/dev/null || true; done |
    awk '{sub(/^.*\) /, ""); u += $12; s += $13} END {print u + 0, s + 0}'
}
clock_ticks=$(getconf CLK_TCK)

# Results, by "SERVER.METRIC": the rates of the rounds, CPU per unit (user, system), failures.
declare -A runs user_cpu system_cpu failed
# What a METRIC is, set by the script for each: heading, what its CPU is counted per (cpu_per:
# "us/request" or "s/GB"), what core-server is compared with (versus: "best", the better of
# nginx and haproxy, or a server) and the target (e.g. ">= 1.0").
declare -A heading cpu_per versus target

# measure SERVER METRIC ROUND: runs "METRIC PORT", which prints "<rate> <units done> <failures>"
# (units: requests, or bytes for an s/GB metric), reading SERVER's serving processes' CPU
# ticks before and after it; records the rate and the CPU per unit. Serving processes that
# changed meanwhile (a worker restarted) make the round a failure: their CPU is not all counted.
measure() {
  local server=$1 metric=$2 round=$3 serving before after rate units fails user system
  serving=$(serving_pids "$server")
  before=$(cpu_ticks $serving)
  read -r rate units fails < <("$metric" "${port[$server]}")
  after=$(cpu_ticks $serving)
  runs[$server.$metric]+="$rate "
  [ "$fails" = 0 ] || failed[$server.$metric]+="round $round: $fails failed; "
  [ "$(serving_pids "$server")" = "$serving" ] ||
    failed[$server.$metric]+="round $round: serving processes changed ($serving: now $(serving_pids "$server" | paste -sd' ')); "
  read -r user system < <(awk -v b="$before" -v a="$after" -v n="$units" -v hz="$clock_ticks" \
    -v scale="$([ "${cpu_per[$metric]}" = s/GB ] && echo 1e9 || echo 1e6)" 'BEGIN {
      split(b, x); split(a, y); if (n <= 0) {print "nan nan"; exit}
      printf "%.3f %.3f\n", (y[1] - x[1]) / hz * scale / n, (y[2] - x[2]) / hz * scale / n }')
  user_cpu[$server.$metric]+="$user "
  system_cpu[$server.$metric]+="$system "
}

# run_rounds SERVERS METRICS: ROUNDS rounds; in each, metric after metric, every server in turn
# (A B C A B C ...: a drift in the machine's load hits all alike, not one server's block), the
# order rotated by one each round (A B C, B C A, C A B, ...), so that no server always runs
# right after the same other or first after a change of load.
run_rounds() {
  local round metric server order=($1)
  for round in $(seq "$ROUNDS"); do
    for metric in $2; do
      for server in "${order[@]}"; do measure "$server" "$metric" "$round"; done
    done
    echo "round $round of $ROUNDS done (order: ${order[*]})"
    order=("${order[@]:1}" "${order[0]}")
  done
}

# stats: "<median> <min> <max>" of the numbers on stdin (the mean of the middle two for an
# even count).
stats() {
  tr ' ' '\n' | sed '/^$/d' | sort -g |
    awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR]}'
}
median_of() { stats <<<"${runs[$1]}" | cut -d' ' -f1; }

# print_results SERVERS METRICS: per metric, each server's median rate, the spread over the
# rounds (min-max), the median CPU per unit (user, system) and every round's rate; then each
# core-server column / what the metric compares it with, next to the target, and the same
# ratio for CPU per unit (user + system; below 1.0 is cheaper).
print_results() {
  local metric server m lo hi u s
  for metric in $2; do
    echo
    echo "${heading[$metric]}"
    printf '  %-24s %10s %18s %16s %16s   %s\n' "" median "spread (min-max)" "user ${cpu_per[$metric]}" \
      "sys ${cpu_per[$metric]}" rounds
    for server in $1; do
      read -r m lo hi < <(stats <<<"${runs[$server.$metric]}")
      u=$(stats <<<"${user_cpu[$server.$metric]}" | cut -d' ' -f1)
      s=$(stats <<<"${system_cpu[$server.$metric]}" | cut -d' ' -f1)
      printf '  %-24s %10s %18s %16.2f %16.2f   %s\n' "${label[$server]}" "$(round_figure "$m")" \
        "$(round_figure "$lo")-$(round_figure "$hi")" "$u" "$s" "${runs[$server.$metric]% }"
      [ -z "${failed[$server.$metric]:-}" ] || echo "  FAILED ${label[$server]}: ${failed[$server.$metric]}"
    done
    print_ratios "$1" "$metric"
  done
}
round_figure() { awk -v v="$1" 'BEGIN {printf (v >= 100 ? "%.0f" : "%.1f"), v}'; }
cpu_of() { echo "$(stats <<<"${user_cpu[$1]}" | cut -d' ' -f1) $(stats <<<"${system_cpu[$1]}" | cut -d' ' -f1)"; }

# print_ratios SERVERS METRIC: for each core-server column among SERVERS, its median / the
# median of what METRIC compares it with (when that was measured), and the CPU ratio. The
# target applies at equal CPU: to a core-server of one runtime thread.
print_ratios() {
  local servers=" $1 " metric=$2 other server cpu
  other=${versus[$metric]}
  if [ "$other" = best ]; then
    [[ $servers == *" nginx "* && $servers == *" haproxy "* ]] || return 0
    other=nginx
    awk -v a="$(median_of "haproxy.$metric")" -v b="$(median_of "nginx.$metric")" 'BEGIN {exit !(a > b)}' &&
      other=haproxy
  fi
  [[ $servers == *" $other "* ]] || return 0
  for server in $1; do
    [ "${kind[$server]}" = core-server ] || continue
    cpu=$(awk -v a="$(cpu_of "$server.$metric")" -v b="$(cpu_of "$other.$metric")" \
      'BEGIN {split(a, x); split(b, y); t = y[1] + y[2]; print (t > 0 ? sprintf("%.2f", (x[1] + x[2]) / t) : "-")}')
    printf '  %s / %s: %.2f   (%s)   user+sys %s: %sx\n' "${label[$server]}" "${label[$other]}" \
      "$(awk -v a="$(median_of "$server.$metric")" -v b="$(median_of "$other.$metric")" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
      "$([ "${threads[$server]}" = 1 ] && echo "target ${target[$metric]}" || echo "informational: more CPU")" \
      "${cpu_per[$metric]}" "$cpu"
  done
}

# wrk_figures CMD...: runs CMD, a wrk command line (bound it: `timeout LIMIT wrk ...`), and
# prints "<requests/s> <requests> <failures>" (socket errors and non-2xx/3xx responses), or
# "0 0 all" when it failed.
wrk_figures() {
  local out
  out=$("$@") || { echo "0 0 all"; return; }
  awk '/Requests\/sec/ {rps = $2} / requests in / {n = $1} /Socket errors/ {gsub(",", ""); e += $4 + $6 + $8 + $10}
       /Non-2xx/ {e += $NF} END {printf "%.0f %d %d\n", rps, n, e}' <<<"$out"
}

# nginx_peer_conf BACKEND LISTEN [DIRECTIVES]: $work/nginx.conf, nginx as a reverse proxy beside
# core-server: one worker, pooled keep-alive connections to 127.0.0.1:BACKEND (as many idle as
# core-server keeps, 512: HTTP/2 clients' streams need that many at once), the forwarding
# headers core-server sets, bodies streamed both ways as core-server and haproxy stream them (no
# request buffering, no response spilled to a temporary file on disk), connections accepted
# once their client has sent (`deferred`, as core-server's listeners). LISTEN: the arguments
# of its listen directive; DIRECTIVES: more for its server block (certificates).
nginx_peer_conf() {
  cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$1; keepalive 512; }
  server { listen $2 deferred; client_max_body_size 0; ${3:-}
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$remote_addr;
                 proxy_set_header X-Forwarded-Proto \$scheme;
                 proxy_request_buffering off; proxy_max_temp_file_size 0; }
  } }
CONF
}

# haproxy_peer_conf BACKEND BIND [FRONTEND-LINE]: $work/haproxy.cfg, haproxy as a reverse proxy
# beside core-server: one thread, X-Forwarded-For, connections to 127.0.0.1:BACKEND reused,
# connections accepted once their client has sent (`defer-accept`, as core-server's).
# BIND: the arguments of its bind line; FRONTEND-LINE: one more line for its frontend.
haproxy_peer_conf() {
  cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option forwardfor
frontend web
  bind $2 defer-accept
  ${3:-}
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:$1
CONF
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
