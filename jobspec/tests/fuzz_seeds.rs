//! Replays the fuzz target's seed corpus (jobspec/fuzz/corpus/convert/) through the same
//! checks the target runs, on stable Rust, as part of the normal test run. Any input a
//! fuzzing session found and saved there (crashes are added once fixed) stays a test.
//!
//! `cargo test -p capstan-jobspec --test fuzz_seeds -- --ignored write_fuzz_seeds`
//! rewrites the generated seeds (the fixtures, each behind its front end's byte).

#[path = "common/fuzz_checks.rs"]
mod fuzz_checks;

use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[test]
fn convert_seeds() {
    let mut count = 0;
    for entry in std::fs::read_dir(dir("fuzz/corpus/convert")).expect("the convert corpus") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| fuzz_checks::check_convert(&data)).is_err() {
            panic!("convert seed {} breaks a property", path.display());
        }
        count += 1;
    }
    assert!(count >= 8, "convert: only {count} seeds");
}

/// Small inputs at the edges: unfinished syntax, deep nesting, references that go
/// nowhere, values of the wrong type.
const EDGE_SEEDS: &[(&str, &[u8])] = &[
    ("unclosed-block", b"\x00job \"a\" {\n  group \"g\" {\n"),
    ("deep-array", b"\x00job \"a\" { meta = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]] }"),
    ("local-cycle", b"\x00locals {\n  a = local.b\n  b = local.a\n}\njob \"a\" {}\n"),
    ("undefined-var", b"\x00job \"a\" {\n  group \"g\" {\n    count = var.nope\n  }\n}\n"),
    ("count-string", b"\x00job \"a\" {\n  group \"g\" {\n    count = \"many\"\n    task \"t\" {\n      driver = \"docker\"\n      config { image = \"x\" }\n    }\n  }\n}\n"),
    ("json-not-object", b"\x01{\"Job\": {\"ID\": \"x\", \"TaskGroups\": [3]}}"),
    ("json-nulls", b"\x01{\"Job\": {\"ID\": null, \"TaskGroups\": null}}"),
    ("json-truncated", b"\x01{\"Job\": {\"ID\": \"x\", \"TaskGro"),
    ("format-verbs", b"\x00job \"a\" {\n  meta { x = format(\"%5.2f %q %%\", 1, \"y\") }\n}\n"),
    ("arithmetic-overflow", b"\x00job \"a\" {\n  group \"g\" {\n    count = 9223372036854775807 * 3 + \"${1 % 0}\"\n  }\n}\n"),
    ("duration-odd", b"\x00job \"a\" {\n  update { stagger = \"1.2.3s\" }\n  group \"g\" {\n    task \"t\" {\n      driver = \"docker\"\n      config { image = \"x\" }\n      kill_timeout = \"99999999999999999999999h\"\n    }\n  }\n}\n"),
];

#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_fuzz_seeds() {
    let corpus = dir("fuzz/corpus/convert");
    std::fs::create_dir_all(&corpus).unwrap();
    for entry in std::fs::read_dir(dir("tests/fixtures")).unwrap() {
        let path = entry.unwrap().path();
        let name = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".nomad.hcl", "-hcl")
            .replace(".json", "-json");
        let mut seed = vec![2u8];
        seed.extend(std::fs::read(&path).unwrap());
        std::fs::write(corpus.join(format!("fixture-{name}")), seed).unwrap();
    }
    for (name, data) in EDGE_SEEDS {
        std::fs::write(corpus.join(name), data).unwrap();
    }
}
