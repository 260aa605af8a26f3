//! The properties the engine's fuzz targets (engine/fuzz) check, shared with the stable
//! test that replays their seed corpora (engine/tests/fuzz_seeds.rs). Each function
//! takes the raw fuzz input, must never panic on its own, and panics when a property
//! breaks.
#![allow(dead_code)]

use capstan_engine::policy::{Acl, Capability, Policy};
use capstan_engine::store::barrier::{self, Keyring, RootKey};
use capstan_engine::store::shamir::{self, Progress, ShamirError, UnsealProgress};
use std::sync::OnceLock;

/// The policy parser and matcher. The input is `<policy text> \0 <path> \0 <path> ...`.
/// Never panics; a policy that parses compiles, and for every path: the capabilities
/// never include `deny`, `allows` agrees with `capabilities` (LIST aside, which also
/// tries the path without its trailing slash), a path that is not normalized gets
/// nothing, and adding `deny` on the path exactly takes everything away.
pub fn check_policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let policy_text = fields.next().unwrap_or("");
    let Ok(policy) = Policy::parse("fuzz", policy_text) else {
        return;
    };
    // Whatever parsed must parse again from its rules alone (as JSON, whose escaping
    // serde_json does for us).
    let rules: Vec<String> = policy
        .rules
        .iter()
        .map(|r| {
            let caps: Vec<&str> = r.capabilities.iter().map(|c| c.as_str()).collect();
            format!(
                "{}: {{\"capabilities\": {}}}",
                serde_json::to_string(&r.pattern).unwrap(),
                serde_json::to_string(&caps).unwrap()
            )
        })
        .collect();
    let rewritten = format!("{{\"path\": {{{}}}}}", rules.join(", "));
    let again = Policy::parse("fuzz", &rewritten).unwrap_or_else(|e| panic!("{rewritten:?}: {e}"));
    assert_eq!(again.rules, policy.rules);
    let acl = Acl::new(std::slice::from_ref(&policy));
    for path in fields.take(16) {
        let caps = acl.capabilities(path);
        assert!(!caps.contains(&Capability::Deny), "{path:?}");
        for cap in Capability::ALL {
            if cap != Capability::List {
                assert_eq!(acl.allows(path, cap), caps.contains(&cap), "{cap} on {path:?}");
            }
        }
        let normalized = !path.starts_with('/')
            && !path.contains("//")
            && !path.chars().any(char::is_control)
            && !path.split('/').any(|s| s == "." || s == "..");
        if !normalized {
            assert!(caps.is_empty(), "{path:?} is not normalized but gets {caps:?}");
            assert!(!Acl::root().allows(path, Capability::Read), "{path:?}");
            continue;
        }
        if path.contains('*') || path.contains('+') {
            continue; // a glob or wildcard pattern, not the path exactly
        }
        let deny = format!(
            "{{\"path\": {{{}: {{\"capabilities\": [\"deny\"]}}}}}}",
            serde_json::to_string(path).unwrap()
        );
        if let Ok(denied) = Policy::parse("deny", &deny) {
            let acl = Acl::new(&[policy.clone(), denied]);
            for cap in Capability::ALL {
                assert!(!acl.allows(path, cap), "deny on {path:?} leaves {cap}");
            }
        }
    }
}

struct Keys {
    root: RootKey,
    keyring: Keyring,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keyring = Keyring::generate();
        keyring.rotate();
        keyring.rotate();
        Keys {
            root: RootKey::from_bytes(&[7; 32]).unwrap(),
            keyring,
        }
    })
}

/// The barrier envelope. The first byte picks a mode, the second is a path length.
/// - mode 0: the rest is an envelope from outside: opening it (as an entry, a keyring
///   or a root key) fails, since nobody outside holds the keys; never a panic.
/// - mode 1: the rest is a plaintext: sealing it and opening it gives it back, and the
///   envelope altered as the last bytes of the input say (a bit flip at a position, a
///   truncation, a different path) does not open.
/// - other: the rest is glued after a well-formed header naming a term the keyring
///   holds: still fails.
pub fn check_barrier(data: &[u8]) {
    let [mode, path_len, rest @ ..] = data else {
        return;
    };
    let path_len = usize::from(*path_len).min(rest.len());
    let (path, body) = rest.split_at(path_len);
    let path = String::from_utf8_lossy(path);
    let keys = keys();
    match mode % 3 {
        0 => {
            assert!(
                keys.keyring.open(&path, body).is_err(),
                "a foreign envelope opened"
            );
            assert!(Keyring::open_with(&keys.root, body).is_err());
            assert!(barrier::open_root(&keys.root, body).is_err());
        }
        1 => {
            let env = keys.keyring.seal(&path, body).unwrap();
            assert_eq!(keys.keyring.open(&path, &env).unwrap(), body);
            let pos = body.first().map_or(0, |b| usize::from(*b)) * 7 % env.len();
            let mut flipped = env.clone();
            flipped[pos] ^= body.last().copied().unwrap_or(1).max(1);
            assert!(keys.keyring.open(&path, &flipped).unwrap_err().is_integrity());
            let cut = body.len() % env.len();
            assert!(keys.keyring.open(&path, &env[..cut]).unwrap_err().is_integrity());
            let other = format!("{path}x");
            assert!(keys.keyring.open(&other, &env).unwrap_err().is_integrity());
        }
        _ => {
            let term = 1 + (path_len % 3) as u32;
            let mut env = vec![barrier::ENVELOPE_VERSION];
            env.extend_from_slice(&term.to_be_bytes());
            env.extend_from_slice(body);
            assert!(keys.keyring.open(&path, &env).unwrap_err().is_integrity());
        }
    }
}

/// Shamir. The first byte picks a mode.
/// - even: the rest is shares: the second byte is the share length (1 to 64), then as
///   many shares as fit (at most 64). `combine` never panics; what it accepts it accepted for a
///   reason (at least two shares, one length of 2 bytes or more, distinct non-zero x),
///   and an unseal accumulator fed the same shares agrees.
/// - odd: `n`, `t`, then the secret: a split that succeeds gives `n` shares of which the
///   first `t`, the last `t` and all reconstruct it, in `combine` and through an unseal
///   accumulator; the parameters it refuses are the degenerate ones.
pub fn check_shamir(data: &[u8]) {
    let [mode, a, rest @ ..] = data else {
        return;
    };
    if mode % 2 == 0 {
        let len = usize::from(*a % 64) + 1;
        // Up to 64 shares: combining is quadratic in their number (constant-time
        // inversions), and more would only slow the fuzzer down.
        let shares: Vec<Vec<u8>> = rest.chunks_exact(len).take(64).map(<[u8]>::to_vec).collect();
        match shamir::combine(&shares) {
            Ok(secret) => {
                assert!(shares.len() >= 2 && len >= 2);
                assert_eq!(secret.len(), len - 1);
                let mut xs: Vec<u8> = shares.iter().map(|s| s[len - 1]).collect();
                assert!(!xs.contains(&0));
                xs.sort_unstable();
                xs.dedup();
                assert_eq!(xs.len(), shares.len());
                if shares.len() <= 255 && len >= 2 {
                    let mut progress = UnsealProgress::new(shares.len() as u8, len - 1);
                    let mut out = None;
                    for s in &shares {
                        if let Progress::Complete(k) = progress.add(s.clone()).unwrap() {
                            out = Some(k);
                        }
                    }
                    assert_eq!(out.as_deref().map(Vec::as_slice), Some(secret.as_slice()));
                }
            }
            Err(ShamirError::TooFewShares(n)) => assert!(n < 2),
            Err(_) => {}
        }
    } else {
        let (n, t) = (*a, rest.first().copied().unwrap_or(0));
        // At most 64 bytes: a 255-of-255 split of a long secret costs tens of
        // milliseconds, which would slow the fuzzer down without reaching new code.
        let secret = rest.get(1..).unwrap_or(&[]);
        let secret = &secret[..secret.len().min(64)];
        // Splitting costs n * t * secret bytes field multiplications: past a bound, check
        // only that the parameters are judged as `split` judges them.
        if usize::from(n) * usize::from(t) * secret.len() > 20_000 {
            let valid = shamir::check_params(n.into(), t.into()).is_ok();
            assert_eq!(valid, t <= n && (t >= 2 || (t == 1 && n == 1)), "n={n} t={t}");
            return;
        }
        match shamir::split(secret, n, t) {
            Ok(shares) => {
                assert!(!secret.is_empty() && t <= n && (t >= 2 || (t == 1 && n == 1)));
                assert_eq!(shares.len(), usize::from(n));
                if n == 1 {
                    assert_eq!(shares[0], secret);
                    return;
                }
                let t = usize::from(t);
                let all = if shares.len() <= 32 {
                    &shares[..]
                } else {
                    &shares[..t]
                };
                for set in [&shares[..t], &shares[shares.len() - t..], all] {
                    assert_eq!(shamir::combine(set).unwrap(), secret);
                }
                let mut progress = UnsealProgress::new(t as u8, secret.len());
                for (i, s) in shares.iter().rev().take(t).enumerate() {
                    match progress.add(s.clone()).unwrap() {
                        Progress::Pending { have, .. } => assert_eq!(usize::from(have), i + 1),
                        Progress::Complete(k) => assert_eq!(&k[..], secret),
                    }
                }
            }
            Err(_) => assert!(secret.is_empty() || t > n || (t < 2 && !(t == 1 && n == 1))),
        }
    }
}
