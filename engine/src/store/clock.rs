//! The clock that token and lease expiry run on (V14): Unix seconds that follow the wall
//! clock forward but never backward.
//!
//! Expiry times are persisted as wall-clock instants, so every replica and a restarted
//! engine agree on them. Read straight from the wall clock, a step back of an hour (an
//! NTP correction, a VM restored from a snapshot, TimeChaos) would give every lease and
//! token an hour more to live. So the engine's time is the monotonic clock's elapsed time
//! plus the largest offset to the wall clock seen so far: a step forward is followed (leases
//! expire early, which fails closed), a step back is ignored (the engine keeps counting
//! real seconds from where it was). A restart takes the wall clock as it finds it: a clock
//! that was stepped back while no engine ran cannot be told from a corrected one.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

/// `now = monotonic elapsed + offset`, all in milliseconds; the offset only grows.
struct Clock {
    start: Instant,
    offset_ms: AtomicI64,
}

impl Clock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            offset_ms: AtomicI64::new(i64::MIN),
        }
    }

    fn now_ms(&self, wall_ms: i64) -> i64 {
        let elapsed = self.start.elapsed().as_millis() as i64;
        let previous = self.offset_ms.fetch_max(wall_ms - elapsed, Ordering::Relaxed);
        elapsed + previous.max(wall_ms - elapsed)
    }
}

fn wall_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    }
}

/// Unix seconds, never running backward (see the module's comment).
pub fn now() -> i64 {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    CLOCK.get_or_init(Clock::new).now_ms(wall_ms()).div_euclid(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn follows_the_wall_clock_forward_and_counts_real_time_after_a_step_back() {
        let clock = Clock::new();
        let wall = 1_800_000_000_000;
        assert_eq!(clock.now_ms(wall), wall);
        // An hour forward: followed.
        let forward = clock.now_ms(wall + 3_600_000);
        assert!(forward >= wall + 3_600_000, "{forward}");
        // Two hours back: ignored, the clock keeps its place.
        std::thread::sleep(Duration::from_millis(20));
        let back = clock.now_ms(wall - 3_600_000);
        assert!(
            back >= forward + 20 && back < forward + 1_000,
            "{back} after {forward}"
        );
        // Real time still moves it while the wall clock stays behind.
        std::thread::sleep(Duration::from_millis(20));
        assert!(clock.now_ms(wall - 3_600_000) >= back + 20);
    }

    #[test]
    fn the_process_clock_is_the_wall_clock_when_nothing_jumped() {
        let (before, ours, after) = (wall_ms() / 1000, now(), wall_ms() / 1000);
        assert!(before <= ours && ours <= after, "{before} {ours} {after}");
    }
}
