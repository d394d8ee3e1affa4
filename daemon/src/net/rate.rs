//! `RateLimiter`: caps the bytes per second sent to peers (`--upload-rate-limit`), all peers
//! together.
//!
//! A virtual-clock limiter (GCRA): each send of `n` bytes is scheduled at the limiter's
//! "theoretical arrival time" and pushes it `n / rate` seconds on, so over any long window the
//! rate holds exactly, whatever the message sizes (a 4 MiB response is one message, so a token
//! bucket smaller than a message would never fill). After idleness at most [`BURST`] worth of
//! bytes goes out at once. Callers sleep outside the lock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How much unused time a limiter may bank (so an idle uplink can send this much at once).
pub const BURST: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    /// When the next send may start.
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// `bytes_per_sec` must be > 0 (the config refuses 0).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Reserves `n` bytes and returns when they may be sent (now or later).
    fn reserve(&self, n: u64) -> Instant {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
        *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        start
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: u64) {
        let at = self.reserve(n);
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_over_time() {
        let r = RateLimiter::new(1_000_000);
        let t0 = Instant::now();
        // 10 MB in 1 MB messages: ~10 s minus the burst.
        for _ in 0..10 {
            r.acquire(1_000_000).await;
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(9), "{took:?}");
        assert!(took <= Duration::from_secs(10), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_banks_only_the_burst() {
        let r = RateLimiter::new(1_000_000);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        // Only 250 ms are banked: the third 1 MB message starts 1.75 s later, not at once.
        for _ in 0..3 {
            r.acquire(1_000_000).await;
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1700), "{took:?}");
        assert!(took <= Duration::from_millis(1800), "{took:?}");
    }
}
