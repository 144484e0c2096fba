//! The gate's connection slots: who may hold one of its `max` open connections.
//!
//! A connection is *unproven* until a credential is admitted on it. An unproven connection
//! is closed once its time to prove runs out, whatever it sends meanwhile (an h2 ping, a
//! request that gets 401); and when every slot is taken, a new connection evicts the oldest
//! unproven one, so a crowd that never showed a credential cannot keep a paired device out.
//! Only when every slot holds a proven connection does a newcomer wait.
//!
//! Per source address, at most `per_source` connections are open at once, and new ones come
//! at most `new_per_second` (with a burst of `burst`): one address cannot take the whole gate.
//! Connections the relay carries share the relay's address, so they are not counted per
//! source (the relay bounds its own sources).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How the slots are shared out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotLimits {
    /// Connections open at once, all sources together.
    pub max: usize,
    /// Connections open at once from one source address.
    pub per_source: usize,
    /// New connections per second from one source address, sustained…
    pub new_per_second: f64,
    /// …and at once.
    pub burst: f64,
}

impl Default for SlotLimits {
    fn default() -> SlotLimits {
        SlotLimits {
            max: 1024,
            per_source: 256,
            new_per_second: 128.0,
            burst: 512.0,
        }
    }
}

/// Why a connection got no slot: it is closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    #[error("this source has too many connections open")]
    SourceBusy,
    #[error("this source opens connections too fast")]
    SourceTooFast,
}

pub struct Slots {
    limits: SlotLimits,
    state: Mutex<State>,
    /// Woken when a slot is freed or a connection becomes evictable.
    room: Notify,
}

#[derive(Default)]
struct State {
    open: usize,
    next_id: u64,
    /// Unproven connections by age (ids grow), each with what tells it to go.
    unproven: BTreeMap<u64, Arc<Notify>>,
    sources: HashMap<IpAddr, Source>,
}

struct Source {
    open: usize,
    tokens: f64,
    refilled: Instant,
}

/// One connection's slot: freed when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    source: Option<IpAddr>,
    evict: Arc<Notify>,
    proven: AtomicBool,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Arc<Slots> {
        Arc::new(Slots {
            limits,
            state: Mutex::default(),
            room: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once a new connection could have a slot: one is free, or one is unproven
    /// (and would be evicted). The accept loop waits here before it accepts.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if s.open < self.limits.max || !s.unproven.is_empty() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// A slot for a connection from `source` (`None`: one the relay carries). Evicts the
    /// oldest unproven connection when every slot is taken; waits only when all are proven.
    pub async fn acquire(self: &Arc<Self>, source: Option<IpAddr>) -> Result<Slot, NoSlot> {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if let Some(ip) = source {
                    self.admit_source(&mut s, ip)?;
                }
                let room = s.open < self.limits.max;
                let evicted = if room { None } else { s.unproven.pop_first() };
                if room || evicted.is_some() {
                    if let Some((_, evict)) = evicted {
                        // Its slot is freed when its connection closes, a moment later.
                        evict.notify_one();
                    }
                    s.open += 1;
                    s.next_id += 1;
                    let id = s.next_id;
                    let evict = Arc::new(Notify::new());
                    s.unproven.insert(id, evict.clone());
                    if let Some(ip) = source {
                        let src = s.sources.get_mut(&ip).expect("admitted above");
                        src.open += 1;
                        src.tokens -= 1.0;
                    }
                    return Ok(Slot {
                        slots: self.clone(),
                        id,
                        source,
                        evict,
                        proven: AtomicBool::new(false),
                    });
                }
            }
            notified.await;
        }
    }

    /// Whether `ip` may open one more connection now (its bucket refilled to now).
    fn admit_source(&self, s: &mut State, ip: IpAddr) -> Result<(), NoSlot> {
        let now = Instant::now();
        if s.sources.len() > 10_000 {
            // Bounded memory under a flood from many addresses: forget the idle ones.
            let (rate, burst) = (self.limits.new_per_second, self.limits.burst);
            s.sources.retain(|_, src| {
                src.open > 0 || src.tokens + rate * (now - src.refilled).as_secs_f64() < burst
            });
        }
        let src = s.sources.entry(ip).or_insert(Source {
            open: 0,
            tokens: self.limits.burst,
            refilled: now,
        });
        src.tokens = (src.tokens
            + self.limits.new_per_second * now.duration_since(src.refilled).as_secs_f64())
        .min(self.limits.burst);
        src.refilled = now;
        if src.open >= self.limits.per_source {
            return Err(NoSlot::SourceBusy);
        }
        if src.tokens < 1.0 {
            return Err(NoSlot::SourceTooFast);
        }
        Ok(())
    }

    /// Connections open now, and how many of them are unproven.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.open, s.unproven.len())
    }
}

impl Slot {
    /// A credential was admitted on this connection: it keeps its slot.
    pub fn prove(&self) {
        if !self.proven.swap(true, Ordering::AcqRel) {
            self.slots.lock().unproven.remove(&self.id);
        }
    }

    /// Resolves when this connection must close: it was evicted, or it is still unproven
    /// when `within` has passed since it got its slot. Never resolves once proven in time.
    pub async fn must_close(&self, within: Duration) -> Closed {
        let evicted = self.evict.notified();
        tokio::pin!(evicted);
        tokio::select! {
            () = &mut evicted => return Closed::Evicted,
            () = tokio::time::sleep(within) => {}
        }
        if !self.proven.load(Ordering::Acquire) {
            return Closed::Unproven;
        }
        std::future::pending().await
    }
}

/// Why the gate closed a connection it had given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Unproven, and the slot went to a newer connection.
    Evicted,
    /// No credential in the time it had.
    Unproven,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut s = self.slots.lock();
            s.open = s.open.saturating_sub(1);
            s.unproven.remove(&self.id);
            if let Some(ip) = self.source
                && let Some(src) = s.sources.get_mut(&ip)
            {
                src.open = src.open.saturating_sub(1);
            }
        }
        self.slots.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_source: usize) -> SlotLimits {
        SlotLimits {
            max,
            per_source,
            new_per_second: 1000.0,
            burst: 1000.0,
        }
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    #[tokio::test]
    async fn a_full_gate_evicts_the_oldest_unproven_connection_never_a_proven_one() {
        let slots = Slots::new(limits(3, 10));
        let proven = slots.acquire(ip(1)).await.unwrap();
        proven.prove();
        let old = slots.acquire(ip(2)).await.unwrap();
        let young = slots.acquire(ip(2)).await.unwrap();
        assert_eq!(slots.counts(), (3, 2));
        // Full: the newcomer evicts `old`, the oldest unproven.
        let newcomer = slots.acquire(ip(3)).await.unwrap();
        let within = Duration::from_secs(60);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), old.must_close(within)).await,
            Ok(Closed::Evicted)
        );
        drop(old);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), young.must_close(within))
                .await
                .is_err()
        );
        newcomer.prove();
        young.prove();
        // Every slot proven: a newcomer waits until one is freed.
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(ip(4)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(proven);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), waiting)
                .await
                .unwrap()
                .unwrap(),
            Ok(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unproven_connection_must_close_when_its_time_is_up_and_a_proven_one_never() {
        let slots = Slots::new(limits(8, 8));
        let (a, b) = (
            slots.acquire(ip(1)).await.unwrap(),
            slots.acquire(ip(1)).await.unwrap(),
        );
        b.prove();
        let within = Duration::from_secs(2);
        assert_eq!(a.must_close(within).await, Closed::Unproven);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), b.must_close(within))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn one_source_gets_its_share_and_no_more() {
        let slots = Slots::new(SlotLimits {
            max: 100,
            per_source: 2,
            new_per_second: 1.0,
            burst: 3.0,
        });
        let a = slots.acquire(ip(1)).await.unwrap();
        let _b = slots.acquire(ip(1)).await.unwrap();
        assert_eq!(slots.acquire(ip(1)).await.err(), Some(NoSlot::SourceBusy));
        assert!(
            slots.acquire(ip(2)).await.is_ok(),
            "another source is not held up"
        );
        drop(a);
        let _c = slots.acquire(ip(1)).await.unwrap();
        drop(_c);
        // Three new connections in a burst, then no more until the bucket refills.
        assert_eq!(
            slots.acquire(ip(1)).await.err(),
            Some(NoSlot::SourceTooFast)
        );
        // Connections the relay carries are not counted per source.
        let mut relayed = Vec::new();
        for _ in 0..5 {
            relayed.push(slots.acquire(None).await.unwrap());
        }
    }
}
