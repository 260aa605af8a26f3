use super::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;

const PATH: &str = "secret/data/app/db";

fn keyring_with_terms(n: u32) -> Keyring {
    let mut k = Keyring::generate();
    for _ in 1..n {
        k.rotate();
    }
    k
}

#[test]
fn round_trips_sizes() {
    let k = Keyring::generate();
    for len in [0usize, 1, 15, 16, 17, 1024, 16 * 1024] {
        let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let env = k.seal(PATH, &plain).unwrap();
        assert_eq!(env.len(), MIN_ENVELOPE_LEN + len);
        assert_eq!(env[0], ENVELOPE_VERSION);
        assert_eq!(parse_header(&env).unwrap().term, 1);
        assert_eq!(k.open(PATH, &env).unwrap(), plain);
    }
}

#[test]
fn long_paths_are_bound_too() {
    // 251 bytes of path fill the 256-byte associated-data buffer with the header; longer
    // ones take the heap.
    let k = Keyring::generate();
    for len in [250, 251, 252, 300, 4096] {
        let path: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let env = k.seal(&path, b"v").unwrap();
        assert_eq!(k.open(&path, &env).unwrap(), b"v");
        let mut other = path.clone();
        other.pop();
        assert!(k.open(&other, &env).unwrap_err().is_integrity(), "{len}");
        other.push('A');
        assert!(k.open(&other, &env).unwrap_err().is_integrity(), "{len}");
    }
}

#[test]
fn same_plaintext_seals_differently() {
    let k = Keyring::generate();
    let a = k.seal(PATH, b"same").unwrap();
    let b = k.seal(PATH, b"same").unwrap();
    assert_ne!(a, b, "nonces must differ");
}

fn assert_refused(k: &Keyring, path: &str, env: &[u8], what: &str) {
    match k.open(path, env) {
        Ok(_) => panic!("{what}: a mutated envelope decrypted"),
        Err(e) => assert!(e.is_integrity(), "{what}: {e:?} is not an integrity error"),
    }
}

#[test]
fn v1_every_bit_flip_is_refused() {
    let k = keyring_with_terms(2);
    let env = k.seal(PATH, b"a secret value").unwrap();
    for byte in 0..env.len() {
        for bit in 0..8 {
            let mut m = env.clone();
            m[byte] ^= 1 << bit;
            assert_refused(&k, PATH, &m, &format!("flip byte {byte} bit {bit}"));
        }
    }
}

#[test]
fn v1_every_truncation_and_extension_is_refused() {
    let k = Keyring::generate();
    let env = k.seal(PATH, b"a secret value").unwrap();
    for len in 0..env.len() {
        assert_refused(&k, PATH, &env[..len], &format!("truncated to {len}"));
        assert_refused(&k, PATH, &env[env.len() - len..], &format!("front cut to {len}"));
    }
    for extra in [&[0u8][..], &[0xff; 16], b"more"] {
        let mut m = env.clone();
        m.extend_from_slice(extra);
        assert_refused(&k, PATH, &m, "extended");
    }
    assert_refused(&k, PATH, &[], "empty");
}

#[test]
fn v1_version_and_term_edits_are_refused() {
    let k = keyring_with_terms(3);
    let env = k.seal(PATH, b"written under term 3").unwrap();
    for version in 0..=255u8 {
        if version == ENVELOPE_VERSION {
            continue;
        }
        let mut m = env.clone();
        m[0] = version;
        assert_eq!(
            k.open(PATH, &m),
            Err(BarrierError::Integrity("unknown envelope version"))
        );
    }
    // Another term this keyring holds: a different key, so the tag fails.
    for term in [1u32, 2] {
        let mut m = env.clone();
        m[1..5].copy_from_slice(&term.to_be_bytes());
        assert_refused(&k, PATH, &m, &format!("term {term}"));
    }
    for term in [0u32, 4, 0x0100_0003, u32::MAX] {
        let mut m = env.clone();
        m[1..5].copy_from_slice(&term.to_be_bytes());
        assert_eq!(k.open(PATH, &m), Err(BarrierError::UnknownTerm(term)));
    }
}

#[test]
fn v2_ciphertext_moved_to_another_path_is_refused() {
    let k = Keyring::generate();
    let env = k.seal(PATH, b"db password").unwrap();
    for other in [
        "secret/data/app/db2",
        "secret/data/app/DB",
        "Secret/data/app/db",
        "secret/data/app/",
        "secret/data/app/db/",
        "",
        "/secret/data/app/db",
        "secret/data/app/db\0",
    ] {
        assert_refused(&k, other, &env, other);
    }
    // Two entries under the same term: swapping them between paths is caught too.
    let other = k.seal("secret/data/app/web", b"web password").unwrap();
    assert_refused(&k, PATH, &other, "swapped entry");
    assert_eq!(k.open("secret/data/app/web", &other).unwrap(), b"web password");
}

#[test]
fn rotate_keeps_old_terms_readable_and_writes_use_the_newest() {
    let mut k = Keyring::generate();
    let old = k.seal(PATH, b"term 1").unwrap();
    assert_eq!(k.rotate(), 2);
    assert_eq!(k.rotate(), 3);
    assert_eq!(k.active_term(), 3);
    assert_eq!(k.terms(), vec![1, 2, 3]);
    assert!(k.term_created(3).is_some());
    let new = k.seal(PATH, b"term 3").unwrap();
    assert_eq!(parse_header(&new).unwrap().term, 3);
    assert_eq!(k.open(PATH, &old).unwrap(), b"term 1");
    assert_eq!(k.open(PATH, &new).unwrap(), b"term 3");
    // A keyring that never saw term 3 refuses it as unknown, not as garbage.
    let other = Keyring::generate();
    assert_eq!(other.open(PATH, &new), Err(BarrierError::UnknownTerm(3)));
    assert_refused(&other, PATH, &old, "another keyring's term 1");
}

#[test]
fn v5_needs_rotation_before_the_bound_and_refuses_at_it() {
    let mut k = Keyring::generate().with_max_operations(16);
    assert_eq!(k.max_operations(), 16);
    for i in 0..14 {
        assert!(!k.needs_rotation(), "after {i}");
        k.seal(PATH, b"x").unwrap();
    }
    assert_eq!(k.encryptions(), 14);
    assert!(k.needs_rotation(), "7/8 of 16 = 14");
    k.seal(PATH, b"x").unwrap();
    k.seal(PATH, b"x").unwrap();
    assert_eq!(k.encryptions(), 16);
    assert_eq!(
        k.seal(PATH, b"x"),
        Err(BarrierError::TermExhausted { term: 1, max: 16 })
    );
    assert_eq!(k.encryptions(), 16);
    k.rotate();
    assert_eq!(k.encryptions(), 0);
    assert!(!k.needs_rotation());
    k.seal(PATH, b"x").unwrap();
    let d = Keyring::generate();
    assert_eq!(d.max_operations(), DEFAULT_MAX_OPERATIONS);
}

#[test]
fn the_counter_is_shared_by_concurrent_tasks() {
    let k = Keyring::generate().with_max_operations(1000);
    let ok = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..200 {
                    if k.seal(PATH, b"x").is_ok() {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    // 1,600 attempts, exactly the bound succeed.
    assert_eq!(ok.into_inner(), 1000);
    assert_eq!(k.encryptions(), 1000);
}

#[test]
fn nonces_do_not_repeat() {
    let k = Keyring::generate();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20_000 {
        let env = k.seal(PATH, b"").unwrap();
        assert!(seen.insert(env[5..17].to_vec()), "nonce repeated");
    }
}

#[test]
fn keyring_seals_under_the_root_key_and_back() {
    let root = RootKey::generate();
    let mut k = keyring_with_terms(3);
    let old = k.seal(PATH, b"old").unwrap();
    k.rotate();
    let sealed = k.seal_with(&root).unwrap();
    let back = Keyring::open_with(&root, &sealed).unwrap();
    assert_eq!(back.active_term(), 4);
    assert_eq!(back.terms(), vec![1, 2, 3, 4]);
    assert_eq!(back.term_created(2), k.term_created(2));
    assert_eq!(back.open(PATH, &old).unwrap(), b"old");
    assert_eq!(back.encryptions(), 0);
    // Another root key, a flipped bit, a truncation: integrity errors.
    let other = RootKey::generate();
    assert!(Keyring::open_with(&other, &sealed).unwrap_err().is_integrity());
    for i in [0, 3, 10, sealed.len() - 1] {
        let mut m = sealed.clone();
        m[i] ^= 0x40;
        assert!(Keyring::open_with(&root, &m).unwrap_err().is_integrity());
    }
    assert!(
        Keyring::open_with(&root, &sealed[..sealed.len() - 1])
            .unwrap_err()
            .is_integrity()
    );
    // The sealed keyring is not an entry, and a keyring never opens it.
    assert_eq!(
        back.open(KEYRING_PATH, &sealed),
        Err(BarrierError::UnknownTerm(0))
    );
}

#[test]
fn root_key_seals_under_the_unseal_key_and_back() {
    let unseal = RootKey::generate();
    let root = RootKey::generate();
    let sealed = seal_root(&unseal, &root).unwrap();
    assert_eq!(open_root(&unseal, &sealed).unwrap().as_bytes(), root.as_bytes());
    // A wrong (or previous-generation) unseal key is an integrity error.
    let wrong = RootKey::generate();
    assert!(open_root(&wrong, &sealed).unwrap_err().is_integrity());
    // The root-key and keyring envelopes cannot stand in for one another.
    let ring = Keyring::generate().seal_with(&unseal).unwrap();
    assert!(open_root(&unseal, &ring).unwrap_err().is_integrity());
    assert!(Keyring::open_with(&unseal, &sealed).unwrap_err().is_integrity());
    // Neither can an entry sealed by a keyring.
    let entry = Keyring::generate().seal(ROOT_KEY_PATH, root.as_bytes()).unwrap();
    assert!(open_root(&unseal, &entry).unwrap_err().is_integrity());
}

#[test]
fn root_key_from_bytes_checks_length() {
    assert_eq!(
        RootKey::from_bytes(&[0; 31]).unwrap_err(),
        BarrierError::KeyLength(31)
    );
    assert_eq!(
        RootKey::from_bytes(&[0; 33]).unwrap_err(),
        BarrierError::KeyLength(33)
    );
    let k = RootKey::from_bytes(&[7; 32]).unwrap();
    assert_eq!(k.as_bytes(), &[7; 32]);
}

#[test]
fn debug_and_errors_never_show_key_or_plaintext_bytes() {
    let root = RootKey::from_bytes(&[0xAB; 32]).unwrap();
    let shown = format!("{root:?}");
    assert!(
        !shown.contains("171") && !shown.to_lowercase().contains("ab,"),
        "{shown}"
    );
    assert!(shown.contains("redacted"));
    let k = Keyring::generate();
    let shown = format!("{k:?}");
    assert!(
        shown.contains("redacted") && shown.contains("active: 1"),
        "{shown}"
    );
    let env = k.seal(PATH, b"PLAINTEXT-CANARY").unwrap();
    let mut m = env.clone();
    m[20] ^= 1;
    let err = k.open(PATH, &m).unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("PLAINTEXT"), "{text}");
    }
}

#[test]
fn keyring_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Keyring>();
    assert_send_sync::<RootKey>();
}

#[test]
fn try_clone_keeps_terms_and_both_copies_seal() {
    let mut k = keyring_with_terms(2);
    let a = k.seal(PATH, b"a").unwrap();
    let mut c = k.try_clone().unwrap();
    assert_eq!(c.encryptions(), 1);
    c.rotate();
    let b = c.seal(PATH, b"b").unwrap();
    assert_eq!(c.open(PATH, &a).unwrap(), b"a");
    assert_eq!(k.open(PATH, &b), Err(BarrierError::UnknownTerm(3)));
    k.rotate();
    assert_eq!(k.open(PATH, &a).unwrap(), b"a");
}

/// One randomized mutation of `env` (sealed for `path` under keyring `k`). Returns the
/// mutated envelope, the path to open it at, and a description.
fn mutate(rng: &mut StdRng, env: &[u8], path: &str, donor: &[u8]) -> (Vec<u8>, String, &'static str) {
    let mut m = env.to_vec();
    let mut p = path.to_string();
    let class = match rng.random_range(0..8) {
        0 => {
            // One to three bit flips anywhere.
            for _ in 0..rng.random_range(1..=3) {
                let i = rng.random_range(0..m.len());
                m[i] ^= 1 << rng.random_range(0..8);
            }
            "bit flip"
        }
        1 => {
            m.truncate(rng.random_range(0..m.len()));
            "truncation"
        }
        2 => {
            let n = rng.random_range(1..32);
            m.extend((0..n).map(|_| rng.random::<u8>()));
            "extension"
        }
        3 => {
            m[0] = loop {
                let v = rng.random::<u8>();
                if v != ENVELOPE_VERSION {
                    break v;
                }
            };
            "version byte"
        }
        4 => {
            let old = u32::from_be_bytes([m[1], m[2], m[3], m[4]]);
            let term = loop {
                let t = if rng.random_bool(0.5) {
                    rng.random_range(0..6)
                } else {
                    rng.random()
                };
                if t != old {
                    break t;
                }
            };
            m[1..5].copy_from_slice(&term.to_be_bytes());
            "term edit"
        }
        5 => {
            // The same envelope at another path: a neighbour, a case variant, a prefix.
            p = match rng.random_range(0..4) {
                0 => format!("{path}{}", rng.random_range(0..10)),
                1 => path.to_uppercase(),
                2 => path[..rng.random_range(0..path.len())].to_string(),
                _ => format!("x/{path}"),
            };
            "cross-path swap"
        }
        6 => {
            // Another entry's envelope (same keyring, maybe same term) at this path.
            m = donor.to_vec();
            "cross-entry swap"
        }
        _ => {
            // Splice: this header and nonce with another entry's ciphertext and tag.
            m.truncate(17);
            m.extend_from_slice(&donor[17.min(donor.len())..]);
            "splice"
        }
    };
    (m, p, class)
}

/// G1: 0 of 10,000 randomized mutations decrypt, and none panics.
#[test]
fn g1_randomized_mutations_never_decrypt() {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(0x6_1);
    let k = keyring_with_terms(5);
    let mut entries = Vec::new();
    for i in 0..64 {
        let path = format!("secret/data/app-{i}/config");
        let len = rng.random_range(0..200);
        let plain: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        entries.push((path.clone(), k.seal(&path, &plain).unwrap(), plain));
        if i % 16 == 15 {
            // Entries under every term, as after rotations.
            drop(k.seal("warm", b""));
        }
    }
    let mut tried = 0u32;
    let mut decrypted = 0u32;
    let mut by_class = std::collections::BTreeMap::<&str, u32>::new();
    while tried < 10_000 {
        let (path, env, plain) = &entries[rng.random_range(0..entries.len())];
        let (_, donor, _) = &entries[rng.random_range(0..entries.len())];
        let (m, p, class) = mutate(&mut rng, env, path, donor);
        if m == *env && p == *path {
            continue; // e.g. a donor that is this very entry: not a mutation
        }
        tried += 1;
        *by_class.entry(class).or_default() += 1;
        match k.open(&p, &m) {
            Ok(got) => {
                decrypted += 1;
                assert_ne!(&got, plain, "{class}: plaintext recovered");
            }
            Err(e) => assert!(e.is_integrity(), "{class}: {e:?}"),
        }
    }
    println!(
        "G1: {tried} mutations, {decrypted} decrypted, {:?}, {:?}",
        by_class,
        started.elapsed()
    );
    assert_eq!(decrypted, 0);
}

#[test]
fn v5_with_terms_of_reads_new_terms_and_keeps_its_own_term_and_count() {
    let mine = Keyring::generate().with_max_operations(4);
    let mut stored = mine.try_clone().unwrap();
    stored.rotate();
    let theirs = stored.seal(PATH, b"theirs").unwrap();
    mine.seal(PATH, b"x").unwrap();
    let merged = mine.with_terms_of(stored).unwrap();
    assert_eq!(merged.terms(), vec![1, 2]);
    assert_eq!(merged.active_term(), 1, "never adopts another's term");
    assert_eq!(merged.open(PATH, &theirs).unwrap(), b"theirs");
    // The count is shared: the old copy and the merged one together reach the bound once.
    merged.seal(PATH, b"x").unwrap();
    mine.seal(PATH, b"x").unwrap();
    merged.seal(PATH, b"x").unwrap();
    assert_eq!(
        mine.seal(PATH, b"x"),
        Err(BarrierError::TermExhausted { term: 1, max: 4 })
    );
    assert!(merged.seal(PATH, b"x").is_err());
    // One claim of the rotation, however many writers see the threshold.
    assert!(merged.claim_rotation());
    assert!(!mine.claim_rotation());
    merged.release_rotation();
    assert!(mine.claim_rotation());
}
