//! State you can trust, on the real engine: soul never locks a paired device out by itself
//! (a damaged registry or another key stops apply while the running gate keeps serving), reads
//! nothing without a bound, serves the files it just wrote, and finishes a rotation cut short.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn stack_kdl(lan: u16, devices: &str, generation: u64) -> String {
    format!(
        r#"stack "{{stack}}"
{notes}transport {{
    lan port={lan} address="192.168.1.20"
}}
secret-generation {generation}
{devices}
"#,
        notes = demo_sidecar("notes")
    )
}

/// A stack with `devices` applied, its LAN port, and the token of its first device served.
fn applied(tag: &str, devices: &str) -> (TestStack, u16) {
    ensure_images();
    let s = TestStack::new(tag);
    let lan = free_port();
    s.write(&stack_kdl(lan, devices, 1));
    s.apply();
    (s, lan)
}

/// Whether the gate on `port` answers `token` with `code` (retried until `within`).
fn answers(port: u16, token: &str, code: u16, within: Duration) -> bool {
    retry(within, || {
        http_get_as(port, "/", token, Duration::from_secs(2))
            .filter(|(c, _)| *c == code)
            .map(|_| ())
    })
    .is_some()
}

/// One way to damage the state dir: its name, what does it, and what the refusal must say.
type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);

/// A damaged `devices.json` (emptied, truncated, garbage, deleted) or a `stack.key` replaced by
/// another valid key once made apply exit 0, re-issue every token and lock every device out.
#[test]
fn a_damaged_registry_or_another_key_stops_apply_while_the_gate_keeps_serving() {
    let (s, lan) = applied("damaged", "device \"phone\"\n");
    let token = s.token("phone");
    assert!(answers(lan, &token, 200, Duration::from_secs(20)));
    let state = s.state();
    let registry = std::fs::read(state.join("devices.json")).unwrap();
    let key = std::fs::read(state.join("stack.key")).unwrap();
    let another_key = soul::state::StackKey::from_seed(1, [99; 32]).to_file();
    let damage: [Damage; 6] = [
        (
            "empty",
            Box::new(|| std::fs::write(state.join("devices.json"), b"").unwrap()),
            "gate/devices.json",
        ),
        (
            "truncated",
            Box::new(|| {
                std::fs::write(state.join("devices.json"), &registry[..registry.len() / 2]).unwrap()
            }),
            "gate/devices.json",
        ),
        (
            "garbage",
            Box::new(|| std::fs::write(state.join("devices.json"), b"\x00\xffnot json").unwrap()),
            "gate/devices.json",
        ),
        (
            "deleted",
            Box::new(|| std::fs::remove_file(state.join("devices.json")).unwrap()),
            "gate/devices.json",
        ),
        (
            "another valid key",
            Box::new(|| std::fs::write(state.join("stack.key"), &another_key).unwrap()),
            "stack.key",
        ),
        (
            "key and registry deleted",
            Box::new(|| {
                std::fs::remove_file(state.join("stack.key")).unwrap();
                std::fs::remove_file(state.join("devices.json")).unwrap();
            }),
            "stack.key from a backup",
        ),
    ];
    for (what, damage, hint) in damage {
        damage();
        for cmd in [&["apply"][..], &["plan"]] {
            let o = s.soul(cmd);
            assert_eq!(
                o.status.code(),
                Some(1),
                "{what}: soul {cmd:?} went on:\n{}",
                text(&o)
            );
            let err = o.stderr_text();
            assert!(
                err.contains(hint) && err.contains("rotate --new-key"),
                "{what}: {err}"
            );
        }
        assert_eq!(
            s.token("phone"),
            token,
            "{what}: the token on disk was re-issued"
        );
        assert!(
            answers(lan, &token, 200, Duration::from_secs(5)),
            "{what}: the running gate stopped admitting the device"
        );
        std::fs::write(state.join("devices.json"), &registry).unwrap();
        std::fs::write(state.join("stack.key"), &key).unwrap();
        let o = s.soul(&["plan", "--detailed-exitcode"]);
        assert_eq!(o.status.code(), Some(0), "{what}, restored:\n{}", text(&o));
    }
}

/// `stack.key` linked to /dev/zero made `soul plan` grow to 22 GB; state files linked to it
/// read a GiB each; a FIFO made plan and apply hang; a state dir that is a file said only
/// "File exists (os error 17)".
#[test]
fn every_state_file_as_a_fifo_a_dev_zero_link_or_a_directory_ends_at_once() {
    ensure_command("prlimit", "util-linux");
    let (s, _) = applied("fifo", "device \"phone\"\n");
    let state = s.state();
    let mut slowest = Duration::ZERO;
    for file in [
        "stack.key",
        "devices.json",
        "addresses.json",
        "stopped.json",
        "renders.json",
        "state.id",
        "gate/devices.json",
    ] {
        let path = state.join(file);
        let saved = std::fs::read(&path).ok();
        for kind in ["fifo", "dev-zero", "directory"] {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir(&path);
            match kind {
                "fifo" => assert!(
                    Command::new("mkfifo")
                        .arg(&path)
                        .status()
                        .unwrap()
                        .success()
                ),
                "dev-zero" => std::os::unix::fs::symlink("/dev/zero", &path).unwrap(),
                _ => std::fs::create_dir(&path).unwrap(),
            }
            let started = Instant::now();
            let o = run(Command::new("timeout")
                .args(["20", "prlimit", "--as=536870912", SOUL, "-f"])
                .arg(s.file())
                .arg("--state-dir")
                .arg(&state)
                .arg("plan"));
            let took = started.elapsed();
            slowest = slowest.max(took);
            assert!(
                took < Duration::from_secs(5),
                "{file} as a {kind}: plan took {took:?}"
            );
            assert!(
                matches!(o.status.code(), Some(0..=2)),
                "{file} as a {kind}: plan was killed or hung:\n{}",
                text(&o)
            );
            if ["stack.key", "devices.json"].contains(&file) {
                assert_eq!(
                    o.status.code(),
                    Some(1),
                    "{file} as a {kind}:\n{}",
                    text(&o)
                );
            }
            assert!(!o.stderr_text().contains("os error 17"), "{}", text(&o));
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&path);
        if let Some(bytes) = saved {
            std::fs::write(&path, bytes).unwrap();
        }
    }
    eprintln!("figure: the slowest plan over a FIFO, /dev/zero or a directory: {slowest:?}");
    s.soul(&["plan"]).exited(0);
    // A state dir that is a plain file says so.
    let file = s.dir.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let o = run(Command::new(SOUL)
        .arg("-f")
        .arg(s.file())
        .arg("--state-dir")
        .arg(&file)
        .arg("apply"));
    o.exited(1).stderr_has("is a file, not a directory");
}

/// After `rm -rf STATE/gate; soul apply` the gate kept serving the deleted directory: a device
/// removed from stack.kdl still got 200, and plan said nothing.
#[test]
fn a_deleted_gate_directory_is_replaced_in_the_running_gate_too() {
    let (s, lan) = applied("gatedir", "device \"phone\"\ndevice \"tablet\"\n");
    let tablet = s.token("tablet");
    assert!(answers(lan, &tablet, 200, Duration::from_secs(20)));
    std::fs::remove_dir_all(s.state().join("gate")).unwrap();
    let o = s.soul(&["plan", "--detailed-exitcode"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "plan reports the drift:\n{}",
        text(&o)
    );
    s.write(&stack_kdl(lan, "device \"phone\"\n", 1));
    s.apply();
    // From the moment apply returns, nothing admits the removed device: the gate serving the
    // deleted directory is gone, and the new one answers 401 once it listens.
    let started = Instant::now();
    let mut refused_after = None;
    while started.elapsed() < Duration::from_secs(20) {
        match http_get_as(lan, "/", &tablet, Duration::from_millis(300)) {
            Some((401, _)) => {
                refused_after = Some(started.elapsed());
                break;
            }
            Some((200, _)) => panic!(
                "the removed device was admitted {:?} after apply returned",
                started.elapsed()
            ),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let refused_after = refused_after.expect("the removed device never got its 401");
    eprintln!(
        "figure: the removed device admitted by nothing after apply returned, refused with 401 by the new gate after {refused_after:?}"
    );
    assert!(answers(
        lan,
        &s.token("phone"),
        200,
        Duration::from_secs(20)
    ));
    s.soul(&["plan", "--detailed-exitcode"]).exited(0);
}

/// Bumping `secret-generation` on a full disk rotated the key and the gate's keys, then failed
/// writing a QR code: every device got 401 until an apply completed. A rotation cut short at
/// any of its writes leaves the old tokens admitted, and the next apply finishes it.
#[test]
fn a_rotation_cut_short_at_any_write_leaves_the_old_tokens_admitted() {
    let (s, lan) = applied("rotate", "device \"phone\"\n");
    let old = s.token("phone");
    assert!(answers(lan, &old, 200, Duration::from_secs(20)));
    s.write(&stack_kdl(lan, "device \"phone\"\n", 2));
    let plan: serde_json::Value =
        serde_json::from_str(&s.soul(&["plan", "--output", "json"]).stdout_text()).unwrap();
    let writes: Vec<String> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["step"] == "write-file")
        .filter_map(|st| st["path"].as_str().map(String::from))
        .collect();
    assert!(
        writes.iter().any(|p| p == "stack.key") && writes.len() >= 8,
        "{plan}"
    );
    for path in &writes {
        let o = run(s
            .command(&["apply"])
            .env(soul::state::FAULT_WRITE_VAR, path));
        assert_eq!(o.status.code(), Some(1), "cut at {path}:\n{}", text(&o));
        assert!(
            answers(lan, &old, 200, Duration::from_secs(5)),
            "cut at {path}: the old token is refused"
        );
    }
    s.apply();
    let new = s.token("phone");
    assert_ne!(new, old);
    assert!(answers(lan, &new, 200, Duration::from_secs(20)));
    assert!(answers(lan, &old, 401, Duration::from_secs(20)));
    assert!(!Path::new(&s.state().join(soul::state::ROTATION_FILE)).exists());
    s.soul(&["plan", "--detailed-exitcode"]).exited(0);
}

/// `curl` at the pod's LAN port on loopback: the status, and the body.
fn curl_at(port: u16, args: &[&str], path: &str) -> (String, String) {
    let o = run(Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}{path}")));
    let out = o.stdout_text();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.to_string(), body.to_string())
}

/// Moving a stack: its state exported, the old machine's stack and state gone (`down
/// --volumes`, the state dir deleted), imported and applied with another LAN address and port.
/// Nothing a paired device holds stops working, and nothing spent becomes new.
#[test]
fn a_stack_moved_by_its_state_bundle_keeps_every_token_pin_cookie_and_spent_ticket() {
    ensure_images();
    ensure_command("curl", "curl");
    let s = TestStack::new("move");
    let old_port = free_port();
    s.write(&stack_kdl(old_port, "device \"phone\"", 1));
    s.apply();
    let status = s.soul(&["status"]);
    assert!(
        status.stdout_text().contains("never exported"),
        "{}",
        text(&status)
    );
    let token = s.token("phone");
    let pin = served_pin(old_port);
    let code = read(s.state().join("pairing/phone/notes.code"));
    let ticket = soul::pairing::Payload::parse(&code)
        .unwrap()
        .ticket
        .unwrap()
        .expose()
        .to_string();
    // A browser pairs before the move: its cookie, and the ticket is spent.
    let jar = s.dir.join("cookies");
    let jar_arg = jar.to_str().unwrap();
    let form = format!("ticket={ticket}");
    let (paired, _) = curl_at(
        old_port,
        &["-c", jar_arg, "--data-urlencode", &form],
        "/.soul/pair",
    );
    assert_eq!(paired, "303");
    assert_eq!(curl_at(old_port, &["-b", jar_arg], "/").0, "200");

    let pass = s.dir.join("pass");
    std::fs::write(&pass, "a long passphrase\n").unwrap();
    let bundle = s.dir.join("home.soul-state.age");
    let o = s.soul(&[
        "state",
        "export",
        "--out",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!o.stderr_text().contains("a long passphrase"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        s.soul(&["status"])
            .stdout_text()
            .contains("backup: exported")
    );

    // The old machine is gone.
    assert!(s.soul(&["down", "--volumes"]).status.success());
    std::fs::remove_dir_all(s.state()).unwrap();

    // The new machine: another LAN address and port.
    let new_port = free_port();
    s.write(&stack_kdl(new_port, "device \"phone\"", 1).replace("192.168.1.20", "192.168.7.40"));
    let o = s.soul(&[
        "state",
        "import",
        bundle.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    o.stderr_has("soul apply");
    s.apply();
    assert_eq!(
        s.token("phone"),
        token,
        "the token is re-derived byte for byte"
    );
    assert_eq!(served_pin(new_port), pin, "the gate's pin is unchanged");
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(curl_at(new_port, &["-H", &bearer], "/").0, "200");
    assert_eq!(
        curl_at(new_port, &["-b", jar_arg], "/").0,
        "200",
        "the browser's cookie from before the move"
    );
    assert_eq!(
        curl_at(new_port, &["--data-urlencode", &form], "/.soul/pair").0,
        "410",
        "a ticket spent before the move stays spent"
    );
    assert!(
        read(s.state().join("pairing/phone/notes.uri")).contains("192.168.7.40"),
        "the codes name the new address"
    );
}

/// The stack moves to another machine while a laptop is away from home: the laptop's stored
/// pairing names only the old LAN address. It reaches the new home through the relay, learns
/// the new addresses there, and its next race picks the new LAN address directly. (Both
/// "machines" are this engine in turn; the laptop and the VPS are network namespaces.)
#[test]
fn a_laptop_follows_its_moved_home_through_the_relay_to_the_new_lan_address() {
    use support::public_name::{Hosts, start_relay};
    ensure_images();
    let hosts = Hosts::new();
    let s = TestStack::new("follow");
    let (old_port, new_port) = (free_port(), free_port());
    let kdl = |port: u16, relay: &str| {
        format!(
            "stack \"{{stack}}\"\n{notes}transport {{\n    lan port={port} address=\"{}\"\n}}\ndevice \"laptop\"\n{relay}",
            hosts.home_lan,
            notes = demo_sidecar("notes")
        )
    };
    s.write(&kdl(old_port, ""));
    s.apply();
    let allow = s.soul(&["relay", "allow"]).stdout_text();
    let (_relay, pin) = start_relay(&hosts, &s.dir, &allow);
    let relay_line = format!("relay \"{}:443\" pin=\"{pin}\"\n", hosts.vps_up);
    s.write(&kdl(old_port, &relay_line));
    s.apply();
    let config = s.dir.join("laptop-config");
    let laptop = |pairing: &str| {
        let o = run(Hosts::in_ns(&hosts.device, SOUL)
            .args(["connect", pairing, "--probe"])
            .env("XDG_CONFIG_HOME", &config));
        assert!(o.status.success(), "laptop: {}", text(&o));
        let probe: serde_json::Value = serde_json::from_str(o.stdout_text().trim()).unwrap();
        (probe, o.stderr_text())
    };
    // Paired at home, over the LAN. Its code names the LAN address and the relay (the relay's
    // address is put in by hand: the code lists it once the pod has registered).
    let uri = read(s.state().join("pairing/laptop/notes.uri"));
    let lan_only: String = uri
        .split('&')
        .filter(|p| !p.starts_with("addr=relay"))
        .collect::<Vec<_>>()
        .join("&");
    let (probe, _) = laptop(&with_relay_after_lan(&lan_only, &hosts.vps_up));
    assert_eq!(probe["path"], "lan", "{probe}");
    let stored = config.join(format!("soul/pairings/{}.notes.laptop.json", s.name));
    let before = read(&stored);
    assert!(before.contains(&format!(":{old_port}")), "{before}");

    // The move: state exported, the old machine's stack gone, imported with another LAN port.
    let pass = s.dir.join("pass");
    std::fs::write(&pass, "moving day\n").unwrap();
    let bundle = s.dir.join("bundle.age");
    let (b, p) = (bundle.to_str().unwrap(), pass.to_str().unwrap());
    assert!(
        s.soul(&["state", "export", "--out", b, "--passphrase-file", p])
            .status
            .success()
    );
    assert!(s.soul(&["down", "--volumes"]).status.success());
    std::fs::remove_dir_all(s.state()).unwrap();
    s.write(&kdl(new_port, &relay_line));
    let o = s.soul(&["state", "import", b, "--passphrase-file", p]);
    assert!(o.status.success(), "{}", text(&o));
    s.apply();

    // Away from the old address: the race falls through to the relay, and learns where home is.
    let (probe, said) = laptop(&format!("{}.notes.laptop", s.name));
    assert_eq!(probe["path"], "relay", "{probe}\n{said}");
    assert!(said.contains("the gate's addresses changed"), "{said}");
    let after = read(&stored);
    assert!(after.contains(&format!(":{new_port}")), "{after}");
    assert!(!after.contains(&format!(":{old_port}")), "{after}");
    // The next race starts from the new LAN address and wins there.
    let (probe, _) = laptop(&format!("{}.notes.laptop", s.name));
    assert_eq!(probe["path"], "lan", "{probe}");
    assert_eq!(
        probe["address"],
        format!("{}:{new_port}", hosts.home_lan),
        "{probe}"
    );
}

/// A pairing URI with the relay's address added after the others (before `pin`), as a code
/// made once the pod is registered lists it.
fn with_relay_after_lan(uri: &str, relay_host: &str) -> String {
    let (head, tail) = uri.split_once("&pin=").expect("a pin");
    format!("{head}&addr=relay:{relay_host}:443&pin={tail}")
}
