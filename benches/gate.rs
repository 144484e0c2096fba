//! The gate's cost, against the app directly, measured in the same run (run: `cargo bench
//! --bench gate`). One nginx pod (static page, no access log); `wrk` runs inside the pod's network namespace (entered with
//! `nsenter`) with 64 connections, in turn straight at the app (127.0.0.1:80), through the
//! gate (127.0.0.1:8443, with a paired device's token) and through nginx as a reverse proxy in
//! the same pod (the anchor: upstream keep-alive, a static `Authorization` check). Prints requests/s and the ratio
//! (goal ≥ 0.8× direct), p99 latency and the added p99 (goal < 1 ms), and the gate's peak RSS
//! under that load (goal < 30 MB). Needs the test images (`.ci/test-images.sh`), `wrk` and
//! `nsenter`, and root (to enter the namespace).

use std::process::Command;
use std::time::Duration;

#[path = "../tests/support/memory.rs"]
mod memory;

const SOUL: &str = env!("CARGO_BIN_EXE_soul");
const ROUNDS: usize = 3;
/// The anchor: nginx as a reverse proxy in the same pod, with upstream keep-alive and a static
/// `Authorization` check (what a Compose user would put in front of an app by hand).
const NGINX_PROXY_PORT: u16 = 8081;
const NGINX_PROXY_TOKEN: &str = "static-bench-token";
const SECONDS: u64 = 8;

fn main() {
    for tool in ["wrk", "nsenter"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "the gate benchmark needs `{tool}` (apt-get install wrk util-linux)"
        );
    }
    let dir = std::env::temp_dir().join(format!("soul-bench-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lan = 25000 + (std::process::id() % 1000) as u16;
    let file = dir.join("stack.kdl");
    let state = dir.join("state");
    // nginx without its access log: the test image logs every request to stdout, through
    // Docker's log pipeline, which would be the bottleneck of both runs instead of the gate.
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  server {{ listen 80; root /var/www/html; }}\n  upstream app {{ server 127.0.0.1:80; keepalive 64; }}\n  server {{\n    listen {NGINX_PROXY_PORT};\n    location / {{\n      if ($http_authorization != \"Bearer {NGINX_PROXY_TOKEN}\") {{ return 401; }}\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Authorization \"\";\n    }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &file,
        format!(
            "stack \"gbench\"\nsidecar \"web\" {{\n  image \"soul-test/nginx:1\"\n  port 80\n  volume \"{}\" \"/etc/nginx/nginx.conf\" read-only=#true\n}}\ntransport {{\n  lan port={lan}\n}}\ndevice \"bench\"\n",
            conf.display()
        ),
    )
    .unwrap();
    let soul = |args: &[&str]| {
        let o = Command::new(SOUL)
            .arg("-f")
            .arg(&file)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "soul {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    soul(&["apply"]);
    let token = std::fs::read_to_string(state.join("tokens/bench.jwt")).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let pause = pid("soul_gbench_web_pause");
    let gate = pid("soul_gbench_web_gate");
    let netns = format!("--net=/proc/{pause}/ns/net");

    let direct_url = "http://127.0.0.1:80/";
    let gate_url = "http://127.0.0.1:8443/";
    let proxy_url = format!("http://127.0.0.1:{NGINX_PROXY_PORT}/");
    let proxy_auth = format!("Authorization: Bearer {NGINX_PROXY_TOKEN}");
    // All answer before anything is measured; a short warm-up run each.
    wrk(&netns, direct_url, None, 64, 1);
    wrk(&netns, gate_url, Some(&auth), 64, 1);
    wrk(&netns, &proxy_url, Some(&proxy_auth), 64, 1);
    let (mut direct, mut gated, mut proxied) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        direct.push(wrk(&netns, direct_url, None, 64, SECONDS));
        gated.push(wrk(&netns, gate_url, Some(&auth), 64, SECONDS));
        proxied.push(wrk(&netns, &proxy_url, Some(&proxy_auth), 64, SECONDS));
    }
    // Under 64 connections both sides saturate this machine's cores, so latency there is
    // mostly queueing (Little's law); one connection shows what the gate adds to a request.
    let (mut direct_one, mut gated_one) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        direct_one.push(wrk(&netns, direct_url, None, 1, SECONDS / 2));
        gated_one.push(wrk(&netns, gate_url, Some(&auth), 1, SECONDS / 2));
    }
    // MiB → MB: the goal is in megabytes.
    let peak = memory::status_mib(gate, "VmHWM") * 1.048_576;
    soul(&["down", "--volumes"]);
    let _ = std::fs::remove_dir_all(&dir);

    let best = |runs: &[Run]| runs.iter().map(|r| r.rps).fold(0.0, f64::max);
    let median_p99 = |runs: &[Run]| {
        let mut v: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, g, n) = (best(&direct), best(&gated), best(&proxied));
    let (dp, gp, np) = (
        median_p99(&direct),
        median_p99(&gated),
        median_p99(&proxied),
    );
    let (dp1, gp1) = (median_p99(&direct_one), median_p99(&gated_one));
    println!("gate vs app directly (nginx, static page), wrk inside the pod, {ROUNDS} runs each:");
    println!("  64 connections, best req/s, median p99:");
    println!("    direct     {d:>10.0} req/s   p99 {dp:.2} ms");
    println!("    via gate   {g:>10.0} req/s   p99 {gp:.2} ms");
    println!(
        "    via nginx  {n:>10.0} req/s   p99 {np:.2} ms   (reverse proxy, keep-alive, static auth)"
    );
    println!(
        "    gate: {:.2}× direct (goal ≥ 0.90×), {:.2}× nginx-as-proxy (goal ≥ 1.0×); added p99 {:.2} ms",
        g / d,
        g / n,
        gp - dp
    );
    println!("  1 connection, median p99:");
    println!(
        "    direct {dp1:.3} ms, via gate {gp1:.3} ms: added p99 {:.3} ms (goal < 1 ms)",
        gp1 - dp1
    );
    println!("  gate peak RSS {peak:.1} MB (goal < 30 MB)");
}

/// One wrk run's requests/s and p99 latency.
struct Run {
    rps: f64,
    p99_ms: f64,
}

fn wrk(netns: &str, url: &str, header: Option<&str>, connections: u32, seconds: u64) -> Run {
    let threads = connections.min(2);
    let mut cmd = Command::new("nsenter");
    cmd.args([netns, "wrk", "--latency"])
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--timeout")
        .arg("5s");
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let o = cmd.arg(url).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "wrk {url}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !out.contains("Non-2xx"),
        "wrk {url} got refused answers: {out}"
    );
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in {out}"));
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| latency_ms(v.trim()))
        .unwrap_or_else(|| panic!("no 99% latency in {out}"));
    std::thread::sleep(Duration::from_millis(200));
    Run { rps, p99_ms: p99 }
}

/// wrk's latency ("812.00us", "1.20ms", "2.01s") in milliseconds.
fn latency_ms(v: &str) -> f64 {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("latency {v}"));
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => panic!("latency unit in {v}"),
    }
}

fn pid(container: &str) -> u32 {
    let o = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}
