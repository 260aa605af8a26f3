//! What a sync ends in: `Synced` (what status reports, and when to look again) or a
//! `Failure` (the Ready=False reason and message, and whether retrying soon may help).

use super::{engine, reasons, schedule::Lease};
use std::time::Duration;

/// Why a sync did not complete: the Ready=False reason, a message (no values), and
/// whether retrying soon may help.
#[derive(Debug)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
    pub transient: bool,
}

impl Failure {
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            transient: false,
        }
    }

    pub fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            transient: true,
        }
    }

    pub fn engine(error: engine::Error) -> Self {
        Self {
            reason: error.reason(),
            transient: error.transient(),
            message: error.to_string(),
        }
    }

    pub fn kube(what: &str, error: kube::Error) -> Self {
        Self::transient(reasons::KUBERNETES_ERROR, format!("{what}: {error}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Created,
    Changed,
    Restored,
    Rotated,
}

impl Write {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Changed => "changed",
            Self::Restored => "restored",
            Self::Rotated => "rotated",
        }
    }
}

/// What a successful sync leaves in status, and when to look again.
#[derive(Debug, Default)]
pub struct Synced {
    pub wrote: Option<Write>,
    pub hmac: String,
    pub version: Option<i64>,
    pub lease: Option<Lease>,
    pub next: Duration,
    /// A replaced lease still waits for its rollout (reported in the message).
    pub pending_rollouts: usize,
}
