//! The public-name harness shared by tests/public.rs and benches/public.rs: a VPS and a phone
//! as network namespaces wired to this host, Pebble (Let's Encrypt's test CA) and its DNS on the
//! VPS, and `soul relay serve` there on 443 with the domain `relay.test`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use super::netns::Hosts;
use super::*;

pub fn spawn_logged(mut cmd: Command, log: &Path) -> Running {
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
pub struct Pebble {
    _ca: Running,
    _dns: Running,
    pub dir: PathBuf,
    pub directory: String,
    pub management: String,
}

impl Pebble {
    pub fn start(hosts: &Hosts, dir: &Path, validity: u64) -> Pebble {
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

    pub fn curl(&self, url: &str) -> Option<String> {
        let o = run(Command::new("curl")
            .args(["-sf", "-m", "5", "--cacert"])
            .arg(self.dir.join("ca.pem"))
            .arg(url));
        o.status.success().then(|| o.stdout_text())
    }

    /// The root Pebble issues certificates under (a new one each run), as a file.
    pub fn issuing_root(&self) -> PathBuf {
        let pem = self
            .curl(&format!("{}/roots/0", self.management))
            .expect("pebble's issuing root");
        let path = self.dir.join("issuing-root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }
}

/// `soul relay serve` on the VPS's port 443, giving public names under `relay.test`.
pub fn start_relay(hosts: &Hosts, dir: &Path, allow: &str) -> (Running, String) {
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

/// The gate's log.
pub fn gate_log(s: &TestStack) -> String {
    let o = run(Command::new("docker").args(["logs", &s.container("notes", "gate")]));
    format!("{}{}", o.stdout_text(), o.stderr_text())
}

/// `soul status --output json`'s public names.
pub fn public_status(s: &TestStack) -> serde_json::Value {
    let o = s.soul(&["status", "--output", "json"]);
    serde_json::from_str::<serde_json::Value>(&o.stdout_text())
        .map(|v| v["public"].clone())
        .unwrap_or_default()
}

/// The demo app as sidecar `notes`, paired with `device`, on the LAN port `lan` at this host's
/// address on the phone's LAN, applied once (so the stack has its key and `soul relay allow`
/// its line); then the VPS's relay started with that line, and stack.kdl given a public name
/// through it with Pebble as its CA, not applied yet (the caller times that apply). Returns
/// the relay.
pub fn stack_going_public(
    hosts: &Hosts,
    s: &TestStack,
    pebble: &Pebble,
    lan: u16,
    device: &str,
) -> Running {
    let base = format!(
        "stack \"{{stack}}\"\n{notes}transport {{\n    lan port={lan} address=\"{}\"\n}}\ndevice \"{device}\"\n",
        hosts.home_lan,
        notes = demo_sidecar("notes")
    );
    s.write(&base);
    s.apply();
    let allow = s.soul(&["relay", "allow"]).stdout_text();
    let (relay, pin) = start_relay(hosts, &s.dir, &allow);
    s.write(&format!(
        "{base}relay \"{}:443\" pin=\"{pin}\" public=#true domain=\"relay.test\"\nacme directory=\"{}\" ca-file=\"{}\"\n",
        hosts.vps_up,
        pebble.directory,
        pebble.dir.join("ca.pem").display()
    ));
    relay
}
