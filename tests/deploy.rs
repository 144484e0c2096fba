//! Deployment files: the Nix flake and module parse, and the flags they (and the systemd unit)
//! pass to soul are flags soul has; `--pull`'s git logic against real repositories.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// `nix-instantiate`, installed from Debian's nix-bin when missing.
fn nix_instantiate() -> &'static str {
    ensure_command("nix-instantiate", "nix-bin");
    "nix-instantiate"
}

#[test]
fn every_nix_file_parses() {
    let nix = nix_instantiate();
    for f in ["flake.nix", "nix/module.nix"] {
        let o = run(Command::new(nix).arg("--parse").arg(repo().join(f)));
        assert!(o.status.success(), "{f} does not parse:\n{}", text(&o));
    }
}

/// The `--flag ${cfg.option}` pairs of an ExecStart line.
fn flag_options(exec: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = exec.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0].starts_with("--") && w[1].starts_with("${cfg."))
        .map(|w| {
            (
                w[0].to_string(),
                w[1].trim_start_matches("${cfg.")
                    .trim_end_matches('}')
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn the_module_options_match_the_flags_it_passes_and_soul_accepts_them() {
    let module = read("nix/module.nix");
    for option in [
        "enable",
        "package",
        "stackFile",
        "stateDir",
        "environmentFile",
    ] {
        assert!(
            module.contains(&format!("\n    {option} = lib.mk"))
                || module.contains(&format!("\n    {option} = packageOption;")),
            "services.soul.{option} is not declared"
        );
    }
    let exec = module
        .lines()
        .find(|l| l.contains("ExecStart =") && l.contains(" watch"))
        .expect("services.soul's ExecStart");
    let pairs = flag_options(exec);
    assert_eq!(
        pairs,
        vec![
            ("--file".to_string(), "stackFile".to_string()),
            ("--state-dir".into(), "stateDir".into())
        ]
    );
    // soul parses exactly that command line (with real values in place of the options).
    let dir = std::env::temp_dir().join(format!("soul-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let line = exec
        .split("ExecStart = \"")
        .nth(1)
        .unwrap()
        .trim_end_matches("\";")
        .replace("${lib.getExe cfg.package}", "")
        .replace(
            "${cfg.stackFile}",
            repo().join("stack.kdl").to_str().unwrap(),
        )
        .replace("${cfg.stateDir}", dir.to_str().unwrap());
    let args: Vec<&str> = line.split_whitespace().collect();
    let o = run(Command::new(SOUL).args(&args).arg("--help"));
    assert!(
        o.status.success(),
        "soul rejects the module's command line {args:?}:\n{}",
        text(&o)
    );
    o.stdout_has("Keep this machine on stack.kdl");

    // The systemd unit's command line too.
    let unit = read("examples/soul.service");
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    let args: Vec<&str> = exec
        .trim_start_matches("ExecStart=")
        .split_whitespace()
        .skip(1)
        .collect();
    assert!(args.contains(&"watch"));
    let o = run(Command::new(SOUL).args(&args).arg("--help"));
    assert!(
        o.status.success(),
        "soul rejects the unit's command line {args:?}:\n{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com"));
    assert!(o.status.success(), "git {args:?}: {}", text(&o));
    o.stdout_text().trim().to_string()
}

#[test]
fn pull_fast_forwards_and_never_forces() {
    let base = std::env::temp_dir().join(format!("soul-git-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (upstream, machine, laptop) = (
        base.join("up.git"),
        base.join("machine"),
        base.join("laptop"),
    );
    std::fs::create_dir_all(&base).unwrap();
    git(
        &base,
        &[
            "init",
            "--quiet",
            "--bare",
            "-b",
            "main",
            upstream.to_str().unwrap(),
        ],
    );
    git(
        &base,
        &[
            "clone",
            "--quiet",
            upstream.to_str().unwrap(),
            laptop.to_str().unwrap(),
        ],
    );
    std::fs::write(laptop.join("stack.kdl"), "stack \"a\"\n").unwrap();
    git(&laptop, &["add", "."]);
    git(&laptop, &["commit", "--quiet", "-m", "one"]);
    git(&laptop, &["push", "--quiet", "origin", "HEAD:main"]);
    git(
        &base,
        &[
            "clone",
            "--quiet",
            upstream.to_str().unwrap(),
            machine.to_str().unwrap(),
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pull = |dir: &Path| {
        rt.block_on(soul::reconcile::pull_once(dir))
            .map_err(|e| e.to_string())
    };

    assert_eq!(pull(&machine), Ok(false), "up to date");
    std::fs::write(laptop.join("stack.kdl"), "stack \"b\"\n").unwrap();
    git(&laptop, &["commit", "--quiet", "-am", "two"]);
    git(&laptop, &["push", "--quiet", "origin", "HEAD:main"]);
    assert_eq!(pull(&machine), Ok(true));
    assert_eq!(
        std::fs::read_to_string(machine.join("stack.kdl")).unwrap(),
        "stack \"b\"\n"
    );

    // A dirty tree is reported, not overwritten.
    std::fs::write(laptop.join("stack.kdl"), "stack \"c\"\n").unwrap();
    git(&laptop, &["commit", "--quiet", "-am", "three"]);
    git(&laptop, &["push", "--quiet", "origin", "HEAD:main"]);
    std::fs::write(machine.join("stack.kdl"), "stack \"local edit\"\n").unwrap();
    let e = pull(&machine).unwrap_err();
    assert!(e.contains("local changes"), "{e}");
    assert_eq!(
        std::fs::read_to_string(machine.join("stack.kdl")).unwrap(),
        "stack \"local edit\"\n"
    );

    // Diverged history is reported, not forced.
    git(&machine, &["commit", "--quiet", "-am", "local"]);
    let e = pull(&machine).unwrap_err();
    assert!(e.contains("diverged"), "{e}");
    assert_eq!(
        std::fs::read_to_string(machine.join("stack.kdl")).unwrap(),
        "stack \"local edit\"\n"
    );

    // Not a repository with an upstream.
    assert!(pull(&base).is_err());
    let _ = std::fs::remove_dir_all(&base);
}

/// The relay's command lines in the NixOS module and the systemd example are ones soul accepts:
/// run with a broken relay file, soul gets as far as reading it and names where it is wrong.
#[test]
fn the_relay_units_run_a_command_soul_accepts() {
    let module = read("nix/module.nix");
    assert!(module.contains("options.services.soul-relay"));
    let unit = read("examples/relay/soul-relay.service");
    let dir = std::env::temp_dir().join(format!("soul-deploy-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("relay.kdl");
    std::fs::write(&broken, "listen \"0.0.0.0:7000\"\nallow \"home\"\n").unwrap();
    let nix_exec = module
        .lines()
        .find(|l| l.contains("ExecStart =") && l.contains("relay serve"))
        .expect("the relay's ExecStart in the module")
        .split("ExecStart = \"")
        .nth(1)
        .unwrap()
        .trim_end_matches("\";")
        .replace("${lib.getExe relay.package}", "")
        .replace("${relayFile}", &broken.to_string_lossy());
    let unit_exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit's ExecStart")
        .replace("/usr/local/bin/soul", "")
        .replace("/etc/soul/relay.kdl", &broken.to_string_lossy());
    for line in [nix_exec, unit_exec] {
        let o = run(Command::new(SOUL).args(line.split_whitespace()));
        assert_eq!(o.status.code(), Some(1), "{line}:\n{}", text(&o));
        assert!(
            o.stderr_text().contains("relay.kdl:2:") && o.stderr_text().contains("key="),
            "{line}:\n{}",
            text(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kubernetes-validate` (PyPI; it bundles the schemas, no cluster needed), installed with pip
/// when missing.
fn kubernetes_validate() -> &'static str {
    let have = || {
        run(Command::new("sh").args(["-c", "command -v kubernetes-validate"]))
            .status
            .success()
    };
    if !have() {
        // pip as the machine has it; on a Debian python that refuses pip (PEP 668) or lacks it,
        // Debian's python3-pip and --break-system-packages (a tool-only package, no system one
        // replaced).
        let o = run(Command::new("sh").args([
            "-c",
            "python3 -m pip install -q kubernetes-validate \
             || { command -v pip3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; }; \
                  python3 -m pip install -q --break-system-packages kubernetes-validate; }",
        ]));
        assert!(
            have(),
            "installing kubernetes-validate failed:\n{}",
            text(&o)
        );
    }
    "kubernetes-validate"
}

#[test]
fn every_example_exports_to_manifests_kubernetes_validate_accepts_strictly() {
    let validate = kubernetes_validate();
    let dir = std::env::temp_dir().join(format!("soul-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = vec![repo().join("stack.kdl")];
    for e in std::fs::read_dir(repo().join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "kdl") {
            files.push(p);
        }
    }
    for (i, file) in files.iter().enumerate() {
        let out = dir.join(format!("{i}.yaml"));
        let o = Soul::offline()
            .args(["export", "kubernetes", "-f"])
            .args([file.as_os_str(), "--out".as_ref(), out.as_os_str()])
            .args(["--state-dir".as_ref(), dir.join("state").as_os_str()])
            .run()
            .success();
        assert!(o.stderr().contains("objects"), "{}", o.stderr());
        let v = run(Command::new(validate).args(["--strict"]).arg(&out));
        assert!(
            v.status.success() && !v.stdout_text().contains("ERROR"),
            "{} does not validate:\n{}\n{}",
            file.display(),
            text(&v),
            read(&out)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kubernetes_export_holds_no_secret_value() {
    let dir = std::env::temp_dir().join(format!("soul-k8s-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("db-password");
    std::fs::write(&secret_file, "s3cr3t-value-from-a-file\n").unwrap();
    let stack = dir.join("stack.kdl");
    std::fs::write(
        &stack,
        format!(
            "stack \"home\"\nsidecar \"notes\" {{\n  image \"ghcr.io/x/notes:1\"\n  port 8080\n  env \"DB_PASSWORD\" file=\"{}\"\n  env \"API\" from-env=\"SOUL_TEST_API_KEY\"\n}}\ndevice \"phone\"\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let o = Soul::offline()
        .args(["export", "kubernetes", "-f"])
        .args([stack.as_os_str()])
        .args(["--state-dir".as_ref(), dir.join("state").as_os_str()])
        .env("SOUL_TEST_API_KEY", "s3cr3t-value-from-the-environment")
        .run()
        .success();
    let text = o.stdout();
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.contains("secretKeyRef"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The module's `stateDir` was read-only to its own service: `ReadWritePaths` named
/// `/var/lib/soul` whatever `stateDir` said, under `ProtectSystem = "strict"`. Evaluated by
/// Nix itself (the module's config function, with a `lib` that has just what it calls, since no
/// nixpkgs is reachable here), a custom `stateDir` is exactly what the unit may write.
#[test]
fn the_nixos_modules_state_dir_is_writable_by_its_service() {
    let nix = nix_instantiate();
    let expr = format!(
        r#"
let
  id = x: x;
  lib = {{
    mkOption = id; mkEnableOption = id; literalExpression = id; mkDefault = id;
    mkIf = c: v: if c then v else {{}};
    mkMerge = builtins.foldl' (a: b: a // b) {{}};
    getExe = p: "/bin/soul";
    types = {{ package = null; path = null; str = null; lines = null; port = null; bool = null;
               nullOr = t: null; }};
  }};
  pkgs = {{ writeText = n: t: "/nix/store/x-${{n}}"; coreutils = "/coreutils"; git = "/git";
           stdenv.hostPlatform.system = "x86_64-linux"; }};
  self = {{ packages.x86_64-linux.default = "soul"; }};
  config = {{
    services.soul = {{ enable = true; package = "soul"; stackFile = "/etc/soul/stack.kdl";
                      stateDir = "/srv/soul/home"; environmentFile = null; }};
    services.soul-relay = {{ enable = false; }};
  }};
  module = import {module} self {{ inherit config lib pkgs; }};
in module.config.systemd.services.soul.serviceConfig
"#,
        module = repo().join("nix/module.nix").display()
    );
    let o = run(Command::new(nix).args(["--eval", "--strict", "--json", "--expr", &expr]));
    assert!(o.status.success(), "{}", text(&o));
    let unit: serde_json::Value = serde_json::from_str(&o.stdout_text()).unwrap();
    assert_eq!(unit["ProtectSystem"], "strict", "{unit}");
    let writable = unit["ReadWritePaths"].as_array().unwrap();
    assert!(
        writable.iter().any(|p| p == "/srv/soul/home"),
        "the state dir is not writable: {unit}"
    );
    assert!(
        !writable.iter().any(|p| p == "/var/lib/soul"),
        "more than the state dir: {unit}"
    );
    assert!(
        unit["ExecStart"]
            .as_str()
            .unwrap()
            .contains("--state-dir /srv/soul/home"),
        "{unit}"
    );
}

/// The relay's units gave it no capability, so `listen "0.0.0.0:443"` (public names) failed
/// to bind. Both now give it `CAP_NET_BIND_SERVICE` and nothing else; run as an unprivileged
/// user with exactly that set (setpriv, in a network namespace of its own), the relay binds 443.
#[test]
fn the_relay_units_bind_443_with_their_one_capability() {
    let module = read("nix/module.nix");
    let unit = read("examples/relay/soul-relay.service");
    let value = |prefix: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix} in the unit"))
            .to_string()
    };
    let (bounding, ambient) = (
        value("CapabilityBoundingSet="),
        value("AmbientCapabilities="),
    );
    assert_eq!(bounding, "CAP_NET_BIND_SERVICE");
    assert_eq!(ambient, bounding);
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert!(
            module.contains(&format!("{key} = \"{bounding}\";")),
            "the NixOS module's {key} is the unit's"
        );
    }
    ensure_command("ip", "iproute2");
    let ns = format!("soul{}-caps", std::process::id());
    run(Command::new("ip").args(["netns", "add", &ns])).exited(0);
    let dir = std::env::temp_dir().join(format!("soul-deploy-caps-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("relay.kdl"),
        "listen \"127.0.0.1:443\"\nstatus #false\ndomain \"relay.test\"\n",
    )
    .unwrap();
    run(Command::new("chown").args(["-R", "65534:65534"]).arg(&dir)).exited(0);
    let cap = bounding.trim_start_matches("CAP_").to_ascii_lowercase();
    let serve = |caps: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        run(&mut c).exited(0);
        let mut relay = Command::new("ip");
        relay
            .args([
                "netns",
                "exec",
                &ns,
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
            ])
            .args(["--clear-groups", &format!("--inh-caps={caps}")])
            .arg(format!("--ambient-caps={caps}"))
            .arg(match caps.strip_prefix('+') {
                Some(_) => format!("--bounding-set=-all,{caps}"),
                None => "--bounding-set=-all".to_string(),
            })
            .args([env!("CARGO_BIN_EXE_soul"), "relay", "serve", "--config"])
            .arg(dir.join("relay.kdl"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = relay.spawn().unwrap();
        let bound = retry(std::time::Duration::from_secs(10), || {
            let o =
                run(Command::new("ip").args(["netns", "exec", &ns, "ss", "-Htln", "sport = :443"]));
            if o.stdout_text().contains(":443") {
                return Some(true);
            }
            child.try_wait().ok().flatten().map(|_| false)
        });
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        (
            bound == Some(true),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (with_cap, log) = serve(&format!("+{cap}"));
    let (without, _) = serve("-all");
    let _ = run(Command::new("ip").args(["netns", "del", &ns]));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        with_cap,
        "the relay did not bind 443 with {bounding}:\n{log}"
    );
    assert!(!without, "without it, 443 is refused (the check can fail)");
}
