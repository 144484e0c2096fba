//! Benchmarks with their anchors measured in the same run (run: `cargo bench`):
//! - a no-op `soul apply` on a converged 10-sidecar stack vs `docker-compose up -d` on the
//!   equivalent compose file (goal: soul takes at most 1/5 of Compose's wall time);
//! - `plan()` for 100 sidecars and 1,000 devices (goal: under 5 ms);
//! - a converged pass over the state dir of a 1,000-device stack vs the first pass that renders
//!   all their QR codes (goal: under 5%: nothing is re-rendered).
//!
//! Needs a Docker engine and Debian's docker-compose; builds soul's image itself.

use std::process::Command;
use std::time::{Duration, Instant};

use soul::pod::ContainerSpec;
use soul::reconcile::{self, Desired, Observed, ObservedContainer};
use soul::state::{StackKey, StateDir};

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
    if wants("pairing") {
        bench_pairing();
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
    let desired = reconcile::resolve(&stack, &soul::machine::Host, std::path::Path::new("/state"))
        .expect("resolves");
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
        "  converged plan of the pods: {:.3} ms per plan (goal < 5 ms: {})",
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

    // With the state dir's files too: one token per device, and a URI with three QR
    // renderings per (device, sidecar): 100,000 pairing codes.
    let mut with_files = desired.clone();
    let inputs = reconcile::PairingInputs {
        key: Ok(StackKey::from_seed(1, [1; 32])),
        fresh_key: StackKey::from_seed(1, [1; 32]),
        registry: Ok(Default::default()),
        issued: Default::default(),
        renders: Default::default(),
        addresses: soul::transport::addresses(&stack, Some("192.168.1.20"), &Default::default()),
        now: 1_800_000_000,
    };
    let files_start = Instant::now();
    with_files.files = reconcile::desired_files(&stack, inputs)
        .expect("files")
        .files;
    let files_time = files_start.elapsed();
    let mut observed_files = observed.clone();
    for f in &mut with_files.files {
        let h = *f.hash.get_or_insert([7; 32]);
        observed_files.files.insert(f.path.clone(), h);
    }
    let start = Instant::now();
    let runs = 5;
    for _ in 0..runs {
        assert!(reconcile::plan(&with_files, &observed_files).is_empty());
    }
    let per_plan = start.elapsed() / runs;
    println!(
        "  with {} state-dir files: computing them {:.1} ms, converged plan {:.1} ms",
        with_files.files.len(),
        ms(files_time),
        ms(per_plan)
    );
}

/// What the engine would report once `desired` is applied.
fn converged(desired: &Desired) -> Observed {
    let mut o = Observed::default();
    for need in &desired.images {
        o.images.insert(need.reference.clone(), "sha256:x".into());
    }
    o.volumes = desired.volumes.iter().map(|v| v.name.clone()).collect();
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
        owner: None,
        running: true,
        state: "running".into(),
        health: None,
        image: c.image.clone(),
        image_id: "sha256:x".into(),
    }
}

/// An engine that is never called: the pairing bench runs file steps only.
struct NoEngine;

impl reconcile::Engine for NoEngine {
    type Error = std::io::Error;
    async fn build_soul_image(&self, _: &[String]) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn pull_image(&self, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn create_volume(&self, _: &str, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn create_network(&self, _: &str, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn create_container(&self, _: &ContainerSpec, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn start_container(&self, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn remove_container(&self, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn remove_network(&self, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
    async fn remove_volume(&self, _: &str) -> Result<(), Self::Error> {
        unreachable!("file steps only")
    }
}

/// One pass over the state dir: compute the desired files, observe, plan, write.
fn pairing_pass(
    stack: &soul::stack::Stack,
    state: &StateDir,
    rt: &tokio::runtime::Runtime,
) -> usize {
    let addresses = soul::transport::addresses(stack, Some("192.168.1.20"), &Default::default());
    let inputs = reconcile::PairingInputs {
        key: state.read_key(),
        fresh_key: StackKey::generate(stack.secret_generation).expect("key"),
        registry: state.read_registry(),
        issued: state.issued(),
        renders: state.read_render_index(),
        addresses,
        now: 1_800_000_000,
    };
    let pairing = reconcile::desired_files(stack, inputs).expect("pairing");
    let desired = Desired {
        stack: stack.stack.clone(),
        pods: vec![],
        volumes: vec![],
        external_volumes: vec![],
        images: vec![],
        files: pairing.files,
        stopped: Default::default(),
    };
    let observed = Observed {
        files: state.file_hashes(),
        ..Observed::default()
    };
    let plan = reconcile::plan(&desired, &observed);
    rt.block_on(reconcile::execute(
        &NoEngine,
        state,
        &stack.stack,
        &plan,
        |_, _| {},
    ))
    .expect("execute");
    plan.steps.len()
}

fn bench_pairing() {
    let mut src = String::from(
        "stack \"bench\"\nsidecar \"notes\" { image \"soul:latest\"; port 8080; }\ntransport { lan port=8443; }\n",
    );
    for i in 0..1000 {
        src.push_str(&format!("device \"device-{i}\"\n"));
    }
    let stack = soul::stack::parse("bench.kdl", &src).expect("valid");
    let dir = std::env::temp_dir().join(format!("soul-bench-pairing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = StateDir::open(&dir).expect("state dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let start = Instant::now();
    let first_steps = pairing_pass(&stack, &state, &rt);
    let first = start.elapsed();
    let converged = median(
        (0..5)
            .map(|_| {
                let start = Instant::now();
                assert_eq!(
                    pairing_pass(&stack, &state, &rt),
                    0,
                    "a converged pass wrote something"
                );
                start.elapsed()
            })
            .collect(),
    );
    let ratio = converged.as_secs_f64() / first.as_secs_f64();
    println!("state dir pass, 1 sidecar x 1,000 devices");
    println!(
        "  first pass ({first_steps} files written): {:>8.1} ms",
        ms(first)
    );
    println!("  converged pass (0 written):    {:>8.1} ms", ms(converged));
    println!(
        "  ratio converged/first: {ratio:.3} (goal < 0.05: {})",
        verdict(ratio < 0.05)
    );
    let _ = std::fs::remove_dir_all(&dir);
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
