//! A process's memory as `/proc/<pid>/status` reports it, for tests and benchmarks (included
//! by both: `#[path]` from `benches/`).

/// A `Vm…` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`: the peak) in MiB.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib / 1024.0
}
