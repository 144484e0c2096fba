//! The command line without a Docker engine: validation, the schema, examples, help, and the
//! guarantee that invalid input never reaches Docker.

mod support;

use std::process::Command;

use support::*;

/// Runs soul with DOCKER_HOST pointing at nothing: any Docker call would exit 3.
fn soul_offline(args: &[&str]) -> std::process::Output {
    run(Command::new(SOUL)
        .args(args)
        .current_dir(repo())
        .env("DOCKER_HOST", NO_ENGINE))
}

#[test]
fn every_example_and_the_repository_stack_validate() {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kdl"))
        .collect();
    assert!(
        files.len() >= 3,
        "examples/ should hold at least three stacks"
    );
    files.push(repo().join("stack.kdl"));
    for f in files {
        Soul::offline()
            .args(["validate", "-f", f.to_str().unwrap()])
            .run()
            .success();
    }
}

#[test]
fn the_committed_schema_is_current() {
    let o = soul_offline(&["schema"]);
    assert!(o.status.success());
    let printed = String::from_utf8(o.stdout).unwrap();
    let committed = read("schema/stack.schema.json");
    assert!(
        printed == committed,
        "schema/stack.schema.json is stale: run `cargo run -q -- schema > schema/stack.schema.json`"
    );
    let v: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert!(v["properties"]["sidecars"].is_object());
}

#[test]
fn each_kind_of_invalid_file_exits_1_with_line_and_column_and_no_docker_call() {
    let dir = std::env::temp_dir().join(format!("soul-cli-invalid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = "stack \"home\"\nsidecar \"x\" { image \"i\"; port 80; }\n";
    let cases: &[(&str, String, &str)] = &[
        ("kdl syntax", format!("{ok}device \"a\n"), "3:"),
        ("unknown node", format!("{ok}devic \"a\"\n"), "3:1"),
        (
            "unknown property",
            format!("{ok}device \"a\" generaton=2\n"),
            "3:12",
        ),
        (
            "schema type",
            "stack \"home\"\nsidecar \"x\" {\n  image \"i\"\n  port \"eighty\"\n}\n".into(),
            "4:8",
        ),
        (
            "schema range",
            "stack \"home\"\nsidecar \"x\" {\n  image \"i\"\n  port 0\n}\n".into(),
            "4:8",
        ),
        (
            "name pattern",
            "stack \"Home\"\nsidecar \"x\" { image \"i\"; port 80; }\n".into(),
            "1:7",
        ),
        (
            "missing field",
            "stack \"home\"\nsidecar \"x\" { port 80; }\n".into(),
            "2:1",
        ),
        (
            "literal secret",
            format!("{ok}transport {{\n  tailscale authkey=\"tskey-x\"\n}}\n"),
            "4:13",
        ),
        (
            "duplicate",
            format!("{ok}sidecar \"x\" {{ image \"i\"; port 81; }}\n"),
            "3:9",
        ),
        (
            "gate clash",
            "stack \"home\"\nsidecar \"x\" { image \"i\"; port 8443; }\n".into(),
            "2:",
        ),
        (
            "undeclared transport",
            format!("{ok}transport {{\n  order \"lan\" \"tor\"\n  lan\n}}\n"),
            "4:15",
        ),
        (
            "both tailnets",
            format!("{ok}transport {{\n  tailscale\n  headscale url=\"https://h\"\n}}\n"),
            "5:3",
        ),
    ];
    for (what, src, at) in cases {
        let file = dir.join(format!("{}.kdl", what.replace(' ', "-")));
        std::fs::write(&file, src).unwrap();
        let path = file.to_str().unwrap();
        for cmd in ["validate", "plan", "apply"] {
            let o = soul_offline(&[cmd, "-f", path]);
            assert_eq!(o.status.code(), Some(1), "{what} / {cmd}: {}", text(&o));
            let err = o.stderr_text();
            assert!(
                err.contains(&format!("{path}:{at}")),
                "{what} / {cmd}: expected {path}:{at} in\n{err}"
            );
            assert!(err.contains("help:"), "{what}: no hint in\n{err}");
            assert!(!err.contains("panicked"), "{what}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pathological_stack_files_fail_fast_with_a_location_and_bounded_output() {
    support::ensure_command("prlimit", "util-linux");
    let dir = std::env::temp_dir().join(format!("soul-cli-patho-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = "stack \"home\"\nsidecar \"x\" {\n    image \"i\"\n    port 80\n}\n";
    let mut cases = files_that_broke_the_parser();
    cases.extend([
        (
            "wide column",
            format!("{}x", "\t".repeat(16_384 * 4)).into_bytes(),
            ":1:65537",
        ),
        (
            "ten thousand errors",
            format!("{ok}{}", "bogus 1\n".repeat(10_000)).into_bytes(),
            "… and 99",
        ),
        // 255 KiB of one-line errors: within the size limit, the worst the parser gets.
        (
            "a file of errors",
            format!("{ok}{}", "b 1\n".repeat(65_000)).into_bytes(),
            "… and ",
        ),
        (
            "invalid UTF-8",
            b"stack \"home\"\nsidecar \xff\n".to_vec(),
            ":2:9",
        ),
        (
            "float port",
            ok.replace("port 80", "port 80.0").into_bytes(),
            ":4:10",
        ),
        (
            "retries past u32",
            ok.replace(
                "port 80\n",
                "port 80\n    health cmd=\"true\" retries=4294967296\n",
            )
            .into_bytes(),
            ":5:",
        ),
        (
            "oversized file",
            format!("{ok}//{}\n", "x".repeat(300 * 1024)).into_bytes(),
            "larger than",
        ),
    ]);
    for (what, bytes, expected) in cases {
        let file = dir.join(format!("{}.kdl", what.replace(' ', "-")));
        std::fs::write(&file, bytes).unwrap();
        // The data segment is capped at 512 MiB: an unbounded parse or rendering aborts.
        let o = run(std::process::Command::new("prlimit")
            .arg("--data=536870912")
            .arg(SOUL)
            .args(["validate", "-f", file.to_str().unwrap()]));
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
        let err = o.stderr_text();
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in\n{err}"
        );
        assert!(
            err.len() < 64 * 1024,
            "{what}: {} bytes of diagnostics",
            err.len()
        );
        let widest = err.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(widest <= 300, "{what}: a line of {widest} characters");
    }
    let fifo = dir.join("fifo.kdl");
    run(std::process::Command::new("mkfifo").arg(&fifo));
    for (what, path) in [
        ("/dev/zero", "/dev/zero"),
        ("a FIFO", fifo.to_str().unwrap()),
        ("a directory", dir.to_str().unwrap()),
    ] {
        // `timeout`: reading a FIFO used to block forever.
        let o =
            run(std::process::Command::new("timeout").args(["10", SOUL, "validate", "-f", path]));
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
        assert!(
            o.stderr_text().contains("is not a regular file"),
            "{what}: {}",
            text(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flag_errors_exit_1_as_the_readme_says() {
    for args in [
        &["--bogus"][..],
        &["plan", "--output", "yaml"],
        &["nonsense"],
    ] {
        Soul::offline()
            .args(args)
            .run()
            .code(1)
            .stderr_has("error:");
    }
    for args in [&["--help"][..], &["--version"], &["plan", "--help"]] {
        Soul::offline().args(args).run().code(0);
    }
}

#[test]
fn permission_denied_on_the_docker_socket_says_what_to_do() {
    // A socket this user may not open: mode 000, and (as root, who may open anything) soul
    // runs as `nobody`.
    let dir = std::env::temp_dir().join(format!("soul-cli-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("docker.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
    let example = repo().join("examples/one-service.kdl");
    let state = dir.join("state");
    let args = [
        "status",
        "-f",
        example.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let root = run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n");
    let mut cmd = if root {
        ensure_command("setpriv", "util-linux");
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", SOUL]);
        c
    } else {
        Command::new(SOUL)
    };
    let o = run(cmd
        .args(args)
        .env("DOCKER_HOST", format!("unix://{}", socket.display())));
    o.exited(3);
    let err = o.stderr_text();
    assert!(err.contains("`docker` group"), "{err}");
    assert!(!err.contains("is the Docker daemon running"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn file_flag_works_before_or_after_the_command() {
    let path = repo().join("examples/one-service.kdl");
    let p = path.to_str().unwrap();
    for args in [
        &["-f", p, "validate"][..],
        &["validate", "-f", p],
        &["validate", "--file", p],
    ] {
        Soul::offline()
            .args(args)
            .run()
            .success()
            .stdout_has("stack `notes`");
    }
    Soul::offline()
        .args(["validate", "-f", "/nonexistent/stack.kdl"])
        .run()
        .code(1)
        .stderr_has("/nonexistent/stack.kdl");
}

#[test]
fn every_command_explains_itself_with_an_example() {
    let o = soul_offline(&["--help"]);
    let top = o.stdout_text();
    assert!(
        top.contains("Exit codes:") && top.contains("3  the Docker engine"),
        "{top}"
    );
    for cmd in [
        "validate", "schema", "plan", "apply", "status", "down", "image",
    ] {
        let o = soul_offline(&[cmd, "--help"]);
        assert!(o.status.success());
        let help = o.stdout_text();
        assert!(
            help.contains("Example:"),
            "{cmd} --help has no example:\n{help}"
        );
        assert!(top.contains(cmd), "{cmd} missing from soul --help");
    }
}

#[test]
fn export_compose_is_accepted_by_docker_compose_and_holds_no_secret() {
    let dir = std::env::temp_dir().join(format!("soul-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("db");
    std::fs::write(&secret, "s3cret-value\n").unwrap();
    let own = dir.join("stack.kdl");
    std::fs::write(
        &own,
        format!(
            "stack \"exp\"\nsidecar \"web\" {{ image \"nginx:1\"; port 80; env \"DB_PASSWORD\" file=\"{}\"; env \"PRICE\" \"$5\"; env \"VERBOSE\" \"on\"; volume \"data\" \"/data\"; }}\ntransport {{ lan port=8080; tor; }}\n",
            secret.display()
        ),
    )
    .unwrap();
    let mut files: Vec<_> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kdl"))
        .collect();
    files.push(own);
    for f in files {
        let out = dir.join("compose.yml");
        let o = soul_offline(&[
            "export",
            "compose",
            "-f",
            f.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}: {}", f.display(), text(&o));
        let yaml = std::fs::read_to_string(&out).unwrap();
        assert!(
            !yaml.contains("s3cret-value"),
            "a secret leaked into the compose file"
        );
        assert!(yaml.contains("network_mode: service:"), "{yaml}");
        ensure_command("docker-compose", "docker-compose");
        let config = run(Command::new("docker-compose")
            .arg("-f")
            .arg(&out)
            .arg("config"));
        assert!(
            config.status.success(),
            "docker-compose rejects the export of {}:\n{}\n{yaml}",
            f.display(),
            text(&config)
        );
        if f.ends_with("stack.kdl") {
            let resolved = config.stdout_text();
            assert!(
                resolved.contains("PRICE: $$5") || resolved.contains("PRICE: $5"),
                "{resolved}"
            );
            assert!(yaml.contains("DB_PASSWORD: ${DB_PASSWORD}"), "{yaml}");
            // YAML 1.1 (docker-compose v1's reader) would take a plain `on` for `true`.
            assert!(
                resolved.contains("VERBOSE: 'on'") || resolved.contains("VERBOSE: \"on\""),
                "{resolved}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bridge_init_changes_only_the_transport_block_and_keeps_comments() {
    let dir = std::env::temp_dir().join(format!("soul-bridge-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stack.kdl");
    let original = "// my stack: commit this file\nstack \"home\"   // the name\n\nsidecar \"notes\" {\n    image \"ghcr.io/example/notes:1.4\"   // pinned\n    port 8080\n}\n\n// reached on the LAN for now\ntransport {\n    lan port=9443 address=\"192.168.1.20\"   // the NAS\n}\n\ndevice \"alice-phone\"   // Alice\n";
    std::fs::write(&file, original).unwrap();
    let f = file.to_str().unwrap();
    let headscale = [
        "bridge",
        "init",
        "-f",
        f,
        "--headscale",
        "https://hs.example.com",
        "--authkey-file",
        "/run/secrets/hs",
        "--yes",
    ];
    let o = soul_offline(&headscale);
    o.exited(0);
    let diff = o.stdout_text();
    let mut changed = diff.lines().filter(|l| {
        (l.starts_with('-') || l.starts_with('+')) && !l.starts_with("---") && !l.starts_with("+++")
    });
    assert!(
        !changed.any(|l| l.contains("lan port")),
        "the LAN line did not change: {diff}"
    );
    assert!(
        diff.contains(
            "+    headscale url=\"https://hs.example.com\" authkey-file=\"/run/secrets/hs\""
        ),
        "{diff}"
    );
    let after = std::fs::read_to_string(&file).unwrap();
    let expected = original.replace(
        "transport {\n    lan port=9443 address=\"192.168.1.20\"   // the NAS\n}",
        "transport {\n    lan port=9443 address=\"192.168.1.20\"   // the NAS\n    headscale url=\"https://hs.example.com\" authkey-file=\"/run/secrets/hs\"\n}",
    );
    assert_eq!(after, expected);
    for comment in [
        "// my stack: commit this file",
        "// the name",
        "// pinned",
        "// reached on the LAN for now",
        "// the NAS",
        "// Alice",
    ] {
        assert!(after.contains(comment), "lost {comment}");
    }
    Soul::offline()
        .args(["validate", "-f", f])
        .run()
        .success()
        .stdout_has("transports: lan, headscale");

    // Running it again changes nothing; another choice replaces the block again.
    let o = soul_offline(&headscale);
    o.stdout_has("nothing to change");
    let o = soul_offline(&["bridge", "init", "-f", f, "--tor", "--yes"]);
    o.exited(0);
    assert!(std::fs::read_to_string(&file).unwrap().contains(
        "transport {\n    lan port=9443 address=\"192.168.1.20\"   // the NAS\n    tor\n}"
    ));
    // `soul-bridge init` is the same command.
    let link = dir.join("soul-bridge");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(SOUL, &link).unwrap();
    let o = run(Command::new(&link)
        .args(["init", "-f", f, "--lan-only", "--yes"])
        .env("DOCKER_HOST", "unix:///nonexistent"));
    o.exited(0);
    assert!(!std::fs::read_to_string(&file).unwrap().contains("tor"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_load_in_each_shell_and_the_man_page_lists_the_commands() {
    let bash = Soul::offline()
        .args(["completions", "bash"])
        .run()
        .success();
    let script = std::env::temp_dir().join(format!("soul-completion-{}.bash", std::process::id()));
    std::fs::write(&script, bash.stdout()).unwrap();
    let o = run(Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p soul", script.display())));
    o.exited(0).stdout_has("-F _soul soul");
    let _ = std::fs::remove_file(&script);
    Soul::offline()
        .args(["completions", "zsh"])
        .run()
        .success()
        .stdout_has("#compdef soul");
    Soul::offline()
        .args(["completions", "fish"])
        .run()
        .success()
        .stdout_has("complete -c soul");
    let man = Soul::offline().args(["man"]).run().success();
    let page = man.stdout();
    assert!(page.contains(".TH soul 1"), "{page}");
    for command in ["apply", "watch", "pair", "rotate", "completions"] {
        assert!(
            page.contains(&format!("soul\\-{command}")),
            "no {command} in the man page"
        );
    }
    // The pages it names exist: one per command, none for the commands pods run.
    let dir = std::env::temp_dir().join(format!("soul-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Soul::offline()
        .args(["man", "--out", dir.to_str().unwrap()])
        .run()
        .success();
    for page in [
        "soul.1",
        "soul-apply.1",
        "soul-pair.1",
        "soul-logs.1",
        "soul-bridge-init.1",
    ] {
        assert!(dir.join(page).exists(), "no {page}");
    }
    assert!(
        !dir.join("soul-gate.1").exists(),
        "hidden commands get no page"
    );
    assert!(read(dir.join("soul-apply.1")).contains(".TH soul-apply 1"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_writes_a_valid_commented_stack_and_never_overwrites_one() {
    let dir = std::env::temp_dir().join(format!("soul-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stack.kdl");
    let f = file.to_str().unwrap();
    // No terminal to ask on: the flags are needed, and nothing is written.
    Soul::offline()
        .args(["-f", f, "init"])
        .run()
        .code(1)
        .stderr_has("needs --image IMAGE and --port PORT");
    assert!(!file.exists());
    Soul::offline()
        .args([
            "-f", f, "init", "--image", "nginx:1", "--port", "80", "--name", "Bad Name",
        ])
        .run()
        .code(1)
        .stderr_has("try `bad-name`");
    Soul::offline()
        .args([
            "-f",
            f,
            "init",
            "--image",
            "ghcr.io/example/notes:1.4",
            "--port",
            "8080",
            "--name",
            "home",
        ])
        .run()
        .success()
        .stdout_has("next: `soul apply`");
    let text = read(&file);
    assert!(text.starts_with("// stack.kdl"), "commented: {text}");
    Soul::offline()
        .args(["-f", f, "validate"])
        .run()
        .success()
        .stdout_has("stack `home`, 1 sidecar, 1 device");
    std::fs::write(&file, "// mine\n").unwrap();
    Soul::offline()
        .args(["-f", f, "init", "--image", "nginx:1", "--port", "80"])
        .run()
        .code(1)
        .stderr_has("never overwrites");
    assert_eq!(read(&file), "// mine\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_on_a_terminal_asks_for_the_image_and_the_port() {
    ensure_command("script", "bsdutils");
    let dir = std::env::temp_dir().join(format!("soul-init-tty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stack.kdl");
    // `script` gives soul a terminal and types what the shell pipes in, a line at a time.
    let typed = format!(
        "(sleep 1; printf 'ghcr.io/example/notes:1.4\\n'; sleep 0.5; printf '8080\\n'; sleep 1) \\
         | script -qec '{SOUL} -f {} init --name home' /dev/null",
        file.display()
    );
    let o = run(Command::new("timeout").args(["20", "sh", "-c", &typed]));
    o.exited(0)
        .stdout_has("Image of your service")
        .stdout_has("next: `soul apply`");
    let text = read(&file);
    assert!(
        text.contains("image \"ghcr.io/example/notes:1.4\""),
        "{text}"
    );
    assert!(text.contains("port 8080"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_mistyped_pairing_name_says_how_to_list_the_stored_ones() {
    let config = std::env::temp_dir().join(format!("soul-connect-{}", std::process::id()));
    Soul::offline()
        .args(["connect", "home.notez.phone", "--probe"])
        .env("XDG_CONFIG_HOME", &config)
        .run()
        .code(1)
        .stderr_has("soul connect --list");
    Soul::offline()
        .args(["connect", "--list"])
        .env("XDG_CONFIG_HOME", &config)
        .run()
        .success()
        .stdout_has("no pairing stored");
    let _ = std::fs::remove_dir_all(&config);
}

/// A pairing code's names once built the path its pairing was stored at:
/// `stack=%2Fsome%2Fdir%2F&sidecar=%2F&device=%2Fvictim` made `soul connect --probe` write
/// `/some/dir/victim.json`, before any gate was contacted.
#[test]
fn soul_connect_writes_nothing_outside_its_directory_and_stores_no_code_no_gate_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config");
    let victim = tmp.path().join("victim");
    let pin = "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=";
    let escaping = format!(
        "soul://pair?v=1&stack={}%2F&sidecar=%2F&device=victim&addr=lan:127.0.0.1:9&pin={}&token=t",
        tmp.path().display().to_string().replace('/', "%2F"),
        pin.replace('/', "%2F").replace('=', "%3D")
    );
    Soul::offline()
        .args(["connect", &escaping, "--probe"])
        .env("XDG_CONFIG_HOME", &config)
        .run()
        .code(1)
        .stderr_has("is not a name soul makes");
    assert!(!victim.with_extension("json").exists());
    // A well-formed code whose gate never answers: refused, and nothing is stored.
    let port = free_port();
    let unanswered = format!(
        "soul://pair?v=1&stack=home&sidecar=notes&device=phone&addr=lan:127.0.0.1:{port}&pin={}&token=t",
        pin.replace('/', "%2F").replace('=', "%3D")
    );
    Soul::offline()
        .args(["connect", &unanswered, "--probe"])
        .env("XDG_CONFIG_HOME", &config)
        .run()
        .code(1);
    // `0.0.0.0` names no gate.
    let nowhere = unanswered.replace("127.0.0.1", "0.0.0.0");
    Soul::offline()
        .args(["connect", &nowhere, "--probe"])
        .env("XDG_CONFIG_HOME", &config)
        .run()
        .code(1)
        .stderr_has("0.0.0.0");
    let stored: Vec<_> = std::fs::read_dir(config.join("soul/pairings"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "{stored:?}");
    let all: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(all.iter().all(|n| n == "config"), "{all:?}");
}
