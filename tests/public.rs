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

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::public_name::*;
use support::*;

const APP_TEXT: &str = "hello from soul's demo app";

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
    let o = run(Hosts::in_ns(&hosts.device, "timeout")
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
    let _relay = stack_going_public(&hosts, &s, &pebble, lan, "alice-phone");
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
        run(Hosts::in_ns(&hosts.device, "curl")
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
    let o = run(Hosts::in_ns(&hosts.device, "curl")
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
    hosts.device_lan("down");
    let dom = phone_chromium(&hosts, &phone, &root, &via_vps, &format!("https://{name}/"));
    assert!(
        dom.contains(APP_TEXT),
        "not paired through the relay: {dom}"
    );
    drop(tcpdump);

    // Back home, split DNS sends the name to the gate's LAN port: a valid certificate, and
    // the same cookie.
    hosts.device_lan("up");
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
    let started_at = inspect(&gate, "{{.State.StartedAt}}");
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
        inspect(&gate, "{{.State.StartedAt}}"),
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

    // The stack moves to another machine (its state bundle, another LAN port): the public
    // name keeps working, with a certificate the new home obtains, and the phone's cookie.
    let pass = s.dir.join("pass");
    std::fs::write(&pass, "moving day\n").unwrap();
    let bundle = s.dir.join("bundle.age");
    let (b, p) = (bundle.to_str().unwrap(), pass.to_str().unwrap());
    s.soul(&["state", "export", "--out", b, "--passphrase-file", p])
        .exited(0);
    s.soul(&["down", "--volumes"]).exited(0);
    std::fs::remove_dir_all(s.state()).unwrap();
    let moved_lan = free_port();
    s.write(&read(s.file()).replace(
        &format!("lan port={lan} "),
        &format!("lan port={moved_lan} "),
    ));
    s.soul(&["state", "import", b, "--passphrase-file", p])
        .exited(0);
    let moved = Instant::now();
    s.apply();
    let reissued = retry(Duration::from_secs(90), || {
        public_status(&s)[0]["acme"]["not_after"].as_u64()
    });
    assert!(
        reissued.is_some(),
        "no certificate after the move: {}\n{}",
        public_status(&s),
        gate_log(&s)
    );
    let dom = phone_chromium(&hosts, &phone, &root, &via_vps, &format!("https://{name}/"));
    assert!(
        dom.contains(APP_TEXT),
        "the phone's cookie at the public name after the move: {dom}"
    );
    eprintln!(
        "after the move: apply to the phone's page at the public name: {} ms",
        moved.elapsed().as_millis()
    );
}
