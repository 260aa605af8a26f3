//! When to renew a lease, and when to replace it (pure, explicit times).
//!
//! A lease is renewed when `renewBefore` of it is left (default a third: at two thirds
//! of its duration). Once the engine grants less than was asked (the lease reached its
//! max TTL) or the lease is not renewable, renewing cannot keep it alive: a new
//! credential is issued when `renewBefore` of the lease's *original* duration is left,
//! so the workloads have that long to roll over before the old one ends (S6). The old
//! lease is revoked only after that rollout (`leased::revoke`), never by renewal.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// `renewBefore`: how much of a lease is left when it is renewed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RenewBefore {
    /// This share of the lease's duration (0 < f < 1).
    Fraction(f64),
    /// This long before the lease ends.
    Before(Duration),
}

impl Default for RenewBefore {
    fn default() -> Self {
        Self::Fraction(1.0 / 3.0)
    }
}

impl RenewBefore {
    pub fn parse(text: Option<&str>) -> Result<Self, String> {
        let Some(text) = text else {
            return Ok(Self::default());
        };
        if let Some(percent) = text.strip_suffix('%') {
            let value: u8 = percent
                .parse()
                .map_err(|_| format!("renewBefore: {text:?} is not a percentage"))?;
            if !(1..=99).contains(&value) {
                return Err(format!("renewBefore: {text:?} must be between 1% and 99%"));
            }
            return Ok(Self::Fraction(f64::from(value) / 100.0));
        }
        capstan_contract::duration::parse(text)
            .map(Self::Before)
            .map_err(|e| format!("renewBefore: {e}"))
    }

    /// How long before the end of a lease of `duration` to act: never more than 90% of
    /// it, so a lease is always used for a while before it is renewed again.
    pub fn lead(self, duration: Duration) -> Duration {
        let lead = match self {
            Self::Fraction(f) => duration.mul_f64(f),
            Self::Before(d) => d,
        };
        lead.min(duration.mul_f64(0.9))
    }
}

/// What the controller knows of a lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// When the engine last granted it (issue or renewal).
    pub granted_at: Timestamp,
    /// How long that grant lasts.
    pub ttl: Duration,
    /// The duration of the first grant: the credential's normal lifetime.
    pub original_ttl: Duration,
    pub renewable: bool,
    /// A renewal was granted less than asked: the lease is at its max TTL.
    pub at_max: bool,
}

impl Lease {
    pub fn issued(now: Timestamp, ttl: Duration, renewable: bool) -> Self {
        Self {
            granted_at: now,
            ttl,
            original_ttl: ttl,
            renewable,
            at_max: !renewable,
        }
    }

    pub fn expires_at(&self) -> Timestamp {
        add(self.granted_at, self.ttl)
    }

    /// The lease after a renewal that asked for `requested` and was granted `granted`.
    pub fn renewed(&self, now: Timestamp, requested: Duration, granted: Duration, renewable: bool) -> Self {
        Self {
            granted_at: now,
            ttl: granted,
            original_ttl: self.original_ttl,
            renewable,
            // A second's slack: the engine rounds to whole seconds.
            at_max: !renewable || granted + Duration::from_secs(1) < requested,
        }
    }

    /// Whether renewing could still extend it.
    pub fn extendable(&self) -> bool {
        self.renewable && !self.at_max
    }
}

/// The lease as it really is when the token that issued it ends first: the engine
/// revokes a token's leases with the token (Vault's rule), so renewing the lease cannot
/// carry it past that point, and it must be replaced before.
pub fn capped(lease: Lease, token_expires_at: Option<Timestamp>) -> Lease {
    match token_expires_at {
        Some(end) if end < lease.expires_at() => Lease {
            ttl: until(lease.granted_at, end),
            at_max: true,
            ..lease
        },
        _ => lease,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do before `at`.
    Wait { at: Timestamp },
    /// Renew it now.
    Renew,
    /// Issue a new credential now and retire this one (it stays valid until revoked
    /// after the rollout, or until it expires).
    Replace,
}

/// The next step for `lease` at `now`.
pub fn plan(lease: &Lease, renew_before: RenewBefore, now: Timestamp) -> Step {
    let expires = lease.expires_at();
    if now >= expires {
        return Step::Replace;
    }
    if lease.extendable() {
        // Renewing no earlier than a tenth into the grant: never a renewal storm, even
        // for a lease of a second.
        let lead = renew_before.lead(lease.ttl);
        let floor = add(lease.granted_at, lease.ttl / 10);
        let at = sub(expires, lead).max(floor);
        if now >= at { Step::Renew } else { Step::Wait { at } }
    } else {
        // Replace with the lead of a whole normal lease, or at once if less is left.
        let at = sub(expires, renew_before.lead(lease.original_ttl));
        if now >= at {
            Step::Replace
        } else {
            Step::Wait { at }
        }
    }
}

pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

pub fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MIN)
}

/// How long from `now` until `at` (zero if it has passed).
pub fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }
    const fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// What the CRD's duration pattern admits (`^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$`)
    /// parses in the one grammar, `capstan_contract::duration` (which admits more:
    /// bare seconds and days, that the pattern keeps out of the spec).
    #[test]
    fn durations_the_crd_admits_parse_like_go() {
        use capstan_contract::duration::parse;
        assert_eq!(parse("90s"), Ok(s(90)));
        assert_eq!(parse("1h30m"), Ok(s(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1.5h"), Ok(s(5400)));
        for bad in ["", "s", "-1s", "1e3s"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn renew_before_is_a_share_or_a_duration() {
        assert_eq!(RenewBefore::parse(None), Ok(RenewBefore::Fraction(1.0 / 3.0)));
        assert_eq!(RenewBefore::parse(Some("25%")), Ok(RenewBefore::Fraction(0.25)));
        assert_eq!(RenewBefore::parse(Some("10m")), Ok(RenewBefore::Before(s(600))));
        assert!(RenewBefore::parse(Some("0%")).is_err());
        assert!(RenewBefore::parse(Some("100%")).is_err());
        // Never more than 90% of the lease.
        assert_eq!(RenewBefore::Before(s(3600)).lead(s(100)), s(90));
    }

    /// The default renews at two thirds of the lease, and the renewed lease again at
    /// two thirds of its new grant.
    #[test]
    fn renews_at_two_thirds_by_default() {
        let lease = Lease::issued(t(0), s(300), true);
        let rb = RenewBefore::default();
        assert_eq!(plan(&lease, rb, t(0)), Step::Wait { at: t(200) });
        assert_eq!(plan(&lease, rb, t(199)), Step::Wait { at: t(200) });
        assert_eq!(plan(&lease, rb, t(200)), Step::Renew);
        let renewed = lease.renewed(t(200), s(300), s(300), true);
        assert!(!renewed.at_max);
        assert_eq!(renewed.expires_at(), t(500));
        assert_eq!(plan(&renewed, rb, t(201)), Step::Wait { at: t(400) });
    }

    /// At max TTL (granted less than asked) a new credential is issued a normal lead
    /// before the end, never by renewing; past the end, at once.
    #[test]
    fn replaces_at_max_ttl_with_a_full_lead() {
        let lease = Lease::issued(t(0), s(300), true);
        let rb = RenewBefore::default();
        // Max TTL 450s: the renewal at 200 is granted 250s, not 300s.
        let capped = lease.renewed(t(200), s(300), s(250), true);
        assert!(capped.at_max && !capped.extendable());
        assert_eq!(capped.expires_at(), t(450));
        // The lead is a third of the normal 300s: replace at 350.
        assert_eq!(plan(&capped, rb, t(201)), Step::Wait { at: t(350) });
        assert_eq!(plan(&capped, rb, t(350)), Step::Replace);
        // Granted only 60s at max TTL: less than the lead is left, replace at once.
        let short = lease.renewed(t(200), s(300), s(60), true);
        assert_eq!(plan(&short, rb, t(200)), Step::Replace);
        // Expired: replace.
        assert_eq!(plan(&lease, rb, t(301)), Step::Replace);
    }

    #[test]
    fn non_renewable_leases_are_replaced_before_they_end() {
        // A certificate of 24h, renewBefore 2h: replaced at 22h.
        let cert = Lease::issued(t(0), s(86_400), false);
        let rb = RenewBefore::Before(s(7200));
        assert_eq!(plan(&cert, rb, t(10)), Step::Wait { at: t(79_200) });
        assert_eq!(plan(&cert, rb, t(79_200)), Step::Replace);
    }

    /// A tiny lease with a large renewBefore is still used for a tenth of its grant
    /// before renewal: no hot loop.
    #[test]
    fn no_renewal_storm_for_short_leases() {
        let lease = Lease::issued(t(0), s(10), true);
        let rb = RenewBefore::Before(s(3600));
        assert_eq!(plan(&lease, rb, t(0)), Step::Wait { at: t(1) });
    }

    /// A lease issued by a token that ends before it is replaced before the token ends,
    /// with a full lead; a token that outlives the lease changes nothing.
    #[test]
    fn a_lease_ends_with_its_token() {
        let rb = RenewBefore::default();
        let lease = Lease::issued(t(0), s(300), true);
        let capped_lease = capped(lease.clone(), Some(t(250)));
        assert_eq!(capped_lease.expires_at(), t(250));
        assert!(!capped_lease.extendable());
        assert_eq!(plan(&capped_lease, rb, t(10)), Step::Wait { at: t(150) });
        assert_eq!(plan(&capped_lease, rb, t(150)), Step::Replace);
        assert_eq!(capped(lease.clone(), Some(t(900))), lease);
        assert_eq!(capped(lease.clone(), None), lease);
    }

    #[test]
    fn a_renewal_granted_in_full_is_not_at_max() {
        let lease = Lease::issued(t(0), s(300), true);
        // Rounded down a little by the engine: still in full.
        assert!(!lease.renewed(t(200), s(300), s(299), true).at_max);
        assert!(lease.renewed(t(200), s(300), s(300), false).at_max);
    }
}
