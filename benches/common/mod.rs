//! What the benchmarks print their figures with: medians, milliseconds, and whether a goal was
//! met.

use std::time::Duration;

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
