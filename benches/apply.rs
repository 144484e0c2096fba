//! Benchmarks with their anchors measured in the same run (run: `cargo bench`):
//! - a no-op `soul apply` on a converged 10-sidecar stack vs `docker-compose up -d` on the
//!   equivalent compose file (goal: soul takes at most 1/5 of Compose's wall time);
//! - `plan()` for 100 sidecars and 1,000 devices (goal: under 5 ms);
//! - a converged pass over the state dir of a 1,000-device stack vs the first pass that renders
//!   all their QR codes (goal: under 5%: nothing is re-rendered);
//! - `soul apply` from nothing of a 5-sidecar stack whose images are only in a local registry
//!   (Debian's docker-registry) vs `docker-compose up -d` of its `soul export compose` from the
//!   same registry, the images removed before each run (goal: at most 1.0× Compose), and the
//!   no-op apply with stack.lock vs Compose's no-op (goal: at most 0.2×).
//!
//! Needs a Docker engine and Debian's docker-compose (and docker-registry for the last); builds
//! soul's image itself.

mod common;
use common::{median, ms, verdict};

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
    if wants("registry") {
        bench_registry_apply_vs_compose();
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

const REGISTRY_SIDECARS: usize = 5;
const REGISTRY_ROUNDS: usize = 3;

/// A 5-sidecar stack whose images (each its own 4 MB layer on soul's image) are only in a
/// registry on loopback: soul applies it from nothing, and Compose brings up its export, each
/// after the images were removed; then both no-ops, soul's with its stack.lock.
fn bench_registry_apply_vs_compose() {
    if Command::new("docker-registry")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "registry apply: SKIPPED (docker-registry is not installed: apt-get install docker-registry)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("soul-bench-registry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let port = 24000 + (std::process::id() % 2000) as u16 * 2;
    let registry_port = port + 1000;
    std::fs::write(
        dir.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{registry_port}\n",
            dir.join("registry").display()
        ),
    )
    .expect("registry config");
    let mut registry = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("registry.yml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker-registry");
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect(("127.0.0.1", registry_port)).is_ok()
    });
    assert!(up, "docker-registry did not listen on {registry_port}");

    // soul's image, then the five images pushed and removed here.
    must(soul_in(&dir, "build", &["image"]));
    let images: Vec<String> = (0..REGISTRY_SIDECARS)
        .map(|i| {
            let context = dir.join(format!("image-{i}"));
            std::fs::create_dir_all(&context).expect("context");
            let mut blob = vec![0u8; 4 << 20];
            getrandom::fill(&mut blob).expect("random");
            std::fs::write(context.join("blob"), &blob).expect("blob");
            std::fs::write(
                context.join("Dockerfile"),
                "FROM soul:latest\nCOPY blob /blob\n",
            )
            .expect("Dockerfile");
            let reference = format!("127.0.0.1:{registry_port}/soul-bench-s{i}:1");
            must(docker(&[
                "build",
                "-q",
                "-t",
                &reference,
                context.to_str().unwrap(),
            ]));
            must(docker(&["push", "-q", &reference]));
            reference
        })
        .collect();
    let remove_images = || {
        for reference in &images {
            let repository = reference
                .rsplit_once(':')
                .map_or(reference.as_str(), |r| r.0);
            let o = docker(&[
                "images",
                "--digests",
                "--format",
                "{{.Repository}}@{{.Digest}}",
                repository,
            ])
            .output()
            .expect("docker images");
            for by_digest in String::from_utf8_lossy(&o.stdout).lines() {
                let _ = docker(&["rmi", by_digest]).output();
            }
            let _ = docker(&["rmi", reference]).output();
        }
    };

    // Compose's file: the export of the same stack under another name (its containers are
    // named after the stack), its state dir made by one apply, then taken down.
    std::fs::write(
        dir.join("composed.kdl"),
        registry_stack("soulbenchc", port + 10, &images),
    )
    .unwrap();
    must(soul_in(&dir, "composed", &["apply"]));
    must(soul_in(&dir, "composed", &["down"]));
    let compose_file = dir.join("docker-compose.yml");
    must(soul_in(
        &dir,
        "composed",
        &["export", "compose", "--out", compose_file.to_str().unwrap()],
    ));
    let compose = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.arg("-f")
            .arg(&compose_file)
            .arg("-p")
            .arg("soulbenchc")
            .args(args);
        c
    };
    std::fs::write(
        dir.join("soul.kdl"),
        registry_stack("soulbenchr", port, &images),
    )
    .unwrap();
    // The lock a commit would carry.
    must(soul_in(&dir, "soul", &["apply"]));
    must(soul_in(&dir, "soul", &["down"]));

    let (mut soul_runs, mut compose_runs) = (Vec::new(), Vec::new());
    for _ in 0..REGISTRY_ROUNDS {
        remove_images();
        soul_runs.push(timed(soul_in(&dir, "soul", &["apply"])));
        must(soul_in(&dir, "soul", &["down"]));
        remove_images();
        compose_runs.push(timed(compose(&["up", "-d"])));
        must(compose(&["down"]));
    }
    let (soul_time, compose_time) = (median(soul_runs), median(compose_runs));
    let ratio = soul_time.as_secs_f64() / compose_time.as_secs_f64();
    println!(
        "apply from nothing of a {REGISTRY_SIDECARS}-sidecar stack, images only in a registry on loopback (4 MB each; median of {REGISTRY_ROUNDS})"
    );
    println!("  soul apply:           {:>8.1} ms", ms(soul_time));
    println!(
        "  docker-compose up -d: {:>8.1} ms (its soul export compose)",
        ms(compose_time)
    );
    println!(
        "  ratio soul/compose:   {ratio:.3} (goal <= 1.0: {})",
        verdict(ratio <= 1.0)
    );

    must(soul_in(&dir, "soul", &["apply"]));
    must(compose(&["up", "-d"]));
    let soul_noop = median(
        (0..RUNS)
            .map(|_| timed(soul_in(&dir, "soul", &["apply"])))
            .collect(),
    );
    let compose_noop = median((0..RUNS).map(|_| timed(compose(&["up", "-d"]))).collect());
    let ratio = soul_noop.as_secs_f64() / compose_noop.as_secs_f64();
    println!("no-op apply of it with stack.lock (median of {RUNS})");
    println!("  soul apply:           {:>8.1} ms", ms(soul_noop));
    println!("  docker-compose up -d: {:>8.1} ms", ms(compose_noop));
    println!(
        "  ratio soul/compose:   {ratio:.3} (goal <= 0.2: {})",
        verdict(ratio <= 0.2)
    );

    let _ = soul_in(&dir, "soul", &["down", "--volumes", "--images"]).output();
    let _ = compose(&["down", "-v"]).output();
    let _ = soul_in(&dir, "composed", &["down", "--volumes"]).output();
    remove_images();
    let _ = registry.kill();
    let _ = registry.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `soul -f <dir>/<name>.kdl --state-dir <dir>/<name>-state <args>`.
fn soul_in(dir: &std::path::Path, name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(SOUL);
    c.arg("-f")
        .arg(dir.join(format!("{name}.kdl")))
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-state")))
        .args(args);
    c
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args);
    c
}

fn registry_stack(name: &str, port: u16, images: &[String]) -> String {
    let mut s = format!("stack \"{name}\"\n");
    for (i, image) in images.iter().enumerate() {
        s.push_str(&format!(
            "sidecar \"s{i}\" {{\n  image \"{image}\"\n  command \"demo-app\" \"--port=8080\"\n  port 8080\n}}\n"
        ));
    }
    s.push_str(&format!("transport {{\n  lan port={port}\n}}\n"));
    s
}
