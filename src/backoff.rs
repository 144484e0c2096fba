//! Capped exponential backoff with jitter: how soul retries what failed (the watch loop's
//! passes and engine events, the relay agent's registrations), pure and testable.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": each delay is between half and all of
/// `min(cap, base * 2^attempt)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay; `jitter` in [0, 1) picks where in the upper half it falls.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        let full = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random fraction in [0, 1) from the operating system (0.5 if it cannot give one).
pub fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let full: Vec<u128> = (0..7)
            .map(|_| b.next_delay(0.999_999).as_millis())
            .collect();
        assert_eq!(full, [99, 199, 399, 799, 1599, 1999, 1999]);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        for _ in 0..100 {
            let d = Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
                .next_delay(jitter());
            assert!(d >= Duration::from_millis(50) && d < Duration::from_millis(100));
        }
    }
}
