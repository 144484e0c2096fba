//! The relay tier on the real engine: a pod's gate registers with `soul relay` (a process on
//! this host, the "VPS"), and `soul connect` (the "laptop") reaches the app through it when the
//! LAN refuses, with TLS end to end: a capture of the relay's port holds no token and no HTTP.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// The address the pods reach this host at: the source address of its default route, else
/// the Docker bridge's.
fn host_address() -> String {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect("192.0.2.1:9")?;
        s.local_addr()
    });
    match probe {
        Ok(a) if !a.ip().is_unspecified() && !a.ip().is_loopback() => a.ip().to_string(),
        _ => {
            let o = run(Command::new("sh").args([
                "-c",
                "ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1",
            ]));
            o.stdout_text().trim().to_string()
        }
    }
}

/// `soul relay serve` as a child process, with its file and log in `dir`.
struct RelayProcess {
    child: Child,
    status: u16,
    log: PathBuf,
}

impl RelayProcess {
    fn start(dir: &Path, port: u16, status: u16, allow: &str) -> RelayProcess {
        let config = dir.join("relay.kdl");
        std::fs::write(
            &config,
            format!("listen \"0.0.0.0:{port}\"\nstatus \"127.0.0.1:{status}\"\n{allow}"),
        )
        .unwrap();
        let log = dir.join("relay.log");
        let child = Command::new(SOUL)
            .args(["relay", "serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        RelayProcess { child, status, log }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let o = Soul::new()
            .args([
                "relay",
                "status",
                "--status",
                &format!("127.0.0.1:{}", self.status),
                "--output",
                "json",
            ])
            .run();
        serde_json::from_str(&o.stdout()).ok()
    }

    /// Waits until `sidecar` is registered with a full ready pool.
    fn await_registered(&self, sidecar: &str, within: Duration) {
        let start = Instant::now();
        loop {
            let ready = self.status().and_then(|s| {
                s["stacks"][0]["sidecars"]
                    .as_array()?
                    .iter()
                    .find(|c| c["sidecar"] == sidecar)
                    .and_then(|c| c["ready"].as_u64())
            });
            if ready.is_some_and(|n| n >= 1) {
                return;
            }
            assert!(
                start.elapsed() < within,
                "{sidecar} never registered; relay log:\n{}",
                read(&self.log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stack whose pod registers with the relay at `host:relay`, reached on the LAN at `lan`.
fn relay_stack(s: &TestStack, lan: u16, relay: Option<(&str, u16)>) {
    let relay = relay
        .map(|(h, p)| format!("relay \"{h}:{p}\"\n"))
        .unwrap_or_default();
    s.write(&format!(
        "stack \"{{stack}}\"\nsidecar \"notes\" {{\n    image \"soul:latest\"\n    command \"demo-app\" \"--port=8080\"\n    port 8080\n}}\ntransport {{\n    lan port={lan}\n}}\n{relay}device \"laptop\"\n"
    ));
}

/// The stack applied first without a relay (so it has a key), then with one whose relay is
/// already running: the relay and its process.
fn stack_behind_a_relay(tag: &str) -> (TestStack, RelayProcess, u16) {
    ensure_images();
    let s = TestStack::new(tag);
    let (lan, port, status) = (free_port(), free_ports(1), free_ports(1));
    relay_stack(&s, lan, None);
    s.apply();
    let allow = s.soul(&["relay", "allow"]);
    assert!(allow.status.success(), "{}", text(&allow));
    let allow = allow.stdout_text();
    assert!(
        allow.starts_with(&format!("allow \"{}\" key=\"ed25519:", s.name)),
        "{allow}"
    );
    let relay = RelayProcess::start(&s.dir, port, status, &allow);
    let host = host_address();
    relay_stack(&s, lan, Some((&host, port)));
    s.apply();
    relay.await_registered("notes", Duration::from_secs(30));
    (s, relay, port)
}

/// The pairing URI of `laptop`, with its LAN address swapped for one that refuses (RST).
fn uri_with_a_refusing_lan(s: &TestStack) -> String {
    let o = s.soul(&["pair", "laptop", "--format", "uri"]);
    assert!(o.status.success(), "{}", text(&o));
    let uri = o.stdout_text().trim().to_string();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refusing = closed.local_addr().unwrap();
    drop(closed);
    let (before, rest) = uri.split_once("&addr=lan:").expect("a LAN address");
    let (_, after) = rest.split_once('&').unwrap();
    format!("{before}&addr=lan:{refusing}&{after}")
}

fn connect(s: &TestStack, args: &[&str]) -> Command {
    let mut cmd = Command::new(SOUL);
    cmd.arg("connect")
        .args(args)
        .env("XDG_CONFIG_HOME", s.dir.join("laptop-config"));
    cmd
}

/// `GET path` on a local port with `Connection: close`: the whole answer.
fn get(port: u16, path: &str) -> String {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// An upgrade on the demo app's `/echo`, then `payload` sent and read back: everything read.
fn echo(port: u16, payload: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    c.write_all(payload).unwrap();
    while !got.ends_with(payload) {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_device_reaches_the_app_through_the_relay_and_the_relay_sees_no_token_and_no_http() {
    ensure_command("tcpdump", "tcpdump");
    let (s, relay, relay_port) = stack_behind_a_relay("relay-e2e");
    // Registered: the pairing codes now name the relay.
    let uri = s.soul(&["pair", "laptop", "--format", "uri"]).stdout_text();
    assert!(
        uri.contains(&format!("&addr=relay:{}:{relay_port}&", host_address())),
        "{uri}"
    );

    let pcap = s.dir.join("relay.pcap");
    let mut capture = Command::new("tcpdump")
        .args(["-i", "any", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg(format!("tcp port {relay_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    // The laptop: the LAN refuses, so the relay is the path.
    let code = uri_with_a_refusing_lan(&s);
    let probe = run(&mut connect(&s, &[&code, "--probe"]));
    assert!(probe.status.success(), "{}", text(&probe));
    let chosen: serde_json::Value = serde_json::from_str(probe.stdout_text().trim()).unwrap();
    assert_eq!(chosen["path"], "relay", "{chosen}");
    let name = format!("{}.notes.laptop", s.name);
    let stored = s
        .dir
        .join(format!("laptop-config/soul/pairings/{name}.json"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let local = free_ports(1);
    let mut forward = connect(&s, &[&name, "--listen", &format!("127.0.0.1:{local}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let answer = retry(Duration::from_secs(10), || {
        let answer = get(local, "/notes");
        answer.starts_with("HTTP/1.1 200").then_some(answer)
    })
    .expect("the app answers through soul connect and the relay");
    assert!(answer.contains("hello from soul's demo app"), "{answer}");
    // A WebSocket-style upgrade crosses the relay too.
    let echoed = echo(local, b"ping through the relay");
    assert!(echoed.starts_with("HTTP/1.1 101"), "{echoed}");
    assert!(echoed.ends_with("ping through the relay"), "{echoed}");

    std::thread::sleep(Duration::from_millis(1000));
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(capture.id().to_string())
        .status();
    let _ = capture.wait();
    let _ = forward.kill();
    let _ = forward.wait();
    let captured = std::fs::read(&pcap).unwrap();
    assert!(
        captured.len() > 2000,
        "the capture saw the sessions ({} bytes)",
        captured.len()
    );
    for secret_or_plain in [&b"eyJ"[..], b"soul_token", b"HTTP/1.1", b"hello from soul"] {
        assert!(
            !captured
                .windows(secret_or_plain.len())
                .any(|w| w == secret_or_plain),
            "the relay's port carried `{}` in the clear",
            String::from_utf8_lossy(secret_or_plain)
        );
    }
    // The relay's log: a line per registration and per session, and no secret.
    let log = read(&relay.log);
    assert!(
        log.contains(&format!("registered notes.{}", s.name)),
        "{log}"
    );
    assert!(log.contains(&format!("session notes.{}", s.name)), "{log}");
    assert!(!log.contains("eyJ"), "{log}");
    let status = relay.status().unwrap();
    assert!(
        status["stacks"][0]["sidecars"][0]["sessions_total"]
            .as_u64()
            .unwrap()
            >= 2,
        "{status}"
    );
}

#[test]
fn agents_re_register_after_a_relay_restart_and_codes_drop_the_relay_while_it_is_down() {
    let (s, relay, relay_port) = stack_behind_a_relay("relay-restart");
    let allow = std::fs::read_to_string(s.dir.join("relay.kdl")).unwrap();
    let allow = allow
        .lines()
        .find(|l| l.starts_with("allow"))
        .unwrap()
        .to_string();
    let status = relay.status;
    drop(relay);
    // The relay is down: the gate's agent unregisters, and the next pass drops the address.
    std::thread::sleep(Duration::from_millis(500));
    s.apply();
    let uri = s.soul(&["pair", "laptop", "--format", "uri"]).stdout_text();
    assert!(!uri.contains("&addr=relay:"), "{uri}");
    let code = uri_with_a_refusing_lan(&s);
    assert!(!run(&mut connect(&s, &[&code, "--probe"])).status.success());

    let relay = RelayProcess::start(&s.dir, relay_port, status, &allow);
    relay.await_registered("notes", Duration::from_secs(40));
    s.apply();
    let code = uri_with_a_refusing_lan(&s);
    assert!(code.contains("&addr=relay:"), "{code}");
    let probe = run(&mut connect(&s, &[&code, "--probe"]));
    assert!(probe.status.success(), "{}", text(&probe));
    assert!(
        probe.stdout_text().contains("\"path\":\"relay\""),
        "{}",
        text(&probe)
    );
}
