//! What a leased sync does (pure): from the lease record, the target's state and the
//! time, whether to restore the target, and whether to keep, renew or replace the
//! credential. `super::sync` then does it.

use super::super::{
    leases::Record,
    schedule::{self, Lease, RenewBefore, Step},
};
use k8s_openapi::jiff::Timestamp;
use std::time::Duration;

/// What the reconcile observed.
pub struct Observed<'a> {
    pub record: &'a Record,
    /// `validate::fingerprint` of the spec now.
    pub fingerprint: &'a str,
    /// The HMAC of the target's data; None when there is no target.
    pub in_place: Option<&'a str>,
    /// Whether the target has the type the spec asks for.
    pub type_ok: bool,
    /// Whether this process still holds the current credential's data (to write back).
    pub restorable: bool,
    pub renew_before: RenewBefore,
    pub now: Timestamp,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Write the current credential back: the target lost it (a hand edit or deletion).
    pub restore: bool,
    pub lease: Then,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing is due.
    Keep,
    /// Renew the current lease (replaced instead if the engine refuses).
    Renew,
    /// Issue a new credential, for this reason (Event text), and retire the current one.
    Replace(&'static str),
}

pub fn plan(o: &Observed<'_>) -> Plan {
    let replace = |why| Plan {
        restore: false,
        lease: Then::Replace(why),
    };
    let Some(current) = &o.record.current else {
        return replace("first credential");
    };
    if o.record.fingerprint != o.fingerprint {
        return replace("the source or auth changed");
    }
    let lost = o.in_place != Some(current.hmac.as_str()) || !o.type_ok;
    if lost && !o.restorable {
        return replace("the target no longer holds the credential and it cannot be read again");
    }
    let lease = match schedule::plan(
        &effective(o.record).expect("a current lease"),
        o.renew_before,
        o.now,
    ) {
        Step::Wait { .. } => Then::Keep,
        Step::Replace => Then::Replace("the lease is at its max TTL"),
        Step::Renew => Then::Renew,
    };
    Plan { restore: lost, lease }
}

/// The current lease as it can last: no longer than the token that issued it.
pub fn effective(record: &Record) -> Option<Lease> {
    let current = record.current.as_ref()?;
    Some(schedule::capped(current.lease(), current.token_expires_at))
}

/// When to look again: at the next renewal or replacement of `lease`, at `token_wake`
/// (the issuing token's renewal), and within `pending` (a retiring lease), never
/// sooner than a second.
pub fn next_wake(
    lease: &Lease,
    renew_before: RenewBefore,
    now: Timestamp,
    token_wake: Option<Duration>,
    pending: Duration,
) -> Duration {
    let mut next = pending;
    if let Some(wake) = token_wake {
        next = next.min(wake.max(Duration::from_secs(1)));
    }
    let wait = match schedule::plan(lease, renew_before, now) {
        Step::Wait { at } => schedule::until(now, at),
        _ => Duration::from_secs(1),
    };
    next.min(wait.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secretsync::leases::Current;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// A record with a renewable 300 s lease issued at t(0), fingerprint "fp".
    fn record() -> Record {
        let lease = Lease::issued(t(0), Duration::from_secs(300), true);
        let mut record = Record {
            fingerprint: "fp".into(),
            ..Default::default()
        };
        record.replace(Current::new(Some("lease-1".into()), &lease, "h1".into()));
        record
    }

    fn observed<'a>(record: &'a Record, now: Timestamp) -> Observed<'a> {
        Observed {
            record,
            fingerprint: "fp",
            in_place: Some("h1"),
            type_ok: true,
            restorable: true,
            renew_before: RenewBefore::default(),
            now,
        }
    }

    #[test]
    fn the_first_credential_and_a_changed_spec_are_issued() {
        let empty = Record::default();
        assert_eq!(
            plan(&observed(&empty, t(0))).lease,
            Then::Replace("first credential")
        );
        let record = record();
        let changed = Observed {
            fingerprint: "other",
            ..observed(&record, t(10))
        };
        assert_eq!(plan(&changed).lease, Then::Replace("the source or auth changed"));
    }

    #[test]
    fn a_lease_is_kept_then_renewed_at_two_thirds() {
        let record = record();
        assert_eq!(
            plan(&observed(&record, t(100))),
            Plan {
                restore: false,
                lease: Then::Keep
            }
        );
        assert_eq!(plan(&observed(&record, t(201))).lease, Then::Renew);
    }

    #[test]
    fn a_lost_target_is_restored_while_the_data_is_held_else_replaced() {
        let record = record();
        let edited = Observed {
            in_place: Some("tampered"),
            ..observed(&record, t(10))
        };
        assert_eq!(
            plan(&edited),
            Plan {
                restore: true,
                lease: Then::Keep
            }
        );
        let forgotten = Observed {
            in_place: None,
            restorable: false,
            ..observed(&record, t(10))
        };
        assert!(matches!(plan(&forgotten).lease, Then::Replace(_)));
        let retyped = Observed {
            type_ok: false,
            ..observed(&record, t(10))
        };
        assert!(plan(&retyped).restore);
    }

    #[test]
    fn a_lease_at_its_max_ttl_is_replaced_not_renewed() {
        let mut record = record();
        let current = record.current.as_mut().unwrap();
        // Renewed at t(200) for 100 s where 300 were asked: the max TTL is reached.
        let capped =
            current
                .lease()
                .renewed(t(200), Duration::from_secs(300), Duration::from_secs(100), true);
        current.set_lease(&capped);
        assert_eq!(
            plan(&observed(&record, t(250))).lease,
            Then::Replace("the lease is at its max TTL")
        );
    }

    #[test]
    fn the_next_look_is_at_the_renewal_or_sooner() {
        let record = record();
        let lease = effective(&record).unwrap();
        let resync = Duration::from_secs(300);
        let rd = RenewBefore::default();
        assert_eq!(
            next_wake(&lease, rd, t(0), None, resync),
            Duration::from_secs(200)
        );
        assert_eq!(
            next_wake(&lease, rd, t(0), Some(Duration::from_secs(30)), resync),
            Duration::from_secs(30)
        );
        assert_eq!(
            next_wake(&lease, rd, t(250), None, resync),
            Duration::from_secs(1)
        );
    }
}
