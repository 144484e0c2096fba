//! Time from `soul apply` on a fresh stack to the first pairing URI that carries every declared
//! transport's address, per transport (run: `cargo bench --bench transports`). Offline: LAN,
//! Tor (the onion service is created without any network) and Nebula (the address is the
//! certificate's; certificates are made here with `nebula-cert`). Needs the test images
//! (`.ci/test-images.sh`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SOUL: &str = env!("CARGO_BIN_EXE_soul");

fn main() {
    let dir = std::env::temp_dir().join(format!("soul-bench-transports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    cert(
        &pki,
        &[
            "ca", "-name", "bench", "-out-crt", "ca.crt", "-out-key", "ca.key",
        ],
    );
    cert(
        &pki,
        &[
            "sign",
            "-ca-crt",
            "ca.crt",
            "-ca-key",
            "ca.key",
            "-name",
            "pod",
            "-ip",
            "10.43.0.2/24",
            "-out-crt",
            "pod.crt",
            "-out-key",
            "pod.key",
        ],
    );
    let base = 24000 + (std::process::id() % 1000) as u16;
    let cases = [
        ("lan", String::new(), "&addr=lan:"),
        (
            "tor",
            "    tor image=\"soul-test/tor:1\"\n".to_string(),
            "&addr=tor:",
        ),
        (
            "nebula",
            format!(
                "    nebula lighthouse=\"127.0.0.1:4242\" lighthouse-ip=\"10.43.0.1\" ip=\"10.43.0.2/24\" ca-file=\"{0}/ca.crt\" cert-file=\"{0}/pod.crt\" key-file=\"{0}/pod.key\" image=\"soul-test/nebula:1\"\n",
                pki.display()
            ),
            "&addr=nebula:",
        ),
    ];
    // soul's own image from this (release) binary, so no measurement includes building it.
    let o = Command::new(SOUL).arg("image").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    println!(
        "apply → first pairing URI carrying every declared address (fresh stack, images present)"
    );
    for (i, (name, line, needle)) in cases.iter().enumerate() {
        let stack_dir = dir.join(name);
        std::fs::create_dir_all(&stack_dir).unwrap();
        let file = stack_dir.join("stack.kdl");
        std::fs::write(
            &file,
            format!(
                "stack \"tbench-{name}\"\nsidecar \"app\" {{\n  image \"soul:latest\"\n  command \"demo-app\" \"--port=8080\"\n  port 8080\n}}\ntransport {{\n    lan port={} address=\"192.168.1.20\"\n{line}}}\ndevice \"phone\"\n",
                base + i as u16
            ),
        )
        .unwrap();
        let state = stack_dir.join("state");
        let soul = |args: &[&str]| {
            let mut c = Command::new(SOUL);
            c.arg("-f")
                .arg(&file)
                .arg("--state-dir")
                .arg(&state)
                .args(args);
            c
        };
        let start = Instant::now();
        let o = soul(&["apply"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let uri = state.join("pairing/phone/app.uri");
        while !std::fs::read_to_string(&uri).is_ok_and(|u| u.contains(needle)) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name}: no address"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        println!(
            "  {name:<7} {:>8.0} ms",
            start.elapsed().as_secs_f64() * 1000.0
        );
        let _ = soul(&["down", "--volumes"]).output();
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

fn cert(dir: &Path, args: &[&str]) {
    let o = Command::new("nebula-cert")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("nebula-cert (Debian's nebula)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
