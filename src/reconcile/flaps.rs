//! The watch loop's flap tracker, pure and testable with paused time: it turns containers that
//! keep dying into "degraded" and slows their repair instead of recreating them in a hot loop
//! (retrying a failed pass is [`crate::backoff::Backoff`]'s job).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Deaths and repairs of containers within a sliding window.
#[derive(Debug, Clone)]
pub struct FlapTracker {
    window: Duration,
    threshold: usize,
    /// Base and cap of the delay between repairs of a flapping container.
    repair_base: Duration,
    repair_cap: Duration,
    events: BTreeMap<String, Vec<Instant>>,
    repairs: BTreeMap<String, Vec<Instant>>,
}

impl FlapTracker {
    pub fn new(threshold: usize, window: Duration) -> FlapTracker {
        FlapTracker {
            window,
            threshold: threshold.max(1),
            repair_base: Duration::from_secs(1),
            repair_cap: Duration::from_secs(300),
            events: BTreeMap::new(),
            repairs: BTreeMap::new(),
        }
    }

    /// The engine reported that `container` died.
    pub fn died(&mut self, container: &str, at: Instant) {
        self.events
            .entry(container.to_string())
            .or_default()
            .push(at);
    }

    /// soul started or recreated `container` because it was stopped or gone.
    pub fn repaired(&mut self, container: &str, at: Instant) {
        self.repairs
            .entry(container.to_string())
            .or_default()
            .push(at);
    }

    fn prune(&mut self, now: Instant) {
        let window = self.window;
        for list in self.events.values_mut().chain(self.repairs.values_mut()) {
            list.retain(|t| now.saturating_duration_since(*t) < window);
        }
        self.events.retain(|_, l| !l.is_empty());
        self.repairs.retain(|_, l| !l.is_empty());
    }

    /// How often `container` went down in the window: the engine's deaths, or soul's repairs
    /// when those are more (a container removed while soul was not listening).
    pub fn restarts(&mut self, container: &str, now: Instant) -> usize {
        self.prune(now);
        let deaths = self.events.get(container).map_or(0, Vec::len);
        deaths.max(self.repairs.get(container).map_or(0, Vec::len))
    }

    /// Containers with at least `threshold` restarts in the window.
    pub fn degraded(&mut self, now: Instant) -> Vec<String> {
        self.prune(now);
        let mut names: Vec<String> = self
            .events
            .keys()
            .chain(self.repairs.keys())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|n| self.restarts(n, now) >= self.threshold)
            .collect()
    }

    /// When soul may next repair `container`: right away for the first repairs, then after
    /// an exponentially growing delay since the last one.
    pub fn next_repair(&mut self, container: &str, now: Instant) -> Instant {
        self.prune(now);
        let Some(last) = self.repairs.get(container).and_then(|r| r.last().copied()) else {
            return now;
        };
        let n = self.repairs.get(container).map_or(0, Vec::len);
        if n < 2 {
            return now;
        }
        let delay = self
            .repair_base
            .saturating_mul(1u32 << (n - 2).min(20) as u32)
            .min(self.repair_cap);
        (last + delay).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn flapping_containers_are_degraded_and_repaired_ever_more_slowly() {
        let mut f = FlapTracker::new(3, Duration::from_secs(600));
        let c = "soul-home-notes-app";
        let t0 = Instant::now();
        assert_eq!(f.next_repair(c, t0), t0);
        f.repaired(c, t0);
        assert_eq!(f.next_repair(c, t0), t0, "a second repair is immediate");
        f.repaired(c, t0);
        assert_eq!(f.next_repair(c, t0), t0 + Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        f.repaired(c, t1);
        assert_eq!(f.next_repair(c, t1), t1 + Duration::from_secs(2));
        assert_eq!(f.degraded(t1), vec![c.to_string()]);
        f.died("other", t1);
        f.died("other", t1);
        assert_eq!(f.degraded(t1), vec![c.to_string()]);
        // A death soul repaired counts once, not twice.
        f.died(c, t1);
        f.died(c, t1);
        assert_eq!(f.restarts(c, t1), 3);
        f.died("other", t1);
        assert_eq!(f.degraded(t1), vec!["other".to_string(), c.to_string()]);
        // Outside the window, everything is forgotten.
        tokio::time::advance(Duration::from_secs(601)).await;
        let later = Instant::now();
        assert!(f.degraded(later).is_empty());
        assert_eq!(f.next_repair(c, later), later);
        assert_eq!(f.restarts(c, later), 0);
    }
}
