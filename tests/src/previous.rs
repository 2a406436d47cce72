//! The previous version's binaries (the commit in `tests/previous-version`, built by
//! `scripts/build-previous.sh` into `<target>/previous/bin`), for tests of what an upgrade
//! mixes: an instance of one version and a rerun of the other.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const BINARIES: [&str; 2] = ["core-server", "core-server-worker"];

/// The commit the tests expect, from `tests/previous-version` (lines starting `#` are comments).
pub fn commit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("previous-version");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .unwrap_or_else(|| panic!("no commit in {}", path.display()))
        .to_owned()
}

/// `<target>/previous/bin`, next to this test executable's `<target>/debug`.
fn built() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .join("previous/bin")
}

/// A private copy of the previous version's binaries, in a directory anyone may use (the
/// children run as `nobody` when the tests run as root); removed on drop. Panics, rather than
/// skipping, when they are not built for the commit in `tests/previous-version`.
pub fn install() -> tempfile::TempDir {
    let built = built();
    let want = commit();
    let have = std::fs::read_to_string(built.join("COMMIT")).unwrap_or_default();
    assert_eq!(
        have.trim(),
        want,
        "the previous version's binaries are not built in {} for commit {want}: run \
         scripts/build-previous.sh (scripts/test.sh does)",
        built.display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in BINARIES {
        std::fs::copy(built.join(name), dir.path().join(name)).unwrap();
    }
    dir
}
