#!/usr/bin/env bash
# Builds the binaries of the previous version (the commit named in tests/previous-version) into
# <target>/previous/bin, for tests/tests/previous_version.rs. Its sources are extracted from git
# (a clone with full history is needed) and built in a target directory of their own, kept
# between runs so only the first build compiles the dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

commit=$(grep -v '^#' tests/previous-version | tr -d '[:space:]')
target=${CARGO_TARGET_DIR:-target}
out=$target/previous
src=$out/src-$commit

if [ ! -d "$src" ]; then
  if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    # A shallow clone: try to complete it before giving up.
    git fetch --quiet --unshallow 2>/dev/null || git fetch --quiet origin "$commit" 2>/dev/null || true
  fi
  if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "commit $commit (tests/previous-version) is not in this clone: fetch the full history (git fetch --unshallow)" >&2
    exit 1
  fi
  rm -rf "$out"/src-* "$out/bin"
  mkdir -p "$src.partial"
  git archive "$commit" | tar -x -C "$src.partial"
  mv "$src.partial" "$src"
fi

# No debug info: the tests only run these binaries, and it halves the build.
cargo build --locked --quiet --config profile.dev.debug=0 \
  --manifest-path "$src/Cargo.toml" --target-dir "$out/target" \
  -p core-server -p core-server-worker --bins

mkdir -p "$out/bin"
for binary in core-server core-server-worker; do
  cp "$out/target/debug/$binary" "$out/bin/$binary.partial"
  mv "$out/bin/$binary.partial" "$out/bin/$binary"
done
echo "$commit" > "$out/bin/COMMIT"
echo "previous version $commit built in $out/bin"
