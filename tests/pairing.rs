//! Secrets, device tokens and pairing artifacts through `soul apply` on the real engine:
//! decoding the QR, convergence, drift repair, revocation, rotation, permissions, and no
//! secret in any output.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use soul::pairing::{Payload, TokenError, verify};
use soul::state::StateDir;
use support::*;

fn stack_kdl(devices: &str, secret_generation: u64) -> String {
    format!(
        r#"// pairing test stack
stack "{{stack}}"
sidecar "notes" {{
    image "soul:latest"
    command "demo-app" "--port=8080"
    port 8080
}}
sidecar "wiki" {{
    image "soul:latest"
    command "demo-app" "--port=8081"
    port 8081
}}
transport {{
    lan port={} address="192.168.1.20"   // a fixed LAN address keeps URIs predictable
}}
secret-generation {secret_generation}
{devices}
"#,
        free_port()
    )
}

const DEVICES: &str =
    "device \"alice-phone\"\ndevice \"bob-laptop\" expires=\"90d\"   // bob's\ndevice \"tablet\"\n";

/// Every file of the state dir: path → (sha256, mtime).
fn files(dir: &Path) -> BTreeMap<String, ([u8; 32], SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if !path.ends_with("lock") {
                let bytes = std::fs::read(&path).unwrap();
                let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
                let rel = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                out.insert(rel, (Sha256::digest(&bytes).into(), mtime));
            }
        }
    }
    out
}

/// The QR code (the pairing link) carries what the pairing URI does, but the token.
fn assert_code_follows_uri(png: &PathBuf, uri: &str) {
    let code = Payload::parse(&decode_png(png)).unwrap();
    let full = Payload::parse(uri).unwrap();
    assert_eq!(
        (
            &code.stack,
            &code.sidecar,
            &code.device,
            &code.addresses,
            &code.pin
        ),
        (
            &full.stack,
            &full.sidecar,
            &full.device,
            &full.addresses,
            &full.pin
        ),
        "the QR code does not follow {uri}"
    );
    assert!(code.token.is_none() && code.ticket.is_some());
}

/// Verifies a token against what the state dir holds now.
fn check(s: &TestStack, token: &str) -> Result<soul::pairing::Claims, TokenError> {
    let state = StateDir::at(&s.state());
    let key = state.read_key().expect("key");
    verify(
        token,
        &key.public_key(),
        &s.name,
        &state.read_registry().unwrap_or_default(),
        now() as u64,
    )
}

fn decode_png(path: &PathBuf) -> String {
    soul::pairing::qr::decode_png(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The stack of [`stack_kdl`] with [`DEVICES`], applied.
fn applied_with_devices(tag: &str) -> TestStack {
    ensure_images();
    let s = TestStack::new(tag);
    s.write(&stack_kdl(DEVICES, 1));
    s.apply();
    s
}

#[test]
fn the_qr_png_decodes_to_the_uri_and_its_token_verifies() {
    let s = applied_with_devices("qr");
    for device in ["alice-phone", "bob-laptop", "tablet"] {
        for sidecar in ["notes", "wiki"] {
            let base = s.state().join(format!("pairing/{device}/{sidecar}"));
            let uri = std::fs::read_to_string(base.with_extension("uri")).unwrap();
            // The code holds the pairing link: the URI's fields without the token, and a ticket.
            assert_code_follows_uri(&base.with_extension("png"), &uri);
            assert!(uri.starts_with(&format!("soul://pair?v=1&stack={}&sidecar={sidecar}&device={device}&addr=lan:192.168.1.20:", s.name)), "{uri}");
            assert!(uri.contains("&pin=sha256//"), "{uri}");
            assert!(uri.contains("&token="), "{uri}");
            let tok = uri.rsplit_once("&token=").unwrap().1;
            assert_eq!(tok, s.token(device));
            let claims = check(&s, tok).expect("token verifies");
            assert_eq!(claims.sub, device);
            assert_eq!(claims.jti, format!("{device}.1"));
            assert_eq!(claims.exp.is_some(), device == "bob-laptop");
            let svg = std::fs::read_to_string(base.with_extension("svg")).unwrap();
            assert!(svg.contains("<svg"));
        }
    }
    // `soul pair` shows the same code; --format uri prints the URI; --out writes 0600.
    let o = s.soul(&[
        "pair",
        "alice-phone",
        "--sidecar",
        "notes",
        "--format",
        "uri",
    ]);
    o.exited(0);
    assert_eq!(
        o.stdout_text().trim(),
        std::fs::read_to_string(s.state().join("pairing/alice-phone/notes.uri")).unwrap()
    );
    let out = s.dir.join("alice.png");
    let pair_wiki = |format: &[&str]| {
        s.soul(
            &[
                &["pair", "alice-phone", "--sidecar", "wiki", "--format"],
                format,
            ]
            .concat(),
        )
    };
    let o = pair_wiki(&["png", "--out", out.to_str().unwrap()]);
    o.exited(0);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(decode_png(&out).contains("sidecar=wiki"));
    o.stderr_has("it holds a single-use pairing ticket");
    // --format code prints exactly what the QR code holds: the link with its fragment, which
    // soul connect takes as it takes the URI.
    let o = pair_wiki(&["code"]);
    o.exited(0);
    let code = o.stdout_text().trim().to_string();
    assert_eq!(code, decode_png(&out));
    assert!(
        code.contains("?soul_ticket=") && code.contains("#v=1&"),
        "{code}"
    );
    for given in [
        code.clone(),
        read(s.state().join("pairing/alice-phone/wiki.uri")),
    ] {
        let parsed = soul::pairing::Payload::parse(&given).expect("soul reads the code it prints");
        assert_eq!(
            (parsed.sidecar.as_str(), parsed.device.as_str()),
            ("wiki", "alice-phone")
        );
    }
    // soul connect takes both (the stack's LAN address is this machine's: loopback here).
    let local = |c: &str| c.replace("192.168.1.20", "127.0.0.1");
    let uri_text = read(s.state().join("pairing/alice-phone/wiki.uri"));
    for (form, given) in [("link", local(&code)), ("uri", local(&uri_text))] {
        let o = s
            .command(&["connect", &given, "--probe"])
            .env("XDG_CONFIG_HOME", s.dir.join(format!("xdg-{form}")))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "soul connect of the {form}: {}",
            text(&o)
        );
        assert!(o.stdout_text().contains("\"path\":\"lan\""), "{}", text(&o));
    }
    // The browser link alone (no fragment) is not a code, and the error says what is.
    let bare = code.split('#').next().unwrap();
    let o = s.soul(&["connect", bare, "--probe"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    o.stderr_has("--format code");
    assert!(
        !o.stderr_text().contains("soul_ticket="),
        "the ticket is not echoed"
    );
    let o = s.soul(&["pair", "alice-phone", "--sidecar", "notes"]);
    o.stdout_has("█");
    let o = s.soul(&["pair", "alice-phone"]);
    assert_eq!(o.status.code(), Some(1));
    o.stderr_has("--sidecar");
    let o = s.soul(&["pair", "alice-phon"]);
    o.stderr_has("did you mean `alice-phone`");
    let o = s.soul(&["devices", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["devices"].as_array().unwrap().len(), 3);
    assert!(
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["token_current"] == true && d["artifacts"].as_array().unwrap().len() == 10)
    );
}

#[test]
fn a_converged_apply_rewrites_nothing_and_drift_is_repaired_file_by_file() {
    let s = applied_with_devices("drift");
    let first = files(&s.state());
    std::thread::sleep(std::time::Duration::from_millis(20));
    s.apply();
    assert_eq!(
        files(&s.state()),
        first,
        "a converged apply changed the state dir"
    );

    // Delete one PNG: that file alone is rewritten, identical.
    let png = "pairing/tablet/wiki.png";
    std::fs::remove_file(s.state().join(png)).unwrap();
    let o = s.apply();
    let out = o.stdout_text();
    assert!(
        out.contains(png) && out.matches("write ").count() == 1,
        "{out}"
    );
    let after = files(&s.state());
    for (path, (hash, mtime)) in &first {
        assert_eq!(after[path].0, *hash, "{path} content changed");
        if path != png && path != "renders.json" {
            assert_eq!(after[path].1, *mtime, "{path} was rewritten");
        }
    }

    // Corrupt a token file: rewritten with the right bytes.
    let good = s.token("alice-phone");
    std::fs::write(s.state().join("tokens/alice-phone.jwt"), "garbage").unwrap();
    s.apply();
    assert_eq!(s.token("alice-phone"), good);
}

#[test]
fn a_lost_stack_key_stops_apply_instead_of_locking_out_every_device() {
    let s = applied_with_devices("lostkey");
    let devices = ["alice-phone", "bob-laptop", "tablet"];
    let old: Vec<String> = devices.iter().map(|d| s.token(d)).collect();
    let key = s.state().join("stack.key");
    let backup = std::fs::read(&key).unwrap();

    // Deleted, emptied, truncated or corrupt: apply and plan stop, and say what to do.
    for (what, damage) in [
        ("deleted", None),
        ("empty", Some(Vec::new())),
        ("truncated", Some(backup[..backup.len() / 2].to_vec())),
        ("corrupt", Some(b"not a key".to_vec())),
    ] {
        match damage {
            None => std::fs::remove_file(&key).unwrap(),
            Some(bytes) => std::fs::write(&key, bytes).unwrap(),
        }
        for cmd in ["apply", "plan"] {
            let o = s.soul(&[cmd]);
            assert_eq!(o.status.code(), Some(1), "{what} / {cmd}: {}", text(&o));
            let err = o.stderr_text();
            assert!(err.contains("3 paired device(s)"), "{what}: {err}");
            assert!(err.contains("soul rotate --new-key"), "{what}: {err}");
        }
        // Nothing was re-keyed: the tokens in the state dir are the old ones.
        assert_eq!(s.token("tablet"), old[2], "{what}");
    }

    // Restored from the backup: the same tokens keep working.
    std::fs::write(&key, &backup).unwrap();
    s.apply();
    for (d, old_token) in devices.iter().zip(&old) {
        assert_eq!(&s.token(d), old_token);
        assert!(check(&s, old_token).is_ok());
    }

    // Starting over is deliberate: a new key, every token re-issued, the old ones refused, and
    // the lost files kept aside.
    std::fs::write(&key, "not a key").unwrap();
    let o = s.soul(&["rotate", "--new-key"]);
    o.exited(0);
    o.stdout_has("stack.key.lost-");
    for (d, old_token) in devices.iter().zip(&old) {
        let new = s.token(d);
        assert_ne!(&new, old_token);
        assert!(check(&s, &new).is_ok());
        assert!(
            matches!(check(&s, old_token), Err(TokenError::Invalid(_))),
            "{d}'s old token still verifies"
        );
        let uri =
            std::fs::read_to_string(s.state().join(format!("pairing/{d}/notes.uri"))).unwrap();
        assert!(uri.ends_with(&new), "{d}'s QR was not re-issued");
    }
}

#[test]
fn removing_a_device_revokes_it_alone_and_bumping_a_generation_reissues_one_token() {
    let s = applied_with_devices("revoke");
    let bob = s.token("bob-laptop");
    let alice = s.token("alice-phone");
    let tablet = s.token("tablet");

    // Remove bob: his files go, his token fails, the others are untouched and verify.
    s.write(&stack_kdl("device \"alice-phone\"\ndevice \"tablet\"\n", 1));
    s.apply();
    assert!(!s.state().join("pairing/bob-laptop").exists());
    assert!(!s.state().join("tokens/bob-laptop.jwt").exists());
    assert_eq!(
        check(&s, &bob),
        Err(TokenError::UnknownDevice("bob-laptop".into()))
    );
    assert_eq!(
        (s.token("alice-phone"), s.token("tablet")),
        (alice.clone(), tablet.clone())
    );
    assert!(check(&s, &alice).is_ok() && check(&s, &tablet).is_ok());

    // `soul rotate --device tablet` bumps its generation in stack.kdl (comments survive) and
    // re-issues its token alone.
    let before = std::fs::read_to_string(s.file()).unwrap();
    let o = s.soul(&["rotate", "--device", "tablet"]);
    o.exited(0);
    let after = std::fs::read_to_string(s.file()).unwrap();
    assert_eq!(
        after,
        before.replace("device \"tablet\"", "device \"tablet\" generation=2")
    );
    assert!(after.contains("// a fixed LAN address keeps URIs predictable"));
    let new_tablet = s.token("tablet");
    assert_ne!(new_tablet, tablet);
    assert_eq!(
        check(&s, &tablet),
        Err(TokenError::OldGeneration("tablet".into()))
    );
    assert_eq!(check(&s, &new_tablet).unwrap().jti, "tablet.2");
    assert_eq!(s.token("alice-phone"), alice);

    // `soul rotate` bumps secret-generation: every token and QR is re-issued in one pass.
    let o = s.soul(&["rotate"]);
    o.exited(0);
    assert!(
        std::fs::read_to_string(s.file())
            .unwrap()
            .contains("secret-generation 2")
    );
    assert_ne!(s.token("alice-phone"), alice);
    assert!(matches!(check(&s, &alice), Err(TokenError::Invalid(_))));
    assert!(matches!(
        check(&s, &new_tablet),
        Err(TokenError::Invalid(_))
    ));
    for d in ["alice-phone", "tablet"] {
        let t = s.token(d);
        assert!(check(&s, &t).is_ok());
        let base = s.state().join(format!("pairing/{d}/wiki"));
        let uri = read(base.with_extension("uri"));
        assert_eq!(uri.rsplit_once("&token=").unwrap().1, t);
        assert_code_follows_uri(&base.with_extension("png"), &uri);
    }
}

#[test]
fn a_changed_address_rewrites_the_uri_and_its_qr_in_the_same_pass() {
    ensure_images();
    let s = TestStack::new("addr");
    let kdl = stack_kdl(DEVICES, 1);
    s.write(&kdl);
    s.apply();
    let uri_path = s.state().join("pairing/alice-phone/notes.uri");
    let png_path = s.state().join("pairing/alice-phone/notes.png");
    let token_before = s.token("alice-phone");
    s.write(&kdl.replace("192.168.1.20", "10.1.2.3"));
    let o = s.apply();
    let uri = std::fs::read_to_string(&uri_path).unwrap();
    assert!(
        uri.contains("&addr=lan:10.1.2.3:") && !uri.contains("192.168.1.20"),
        "{uri}"
    );
    // The QR must follow the URI in the same pass.
    assert_code_follows_uri(&png_path, &uri);
    assert!(decode_png(&png_path).starts_with("http://10.1.2.3:"));
    assert_eq!(
        s.token("alice-phone"),
        token_before,
        "an address change is not a new token"
    );
    let out = o.stdout_text();
    assert!(!out.contains("tokens/"), "tokens were rewritten: {out}");
}

#[test]
fn state_dir_is_0700_and_every_file_0600() {
    let s = applied_with_devices("perms");
    let mut dirs = vec![s.state()];
    let mut seen = 0;
    while let Some(d) = dirs.pop() {
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            d.display()
        );
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                seen += 1;
                assert_eq!(
                    std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                    0o600,
                    "{}",
                    p.display()
                );
            }
        }
    }
    assert!(seen > 20, "only {seen} files");
}

#[test]
fn no_secret_appears_in_any_output_even_at_trace_level() {
    ensure_images();
    let s = TestStack::new("leak");
    let secret_file = s.dir.join("db");
    std::fs::write(&secret_file, "s3cr3t-db-password\n").unwrap();
    s.write(&stack_kdl(DEVICES, 1).replace(
        "    port 8080\n",
        &format!(
            "    port 8080\n    env \"DB_PASSWORD\" file=\"{}\"\n",
            secret_file.display()
        ),
    ));
    let mut outputs = String::new();
    for args in [
        &["plan"][..],
        &["apply"],
        &["apply"],
        &["plan", "--output", "json"],
        &["status"],
        &["status", "--output", "json"],
        &["devices"],
        &["devices", "--output", "json"],
        &["validate"],
    ] {
        let o = s.command(args).env("SOUL_LOG", "trace").output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        outputs.push_str(&text(&o));
    }
    // A failing apply's error output too.
    std::fs::remove_file(&secret_file).unwrap();
    let o = s
        .command(&["apply"])
        .env("SOUL_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    outputs.push_str(&text(&o));
    std::fs::write(&secret_file, "s3cr3t-db-password\n").unwrap();

    let key_file = std::fs::read_to_string(s.state().join("stack.key")).unwrap();
    let seed: serde_json::Value = serde_json::from_str(&key_file).unwrap();
    let mut secrets = vec![
        seed["ed25519-seed"].as_str().unwrap().to_string(),
        "s3cr3t-db-password".to_string(),
    ];
    for d in ["alice-phone", "bob-laptop", "tablet"] {
        let t = s.token(d);
        secrets.push(t.rsplit('.').next().unwrap().to_string()); // the signature
        secrets.push(t);
    }
    assert!(
        outputs.contains("TRACE") || outputs.contains("DEBUG"),
        "trace logging was not on"
    );
    for secret in &secrets {
        assert!(
            !outputs.contains(secret.as_str()),
            "a secret leaked into the output"
        );
    }
}

/// The `pin=` of a pairing URI, decoded.
fn pin_of(uri: &str) -> String {
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "pin")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no pin in {uri}"))
}

/// The host port of `lan port=` in the test's stack.kdl.
fn lan_port(s: &TestStack) -> u16 {
    let text = read(s.file());
    let at = text.find("lan port=").expect("a lan port") + "lan port=".len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until the gate on `port` serves the certificate pinned by `pin`.
fn serves(port: u16, pin: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if served_pin(port) == pin {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    false
}

#[test]
fn the_gates_pin_is_in_the_uri_survives_a_gate_restart_and_changes_on_rotate() {
    let s = applied_with_devices("pin");
    let port = lan_port(&s);
    let uri = read(s.state().join("pairing/alice-phone/notes.uri"));
    let pin = pin_of(&uri);
    assert!(pin.starts_with("sha256//"), "{uri}");
    assert!(serves(port, &pin), "the gate serves the key the URI pins");
    let token = s.token("alice-phone");
    let (exit, code, _) = curl_tls(port, "/", Some(&token), Some(&pin));
    assert_eq!(
        (exit, code),
        (0, 200),
        "a pinned client with the token reaches the app"
    );

    docker(&["restart", &s.container("notes", "gate")]);
    assert!(
        serves(port, &pin),
        "the pin is the same after a gate restart"
    );

    s.soul(&["rotate"]).exited(0);
    let rotated = pin_of(&read(s.state().join("pairing/alice-phone/notes.uri")));
    assert_ne!(rotated, pin, "soul rotate re-issues the gate's key");
    assert!(serves(port, &rotated), "the gate serves the rotated key");
    let wiki = pin_of(&read(s.state().join("pairing/alice-phone/wiki.uri")));
    assert_ne!(wiki, rotated, "each sidecar's gate has a key of its own");
}

/// `zbarimg`'s reading of a PNG: a decoder nobody here wrote.
fn zbarimg(png: &Path) -> String {
    ensure_command("zbarimg", "zbar-tools");
    let o = run(std::process::Command::new("zbarimg")
        .args(["--raw", "-q"])
        .arg(png));
    o.exited(0);
    o.stdout_text().trim_end_matches('\n').to_string()
}

#[test]
fn a_phone_scanning_the_code_lands_on_the_app_paired_and_the_token_is_nowhere_it_keeps() {
    ensure_command("chromium", "chromium");
    let s = applied_with_devices("scan");
    let port = lan_port(&s);
    let png = s.state().join("pairing/alice-phone/notes.png");
    let link = zbarimg(&png);
    assert!(
        link.starts_with(&format!("http://192.168.1.20:{port}/?soul_ticket=")),
        "{link}"
    );
    // The stack's LAN address is this machine's; the browser here reaches it on loopback.
    let opened = link.replacen("192.168.1.20", "127.0.0.1", 1);
    let profile = s.dir.join("chromium");
    let dom = chromium(&profile, &opened);
    assert!(
        dom.contains("hello from soul's demo app"),
        "did not land on the app: {dom}"
    );
    // Paired: the app answers the same browser again without a link.
    let dom = chromium(&profile, &format!("http://127.0.0.1:{port}/"));
    assert!(
        dom.contains("hello from soul's demo app"),
        "not paired: {dom}"
    );

    let token = s.token("alice-phone");
    let visited = history(&profile);
    assert!(
        visited.last().is_some_and(|u| !u.contains("soul_ticket")),
        "the address bar ended on {visited:?}"
    );
    // Nowhere the browser keeps: not a visited URL, not a byte of its History database.
    for file in ["Default/History", "Default/History-journal"] {
        if let Ok(bytes) = std::fs::read(profile.join(file)) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&token), "the token is in {file}");
        }
    }
    // A soul client that scans another device's code: it checks the pin and trades the ticket
    // for the device token, over TLS.
    let code = Payload::parse(&zbarimg(&s.state().join("pairing/tablet/notes.png"))).unwrap();
    let pin = code.pin.clone().expect("the code carries the pin");
    let ticket = code.ticket.clone().expect("the code carries a ticket");
    let got = run(std::process::Command::new("curl")
        .args([
            "-sk",
            "-m",
            "10",
            "--pinnedpubkey",
            &pin,
            "--data-urlencode",
        ])
        .arg(format!("ticket={}", ticket.expose()))
        .arg(format!("https://127.0.0.1:{port}/.soul/token")));
    got.exited(0);
    assert_eq!(
        got.stdout_text(),
        s.token("tablet"),
        "the client got the device's token"
    );
    for role in ["gate", "app"] {
        let logs = std::process::Command::new("docker")
            .args(["logs", &s.container("notes", role)])
            .output()
            .unwrap();
        let all = format!("{}{}", logs.stdout_text(), logs.stderr_text());
        assert!(!all.contains(&token), "the token is in the {role}'s log");
        if role == "gate" {
            assert!(all.contains("paired a browser"), "{all}");
        }
    }
    let _ = std::fs::remove_dir_all(&profile);
}

#[test]
fn the_pairing_page_shows_every_code_scannable_on_loopback_and_follows_a_reissued_token() {
    use std::io::{BufRead, BufReader};
    ensure_command("chromium", "chromium");
    let s = applied_with_devices("page");
    let mut child = s
        .command(&["pair", "--serve"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "loopback only: {url}");
    let port: u16 = url["http://127.0.0.1:".len()..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let path = &url[url.find(&format!(":{port}")).unwrap() + format!(":{port}").len()..];
    assert_eq!(
        http_get(port, "/", std::time::Duration::from_secs(5)).map(|r| r.0),
        Some(404),
        "without the page's random path there is nothing"
    );

    // A screenshot of the page, decoded by a decoder nobody here wrote, holds the codes.
    let shot = s.dir.join("page.png");
    let profile = s.dir.join("chromium-page");
    let o = run(std::process::Command::new("timeout")
        .args(["90", "chromium"])
        .args(HEADLESS_CHROMIUM)
        .args([
            "--hide-scrollbars",
            "--window-size=1500,1700",
            "--virtual-time-budget=3000",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--screenshot={}", shot.display()),
            &url,
        ]));
    o.exited(0);
    ensure_command("zbarimg", "zbar-tools");
    let seen = run(std::process::Command::new("zbarimg")
        .args(["--raw", "-q"])
        .arg(&shot));
    let seen = seen.stdout_text();
    for (device, sidecar) in [("alice-phone", "notes"), ("tablet", "wiki")] {
        let code = decode_png(&s.state().join(format!("pairing/{device}/{sidecar}.png")));
        assert!(
            seen.lines().any(|l| l == code),
            "{device}/{sidecar} is not on the page: {seen}"
        );
    }

    // A re-issued token: the codes the page polls for change, so it swaps them in by itself.
    let codes = |path: &str| {
        http_get(
            port,
            &format!("{path}codes"),
            std::time::Duration::from_secs(5),
        )
        .expect("the page answers")
    };
    let before = codes(path);
    assert_eq!(before.0, 200);
    s.soul(&["rotate", "--device", "alice-phone"]).exited(0);
    let after = codes(path);
    assert_ne!(
        before.1, after.1,
        "the page did not follow the re-issued code"
    );
    let page = http_get(port, path, std::time::Duration::from_secs(5))
        .unwrap()
        .1;
    assert!(
        page.contains("fetch('codes'"),
        "the page polls for new codes"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
}

#[test]
fn a_tls_only_pod_passes_its_health_check_and_refuses_plain_http_from_the_lan() {
    ensure_images();
    let s = TestStack::new("tlsonly");
    s.write(&format!("{}gate tls-only=#true\n", stack_kdl(DEVICES, 1)));
    s.apply();
    let port = lan_port(&s);
    let gate = s.container("notes", "gate");
    // Exactly Docker's health check, run now rather than after its interval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let probe = run(std::process::Command::new("docker").args([
            "exec",
            &gate,
            "/soul",
            "probe",
            "http://127.0.0.1:8443/.soul/health",
        ]));
        if probe.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the health check fails: {}",
            text(&probe)
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let token = s.token("alice-phone");
    let plain = http_get_as(port, "/", &token, std::time::Duration::from_secs(3));
    assert_eq!(
        plain.map(|r| r.0),
        Some(400),
        "plain HTTP from the LAN is refused"
    );
    let pin = pin_of(&read(s.state().join("pairing/alice-phone/notes.uri")));
    assert_eq!(
        curl_tls_answer(port, "/", Some(&token), Some(&pin), Duration::from_secs(20)),
        Ok(200)
    );
}

/// `soul down --volumes` then `apply` once made every spent pairing ticket good again: the
/// record of spent tickets lived on the gate's volume.
#[test]
fn down_with_volumes_then_apply_keeps_spent_tickets_spent() {
    let s = applied_with_devices("spentdown");
    let port = lan_port(&s);
    let pin = pin_of(&read(s.state().join("pairing/tablet/notes.uri")));
    let link = read(s.state().join("pairing/tablet/notes.link"));
    let ticket = link
        .trim()
        .split_once("soul_ticket=")
        .map(|(_, t)| t.split(['&', '#']).next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no ticket in {link}"));
    let spend = || {
        let mut last = String::new();
        retry(Duration::from_secs(20), || {
            let o = run(std::process::Command::new("curl")
                .args(["-sSk", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["--pinnedpubkey", &pin, "--data-urlencode"])
                .arg(format!("ticket={ticket}"))
                .arg(format!("https://127.0.0.1:{port}/.soul/token")));
            last = text(&o);
            o.status
                .success()
                .then(|| o.stdout_text())
                .filter(|c| c != "000")
        })
        .unwrap_or_else(|| panic!("the gate never answered: {last}"))
    };
    assert_eq!(spend(), "200", "the ticket pays out once");
    assert_eq!(spend(), "410");
    s.soul(&["down", "--volumes"]).exited(0);
    assert!(s.volumes().is_empty(), "{:?}", s.volumes());
    s.apply();
    assert_eq!(
        spend(),
        "410",
        "a spent ticket stays spent whatever was removed"
    );
}
