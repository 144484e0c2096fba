//! The relay tier on the real engine: a pod's gate registers with `soul relay` (a process on
//! this host, the "VPS"), and `soul connect` (the "laptop") reaches the app through it when the
//! LAN refuses, with TLS end to end: a capture of the relay's port holds no token and no HTTP.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::netns::Hosts;
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

/// The seed of the test relays' key, written into their state dir before they start.
const RELAY_SEED: [u8; 32] = [77; 32];

/// The pin of the test relays' key: what a stack.kdl that uses them says.
fn relay_pin() -> String {
    soul::tls::relay_identity(&RELAY_SEED).pin
}

/// `soul relay serve` as a child process, with its file, state dir and log in `dir`.
struct RelayProcess {
    child: Child,
    status: u16,
    log: PathBuf,
    ns: Option<String>,
}

/// `program`, run in the network namespace `ns` when given.
fn in_ns(ns: Option<&str>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

impl RelayProcess {
    fn start(dir: &Path, port: u16, status: u16, allow: &str) -> RelayProcess {
        RelayProcess::start_in(None, dir, port, status, allow)
    }

    /// Started with whatever key its state dir already holds.
    fn start_keeping_key(dir: &Path, port: u16, status: u16, allow: &str) -> RelayProcess {
        RelayProcess::launch(None, dir, port, status, allow, false)
    }

    /// Started inside the network namespace `ns` when given (the test's "VPS").
    fn start_in(ns: Option<&str>, dir: &Path, port: u16, status: u16, allow: &str) -> RelayProcess {
        RelayProcess::launch(ns, dir, port, status, allow, true)
    }

    fn launch(
        ns: Option<&str>,
        dir: &Path,
        port: u16,
        status: u16,
        allow: &str,
        fresh_key: bool,
    ) -> RelayProcess {
        let config = dir.join("relay.kdl");
        std::fs::write(
            &config,
            format!("listen \"0.0.0.0:{port}\"\nstatus \"127.0.0.1:{status}\"\n{allow}"),
        )
        .unwrap();
        let log = dir.join("relay.log");
        let state = dir.join("relay-state");
        std::fs::create_dir_all(&state).unwrap();
        if fresh_key {
            std::fs::write(state.join("relay.key"), hex::encode(RELAY_SEED)).unwrap();
        }
        let child = in_ns(ns, SOUL)
            .args(["relay", "serve", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        RelayProcess {
            child,
            status,
            log,
            ns: ns.map(String::from),
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let o = run(in_ns(self.ns.as_deref(), SOUL).args([
            "relay",
            "status",
            "--status",
            &format!("127.0.0.1:{}", self.status),
            "--output",
            "json",
        ]));
        serde_json::from_str(&o.stdout_text()).ok()
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
        .map(|(h, p)| format!("relay \"{h}:{p}\" pin=\"{}\"\n", relay_pin()))
        .unwrap_or_default();
    s.write(&format!(
        "stack \"{{stack}}\"\n{notes}transport {{\n    lan port={lan}\n}}\n{relay}device \"laptop\"\n",
        notes = demo_sidecar("notes")
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

/// A process's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = read(format!("/proc/{pid}/status"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM for {pid}:\n{status}"));
    kib / 1024
}

/// `GET path` on a local port with `Connection: close`: the whole answer.
fn get(port: u16, path: &str) -> String {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
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
    write!(
        c,
        "GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
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
        .map(Running)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The agent registers again while the capture runs, so its control channel is in it.
    let registrations = || read(&relay.log).matches("registered notes.").count();
    let before = registrations();
    docker(&["restart", &s.container("notes", "gate")]);
    retry(Duration::from_secs(30), || {
        (registrations() > before).then_some(())
    })
    .unwrap_or_else(|| panic!("no new registration; relay log:\n{}", read(&relay.log)));
    relay.await_registered("notes", Duration::from_secs(30));

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

    // The forward starts from the code, whose LAN refuses: the probe above has already
    // stored the gate's real addresses (it follows its home), but a running forward races the
    // addresses it started with, so everything below crosses the relay.
    let local = free_ports(1);
    let mut forward = connect(&s, &[&code, "--listen", &format!("127.0.0.1:{local}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
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
    let captured = std::fs::read(&pcap).unwrap();
    assert!(
        captured.len() > 2000,
        "the capture saw the sessions ({} bytes)",
        captured.len()
    );
    // Neither the devices' sessions nor the agent's channels: no token, no HTTP, and none of
    // the relay protocol (its magic, its frames, the channel key that opens data channels).
    for secret_or_plain in [
        &b"eyJ"[..],
        b"soul_token",
        b"HTTP/1.1",
        b"hello from soul",
        b"soul-relay",
        b"\"hello\"",
        b"challenge",
        b"channel_key",
        b"registered",
    ] {
        assert!(
            !captured
                .windows(secret_or_plain.len())
                .any(|w| w == secret_or_plain),
            "the relay's port carried `{}` in the clear",
            String::from_utf8_lossy(secret_or_plain)
        );
    }
    // (After the capture: a GiB of ciphertext holds any three bytes somewhere.)
    // A 1 GiB download crosses in bounded memory: the relay, the gate (which runs the agent)
    // and the laptop's forwarder each stay far below the size of what they carried.
    ensure_command("curl", "curl");
    let gib: u64 = 1 << 30;
    let started = Instant::now();
    let o = run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "300",
        "-w",
        "%{size_download}",
        &format!("http://127.0.0.1:{local}/bytes/{gib}"),
    ]));
    assert_eq!(o.stdout_text().trim(), gib.to_string(), "{}", text(&o));
    let secs = started.elapsed().as_secs_f64();
    let gate_pid = inspect(&s.container("notes", "gate"), "{{.State.Pid}}");
    let (relay_peak, gate_peak, laptop_peak) = (
        peak_rss_mib(relay.child.id()),
        peak_rss_mib(gate_pid.trim().parse().unwrap()),
        peak_rss_mib(forward.id()),
    );
    eprintln!(
        "figure: 1 GiB through the relay in {secs:.1} s ({:.0} MiB/s); peak RSS: relay {relay_peak} MiB, gate {gate_peak} MiB, soul connect {laptop_peak} MiB",
        1024.0 / secs
    );
    for (who, peak) in [
        ("relay", relay_peak),
        ("gate", gate_peak),
        ("soul connect", laptop_peak),
    ] {
        assert!(peak < 64, "{who} peaked at {peak} MiB carrying 1 GiB");
    }

    // The relay's log: a line per registration and per session, and no secret.
    let _ = forward.kill();
    let _ = forward.wait();
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

/// `soul connect --probe` on the laptop: the chosen path and the milliseconds it took.
fn probe_on_laptop(hosts: &Hosts, s: &TestStack, pairing: &str) -> (String, u64) {
    let o = run(in_ns(Some(&hosts.device), SOUL)
        .args(["connect", pairing, "--probe"])
        .env("XDG_CONFIG_HOME", s.dir.join("laptop-config")));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_str(o.stdout_text().trim()).unwrap();
    (
        v["path"].as_str().unwrap().to_string(),
        v["ms"].as_u64().unwrap(),
    )
}

/// A nebula node run as a process in network namespace `ns`: the VPS's lighthouse, or the
/// laptop's node. Killed on drop.
struct NebulaNode(Child);

impl NebulaNode {
    fn start(ns: &str, dir: &Path, name: &str, config: &str) -> NebulaNode {
        let file = dir.join(format!("{name}.yml"));
        std::fs::write(&file, config).unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nebula", "-config"])
            .arg(&file)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        NebulaNode(child)
    }
}

impl Drop for NebulaNode {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A nebula node's config: the lighthouse (`lighthouse_at` none, listening on `port`, no tun)
/// or a node that finds the lighthouse at `lighthouse_at`.
fn nebula_config(pki: &Path, name: &str, port: u16, lighthouse_at: Option<&str>) -> String {
    let pki = pki.display();
    let (am, map, hosts, tun) = match lighthouse_at {
        None => ("true", String::new(), "", "  disabled: true\n".to_string()),
        Some(at) => (
            "false",
            format!("static_host_map:\n  \"10.99.0.1\": [\"{at}\"]\n"),
            "  hosts: [\"10.99.0.1\"]\n",
            format!("  dev: n{name}\n  mtu: 1300\n"),
        ),
    };
    format!(
        "pki:\n  ca: {pki}/ca.crt\n  cert: {pki}/{name}.crt\n  key: {pki}/{name}.key\n{map}\
         lighthouse:\n  am_lighthouse: {am}\n{hosts}listen:\n  host: 0.0.0.0\n  port: {port}\n\
         punchy:\n  punch: true\n  respond: true\ntun:\n{tun}logging:\n  level: info\n\
         firewall:\n  outbound:\n    - port: any\n      proto: any\n      host: any\n  inbound:\n    - port: any\n      proto: any\n      host: any\n"
    )
}

#[test]
fn the_laptop_falls_back_from_the_lan_to_nebula_to_the_relay_and_moves_back_up() {
    ensure_images();
    ensure_command("curl", "curl");
    ensure_command("iptables", "iptables");
    let hosts = Hosts::new();
    let s = TestStack::new("relay-hosts");
    let (lan, port, status, lh_port) = (free_port(), free_ports(1), free_ports(1), free_ports(1));
    relay_stack(&s, lan, None);
    s.apply();
    let allow = s.soul(&["relay", "allow"]).stdout_text();
    let relay = RelayProcess::start_in(Some(&hosts.vps), &s.dir, port, status, &allow);

    // The overlay tier: a Nebula lighthouse on the VPS, a node on the laptop, one in the pod.
    let pki = nebula_pki(
        &s.dir,
        &[
            ("lh", "10.99.0.1/24"),
            ("pod", "10.99.0.2/24"),
            ("lap", "10.99.0.3/24"),
        ],
    );
    let lighthouse_at = format!("{}:{lh_port}", hosts.vps_up);
    let _lighthouse = NebulaNode::start(
        &hosts.vps,
        &pki,
        "lh",
        &nebula_config(&pki, "lh", lh_port, None),
    );
    let _laptop_node = NebulaNode::start(
        &hosts.device,
        &pki,
        "lap",
        &nebula_config(&pki, "lap", 0, Some(&lighthouse_at)),
    );

    // The pod's agent dials the VPS; pairing codes name this host's LAN address, the pod's
    // Nebula address and the VPS, in that order.
    s.write(&format!(
        r#"stack "{{stack}}"
{notes}transport {{
    order "lan" "nebula" "relay"
    lan port={lan} address="{home}"
    nebula lighthouse="{lighthouse_at}" lighthouse-ip="10.99.0.1" ip="10.99.0.2/24" ca-file="{ca}" cert-file="{crt}" key-file="{key}" image="{NEBULA}"
}}
relay "{vps}:{port}" pin="{pin}"
device "laptop"
"#,
        notes = demo_sidecar("notes"),
        pin = relay_pin(),
        home = hosts.home_lan,
        vps = hosts.vps_up,
        ca = pki.join("ca.crt").display(),
        crt = pki.join("pod.crt").display(),
        key = pki.join("pod.key").display(),
    ));
    s.apply();
    relay.await_registered("notes", Duration::from_secs(30));
    let uri = s.soul(&["pair", "laptop", "--format", "uri"]).stdout_text();
    let uri = uri.trim();
    assert!(
        uri.contains(&format!(
            "&addr=lan:{}:{lan}&addr=nebula:10.99.0.2:8443&addr=relay:{}:{port}&",
            hosts.home_lan, hosts.vps_up
        )),
        "{uri}"
    );
    let name = format!("{}.notes.laptop", s.name);
    // The laptop's tunnel to the pod comes up (the pod answers the lighthouse's punch).
    let start = Instant::now();
    loop {
        let o = run(in_ns(Some(&hosts.device), "curl").args([
            "-sk",
            "-m",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://10.99.0.2:8443/.soul/health",
        ]));
        if o.stdout_text() == "200" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the laptop never reached the pod over Nebula:\n{}\n{}",
            read(pki.join("lap.log")),
            docker(&["logs", "--tail", "20", &s.container("notes", "nebula")])
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // LAN up: the LAN.
    assert_eq!(probe_on_laptop(&hosts, &s, uri).0, "lan");
    // The LAN black-holed (its TCP dropped; Nebula's UDP still flows): Nebula, one stagger
    // (250 ms) and a handshake later.
    let home = &hosts.home_lan;
    hosts.on_device(&format!("iptables -A OUTPUT -d {home} -p tcp -j DROP"));
    let (path, ms) = probe_on_laptop(&hosts, &s, &name);
    assert_eq!(path, "nebula");
    assert!(
        (250..800).contains(&ms),
        "black-holed LAN: Nebula after {ms} ms"
    );
    eprintln!("figure: LAN black-holed → nebula in {ms} ms");
    // The LAN refusing (RST): Nebula at once, without waiting for the stagger.
    hosts.on_device(&format!(
        "iptables -F OUTPUT; iptables -A OUTPUT -d {home} -p tcp -j REJECT --reject-with tcp-reset"
    ));
    let (path, ms) = probe_on_laptop(&hosts, &s, &name);
    assert_eq!(path, "nebula");
    assert!(ms < 250, "refusing LAN: Nebula after {ms} ms");
    eprintln!("figure: LAN refusing → nebula in {ms} ms");
    // The whole home unreachable (the LAN and Nebula's underlay): the relay, two staggers in.
    hosts.on_device(&format!(
        "iptables -F OUTPUT; iptables -A OUTPUT -d {home} -j DROP"
    ));
    let (path, ms) = probe_on_laptop(&hosts, &s, &name);
    assert_eq!(path, "relay");
    assert!(
        (500..1100).contains(&ms),
        "home cut off: the relay after {ms} ms"
    );
    eprintln!("figure: LAN and overlay black-holed → relay in {ms} ms");

    // A running `soul connect` on the relay moves back up when the LAN returns, and re-chooses
    // when the laptop's addresses change.
    let log = s.dir.join("connect.log");
    let local = free_ports(1);
    let mut forward = in_ns(Some(&hosts.device), SOUL)
        .args(["connect", &name, "--listen", &format!("127.0.0.1:{local}")])
        .env("XDG_CONFIG_HOME", s.dir.join("laptop-config"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Running)
        .unwrap();
    let wait_for = |line: &str, within: Duration| {
        let start = Instant::now();
        while !read(&log).contains(line) {
            assert!(
                start.elapsed() < within,
                "no `{line}` within {within:?}:\n{}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    };
    wait_for("path: relay:", Duration::from_secs(5));
    hosts.on_device("iptables -F OUTPUT");
    let back = wait_for("→ lan:", Duration::from_secs(8));
    // Within the probe interval (5 s), and the race that follows it.
    assert!(
        back <= Duration::from_millis(6500),
        "moved back to the LAN after {back:?}"
    );
    eprintln!("figure: LAN restored → back on the LAN after {back:?}");
    let lan_net = hosts.home_lan.rsplit_once('.').unwrap().0;
    hosts.on_device(&format!(
        "ip addr add {lan_net}.77/24 dev {}",
        hosts.device_lan_dev
    ));
    let rechosen = wait_for("the network changed", Duration::from_secs(3));
    assert!(
        rechosen < Duration::from_secs(1),
        "re-chosen after {rechosen:?}"
    );
    eprintln!("figure: laptop address change → re-chosen after {rechosen:?}");
    let _ = forward.kill();
    let _ = forward.wait();
}

/// A stack that declares a relay not running yet (so apply leaves it out of the codes), with
/// what a relay for it needs: its port, its status port and the stack's `allow` line.
fn stack_awaiting_its_relay(tag: &str) -> (TestStack, u16, u16, String) {
    let s = TestStack::new(tag);
    let (lan, port, status) = (free_port(), free_ports(1), free_ports(1));
    relay_stack(&s, lan, None);
    s.apply();
    let allow = s.soul(&["relay", "allow"]).stdout_text();
    relay_stack(&s, lan, Some((&host_address(), port)));
    s.apply();
    (s, port, status, allow)
}

/// `soul watch` on `s` with the address poll `every`, and the file it logs to.
fn spawn_watch(s: &TestStack, every: &str) -> (Running, PathBuf) {
    let log = s.dir.join("watch.log");
    let watch = s
        .command(&["watch", "--address-poll", every])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(Running)
        .unwrap();
    (watch, log)
}

/// Whether laptop's pairing code for `notes` carries the relay's address.
fn code_carries_the_relay(s: &TestStack) -> bool {
    read(s.state().join("pairing/laptop/notes.uri")).contains("&addr=relay:")
}

#[test]
fn a_running_watch_puts_the_relay_into_the_codes_once_the_pod_registers() {
    ensure_images();
    let (s, port, status, allow) = stack_awaiting_its_relay("relay-watch");
    assert!(!code_carries_the_relay(&s));
    let (_watch, log) = spawn_watch(&s, "1s");
    let relay = RelayProcess::start(&s.dir, port, status, &allow);
    relay.await_registered("notes", Duration::from_secs(40));
    wait_until(
        Duration::from_secs(10),
        || code_carries_the_relay(&s),
        || "the watch never added the relay to the code".into(),
    );
    // And drops it when the relay goes away.
    drop(relay);
    await_relay_left_the_codes(&s, &log, Duration::from_secs(10));
}

/// Waits until laptop's code no longer names the relay, showing the watch's log if it does.
fn await_relay_left_the_codes(s: &TestStack, log: &Path, within: Duration) {
    wait_until(
        within,
        || !code_carries_the_relay(s),
        || {
            format!(
                "the watch kept a relay the pod is no longer registered with:\n{}",
                read(log)
            )
        },
    );
}

/// The bug: the watch's address poll compared each reading with its own last one, so a
/// registration that began and ended between two polls — while a pass triggered by something
/// else put the relay into the codes — never left them. Here the poll is slow, the pass comes
/// from SIGHUP, and the relay is gone again long before the poll's next look.
#[test]
fn a_registration_the_poll_never_saw_still_leaves_the_codes_when_it_ends() {
    ensure_images();
    let (s, port, status, allow) = stack_awaiting_its_relay("relay-unseen");
    // The pod healthy first (the gate is recreated with the relay's flag): a health event
    // triggers a pass of its own, which would hide the bug in the middle of what this test
    // times.
    for role in ["pause", "gate"] {
        let container = s.container("notes", role);
        let healthy = || inspect(&container, "{{.State.Health.Status}}").trim() == "healthy";
        wait_until(Duration::from_secs(90), healthy, || {
            format!("{container} never got healthy")
        });
    }
    let (watch, log) = spawn_watch(&s, "15s");
    wait_until(
        Duration::from_secs(20),
        || read(&log).contains("trigger=start"),
        || "the watch did not start".into(),
    );
    let relay = RelayProcess::start(&s.dir, port, status, &allow);
    relay.await_registered("notes", Duration::from_secs(40));
    let hup = Command::new("kill")
        .args(["-HUP", &watch.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_until(
        Duration::from_secs(10),
        || code_carries_the_relay(&s),
        || format!("the pass on SIGHUP did not add the relay:\n{}", read(&log)),
    );
    drop(relay);
    // Within one poll of the registration's end, whatever the poll saw before.
    await_relay_left_the_codes(&s, &log, Duration::from_secs(25));
}

#[test]
fn a_gate_whose_key_does_not_match_the_pin_is_refused_and_sees_no_request() {
    ensure_images();
    let s = TestStack::new("relay-pin");
    relay_stack(&s, free_port(), None);
    s.apply();
    let uri = s.soul(&["pair", "laptop", "--format", "uri"]).stdout_text();
    let (before, rest) = uri.trim().split_once("&pin=").unwrap();
    let (_, after) = rest.split_once('&').unwrap();
    // Another key's pin: what a client sees when something else answers at the gate's address.
    let wrong = format!("{before}&pin=sha256//{}&{after}", "A".repeat(43) + "=");
    let gate = s.container("notes", "gate");
    let lines_before = docker(&["logs", &gate]).lines().count()
        + run(Command::new("docker").args(["logs", &gate]))
            .stderr_text()
            .lines()
            .count();
    let o = run(&mut connect(&s, &[&wrong, "--probe"]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(o.stderr_text().contains("pinned key"), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(300));
    let logs = run(Command::new("docker").args(["logs", &gate]));
    let all: Vec<String> = logs
        .stdout_text()
        .lines()
        .chain(logs.stderr_text().lines())
        .map(String::from)
        .collect();
    assert_eq!(
        all.len(),
        lines_before,
        "the gate logged a request from a client that refused its key:\n{}",
        all.join("\n")
    );
    // The right pin: the same probe succeeds over the LAN.
    let o = run(&mut connect(&s, &[uri.trim(), "--probe"]));
    assert!(o.stdout_text().contains("\"path\":\"lan\""), "{}", text(&o));
}

#[test]
fn soul_connect_trades_a_scanned_links_ticket_for_the_token_over_pinned_tls() {
    ensure_images();
    let s = TestStack::new("relay-link");
    relay_stack(&s, free_port(), None);
    s.apply();
    // The QR code's text (what a phone's camera reads): the link, with a one-time ticket.
    let png = s.state().join("pairing/laptop/notes.png");
    let o = s.soul(&["pair", "laptop", "--format", "link"]);
    assert!(o.status.success(), "{}", text(&o));
    let link = o
        .stdout_text()
        .lines()
        .find(|l| l.contains("soul_ticket="))
        .expect("a pairing link")
        .trim()
        .to_string();
    assert!(!link.contains("eyJ"), "the link holds no token: {link}");
    // From the PNG of the QR code, as a laptop would read it from a file.
    let o = run(&mut connect(&s, &[&png.to_string_lossy(), "--probe"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stdout_text().contains("\"path\":\"lan\""), "{}", text(&o));
    let stored = s.dir.join(format!(
        "laptop-config/soul/pairings/{}.notes.laptop.json",
        s.name
    ));
    let pairing: serde_json::Value = serde_json::from_str(&read(&stored)).unwrap();
    assert_eq!(
        pairing["token"],
        s.token("laptop"),
        "the gate handed over the device token"
    );
    // The ticket is spent: the same code does not pair again.
    std::fs::remove_file(&stored).unwrap();
    let again = run(&mut connect(&s, &[&png.to_string_lossy(), "--probe"]));
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(again.stderr_text().contains("ticket"), "{}", text(&again));
}

/// The agent's channel was plain text, so anything answering at the relay's address got the
/// registration. Now it is TLS pinned to the relay's key: a relay with another key is never
/// sent a registration, and the gate says why.
#[test]
fn a_relay_whose_key_does_not_match_the_pin_never_receives_a_registration() {
    ensure_images();
    let s = TestStack::new("relay-wrongkey");
    let (lan, port, status) = (free_port(), free_ports(1), free_ports(1));
    relay_stack(&s, lan, None);
    s.apply();
    let allow = s.soul(&["relay", "allow"]).stdout_text();
    let relay = RelayProcess::start(&s.dir, port, status, &allow);
    // The relay's state dir now holds another key than the one stack.kdl pins.
    drop(relay);
    std::fs::write(s.dir.join("relay-state/relay.key"), hex::encode([78u8; 32])).unwrap();
    let relay = RelayProcess::start_keeping_key(&s.dir, port, status, &allow);
    relay_stack(&s, lan, Some((&host_address(), port)));
    s.apply();
    let gate = s.container("notes", "gate");
    let said = retry(Duration::from_secs(20), || {
        let logs = run(Command::new("docker").args(["logs", &gate]));
        let all = format!("{}{}", logs.stdout_text(), logs.stderr_text());
        all.contains("does not have the key stack.kdl pins")
            .then_some(all)
    });
    assert!(said.is_some(), "the gate did not say why");
    let log = read(&relay.log);
    assert!(!log.contains("registered"), "{log}");
    let registered = relay
        .status()
        .map(|s| s["stacks"][0]["sidecars"].as_array().map_or(0, Vec::len));
    assert_eq!(registered, Some(0), "{log}");
    let uri = s.soul(&["pair", "laptop", "--format", "uri"]).stdout_text();
    assert!(!uri.contains("&addr=relay:"), "{uri}");
}
