//! Test-only fault injection, for the end-to-end tests of RELIABILITY K1 and K4 (never
//! set by the chart): with `CAPSTAN_CONTROLLER_TEST_PAUSE_AT=<point>` in its environment
//! the controller, the first time a reconcile reaches `<point>`, logs
//! `Test fault: pausing at <point>` and sleeps `TEST_PAUSE`, so that a test can SIGKILL
//! or SIGSTOP it at exactly that point. Points: `intent` (the intent to issue is saved,
//! nothing is issued yet), `issued` (the engine issued a credential whose lease id is
//! not recorded yet), `claimed` (a reconcile claimed the intent a stopped issue left,
//! and has not revoked its token yet) and `revoked` (it revoked that token, and has not
//! cleared the intent yet). It ships in every binary, so a set variable is announced
//! with a Warning in the log at startup (`warn_if_set`, called by main). Unset, it costs
//! one lookup of a cached value.
//!
//! The one process-wide state in the controller, on purpose: "the first time in this
//! process" is what the tests rely on, across leadership terms.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub const TEST_PAUSE_AT_ENV: &str = "CAPSTAN_CONTROLLER_TEST_PAUSE_AT";
const TEST_PAUSE: Duration = Duration::from_secs(5);

/// The fault point `TEST_PAUSE_AT_ENV` names, read once; the first read warns that it
/// is set (a production controller must never run with it).
fn test_pause_at() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| {
        let at = std::env::var(TEST_PAUSE_AT_ENV).ok();
        if let Some(point) = &at {
            tracing::warn!(
                point = %point,
                "{TEST_PAUSE_AT_ENV} is set: this controller runs with a TEST-ONLY fault point and pauses \
                 {TEST_PAUSE:?} the first time it reaches {point:?}. Never set it outside Capstan's tests."
            );
        }
        at
    })
    .as_deref()
}

/// Reads the variable at startup, so that a set one is announced at once.
pub fn warn_if_set() {
    test_pause_at();
}

/// Pauses here if this is the named point, the first time only.
pub async fn point(name: &str) {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if test_pause_at() == Some(name) && !TAKEN.swap(true, Ordering::SeqCst) {
        tracing::warn!(point = name, "Test fault: pausing at {name}");
        tokio::time::sleep(TEST_PAUSE).await;
    }
}
