//! Refused attempts per source address in a sliding window: past the limit the gate answers
//! 429 and closes the connection. Valid tokens are never limited.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Failures {
    limit: usize,
    window: Duration,
    seen: HashMap<IpAddr, Vec<Instant>>,
}

impl Failures {
    pub fn new(limit: usize, window: Duration) -> Failures {
        Failures {
            limit: limit.max(1),
            window,
            seen: HashMap::new(),
        }
    }

    /// Records a refused attempt; true when this source is now over the limit.
    pub fn record(&mut self, source: IpAddr) -> bool {
        let now = Instant::now();
        let window = self.window;
        if self.seen.len() > 10_000 {
            // Bounded memory under a flood from many addresses.
            self.seen
                .retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < window));
        }
        let list = self.seen.entry(source).or_default();
        list.retain(|t| now.duration_since(*t) < window);
        list.push(now);
        list.len() > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_limit_per_source() {
        let mut f = Failures::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(!f.record(a) && !f.record(a) && !f.record(a));
        assert!(f.record(a));
        assert!(!f.record(b));
    }
}
