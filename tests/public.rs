//! A browser anywhere: a sidecar's public HTTPS name through the stack's own relay, its
//! certificate obtained at home by ACME TLS-ALPN-01 (Pebble, Let's Encrypt's test CA, from
//! Debian's packages) through the relay, which stays blind.
//!
//! Three hosts on this machine: "home" is this host (the engine, the pod's LAN port); "vps" and
//! "phone" are network namespaces the test makes. The VPS runs `soul relay serve` on 443 with
//! a domain, Pebble and its DNS (answering every name with the VPS's address); the phone runs
//! headless Chromium, which trusts Pebble's root for this test only (its own NSS database) and
//! resolves the public name by its host-resolver rules: to the VPS, or (split DNS at home) to
//! the gate's LAN port.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::*;

const SOUL: &str = env!("CARGO_BIN_EXE_soul");
const APP_TEXT: &str = "hello from soul's demo app";

/// The test's hosts, wired with veth pairs: home–vps (the internet as the pod's agent and the
/// CA see it), home–phone (the LAN), phone–vps (the internet as the phone sees it). Removed
/// on drop.
struct Hosts {
    vps: String,
    phone: String,
    /// The VPS's address from home (and the CA's view of it).
    vps_up: String,
    /// The VPS's address from the phone.
    vps_wan: String,
    /// This host's address on the LAN link, and the phone's end of it.
    home_lan: String,
    phone_lan_dev: String,
    vps_wan_dev: String,
    host_devs: Vec<String>,
}

impl Hosts {
    fn new() -> Hosts {
        ensure_command("ip", "iproute2");
        let id = std::process::id();
        let net = |k: u32| format!("10.{}.{}", 150 + (id % 50), (id / 50 % 80) * 3 + k);
        let (lan, up, wan) = (net(0), net(1), net(2));
        let tag = id % 100_000;
        let (phone, vps) = (format!("soul{tag}-phone"), format!("soul{tag}-pvps"));
        let o = run(Command::new("sh").args([
            "-ec",
            &format!(
                "ip netns add {phone}; ip netns add {vps}
                 ip -n {phone} link set lo up; ip -n {vps} link set lo up
                 ip link add q{tag}h type veth peer name q{tag}p
                 ip link set q{tag}p netns {phone}
                 ip addr add {lan}.1/24 dev q{tag}h; ip link set q{tag}h up
                 ip -n {phone} addr add {lan}.2/24 dev q{tag}p; ip -n {phone} link set q{tag}p up
                 ip link add p{tag}h type veth peer name p{tag}v
                 ip link set p{tag}v netns {vps}
                 ip addr add {up}.1/24 dev p{tag}h; ip link set p{tag}h up
                 ip -n {vps} addr add {up}.2/24 dev p{tag}v; ip -n {vps} link set p{tag}v up
                 ip -n {vps} route add default via {up}.1
                 ip -n {phone} link add r{tag}p type veth peer name r{tag}v netns {vps}
                 ip -n {phone} addr add {wan}.1/24 dev r{tag}p; ip -n {phone} link set r{tag}p up
                 ip -n {vps} addr add {wan}.2/24 dev r{tag}v; ip -n {vps} link set r{tag}v up"
            ),
        ]));
        assert!(o.status.success(), "{}", text(&o));
        Hosts {
            vps,
            phone,
            vps_up: format!("{up}.2"),
            vps_wan: format!("{wan}.2"),
            home_lan: format!("{lan}.1"),
            phone_lan_dev: format!("q{tag}p"),
            vps_wan_dev: format!("r{tag}v"),
            host_devs: vec![format!("q{tag}h"), format!("p{tag}h")],
        }
    }

    /// Plugs the phone's LAN in (`up`) or out (`down`).
    fn phone_lan(&self, state: &str) {
        run(Command::new("ip").args([
            "-n",
            &self.phone,
            "link",
            "set",
            &self.phone_lan_dev,
            state,
        ]))
        .exited(0);
    }

    fn in_ns(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.phone, &self.vps] {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        for dev in &self.host_devs {
            let _ = run(Command::new("ip").args(["link", "del", dev]));
        }
    }
}

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Running {
    let out = std::fs::File::create(log).unwrap();
    Running(
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    )
}

/// Pebble and its DNS on the VPS: Pebble's own HTTPS certificate made here (a test CA, whose
/// root is `ca.pem`), certificates valid for `validity` seconds, no validation delays.
struct Pebble {
    _ca: Running,
    _dns: Running,
    dir: PathBuf,
    directory: String,
    management: String,
}

impl Pebble {
    fn start(hosts: &Hosts, dir: &Path, validity: u64) -> Pebble {
        ensure_command("pebble", "pebble");
        ensure_command("openssl", "openssl");
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        let ip = &hosts.vps_up;
        let o = run(Command::new("sh").current_dir(&dir).args([
            "-ec",
            &format!(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=soul-test-ca 2>/dev/null
                 openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout pebble.key -out pebble.csr -subj /CN=pebble 2>/dev/null
                 printf 'subjectAltName=IP:{ip}\\nbasicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\nextendedKeyUsage=serverAuth\\n' > ext
                 openssl x509 -req -in pebble.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out pebble.pem -days 2 -extfile ext 2>/dev/null"
            ),
        ]));
        assert!(o.status.success(), "{}", text(&o));
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{ip}:14000"),
                "managementListenAddress": format!("{ip}:15000"),
                "certificate": dir.join("pebble.pem"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": 5002,
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }
        });
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let mut dns = Hosts::in_ns(&hosts.vps, "pebble-challtestsrv");
        dns.args([
            "-dns01",
            "127.0.0.1:8053",
            "-defaultIPv4",
            ip,
            "-defaultIPv6",
            "",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            "127.0.0.1:8055",
        ]);
        let dns = spawn_logged(dns, &dir.join("dns.log"));
        let mut ca = Hosts::in_ns(&hosts.vps, "pebble");
        ca.arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", "127.0.0.1:8053"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        let ca = spawn_logged(ca, &dir.join("pebble.log"));
        let pebble = Pebble {
            _ca: ca,
            _dns: dns,
            directory: format!("https://{ip}:14000/dir"),
            management: format!("https://{ip}:15000"),
            dir,
        };
        retry(Duration::from_secs(20), || {
            pebble
                .curl(&pebble.directory)
                .filter(|d| d.contains("newOrder"))
        })
        .unwrap_or_else(|| {
            panic!(
                "pebble did not start:\n{}",
                read(pebble.dir.join("pebble.log"))
            )
        });
        pebble
    }

    fn curl(&self, url: &str) -> Option<String> {
        let o = run(Command::new("curl")
            .args(["-sf", "-m", "5", "--cacert"])
            .arg(self.dir.join("ca.pem"))
            .arg(url));
        o.status.success().then(|| o.stdout_text())
    }

    /// The root Pebble issues certificates under (a new one each run), as a file.
    fn issuing_root(&self) -> PathBuf {
        let pem = self
            .curl(&format!("{}/roots/0", self.management))
            .expect("pebble's issuing root");
        let path = self.dir.join("issuing-root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }
}

/// `soul relay serve` on the VPS's port 443, giving public names under `relay.test`.
fn start_relay(hosts: &Hosts, dir: &Path, allow: &str) -> (Running, String) {
    let config = dir.join("relay.kdl");
    std::fs::write(
        &config,
        format!(
            "listen \"0.0.0.0:443\"\nstatus \"127.0.0.1:7001\"\ndomain \"relay.test\"\n{allow}"
        ),
    )
    .unwrap();
    let state = dir.join("relay-state");
    std::fs::create_dir_all(&state).unwrap();
    let mut cmd = Hosts::in_ns(&hosts.vps, SOUL);
    cmd.args(["relay", "serve", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state);
    let relay = spawn_logged(cmd, &dir.join("relay.log"));
    let status = || {
        let o = run(Hosts::in_ns(&hosts.vps, SOUL).args([
            "relay",
            "status",
            "--status",
            "127.0.0.1:7001",
            "--output",
            "json",
        ]));
        serde_json::from_str::<serde_json::Value>(&o.stdout_text()).ok()
    };
    let pin = retry(Duration::from_secs(20), || {
        status().and_then(|s| s["pin"].as_str().map(String::from))
    })
    .unwrap_or_else(|| panic!("the relay did not start:\n{}", read(dir.join("relay.log"))));
    (relay, pin)
}

/// Headless Chromium in the phone's namespace: its own profile and NSS database (trusting
/// `root` only), resolving the public name as `map` says (`name addr[:port]`).
fn phone_chromium(hosts: &Hosts, home: &Path, root: &Path, map: &str, url: &str) -> String {
    let nssdb = home.join(".pki/nssdb");
    if !nssdb.exists() {
        ensure_command("certutil", "libnss3-tools");
        std::fs::create_dir_all(&nssdb).unwrap();
        let db = format!("sql:{}", nssdb.display());
        run(Command::new("certutil").args(["-d", &db, "-N", "--empty-password"])).exited(0);
        run(Command::new("certutil")
            .args(["-d", &db, "-A", "-t", "C,,", "-n", "pebble-test-root", "-i"])
            .arg(root))
        .exited(0);
    }
    let o = run(Hosts::in_ns(&hosts.phone, "timeout")
        .env("HOME", home)
        .args(["90", "chromium"])
        .args(HEADLESS_CHROMIUM)
        .args([
            "--virtual-time-budget=5000",
            &format!("--host-resolver-rules=MAP {map}"),
            &format!("--user-data-dir={}", home.join("profile").display()),
            "--dump-dom",
            url,
        ]));
    assert!(o.status.success(), "chromium failed:\n{}", text(&o));
    o.stdout_text()
}

/// A TLS connection that checks the public certificate against `root`, kept open to send
/// requests on one after another.
struct HeldConnection {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    name: String,
}

impl HeldConnection {
    fn open(addr: &str, name: &str, root: &Path) -> HeldConnection {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(root).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        HeldConnection {
            tls: rustls::StreamOwned::new(conn, tcp),
            name: name.to_string(),
        }
    }

    /// One keep-alive request; the answer's head and body.
    fn get(&mut self, path: &str, token: &str) -> String {
        use std::io::{Read as _, Write as _};
        write!(
            self.tls,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            self.name
        )
        .unwrap();
        self.tls.flush().unwrap();
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            match self.tls.read(&mut byte) {
                Ok(1) => answer.push(byte[0]),
                other => panic!("the held connection ended: {other:?} after {answer:?}"),
            }
        }
        let head = String::from_utf8_lossy(&answer).to_string();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|n| n.trim().parse::<usize>().unwrap())
            })
            .expect("a Content-Length");
        let mut body = vec![0u8; length];
        self.tls.read_exact(&mut body).unwrap();
        head + &String::from_utf8_lossy(&body)
    }
}

/// The gate's log.
fn gate_log(s: &TestStack) -> String {
    let o = run(Command::new("docker").args(["logs", &s.container("notes", "gate")]));
    format!("{}{}", o.stdout_text(), o.stderr_text())
}

/// `soul status --output json`'s public names.
fn public_status(s: &TestStack) -> serde_json::Value {
    let o = s.soul(&["status", "--output", "json"]);
    serde_json::from_str::<serde_json::Value>(&o.stdout_text())
        .map(|v| v["public"].clone())
        .unwrap_or_default()
}

/// The serial of the certificate a TLS server at `addr` presents for `name`, from the host.
fn served_serial(addr: &str, name: &str) -> String {
    let o = run(Command::new("sh").args([
        "-c",
        &format!(
            "openssl s_client -connect {addr} -servername {name} </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ),
    ]));
    o.stdout_text().trim().to_string()
}

#[test]
fn a_phone_pairs_at_the_public_name_and_keeps_its_cookie_through_the_relay_and_at_home() {
    ensure_images();
    ensure_command("curl", "curl");
    ensure_command("chromium", "chromium");
    ensure_command("tcpdump", "tcpdump");
    let hosts = Hosts::new();
    // Certificates live 60 s: renewal (at two-thirds) happens during the test.
    let s = TestStack::new("pub");
    let pebble = Pebble::start(&hosts, &s.dir, 60);
    let lan = free_port();
    let base = format!(
        "stack \"{{stack}}\"\nsidecar \"notes\" {{\n    image \"soul:latest\"\n    command \"demo-app\" \"--port=8080\"\n    port 8080\n}}\ntransport {{\n    lan port={lan} address=\"{}\"\n}}\ndevice \"alice-phone\"\n",
        hosts.home_lan
    );
    s.write(&base);
    s.apply();
    let allow = s.soul(&["relay", "allow"]).stdout_text();
    let (_relay, pin) = start_relay(&hosts, &s.dir, &allow);
    s.write(&format!(
        "{base}relay \"{}:443\" pin=\"{pin}\" public=#true domain=\"relay.test\"\nacme directory=\"{}\" ca-file=\"{}\"\n",
        hosts.vps_up,
        pebble.directory,
        pebble.dir.join("ca.pem").display()
    ));
    let started = Instant::now();
    s.apply();
    let name = format!("notes-{}.relay.test", s.name);

    // The gate obtains its certificate through the relay.
    let issued = retry(Duration::from_secs(90), || {
        let public = public_status(&s);
        public[0]["acme"]["not_after"].as_u64()
    });
    assert!(
        issued.is_some(),
        "no certificate: {}\ngate log:\n{}\nrelay log:\n{}\npebble log:\n{}",
        public_status(&s),
        gate_log(&s),
        read(s.dir.join("relay.log")),
        read(pebble.dir.join("pebble.log"))
    );
    let root = pebble.issuing_root();
    let vps_https = |path: &str| {
        run(Hosts::in_ns(&hosts.phone, "curl")
            .args(["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("--cacert")
            .arg(&root)
            .arg("--resolve")
            .arg(format!("{name}:443:{}", hosts.vps_wan))
            .arg(format!("https://{name}{path}")))
    };
    let first = retry(Duration::from_secs(30), || {
        let o = vps_https("/.soul/health");
        (o.stdout_text() == "200").then_some(())
    });
    assert!(
        first.is_some(),
        "the public name never answered with a valid certificate"
    );
    eprintln!(
        "apply to the first valid HTTPS answer at the public name: {} ms",
        started.elapsed().as_millis()
    );

    // The certificate's key is at home (0600); on the VPS side, no private key but the relay's.
    let cert = s.state().join("acme/notes/public.pem");
    let pem = read(&cert);
    assert!(pem.contains("PRIVATE KEY") && pem.contains("BEGIN CERTIFICATE"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for entry in std::fs::read_dir(s.dir.join("relay-state")).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(
            path.file_name().unwrap(),
            "relay.key",
            "a file on the VPS side: {}",
            path.display()
        );
    }
    for file in std::fs::read_dir(&pebble.dir).unwrap() {
        let path = file.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            assert!(
                ["ca.key", "pebble.key"].contains(&path.file_name().unwrap().to_str().unwrap()),
                "a private key beside the CA: {}",
                path.display()
            );
        }
    }

    // Without a credential: the same refusal at the public name as on the LAN.
    let lan_refusal = run(Command::new("curl")
        .args(["-sk", "-m", "10", "-w", "\n%{http_code}"])
        .arg(format!("https://127.0.0.1:{lan}/notes")));
    let o = run(Hosts::in_ns(&hosts.phone, "curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(&root)
        .arg("--resolve")
        .arg(format!("{name}:443:{}", hosts.vps_wan))
        .arg(format!("https://{name}/notes")));
    assert!(o.stdout_text().ends_with("\n401"), "{}", text(&o));
    assert_eq!(o.stdout_text(), lan_refusal.stdout_text());
    assert!(!o.stdout_text().contains(APP_TEXT));

    // The phone scans the code: a link to the public name.
    ensure_command("zbarimg", "zbar-tools");
    let scanned = run(Command::new("zbarimg")
        .args(["--raw", "-q"])
        .arg(s.state().join("pairing/alice-phone/notes.png")));
    let link = scanned.stdout_text().trim().to_string();
    assert!(
        link.starts_with(&format!("https://{name}/?soul_ticket=")),
        "{link}"
    );
    // Everything the phone sends through the VPS is captured there.
    let capture = s.dir.join("vps.pcap");
    let mut tcpdump = Hosts::in_ns(&hosts.vps, "tcpdump");
    tcpdump
        .args(["-i", &hosts.vps_wan_dev, "-U", "-s", "0", "-w"])
        .arg(&capture);
    let tcpdump = spawn_logged(tcpdump, &s.dir.join("tcpdump.log"));
    retry(Duration::from_secs(10), || {
        read(s.dir.join("tcpdump.log"))
            .contains("listening")
            .then_some(())
    })
    .expect("tcpdump started");

    let phone = s.dir.join("phone");
    let via_vps = format!("{name} {}", hosts.vps_wan);
    let dom = phone_chromium(&hosts, &phone, &root, &via_vps, &link);
    assert!(dom.contains(APP_TEXT), "did not land on the app: {dom}");
    // Out of the house: the LAN is cut; the same page with the same cookie through the VPS.
    hosts.phone_lan("down");
    let dom = phone_chromium(&hosts, &phone, &root, &via_vps, &format!("https://{name}/"));
    assert!(
        dom.contains(APP_TEXT),
        "not paired through the relay: {dom}"
    );
    drop(tcpdump);

    // Back home, split DNS sends the name to the gate's LAN port: a valid certificate, and
    // the same cookie.
    hosts.phone_lan("up");
    let at_home = format!("{name} {}:{lan}", hosts.home_lan);
    let dom = phone_chromium(&hosts, &phone, &root, &at_home, &format!("https://{name}/"));
    assert!(dom.contains(APP_TEXT), "not paired at home: {dom}");

    // The VPS saw no token, no cookie, no HTTP and no app text.
    let captured = std::fs::read(&capture).unwrap();
    assert!(captured.len() > 1000, "the capture holds the sessions");
    let token = s.token("alice-phone");
    let ticket = link
        .split("soul_ticket=")
        .nth(1)
        .and_then(|t| t.split('#').next())
        .unwrap()
        .to_string();
    for secret in [
        token.as_str(),
        ticket.as_str(),
        "HTTP/1.1",
        "soul_session",
        "Cookie",
        APP_TEXT,
    ] {
        assert!(
            !captured
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "the VPS saw `{secret}`"
        );
    }

    // Renewal: the gate renews without a restart; a connection open across it is not cut.
    let gate = s.container("notes", "gate");
    let started_at = docker(&["inspect", "-f", "{{.State.StartedAt}}", &gate]);
    let lan_addr = format!("127.0.0.1:{lan}");
    let before = served_serial(&lan_addr, &name);
    let obtained = |s: &TestStack| {
        public_status(s)[0]["acme"]["obtained"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut held = HeldConnection::open(&lan_addr, &name, &root);
    assert!(held.get("/notes", &token).starts_with("HTTP/1.1 200"));
    let first_obtained = obtained(&s);
    // The gate closes a keep-alive connection idle for longer than its header timeout, so the
    // held connection carries a request on every attempt: it is in use while the certificate
    // changes under it.
    let mut requests = 1;
    let renewed = retry(Duration::from_secs(90), || {
        let answer = held.get("/notes", &token);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "request {requests}: {answer}"
        );
        requests += 1;
        (obtained(&s) > first_obtained).then_some(())
    });
    assert!(
        renewed.is_some(),
        "no renewal: {}\n{}",
        public_status(&s),
        gate_log(&s)
    );
    let after = served_serial(&lan_addr, &name);
    assert_ne!(before, after, "a new certificate is served");
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", &gate]),
        started_at,
        "the gate was not restarted"
    );
    // The connection opened before the renewal still answers, on the old certificate.
    let answer = held.get("/notes", &token);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        requests > 2,
        "the held connection carried requests across the wait"
    );
}
