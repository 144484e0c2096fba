//! Log lines that a flood would repeat: said once per interval and key (a source address, a
//! route), the next one saying how many were held back. A gate or relay under attack logs a
//! line every few seconds per attacker, not one per connection.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// When each key last spoke, and what it has held back since.
pub struct Quiet<K> {
    every: Duration,
    said: HashMap<K, (Instant, u64)>,
}

impl<K: Hash + Eq + Clone> Quiet<K> {
    pub fn new(every: Duration) -> Quiet<K> {
        Quiet {
            every,
            said: HashMap::new(),
        }
    }

    /// `Some(suffix)` when a line about `key` is to be logged now, the suffix telling how many
    /// were held back before it (empty when none); `None` when it is to be held back.
    pub fn say(&mut self, key: K) -> Option<String> {
        let now = Instant::now();
        if self.said.len() > 10_000 {
            let every = self.every;
            self.said
                .retain(|_, (at, _)| now.duration_since(*at) < every);
        }
        match self.said.get_mut(&key) {
            Some((at, held)) if now.duration_since(*at) < self.every => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suffix = match *held {
                    0 => String::new(),
                    n => format!(" ({n} more like it held back)"),
                };
                (*at, *held) = (now, 0);
                Some(suffix)
            }
            None => {
                self.said.insert(key, (now, 0));
                Some(String::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_is_said_once_per_interval_with_the_count_held_back() {
        let mut q = Quiet::new(Duration::from_millis(50));
        assert_eq!(q.say("a"), Some(String::new()));
        assert_eq!(q.say("a"), None);
        assert_eq!(q.say("a"), None);
        assert_eq!(q.say("b"), Some(String::new()), "another key speaks");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(q.say("a"), Some(" (2 more like it held back)".into()));
    }
}
