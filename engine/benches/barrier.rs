//! Keyring::seal/open against raw AES-256-GCM (the same aes-gcm crate, same key size,
//! same associated data length, a counter nonce and no envelope) on 1 KiB and 16 KiB
//! values. The target is a ratio within 1.5x. Prints figures; no harness.
//!
//!     cargo bench -p capstan-engine --bench barrier

use aes_gcm::{
    Aes256Gcm,
    aead::{AeadInOut, KeyInit, array::Array},
};
use capstan_engine::store::barrier::Keyring;
use std::{hint::black_box, time::Instant};

const PATH: &str = "secret/data/app/db";

/// Runs `f` for about `budget` seconds (after a warm-up), returning ns per call.
fn time_per_op(mut f: impl FnMut()) -> f64 {
    for _ in 0..1000 {
        f();
    }
    let mut iters = 0u64;
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < 1.0 {
        for _ in 0..256 {
            f();
        }
        iters += 256;
    }
    started.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    let keyring = Keyring::generate();
    let raw = Aes256Gcm::new(&Array::from([7u8; 32]));
    let mut counter = 0u64;
    println!("size    op    raw ns/op  barrier ns/op  ratio  barrier MB/s");
    let mut worst: f64 = 0.0;
    for size in [1024usize, 16 * 1024] {
        let plain = vec![0x5a; size];
        let aad_len = 5 + PATH.len();
        let aad = vec![0u8; aad_len];

        let raw_seal = time_per_op(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&counter.to_be_bytes());
            let mut buf = Vec::with_capacity(size + 33);
            buf.extend_from_slice(&[0u8; 17]);
            buf.extend_from_slice(&plain);
            let tag = raw
                .encrypt_inout_detached(&Array::from(nonce), &aad, buf[17..].as_mut().into())
                .unwrap();
            buf.extend_from_slice(&tag);
            black_box(buf);
        });
        let ours_seal = time_per_op(|| {
            black_box(keyring.seal(PATH, black_box(&plain)).unwrap());
        });

        let nonce = Array::from([1u8; 12]);
        let mut sealed = plain.clone();
        let tag = raw
            .encrypt_inout_detached(&nonce, &aad, sealed.as_mut_slice().into())
            .unwrap();
        let raw_open = time_per_op(|| {
            let mut buf = sealed.clone();
            raw.decrypt_inout_detached(&nonce, &aad, buf.as_mut_slice().into(), &tag)
                .unwrap();
            black_box(buf);
        });
        let envelope = keyring.seal(PATH, &plain).unwrap();
        let ours_open = time_per_op(|| {
            black_box(keyring.open(PATH, black_box(&envelope)).unwrap());
        });

        for (op, r, o) in [("seal", raw_seal, ours_seal), ("open", raw_open, ours_open)] {
            let ratio = o / r;
            worst = worst.max(ratio);
            println!(
                "{:>5}  {op}  {r:>10.0}  {o:>13.0}  {ratio:>5.2}  {:>12.0}",
                format!("{}K", size / 1024),
                size as f64 / o * 1e3
            );
        }
    }
    println!("worst ratio barrier/raw: {worst:.2} (target <= 1.50)");
}
