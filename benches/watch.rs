//! `soul watch` benchmarks, anchors measured in the same run (run: `cargo bench --bench watch`):
//! - edit-to-converged: writing stack.kdl → the new app answers, vs a bare `docker rm -f` +
//!   `docker create` + `docker start` of the same container → it answers (goal: soul adds
//!   under 100 ms);
//! - drift repair: `docker rm -f` of the app → it answers again (goal: under 1 s plus the
//!   container's own start time, measured by the anchor);
//! - idle cost over 60 s with nothing changing: RSS (goal < 20 MB) and CPU seconds (< 0.1 s).

mod common;
use common::{median, ms, verdict};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/memory.rs"]
mod memory;

const SOUL: &str = env!("CARGO_BIN_EXE_soul");
const RUNS: usize = 5;

fn main() {
    let idle_secs: u64 = std::env::var("SOUL_BENCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = std::env::temp_dir().join(format!("soul-bench-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = 23000 + (std::process::id() % 1000) as u16;
    let anchor_port = port + 1;
    let file = dir.join("stack.kdl");
    let state = dir.join("state");
    let stack = |greeting: &str| {
        format!(
            "stack \"wbench\"\nsidecar \"app\" {{\n  image \"soul:latest\"\n  command \"demo-app\" \"--port=8080\"\n  port 8080\n  env \"GREETING\" \"{greeting}\"\n}}\ntransport {{\n  lan port={port}\n}}\ndevice \"bench\"\n"
        )
    };
    std::fs::write(&file, stack("g0")).unwrap();
    let o = Command::new(SOUL)
        .arg("-f")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .arg("apply")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut watch = Command::new(SOUL)
        .arg("-f")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .arg("watch")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The LAN port leads to the pod's gate: requests carry the paired device's token.
    let token = std::fs::read_to_string(state.join("tokens/bench.jwt")).unwrap();
    let token = token.trim();
    wait_body(port, token, "g0", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));

    // Edit → converged.
    let mut soul_edit = vec![];
    for i in 1..=RUNS {
        let want = format!("g{i}");
        let start = Instant::now();
        std::fs::write(&file, stack(&want)).unwrap();
        wait_body(port, token, &want, Duration::from_secs(30));
        soul_edit.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }

    // Anchor: the same container by hand.
    let name = "soul-bench-anchor";
    let _ = Command::new("docker").args(["rm", "-f", name]).output();
    let mut anchor = vec![];
    for i in 1..=RUNS {
        let want = format!("a{i}");
        let start = Instant::now();
        docker(&["rm", "-f", name]);
        docker(&[
            "create",
            "--name",
            name,
            "-p",
            &format!("{anchor_port}:8080"),
            "-e",
            &format!("GREETING={want}"),
            "--restart",
            "unless-stopped",
            "soul:latest",
            "demo-app",
            "--port=8080",
        ]);
        docker(&["start", name]);
        wait_body(anchor_port, "", &want, Duration::from_secs(30));
        anchor.push(start.elapsed());
    }
    docker(&["rm", "-f", name]);

    // Drift repair.
    let mut repair = vec![];
    for _ in 0..RUNS {
        let start = Instant::now();
        docker(&["rm", "-f", "soul_wbench_app_app"]);
        wait_body(port, token, &format!("g{RUNS}"), Duration::from_secs(30));
        repair.push(start.elapsed());
        std::thread::sleep(Duration::from_secs(2)); // stay clear of flap backoff
    }

    let (s, a, r) = (median(soul_edit), median(anchor), median(repair));
    println!("soul watch, 1 sidecar (median of {RUNS})");
    println!("  edit → converged:                 {:>7.1} ms", ms(s));
    println!("  anchor rm + create + start → up:  {:>7.1} ms", ms(a));
    println!(
        "  soul adds:                        {:>7.1} ms (goal < 100 ms: {})",
        ms(s) - ms(a),
        verdict(ms(s) - ms(a) < 100.0)
    );
    println!(
        "  drift repair (rm -f → up):        {:>7.1} ms (goal < 1000 ms + start time {:.0} ms: {})",
        ms(r),
        ms(a),
        verdict(ms(r) < 1000.0 + ms(a))
    );

    // Idle cost.
    std::thread::sleep(Duration::from_secs(2));
    let pid = watch.id();
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let cpu = cpu_seconds(pid) - cpu0;
    let rss = memory::status_mib(pid, "VmRSS");
    println!(
        "  idle {idle_secs} s: RSS {rss:.1} MB (goal < 20 MB: {}), CPU {cpu:.3} s (goal < 0.1 s: {})",
        verdict(rss < 20.0),
        verdict(cpu < 0.1)
    );

    let _ = watch.kill();
    let _ = watch.wait();
    let _ = Command::new(SOUL)
        .arg("-f")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .args(["down", "--volumes"])
        .output();
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

fn docker(args: &[&str]) {
    let o = Command::new("docker").args(args).output().unwrap();
    assert!(
        o.status.success() || args[0] == "rm",
        "docker {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The body `port` answers `GET /` with, sending `token` as a Bearer token when not empty.
fn body(port: u16, token: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
}

fn wait_body(port: u16, token: &str, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if body(port, token).as_deref() == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("port {port} never answered {want:?}");
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}
