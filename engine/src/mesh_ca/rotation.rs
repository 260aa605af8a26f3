//! Root rotation as a pure state machine (RELIABILITY M12: no handshake may fail).
//!
//! A sidecar trusts the roots it last fetched; if it met a leaf signed by a root it did
//! not know yet, the handshake would fail. So a rotation has three phases, each kept in
//! the CA Secret so every replica (and a restarted one) agrees on where it stands:
//!
//! 1. **Begin** (a newer `rotate-requested-at` than the last one handled): a new root is
//!    generated and added to the trust bundle, but does not sign yet.
//! 2. **Activate** (once the propagation time has passed, so every sidecar has had time
//!    to fetch the bundle): the new root signs; the old one moves to "retiring".
//! 3. **Drop** (once every leaf the old root signed has expired): the old root leaves the
//!    bundle. Its last leaf was signed at the latest at activation plus the propagation
//!    time (a replica that had not seen the activation yet), and lives one leaf TTL.
//!
//! Nothing here reads a clock or the API: the caller passes `now` and the stored state.

use jiff::{SignedDuration, Timestamp};

/// How long each phase waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a new root sits in the bundle before it signs.
    pub propagation: SignedDuration,
    /// The leaf TTL: how long a leaf of the old root may still be in use.
    pub leaf_ttl: SignedDuration,
}

/// A root that no longer signs, kept in the bundle until `drop_at`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retiring {
    /// SHA-256 of the root certificate's DER, lowercase hex.
    pub sha256: String,
    pub drop_at: Timestamp,
}

/// Where a managed CA stands, as stored in the Secret's annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationState {
    /// The `rotate-requested-at` value the last rotation started from.
    pub handled_request: Option<Timestamp>,
    /// Set while a new root waits in the bundle: when it starts signing.
    pub next_activates_at: Option<Timestamp>,
    pub retiring: Vec<Retiring>,
}

/// One transition to write to the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Generate a new root, add it to the bundle, record `request` as handled.
    Begin {
        request: Timestamp,
        activates_at: Timestamp,
    },
    /// The waiting root signs from now on; the old one is dropped at `drop_old_at`.
    Activate { drop_old_at: Timestamp },
    /// These retired roots leave the bundle.
    Drop { sha256: Vec<String> },
}

impl Step {
    /// The phase name used in logs and the `phase` metric label.
    pub fn phase(&self) -> &'static str {
        match self {
            Step::Begin { .. } => "started",
            Step::Activate { .. } => "activated",
            Step::Drop { .. } => "retired",
        }
    }
}

/// The next transition due at `now`, if any. Finishing a rotation in progress comes
/// before starting another, so a request made mid-rotation starts once it is done.
pub fn next_step(
    state: &RotationState,
    requested: Option<Timestamp>,
    now: Timestamp,
    timings: Timings,
) -> Option<Step> {
    if let Some(at) = state.next_activates_at
        && now >= at
    {
        return Some(Step::Activate {
            drop_old_at: now + timings.propagation + timings.leaf_ttl,
        });
    }
    let due: Vec<String> = state
        .retiring
        .iter()
        .filter(|r| now >= r.drop_at)
        .map(|r| r.sha256.clone())
        .collect();
    if !due.is_empty() {
        return Some(Step::Drop { sha256: due });
    }
    match (requested, state.handled_request, state.next_activates_at) {
        (Some(request), handled, None) if handled.is_none_or(|h| request > h) => Some(Step::Begin {
            request,
            activates_at: now + timings.propagation,
        }),
        _ => None,
    }
}

/// Which phase a state is in, for the `rotation_phase` gauge: 0 stable, 1 a new root is
/// propagating, 2 an old root is retiring.
pub fn phase_number(state: &RotationState) -> i64 {
    if state.next_activates_at.is_some() {
        1
    } else if !state.retiring.is_empty() {
        2
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const TIMINGS: Timings = Timings {
        propagation: SignedDuration::from_mins(5),
        leaf_ttl: SignedDuration::from_hours(24),
    };

    #[test]
    fn nothing_happens_without_a_request() {
        let state = RotationState::default();
        assert_eq!(next_step(&state, None, t("2030-01-01T00:00:00Z"), TIMINGS), None);
    }

    /// The whole rotation, phase by phase, with the clock moved by hand.
    #[test]
    fn a_rotation_adds_then_activates_then_drops() {
        let request = t("2030-01-01T00:00:00Z");
        let mut state = RotationState::default();

        let now = t("2030-01-01T00:00:10Z");
        let step = next_step(&state, Some(request), now, TIMINGS).unwrap();
        assert_eq!(
            step,
            Step::Begin {
                request,
                activates_at: t("2030-01-01T00:05:10Z")
            }
        );
        state.handled_request = Some(request);
        state.next_activates_at = Some(t("2030-01-01T00:05:10Z"));
        assert_eq!(phase_number(&state), 1);

        // The new root only propagates until its time has come; the request is handled.
        assert_eq!(
            next_step(&state, Some(request), t("2030-01-01T00:05:09Z"), TIMINGS),
            None
        );

        let now = t("2030-01-01T00:05:10Z");
        let step = next_step(&state, Some(request), now, TIMINGS).unwrap();
        // The old root's last leaf: signed up to one propagation time after activation
        // by a replica that had not seen it yet, living one leaf TTL.
        assert_eq!(
            step,
            Step::Activate {
                drop_old_at: t("2030-01-02T00:10:10Z")
            }
        );
        state.next_activates_at = None;
        state.retiring = vec![Retiring {
            sha256: "old".into(),
            drop_at: t("2030-01-02T00:10:10Z"),
        }];
        assert_eq!(phase_number(&state), 2);

        assert_eq!(
            next_step(&state, Some(request), t("2030-01-02T00:10:09Z"), TIMINGS),
            None
        );
        assert_eq!(
            next_step(&state, Some(request), t("2030-01-02T00:10:10Z"), TIMINGS),
            Some(Step::Drop {
                sha256: vec!["old".into()]
            })
        );
        state.retiring.clear();
        assert_eq!(phase_number(&state), 0);
        assert_eq!(
            next_step(&state, Some(request), t("2030-01-03T00:00:00Z"), TIMINGS),
            None
        );
    }

    #[test]
    fn a_request_during_a_rotation_waits_for_the_activation() {
        let first = t("2030-01-01T00:00:00Z");
        let second = t("2030-01-01T00:01:00Z");
        let state = RotationState {
            handled_request: Some(first),
            next_activates_at: Some(t("2030-01-01T00:05:00Z")),
            retiring: vec![],
        };
        assert_eq!(
            next_step(&state, Some(second), t("2030-01-01T00:02:00Z"), TIMINGS),
            None
        );
        // Once activated (old root retiring), the newer request starts the next rotation.
        let state = RotationState {
            handled_request: Some(first),
            next_activates_at: None,
            retiring: vec![Retiring {
                sha256: "old".into(),
                drop_at: t("2030-01-02T00:10:00Z"),
            }],
        };
        assert!(matches!(
            next_step(&state, Some(second), t("2030-01-01T00:06:00Z"), TIMINGS),
            Some(Step::Begin { request, .. }) if request == second
        ));
    }

    #[test]
    fn an_old_or_repeated_request_is_not_a_new_rotation() {
        let state = RotationState {
            handled_request: Some(t("2030-01-01T00:00:00Z")),
            ..Default::default()
        };
        for request in ["2030-01-01T00:00:00Z", "2029-12-31T00:00:00Z"] {
            assert_eq!(
                next_step(&state, Some(t(request)), t("2030-02-01T00:00:00Z"), TIMINGS),
                None
            );
        }
    }

    #[test]
    fn activation_comes_before_due_drops_and_drops_only_the_due_roots() {
        let state = RotationState {
            handled_request: None,
            next_activates_at: None,
            retiring: vec![
                Retiring {
                    sha256: "a".into(),
                    drop_at: t("2030-01-01T00:00:00Z"),
                },
                Retiring {
                    sha256: "b".into(),
                    drop_at: t("2030-01-03T00:00:00Z"),
                },
            ],
        };
        assert_eq!(
            next_step(&state, None, t("2030-01-02T00:00:00Z"), TIMINGS),
            Some(Step::Drop {
                sha256: vec!["a".into()]
            })
        );
        let activating = RotationState {
            next_activates_at: Some(t("2030-01-01T00:00:00Z")),
            ..state
        };
        assert!(matches!(
            next_step(&activating, None, t("2030-01-02T00:00:00Z"), TIMINGS),
            Some(Step::Activate { .. })
        ));
    }
}
