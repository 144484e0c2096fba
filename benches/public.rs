//! A sidecar's public HTTPS name against its pinned `.soul` name, through the same relay to the
//! same gate, measured in the same run (run: `cargo bench --bench public`; needs root, Docker,
//! the test images, and Debian's `pebble`, `wrk` and `curl`, installed when missing).
//!
//! The hosts of tests/public.rs: home is this machine (the engine, the pod); a VPS network
//! namespace runs `soul relay serve` on 443 with the domain `relay.test`, and Pebble (Let's
//! Encrypt's test CA, validation delays off) with its DNS; a phone namespace runs the load.
//!
//! - **Apply to the first valid HTTPS answer**: from `soul apply` of a stack that gains a public
//!   name to the first answer from `https://<name>/.soul/health` at the VPS that verifies
//!   against Pebble's root (the account, the order, TLS-ALPN-01 through the relay, the
//!   certificate, the gate's next handshake).
//! - **Requests/s**: `wrk`, 16 keep-alive connections, HTTPS with a paired device's token, at the
//!   public name and at the `.soul` name (the relay routes both by SNI, blind), in alternating
//!   rounds; the median ratio public / pinned. Goal: the public path costs no more than 1.05×
//!   the pinned one (ratio ≥ 0.95).
//! - **A 1 GiB download** (`curl`, the demo app's `/bytes/N`) through each, the public one
//!   verified against Pebble's root and the pinned one with `--pinnedpubkey`: MiB/s and the
//!   ratio. Goal as above.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::public_name::*;
use support::*;

const ROUNDS: usize = 6;
const SECONDS: u64 = 6;
const GIB: u64 = 1 << 30;

fn main() {
    ensure_images();
    for (command, package) in [("curl", "curl"), ("wrk", "wrk"), ("openssl", "openssl")] {
        ensure_command(command, package);
    }
    let hosts = Hosts::new();
    let s = TestStack::new("pubbench");
    // Certificates that outlive the bench: no renewal during the measurements.
    let pebble = Pebble::start(&hosts, &s.dir, 86_400);
    let lan = free_port();
    let _relay = stack_going_public(&hosts, &s, &pebble, lan, "bench");
    let public = format!("notes-{}.relay.test", s.name);
    let pinned = format!("notes.{}.soul", s.name);

    let started = Instant::now();
    s.apply();
    let applied = started.elapsed();
    // Pebble's issuing root exists once Pebble runs; the first answer that verifies against
    // it is the first certificate the gate serves.
    let root = pebble.issuing_root();
    let health = format!("https://{public}/.soul/health");
    let first = retry(Duration::from_secs(120), || {
        let o = run(in_phone(&hosts, "curl")
            .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("--cacert")
            .arg(&root)
            .args(["--resolve", &format!("{public}:443:{}", hosts.vps_wan)])
            .arg(&health));
        (o.stdout_text() == "200").then(|| started.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "no valid HTTPS answer at {public}: {}\n{}",
            public_status(&s),
            gate_log(&s)
        )
    });
    println!(
        "apply to the first valid HTTPS answer at the public name: {} ms (apply itself {} ms)",
        first.as_millis(),
        applied.as_millis()
    );

    let token = s.token("bench");
    let pin = served_pin(lan);
    // wrk resolves through the phone's /etc/hosts, which `ip netns exec` takes from here.
    let _hosts_file = NetnsHosts::new(
        &hosts.device,
        &format!("{} {public} {pinned}\n", hosts.vps_wan),
    );

    let mut ratios = Vec::new();
    let (mut best_public, mut best_pinned) = (0.0f64, 0.0f64);
    println!("HTTPS requests/s through the relay, wrk, 16 connections, {ROUNDS} rounds:");
    for round in 0..ROUNDS {
        // Each goes first in every other round: neither gets the warmer machine.
        let (p, q) = if round.is_multiple_of(2) {
            let p = wrk(&hosts, &public, &token);
            (p, wrk(&hosts, &pinned, &token))
        } else {
            let q = wrk(&hosts, &pinned, &token);
            (wrk(&hosts, &public, &token), q)
        };
        println!(
            "  round {round}: public {p:.0}, .soul {q:.0}, ratio {:.3}",
            p / q
        );
        best_public = best_public.max(p);
        best_pinned = best_pinned.max(q);
        ratios.push(p / q);
    }
    println!("  public name  {best_public:>8.0} (best)");
    println!("  .soul name   {best_pinned:>8.0} (best)");
    println!(
        "  ratio        {:>8.3}× the pinned path, median (goal ≥ 0.95: the public path costs ≤ 1.05×)",
        median(&mut ratios)
    );

    let public_rate = download(&hosts, &public, &token, |c| {
        c.arg("--cacert").arg(&root);
    });
    let pinned_rate = download(&hosts, &pinned, &token, |c| {
        c.args(["-k", "--pinnedpubkey", &pin]);
    });
    println!("a 1 GiB download through the relay, curl:");
    println!("  public name  {:>8.0} MiB/s", public_rate / 1048576.0);
    println!("  .soul name   {:>8.0} MiB/s", pinned_rate / 1048576.0);
    println!(
        "  ratio        {:>8.3}× the pinned path (goal ≥ 0.95)",
        public_rate / pinned_rate
    );
}

fn in_phone(hosts: &Hosts, program: &str) -> Command {
    Hosts::in_ns(&hosts.device, program)
}

/// Requests/s `wrk` reaches at `https://<name>/` from the phone.
fn wrk(hosts: &Hosts, name: &str, token: &str) -> f64 {
    let o = run(in_phone(hosts, "wrk")
        .args(["-t", "2", "-c", "16", "-d", &format!("{SECONDS}s")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("https://{name}/")));
    let out = o.stdout_text();
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("wrk at {name}:\n{}", text(&o)));
    assert!(
        !out.contains("Non-2xx"),
        "wrk at {name} got refusals:\n{out}"
    );
    rate
}

/// Bytes/s of one 1 GiB download from `https://<name>/bytes/…` at the VPS, from the phone.
fn download(hosts: &Hosts, name: &str, token: &str, trust: impl Fn(&mut Command)) -> f64 {
    let mut c = in_phone(hosts, "curl");
    c.args(["-s", "-m", "300", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{size_download} %{speed_download}"])
        .args(["-H", &format!("Authorization: Bearer {token}")]);
    trust(&mut c);
    let o = run(c.arg(format!("https://{name}/bytes/{GIB}")));
    let out = o.stdout_text();
    let fields: Vec<&str> = out.split_whitespace().collect();
    match fields.as_slice() {
        ["200", size, speed] if size.parse::<u64>().ok() == Some(GIB) => {
            speed.parse().expect("curl's speed")
        }
        _ => panic!("download from {name}:\n{}", text(&o)),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over the namespace's `/etc/hosts`;
/// removed on drop.
struct NetnsHosts(std::path::PathBuf);

impl NetnsHosts {
    fn new(ns: &str, lines: &str) -> NetnsHosts {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{lines}")).unwrap();
        NetnsHosts(dir)
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
