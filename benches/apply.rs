//! Benchmarks with their anchors measured in the same run (run: `cargo bench`):
//! - a no-op `soul apply` on a converged 10-sidecar stack vs `docker-compose up -d` on the
//!   equivalent compose file (goal: soul takes at most 1/5 of Compose's wall time);
//! - `plan()` for 100 sidecars and 1,000 devices (goal: under 5 ms).
//!
//! Needs a Docker engine and Debian's docker-compose; builds soul's image itself.

use std::process::Command;
use std::time::{Duration, Instant};

use soul::pod::ContainerSpec;
use soul::reconcile::{self, Desired, Observed, ObservedContainer};

const SOUL: &str = env!("CARGO_BIN_EXE_soul");
const SIDECARS: usize = 10;
const RUNS: usize = 10;

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if wants("plan") {
        bench_plan();
    }
    if wants("apply") {
        bench_apply_vs_compose();
    }
}

fn bench_plan() {
    let mut src = String::from("stack \"bench\"\n");
    for i in 0..100 {
        src.push_str(&format!(
            "sidecar \"s{i}\" {{ image \"soul:latest\"; port 8080; env \"N\" \"{i}\"; volume \"d{i}\" \"/data\"; }}\n"
        ));
    }
    src.push_str("transport { lan port=20000; }\n");
    for i in 0..1000 {
        src.push_str(&format!("device \"d{i}\" generation=1\n"));
    }
    let parse_start = Instant::now();
    let stack = soul::stack::parse("bench.kdl", &src).expect("valid bench stack");
    let parse_time = parse_start.elapsed();
    let desired = reconcile::resolve(&stack, &reconcile::Host).expect("resolves");
    let observed = converged(&desired);
    let iterations = 200;
    let start = Instant::now();
    for _ in 0..iterations {
        let plan = reconcile::plan(&desired, &observed);
        assert!(plan.is_empty());
    }
    let per_plan = start.elapsed() / iterations;
    let from_nothing = Instant::now();
    let plan = reconcile::plan(&desired, &Observed::default());
    let fresh = from_nothing.elapsed();
    println!("plan(): 100 sidecars, 1,000 devices");
    println!(
        "  converged plan: {:.3} ms per plan (goal < 5 ms: {})",
        ms(per_plan),
        verdict(per_plan < Duration::from_millis(5))
    );
    println!(
        "  plan from nothing ({} steps): {:.3} ms",
        plan.steps.len(),
        ms(fresh)
    );
    println!(
        "  parse + validate of that stack.kdl: {:.3} ms",
        ms(parse_time)
    );
}

/// What the engine would report once `desired` is applied.
fn converged(desired: &Desired) -> Observed {
    let mut o = Observed::default();
    for need in &desired.images {
        o.images.insert(need.reference.clone(), "sha256:x".into());
    }
    o.volumes = desired.volumes.iter().cloned().collect();
    for pod in &desired.pods {
        o.networks.insert(pod.network.clone());
        for c in &pod.containers {
            o.containers.push(observed(c));
        }
    }
    o
}

fn observed(c: &ContainerSpec) -> ObservedContainer {
    ObservedContainer {
        id: format!("id-{}", c.name),
        name: c.name.clone(),
        sidecar: Some(c.sidecar.clone()),
        role: Some(c.role),
        config_hash: Some(c.config_hash()),
        running: true,
        state: "running".into(),
        health: None,
        image: c.image.clone(),
        image_id: "sha256:x".into(),
    }
}

fn bench_apply_vs_compose() {
    let dir = std::env::temp_dir().join(format!("soul-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let base_port = 21000 + (std::process::id() % 2000) as u16 * 2;
    let stack = dir.join("stack.kdl");
    std::fs::write(&stack, soul_stack(base_port)).expect("write stack");
    let compose = dir.join("docker-compose.yml");
    std::fs::write(&compose, compose_file(base_port + 100)).expect("write compose");
    let state = dir.join("state");
    let soul = |args: &[&str]| {
        let mut c = Command::new(SOUL);
        c.arg("-f")
            .arg(&stack)
            .arg("--state-dir")
            .arg(&state)
            .args(args);
        c
    };
    let compose_cmd = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.arg("-f")
            .arg(&compose)
            .arg("-p")
            .arg("soulbench")
            .args(args);
        c
    };

    must(soul(&["apply"]));
    must(compose_cmd(&["up", "-d"]));
    // Warm both up once, then measure converged runs.
    must(soul(&["apply"]));
    must(compose_cmd(&["up", "-d"]));
    let soul_time = median((0..RUNS).map(|_| timed(soul(&["apply"]))).collect());
    let compose_time = median(
        (0..RUNS)
            .map(|_| timed(compose_cmd(&["up", "-d"])))
            .collect(),
    );
    let ratio = soul_time.as_secs_f64() / compose_time.as_secs_f64();
    println!("no-op apply of a converged {SIDECARS}-sidecar stack (median of {RUNS})");
    println!("  soul apply:           {:>8.1} ms", ms(soul_time));
    println!("  docker-compose up -d: {:>8.1} ms", ms(compose_time));
    println!(
        "  ratio soul/compose:   {ratio:.3} (goal <= 0.2: {})",
        verdict(ratio <= 0.2)
    );

    let _ = soul(&["down", "--volumes"]).output();
    let _ = compose_cmd(&["down", "-v"]).output();
    let _ = std::fs::remove_dir_all(&dir);
}

fn soul_stack(port: u16) -> String {
    let mut s = String::from("stack \"bench\"\n");
    for i in 0..SIDECARS {
        s.push_str(&format!(
            "sidecar \"s{i}\" {{\n  image \"soul:latest\"\n  command \"demo-app\" \"--port=8080\"\n  port 8080\n  env \"GREETING\" \"hi {i}\"\n}}\n"
        ));
    }
    s.push_str(&format!("transport {{\n  lan port={port}\n}}\n"));
    s
}

/// The same stack for Compose: per sidecar a pause service owning the network and the port,
/// and the app in its namespace (`network_mode: service:…`).
fn compose_file(port: u16) -> String {
    let mut s = String::from("version: \"2.4\"\nservices:\n");
    let mut networks = String::from("networks:\n");
    for i in 0..SIDECARS {
        s.push_str(&format!(
            "  s{i}-pause:\n    image: soul:latest\n    command: [\"pause\"]\n    restart: unless-stopped\n    ports: [\"{}:8080\"]\n    networks: [s{i}]\n  s{i}-app:\n    image: soul:latest\n    command: [\"demo-app\", \"--port=8080\"]\n    restart: unless-stopped\n    network_mode: \"service:s{i}-pause\"\n    environment:\n      GREETING: \"hi {i}\"\n",
            port + i as u16
        ));
        networks.push_str(&format!("  s{i}: {{}}\n"));
    }
    s + &networks
}

fn must(mut c: Command) {
    let o = c.output().expect("run");
    assert!(
        o.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn timed(mut c: Command) -> Duration {
    let start = Instant::now();
    let o = c.output().expect("run");
    let t = start.elapsed();
    assert!(
        o.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
