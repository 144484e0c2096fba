//! `soul gate` as a process on loopback, in front of a small app this test runs: only valid
//! device tokens get through; pairing links trade the token for a cookie; revocation closes a
//! device's open (upgraded) connections within a second and leaves other devices alone.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use soul::pairing::{claims_for, issue};
use soul::state::{DeviceEntry, Registry, StackKey, hex};
use support::*;

/// An app that logs every request it sees; `/ws` upgrades and echoes.
fn app() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line);
                    }
                    let path = head[0].split_whitespace().nth(1).unwrap_or("").to_string();
                    seen.lock().unwrap().push(head.concat());
                    if path == "/ws" {
                        conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").unwrap();
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = reader.read(&mut buf) {
                            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\napp\n");
                }
            });
        }
    });
    (port, log)
}

struct Gate {
    child: Child,
    port: u16,
    keys: std::path::PathBuf,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry(devices: &[(&str, u64)]) -> Registry {
    Registry {
        devices: devices
            .iter()
            .map(|(n, g)| {
                (
                    n.to_string(),
                    DeviceEntry {
                        generation: *g,
                        issued_at: 1000,
                        expires_at: None,
                    },
                )
            })
            .collect(),
    }
}

fn write_keys(dir: &std::path::Path, key: &StackKey, reg: &Registry) {
    let state = soul::state::StateDir::open(dir).unwrap();
    state
        .write(
            "public.key",
            format!("{}\n", hex(&key.public_key())).as_bytes(),
        )
        .unwrap();
    state.write("devices.json", &reg.to_file()).unwrap();
}

fn start_gate(app_port: u16, key: &StackKey, reg: &Registry, tag: &str) -> Gate {
    let keys = std::env::temp_dir().join(format!("soul-gate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&keys);
    write_keys(&keys, key, reg);
    let port = free_port();
    let child = Command::new(SOUL)
        .args([
            "gate",
            "--stack",
            "home",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("127.0.0.1:{app_port}"),
        ])
        .arg("--keys")
        .arg(&keys)
        .args(["--header-timeout", "2s", "--failures-per-minute", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !TcpStream::connect(("127.0.0.1", port))
        .is_ok_and(|_| request(port, "/.soul/health", "").starts_with("HTTP/1.1 200"))
    {
        assert!(Instant::now() < deadline, "gate did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Gate { child, port, keys }
}

/// One request; returns the whole raw response.
fn request(port: u16, path: &str, headers: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}\r\n")
}

#[test]
fn only_valid_tokens_reach_the_app() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let (app_port, log) = app();
    let key = StackKey::from_seed(1, [4; 32]);
    let reg = registry(&[("alice", 2)]);
    let gate = start_gate(app_port, &key, &reg, "auth");
    let good = issue(&key, &claims_for("home", "alice", 2, 1000, None)).unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let mut sig = B64.decode(parts[2]).unwrap();
    sig[0] ^= 1;
    let bad: Vec<(&str, String)> = vec![
        ("no token", String::new()),
        (
            "wrong audience",
            bearer(&issue(&key, &claims_for("work", "alice", 2, 1000, None)).unwrap()),
        ),
        (
            "expired",
            bearer(&issue(&key, &claims_for("home", "alice", 2, 1000, Some(2000))).unwrap()),
        ),
        (
            "alg none",
            bearer(&format!(
                "{}.{}.",
                B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
                parts[1]
            )),
        ),
        (
            "hs256 with the public key",
            bearer(
                &jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                    &claims_for("home", "alice", 2, 1000, None),
                    &jsonwebtoken::EncodingKey::from_secret(&key.public_key()),
                )
                .unwrap(),
            ),
        ),
        (
            "tampered signature",
            bearer(&format!("{}.{}.{}", parts[0], parts[1], B64.encode(sig))),
        ),
        (
            "revoked device",
            bearer(&issue(&key, &claims_for("home", "bob", 1, 1000, None)).unwrap()),
        ),
        (
            "old generation",
            bearer(&issue(&key, &claims_for("home", "alice", 1, 1000, None)).unwrap()),
        ),
        (
            "another key",
            bearer(
                &issue(
                    &StackKey::from_seed(1, [5; 32]),
                    &claims_for("home", "alice", 2, 1000, None),
                )
                .unwrap(),
            ),
        ),
    ];
    for (what, headers) in &bad {
        let r = request(gate.port, "/secret", headers);
        assert!(r.starts_with("HTTP/1.1 401"), "{what}: {r}");
    }
    assert!(
        log.lock().unwrap().is_empty(),
        "refused requests reached the app: {:?}",
        log.lock().unwrap()
    );
    let r = request(gate.port, "/hello", &bearer(&good));
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("app\n"), "{r}");
    let seen = log.lock().unwrap().concat();
    assert!(
        seen.contains("GET /hello") && !seen.to_lowercase().contains("authorization"),
        "the app saw soul's token: {seen}"
    );
    let r = request(gate.port, "/.soul/health", "");
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");

    // A pairing link: the token is traded for a cookie and dropped from the address.
    let r = request(gate.port, &format!("/page?x=1&soul_token={good}"), "");
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let lower = r.to_lowercase();
    assert!(lower.contains("location: /page?x=1\r\n"), "{r}");
    assert!(
        lower.contains(&format!(
            "set-cookie: soul_token={}; httponly; samesite=strict; path=/",
            good.to_lowercase()
        )),
        "{r}"
    );
    let r = request(
        gate.port,
        "/page",
        &format!("Cookie: soul_token={good}\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // A flood of bad tokens is answered 429 past the limit; a valid client is still served.
    let mut limited = 0;
    for _ in 0..40 {
        if request(gate.port, "/", &bearer("x.y.z")).starts_with("HTTP/1.1 429") {
            limited += 1;
        }
    }
    assert!(limited > 0, "no rate limiting");
    assert!(request(gate.port, "/", &bearer(&good)).starts_with("HTTP/1.1 200"));

    // A slow client that never finishes its headers is cut off; others are served meanwhile.
    let mut slow = TcpStream::connect(("127.0.0.1", gate.port)).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(request(gate.port, "/", &bearer(&good)).starts_with("HTTP/1.1 200"));
    slow.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        "slow client not cut off"
    );
}

/// An upgraded connection through the gate; returns the stream after the 101.
fn upgrade(port: u16, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{}\r\n",
        bearer(token)
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "connection closed during the upgrade"
        );
        head.push(b[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

fn echoes(s: &mut TcpStream, text: &str) -> bool {
    if s.write_all(text.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; text.len()];
    s.read_exact(&mut buf).is_ok() && buf == text.as_bytes()
}

#[test]
fn revocation_closes_the_devices_upgraded_connections_within_a_second_and_no_one_elses() {
    let (app_port, _) = app();
    let key = StackKey::from_seed(1, [6; 32]);
    let gate = start_gate(
        app_port,
        &key,
        &registry(&[("alice", 1), ("bob", 1)]),
        "revoke",
    );
    let alice = issue(&key, &claims_for("home", "alice", 1, 1000, None)).unwrap();
    let bob = issue(&key, &claims_for("home", "bob", 1, 1000, None)).unwrap();
    let mut a = upgrade(gate.port, &alice);
    let mut b = upgrade(gate.port, &bob);
    assert!(echoes(&mut a, "hello from alice") && echoes(&mut b, "hello from bob"));

    // soul apply removes alice: the gate's registry file changes.
    let revoked_at = Instant::now();
    write_keys(&gate.keys, &key, &registry(&[("bob", 1)]));
    let mut buf = [0u8; 16];
    a.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let closed = matches!(a.read(&mut buf), Ok(0) | Err(_));
    assert!(
        closed && revoked_at.elapsed() < Duration::from_millis(1500),
        "alice's socket stayed open {:?}",
        revoked_at.elapsed()
    );
    assert!(request(gate.port, "/", &bearer(&alice)).starts_with("HTTP/1.1 401"));
    assert!(
        echoes(&mut b, "bob is still here"),
        "bob's socket was disturbed"
    );
    assert!(request(gate.port, "/", &bearer(&bob)).starts_with("HTTP/1.1 200"));
}
