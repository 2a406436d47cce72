#!/usr/bin/env bash
# The whole test suite: installs what the tests need when it is missing, checks formatting and
# lints, builds every binary (the integration tests start the real ones), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tool -> Debian package that provides it.
declare -A packages=(
  [curl]=curl              # tests make requests the way users do
  [mkcert]=mkcert          # local-mode HTTPS: certificates from a real mkcert
  [openssl]=openssl        # TLS clients the way users run them (s_client, session resumption)
  [pebble]=pebble          # release-mode HTTPS: a real ACME CA ...
  [pebble-challtestsrv]=pebble  # ... and the DNS server it resolves names with
  [ip]=iproute2            # network namespaces: a real non-loopback sender
  [setcap]=libcap2-bin     # the setcap'd-supervisor test
  [setpriv]=util-linux     # running the supervisor as an ordinary user
  [unshare]=util-linux
)
missing=()
for tool in "${!packages[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${packages[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "not root: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# A fresh clone builds once: incremental state would only take disk (gigabytes) and time.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace
# The previous version's binaries, for tests/tests/previous_version.rs (an upgrade mixes them).
scripts/build-previous.sh

# cargo prints one summary per test binary (the last often a doc-test run of 0); end with
# the total, so the run's last line says what it did.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ {passed += $4; failed += $6} END {printf "%d passed, %d failed\n", passed, failed}' "$log"
exit "$status"
