//! The clocks the delivery core reads, so that a simulation can replace them.
//!
//! - Durations and deadlines use [`Instant`], tokio's: under a paused runtime
//!   (tests, the deterministic simulation) it is virtual time that jumps to the
//!   next timer when every task waits; otherwise it is the monotonic clock.
//! - Wall-clock times (an event's `observed_at`, a re-check's due time, a dead
//!   letter's `paysync-failed-at`) come from [`now_ms`]: the system clock, or,
//!   on a thread that called [`simulate`], a fixed epoch advanced by tokio's
//!   clock, so that a simulated run reads the same times every time it is
//!   replayed.
//!
//! Random draws (retry jitter) use `fastrand`'s thread-local generator, which
//! a simulation seeds on its one thread (`fastrand::seed`).

use std::cell::Cell;
use std::time::SystemTime;

pub use tokio::time::Instant;

thread_local! {
    /// A simulated wall clock: (epoch ms at the anchor, the anchor).
    static SIMULATED: Cell<Option<(i64, Instant)>> = const { Cell::new(None) };
}

/// From now on, on this thread, the wall clock reads `epoch_ms` plus the time
/// tokio's clock advanced since this call.
pub fn simulate(epoch_ms: i64) {
    SIMULATED.with(|s| s.set(Some((epoch_ms, Instant::now()))));
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    if let Some((epoch, anchor)) = SIMULATED.with(Cell::get) {
        let since = Instant::now().saturating_duration_since(anchor).as_millis();
        return epoch.saturating_add(i64::try_from(since).unwrap_or(i64::MAX));
    }
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The wall clock as a `SystemTime` (for HTTP dates such as `Retry-After`).
pub fn system_now() -> SystemTime {
    let ms = u64::try_from(now_ms()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// Now as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339_now() -> String {
    let nanos = i128::from(now_ms()) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_wall_clock_follows_tokio_time() {
        simulate(1_700_000_000_000);
        assert_eq!(now_ms(), 1_700_000_000_000);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(now_ms(), 1_700_000_001_500);
        assert_eq!(rfc3339_now(), "2023-11-14T22:13:21.5Z");
    }
}
