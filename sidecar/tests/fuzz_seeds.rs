//! Replays the fuzz target's seed corpus (sidecar/fuzz/corpus/mux/) through the same
//! checks the target runs, on stable Rust, as part of the normal test run. Any input a
//! fuzzing session found and saved there (crashes are added once fixed) stays a test.
//!
//! `cargo test -p capstan-sidecar --test fuzz_seeds -- --ignored write_fuzz_seeds`
//! rewrites the generated seeds.

#[path = "common/fuzz_checks.rs"]
mod fuzz_checks;

use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/mux")
}

#[test]
fn mux_seeds() {
    let mut count = 0;
    for entry in std::fs::read_dir(corpus_dir()).expect("the mux corpus") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| fuzz_checks::check_mux(&data)).is_err() {
            panic!("mux seed {} breaks a property", path.display());
        }
        count += 1;
    }
    assert!(count >= 8, "mux: only {count} seeds");
}

/// The frame kinds, as mux.rs numbers them.
const DATA: u8 = 0;
const FIN: u8 = 1;
const WINDOW: u8 = 2;
const RESET: u8 = 3;

fn frame(id: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = id.to_be_bytes().to_vec();
    f.push(kind);
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

fn seed(side: u8, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut s = vec![side];
    for f in frames {
        s.extend_from_slice(f);
    }
    s
}

#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_fuzz_seeds() {
    const SERVER: u8 = 0;
    const CLIENT: u8 = 1;
    let big = vec![b'b'; 64 * 1024];
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "server-one-stream",
            seed(
                SERVER,
                &[frame(1, DATA, b""), frame(1, DATA, b"hello"), frame(1, FIN, b"")],
            ),
        ),
        (
            "server-streams-interleaved",
            seed(
                SERVER,
                &[
                    frame(1, DATA, b"a"),
                    frame(2, DATA, b"b"),
                    frame(3, DATA, b"c"),
                    frame(2, FIN, b""),
                    frame(1, WINDOW, &4096u32.to_be_bytes()),
                    frame(3, RESET, b""),
                    frame(1, FIN, b""),
                ],
            ),
        ),
        (
            "server-full-window",
            seed(
                SERVER,
                &[
                    frame(1, DATA, &big),
                    frame(1, DATA, &big),
                    frame(1, DATA, &big),
                    frame(1, DATA, &big),
                    frame(1, FIN, b""),
                ],
            ),
        ),
        (
            "server-frame-too-large",
            seed(SERVER, &[frame(1, DATA, b"x"), vec![0, 0, 0, 1, DATA, 1, 0, 1]]),
        ),
        (
            "server-unknown-kind",
            seed(SERVER, &[frame(1, DATA, b"x"), frame(1, 9, b"")]),
        ),
        (
            "server-window-overflow",
            seed(
                SERVER,
                &[frame(1, DATA, b""), frame(1, WINDOW, &u32::MAX.to_be_bytes())],
            ),
        ),
        (
            "server-late-frames",
            seed(
                SERVER,
                &[frame(1, DATA, b""), frame(1, RESET, b""), frame(1, DATA, b"late")],
            ),
        ),
        (
            "client-answers",
            seed(
                CLIENT,
                &[
                    frame(1, DATA, b"one"),
                    frame(1, FIN, b""),
                    frame(2, RESET, b""),
                    frame(3, WINDOW, &1024u32.to_be_bytes()),
                    frame(3, DATA, b"three"),
                ],
            ),
        ),
        (
            "client-unknown-stream",
            seed(CLIENT, &[frame(99, DATA, b"nobody"), frame(0, FIN, b"")]),
        ),
        (
            "client-truncated",
            seed(CLIENT, &[vec![0, 0, 0, 1, DATA, 0, 0, 9, b'a']]),
        ),
    ];
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
