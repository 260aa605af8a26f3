//! Replays the fuzz targets' seed corpora (engine/fuzz/corpus/<target>/) through the
//! same checks the targets run (engine/fuzz/checks.rs), on stable Rust, as part of the
//! normal test run. Any input a fuzzing session saved there (crashes are added once
//! fixed) stays a test.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, check: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target} seed {} breaks a property", path.display());
        }
        count += 1;
    }
    assert!(count >= 3, "{target}: only {count} seeds");
}

#[test]
fn policy_seeds() {
    replay("policy", checks::check_policy);
}

#[test]
fn barrier_seeds() {
    replay("barrier", checks::check_barrier);
}

#[test]
fn shamir_seeds() {
    replay("shamir", checks::check_shamir);
}
