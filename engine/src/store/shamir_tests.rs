use super::*;
use crate::store::barrier::{RootKey, open_root, seal_root};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::index::sample};
use std::time::Instant;

fn pick(shares: &[Vec<u8>], idx: &[usize]) -> Vec<Vec<u8>> {
    idx.iter().map(|&i| shares[i].clone()).collect()
}

#[test]
fn round_trip_and_layout() {
    let secret = [0x42u8; 32];
    let shares = split(&secret, 5, 3).unwrap();
    assert_eq!(shares.len(), 5);
    let mut xs: Vec<u8> = shares.iter().map(|s| s[32]).collect();
    assert!(shares.iter().all(|s| s.len() == 33));
    assert!(xs.iter().all(|&x| x != 0));
    xs.sort();
    xs.dedup();
    assert_eq!(xs.len(), 5, "x coordinates are distinct");
    assert_eq!(combine(&shares[..3]).unwrap(), secret);
    assert_eq!(combine(&shares[2..]).unwrap(), secret);
    assert_eq!(combine(&shares).unwrap(), secret, "more than t also works");
}

#[test]
fn v9_degenerate_parameters_are_refused() {
    let s = b"key";
    assert!(matches!(split(s, 3, 1), Err(ShamirError::ThresholdTooLow { .. })));
    assert!(matches!(split(s, 3, 0), Err(ShamirError::ThresholdTooLow { .. })));
    assert!(matches!(split(s, 0, 0), Err(ShamirError::ThresholdTooLow { .. })));
    assert!(matches!(
        split(s, 2, 3),
        Err(ShamirError::ThresholdAboveShares { .. })
    ));
    assert!(matches!(
        split(s, 0, 2),
        Err(ShamirError::ThresholdAboveShares { .. })
    ));
    assert_eq!(split(b"", 3, 2), Err(ShamirError::EmptySecret));
    assert_eq!(check_params(256, 2), Err(ShamirError::TooManyShares(256)));
    assert_eq!(check_params(1000, 3), Err(ShamirError::TooManyShares(1000)));
    assert_eq!(check_params(255, 255), Ok(()));
    // As Vault: one share with threshold one is the key itself.
    assert_eq!(split(s, 1, 1).unwrap(), vec![s.to_vec()]);
    // The largest split works and every x is used once.
    let all = split(s, 255, 2).unwrap();
    let mut xs: Vec<u8> = all.iter().map(|v| v[3]).collect();
    xs.sort();
    assert_eq!(xs, (1..=255).collect::<Vec<u8>>());
    assert_eq!(combine(&[all[254].clone(), all[0].clone()]).unwrap(), s);
}

#[test]
fn v7_combine_refuses_bad_share_sets() {
    let shares = split(&[9u8; 32], 3, 2).unwrap();
    assert_eq!(combine(&[]), Err(ShamirError::TooFewShares(0)));
    assert_eq!(combine(&shares[..1]), Err(ShamirError::TooFewShares(1)));
    assert_eq!(
        combine(&[shares[0].clone(), shares[0].clone()]),
        Err(ShamirError::DuplicateShare)
    );
    // Same x, different y: still a duplicate.
    let mut twin = shares[0].clone();
    twin[0] ^= 1;
    assert_eq!(
        combine(&[shares[0].clone(), twin]),
        Err(ShamirError::DuplicateShare)
    );
    let mut short = shares[1].clone();
    short.truncate(20);
    assert_eq!(
        combine(&[shares[0].clone(), short]),
        Err(ShamirError::ShareLengthMismatch { first: 33, other: 20 })
    );
    assert_eq!(combine(&[vec![1], vec![2]]), Err(ShamirError::ShareTooShort(1)));
    assert_eq!(combine(&[vec![], vec![]]), Err(ShamirError::ShareTooShort(0)));
    let mut zero = shares[1].clone();
    zero[32] = 0;
    assert_eq!(combine(&[shares[0].clone(), zero]), Err(ShamirError::ZeroX));
}

#[test]
fn v7_unseal_progress() {
    let unseal = RootKey::generate();
    let root = RootKey::generate();
    let sealed = seal_root(&unseal, &root).unwrap();
    let shares = split(unseal.as_bytes(), 5, 3).unwrap();

    let mut p = UnsealProgress::new(3, 32);
    assert_eq!(p.threshold(), 3);
    assert_eq!(
        p.add(shares[0].clone()).unwrap(),
        Progress::Pending { have: 1, need: 3 }
    );
    // A duplicate is refused and the progress kept.
    assert_eq!(p.add(shares[0].clone()), Err(ShamirError::DuplicateShare));
    assert_eq!(p.progress(), 1);
    // Short and long shares likewise.
    assert_eq!(
        p.add(shares[1][..32].to_vec()),
        Err(ShamirError::ShareLength {
            expected: 33,
            got: 32
        })
    );
    assert_eq!(
        p.add(vec![0; 34]),
        Err(ShamirError::ShareLength {
            expected: 33,
            got: 34
        })
    );
    assert_eq!(p.add(vec![0; 33]), Err(ShamirError::ZeroX));
    assert_eq!(p.progress(), 1);
    assert_eq!(
        p.add(shares[3].clone()).unwrap(),
        Progress::Pending { have: 2, need: 3 }
    );
    let Progress::Complete(key) = p.add(shares[4].clone()).unwrap() else {
        panic!("threshold reached")
    };
    assert_eq!(p.progress(), 0, "reset after completion");
    let key = RootKey::from_bytes(&key).unwrap();
    assert_eq!(open_root(&key, &sealed).unwrap().as_bytes(), root.as_bytes());

    // A share of a previous generation gives a wrong key, which opening the root
    // key refuses as an integrity error; the caller then resets.
    let previous = split(RootKey::generate().as_bytes(), 5, 3).unwrap();
    p.add(shares[0].clone()).unwrap();
    p.add(shares[1].clone()).unwrap();
    let mut stale = previous[2].clone();
    if shares[..2].iter().any(|s| s[32] == stale[32]) {
        stale[32] = (1..=255u8)
            .find(|x| shares[..2].iter().all(|s| s[32] != *x))
            .unwrap();
    }
    let Progress::Complete(wrong) = p.add(stale).unwrap() else {
        panic!()
    };
    let wrong = RootKey::from_bytes(&wrong).unwrap();
    assert!(open_root(&wrong, &sealed).unwrap_err().is_integrity());

    // reset drops partial progress.
    p.add(shares[0].clone()).unwrap();
    p.reset();
    assert_eq!(p.progress(), 0);
    assert!(format!("{p:?}").contains("redacted"));

    // Threshold 1: the share is the key.
    let mut one = UnsealProgress::new(1, 32);
    let Progress::Complete(k) = one.add(unseal.as_bytes().to_vec()).unwrap() else {
        panic!()
    };
    assert_eq!(&k[..], unseal.as_bytes());
    assert_eq!(format!("{:?}", Progress::Complete(k)), "Complete([redacted])");
    assert!(one.add(vec![0; 33]).is_err());
}

/// V9: a share's y value is uniform over all 256 values (the secret's included, which
/// a forced non-zero top coefficient would exclude at threshold 2).
#[test]
fn v9_share_values_are_uniform() {
    let secret = [0x37u8];
    let mut counts = [0u32; 256];
    let rounds = 25_600;
    for _ in 0..rounds {
        for s in split(&secret, 2, 2).unwrap() {
            counts[usize::from(s[0])] += 1;
        }
    }
    let expected = f64::from(rounds * 2) / 256.0;
    let chi2: f64 = counts
        .iter()
        .map(|&c| (f64::from(c) - expected).powi(2) / expected)
        .sum();
    // 255 degrees of freedom: the 1-in-a-million tail starts near 375.
    assert!(chi2 < 400.0, "chi-square {chi2}");
    assert!(counts[0x37] > 0);
}

/// G4: 10,000 random (n, t, secret) cases. Every t-subset reconstructs (all of them
/// when there are at most 16, else 16 random ones), t-1 shares do not give the secret
/// (checked for secrets of 8 bytes or more, where a chance match is 2^-64), and
/// duplicate, short and mixed-length share sets are refused.
#[test]
fn g4_property_split_combine() {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(0x6_4);
    let (mut subsets, mut below, mut refused) = (0u64, 0u64, 0u64);
    for case in 0..10_000 {
        // Mostly small committees, as unseal keys have; every 500th case a large one.
        let n: u8 = if case % 500 == 0 {
            rng.random_range(2..=255)
        } else {
            rng.random_range(2..=10)
        };
        let t: u8 = rng.random_range(2..=n.min(if n > 10 { 12 } else { n }));
        let len = if rng.random_bool(0.5) {
            32
        } else {
            rng.random_range(1..=48)
        };
        let secret: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let shares = split(&secret, n, t).unwrap();
        assert_eq!(shares.len(), usize::from(n));

        let all = combinations_count(n.into(), t.into());
        if all <= 16 {
            for idx in combinations(n.into(), t.into()) {
                assert_eq!(
                    combine(&pick(&shares, &idx)).unwrap(),
                    secret,
                    "n={n} t={t} {idx:?}"
                );
                subsets += 1;
            }
        } else {
            for _ in 0..16 {
                let idx = sample(&mut rng, n.into(), t.into()).into_vec();
                assert_eq!(
                    combine(&pick(&shares, &idx)).unwrap(),
                    secret,
                    "n={n} t={t} {idx:?}"
                );
                subsets += 1;
            }
        }
        if len >= 8 {
            let idx = sample(&mut rng, n.into(), usize::from(t) - 1).into_vec();
            if idx.len() >= 2 {
                assert_ne!(
                    combine(&pick(&shares, &idx)).unwrap(),
                    secret,
                    "n={n} t={t}: t-1 shares"
                );
                below += 1;
            }
        }
        // A duplicate, a short share, a share of another length, a zero x.
        let mut dup = pick(&shares, &sample(&mut rng, n.into(), t.into()).into_vec());
        let j = rng.random_range(1..dup.len());
        dup[j] = dup[0].clone();
        assert_eq!(combine(&dup), Err(ShamirError::DuplicateShare));
        let mut short = pick(&shares, &sample(&mut rng, n.into(), t.into()).into_vec());
        let i = rng.random_range(0..short.len());
        let keep = rng.random_range(0..short[i].len());
        short[i].truncate(keep);
        assert!(matches!(
            combine(&short),
            Err(ShamirError::ShareTooShort(_) | ShamirError::ShareLengthMismatch { .. })
        ));
        let mut long = pick(&shares, &sample(&mut rng, n.into(), t.into()).into_vec());
        long[i].insert(0, 0);
        assert!(matches!(
            combine(&long),
            Err(ShamirError::ShareLengthMismatch { .. })
        ));
        refused += 3;
    }
    println!(
        "G4: 10000 cases, {subsets} t-subsets reconstructed, {below} below-threshold sets \
         gave no secret, {refused} bad sets refused, {:?}",
        started.elapsed()
    );
}

/// G4 mixed generations: shares of two splits of the same unseal key never combine to
/// it, and the wrong key never opens the sealed root key.
#[test]
fn g4_mixed_generation_shares_are_rejected() {
    let mut rng = StdRng::seed_from_u64(7);
    let unseal = RootKey::generate();
    let sealed = seal_root(&unseal, &RootKey::generate()).unwrap();
    for _ in 0..300 {
        let n = rng.random_range(2..=7u8);
        let t = rng.random_range(2..=n);
        let a = split(unseal.as_bytes(), n, t).unwrap();
        let b = split(unseal.as_bytes(), n, t).unwrap();
        let mut set = vec![a[0].clone()];
        for s in &b {
            if set.len() == usize::from(t) {
                break;
            }
            if set.iter().all(|h| h[32] != s[32]) {
                set.push(s.clone());
            }
        }
        if set.len() < usize::from(t) {
            continue;
        }
        let got = combine(&set).unwrap();
        assert_ne!(got, unseal.as_bytes());
        let key = RootKey::from_bytes(&got).unwrap();
        assert!(open_root(&key, &sealed).unwrap_err().is_integrity());
    }
}

fn combinations_count(n: u64, k: u64) -> u64 {
    let mut c = 1u64;
    for i in 0..k {
        c = c * (n - i) / (i + 1);
        if c > 1 << 40 {
            return c;
        }
    }
    c
}

fn combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut idx: Vec<usize> = (0..k).collect();
    loop {
        out.push(idx.clone());
        let Some(i) = (0..k).rev().find(|&i| idx[i] != i + n - k) else {
            return out;
        };
        idx[i] += 1;
        for j in i + 1..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}
