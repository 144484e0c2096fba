//! `soul export kubernetes` run, not only validated: podman (Debian's) plays the export of a
//! demo stack as a Kubernetes pod, with soul's image loaded from the Docker engine, and the
//! gate in it admits only paired devices, and stops admitting a device removed from stack.kdl
//! once the re-exported Secret is applied. podman enforces no NetworkPolicy (README says what
//! that means).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// podman, catatonit (its pause image's init) and container limits this machine accepts:
/// rootful podman raises `nofile`/`nproc` past the machine's hard limits by default.
fn podman_ready() {
    ensure_command("podman", "podman");
    ensure_command("catatonit", "catatonit");
    let drop_in = Path::new("/etc/containers/containers.conf.d/soul-tests.conf");
    if !drop_in.exists() {
        std::fs::create_dir_all(drop_in.parent().unwrap()).unwrap();
        std::fs::write(
            drop_in,
            "[containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=4096:4096\"]\n",
        )
        .unwrap();
    }
}

fn podman(args: &[&str]) -> std::process::Output {
    run(Command::new("podman").args(args))
}

/// The Secrets an export's header names, made from this machine's files as its
/// `kubectl create secret generic NAME --from-file=KEY=PATH…` lines say. podman 4.3 writes a
/// Secret's `data` values into the volume as they are (it does not base64-decode them), so
/// they are given as plain text here.
fn create_secrets(manifests: &str, dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for line in manifests.lines() {
        let Some(rest) = line.strip_prefix("#   kubectl create secret generic ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let name = words.next().unwrap().to_string();
        let mut data = serde_json::Map::new();
        for word in words {
            let (key, path) = word
                .strip_prefix("--from-file=")
                .and_then(|kv| kv.split_once('='))
                .unwrap_or_else(|| panic!("an unexpected secret source in `{line}`"));
            data.insert(key.into(), read(path).into());
        }
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name }, "data": data
        });
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, doc.to_string()).unwrap();
        let _ = podman(&["secret", "rm", &name]);
        let o = run(Command::new("podman")
            .args(["secret", "create", &name])
            .arg(&file));
        assert!(o.status.success(), "{}", text(&o));
        names.push(name);
    }
    names
}

/// What the test made in podman, removed on drop.
struct Played {
    pod: String,
    secrets: Vec<String>,
    volumes: Vec<String>,
}

impl Drop for Played {
    fn drop(&mut self) {
        let _ = podman(&["pod", "rm", "-f", &self.pod]);
        for s in &self.secrets {
            let _ = podman(&["secret", "rm", s]);
        }
        for v in &self.volumes {
            let _ = podman(&["volume", "rm", "-f", v]);
        }
    }
}

fn stack_kdl(lan: u16, devices: &str) -> String {
    format!(
        "stack \"{{stack}}\"\nsidecar \"hello\" {{\n    image \"soul:latest\"\n    command \"demo-app\" \"--port=8080\"\n    port 8080\n}}\ntransport {{\n    lan port={lan}\n}}\n{devices}"
    )
}

/// The status of `GET /` at the pod's gate, with `token` when given.
fn status(ip: &str, token: Option<&str>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    run(cmd.arg(format!("http://{ip}:8443/"))).stdout_text()
}

#[test]
fn the_demo_stacks_export_runs_under_podman_and_its_gate_admits_only_paired_devices() {
    ensure_images();
    podman_ready();
    ensure_command("curl", "curl");
    let s = TestStack::new("k8s");
    let lan = free_port();
    s.write(&stack_kdl(lan, "device \"phone\"\ndevice \"tablet\"\n"));
    // apply makes the state dir's keys, registry and tokens the Secrets are made from.
    s.apply();
    let manifests_file = s.dir.join("k8s.yaml");
    let export = || {
        let o = s.soul(&[
            "export",
            "kubernetes",
            "--out",
            &manifests_file.to_string_lossy(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        read(&manifests_file)
    };
    let manifests = export();
    let image = manifests
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: soul:"))
        .map(|tag| format!("soul:{tag}"))
        .expect("soul's image in the manifests");
    let loaded =
        run(Command::new("sh").args(["-c", &format!("docker save {image} | podman load")]));
    assert!(loaded.status.success(), "{}", text(&loaded));

    let deployment = format!("soul-{}-hello", s.name);
    let mut played = Played {
        pod: format!("{deployment}-pod-0"),
        secrets: create_secrets(&manifests, &s.dir),
        volumes: vec![format!("soul-state-{}-hello-gate", s.name)],
    };
    played.volumes.extend(played.secrets.iter().cloned());
    let o = run(Command::new("podman")
        .args(["kube", "play"])
        .arg(&manifests_file));
    assert!(o.status.success(), "podman kube play:\n{}", text(&o));
    let pod_ip = || {
        let infra = podman(&[
            "pod",
            "inspect",
            &played.pod,
            "--format",
            "{{.InfraContainerID}}",
        ]);
        let ip = podman(&[
            "inspect",
            infra.stdout_text().trim(),
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        ]);
        ip.stdout_text().trim().to_string()
    };
    let ip = pod_ip();
    assert!(!ip.is_empty(), "the pod has no address");
    let (phone, tablet) = (s.token("phone"), s.token("tablet"));
    let start = Instant::now();
    while status(&ip, Some(&phone)) != "200" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the gate never admitted the phone:\n{}",
            podman(&["logs", &format!("{}-gate", played.pod)]).stderr_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(status(&ip, None), "401");
    assert_eq!(status(&ip, Some("eyJ.forged.token")), "401");
    assert_eq!(status(&ip, Some(&tablet)), "200");

    // The tablet leaves stack.kdl: apply, re-create the gate's Secret, and replace the pod
    // (podman copies a Secret into the pod when it starts it; a cluster's kubelet updates the
    // mounted files in place, and the gate re-reads them). podman 4.3 refuses to play a claim
    // whose volume exists, so the volume goes with the pod.
    s.write(&stack_kdl(lan, "device \"phone\"\n"));
    s.apply();
    let manifests = export();
    create_secrets(&manifests, &s.dir);
    let _ = podman(&["pod", "rm", "-f", &played.pod]);
    for v in &played.volumes {
        let _ = podman(&["volume", "rm", "-f", v]);
    }
    let o = run(Command::new("podman")
        .args(["kube", "play"])
        .arg(&manifests_file));
    assert!(o.status.success(), "podman kube play again:\n{}", text(&o));
    let ip = pod_ip();
    let start = Instant::now();
    while status(&ip, Some(&phone)) != "200" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the phone lost access"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        status(&ip, Some(&tablet)),
        "401",
        "a removed device is refused"
    );
}

#[test]
fn a_watch_keeps_a_committed_kubernetes_export_current() {
    ensure_images();
    let s = TestStack::new("k8s-watch");
    let lan = free_port();
    s.write(&stack_kdl(lan, "device \"phone\"\n"));
    let dir = s.dir.join("k8s");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.yaml", s.name));
    let mut watch = s
        .command(&["watch", "--export-kubernetes", &dir.to_string_lossy()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    let wait_for = |what: &str, done: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if done(&text) {
                return text;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{what}:\n{text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let first = wait_for("the watch never wrote the export", &|t| {
        t.contains("kind: Deployment")
    });
    assert!(first.contains("tokens-phone.jwt") && !first.contains("tokens-tablet.jwt"));
    // A device added to stack.kdl: the next pass rewrites the export with it.
    s.write(&stack_kdl(lan, "device \"phone\"\ndevice \"tablet\"\n"));
    wait_for("the export never gained the new device", &|t| {
        t.contains("tokens-tablet.jwt")
    });
    let _ = watch.kill();
    let _ = watch.wait();
}

/// The export's tailscale container, started as a cluster starts it: Kubernetes sets
/// KUBERNETES_SERVICE_HOST in every pod, and containerboot then wants RBAC for a state Secret
/// unless TS_KUBE_SECRET is set and empty. The stand-in's entrypoint checks that as
/// containerboot does; without the export's TS_KUBE_SECRET it exits, as a real node would.
#[test]
fn the_exported_tailscale_node_starts_in_a_cluster_without_rbac_for_a_state_secret() {
    ensure_images();
    let s = TestStack::new("k8sts");
    let key = s.dir.join("ts-key");
    std::fs::write(&key, "tskey-auth-k8s").unwrap();
    s.write(&format!(
        "stack \"{{stack}}\"\nsidecar \"tv-\" {{\n    image \"soul:latest\"\n    port 8080\n}}\ntransport {{\n    tailscale authkey-file=\"{}\" tags=\"tag:soul\" image=\"{TAILSCALE_STANDIN}\"\n}}\n",
        key.display()
    ));
    let o = s.soul(&["export", "kubernetes"]);
    assert!(o.status.success(), "{}", text(&o));
    let deployment: serde_json::Value = o
        .stdout_text()
        .split("\n---\n")
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("a Deployment");
    let tailscale = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tailscale")
        .expect("a tailscale container")
        .clone();
    let env: Vec<(String, String)> = tailscale["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect();
    // containerboot's checks come first; a node that passes them is still running 3 s later.
    let start = |env: &[(String, String)]| {
        let name = format!("{}-boot", s.name);
        let mut cmd = Command::new("timeout");
        cmd.args(["-s", "KILL", "30", "docker", "run", "--rm", "--name", &name])
            .args(["-e", "KUBERNETES_SERVICE_HOST=10.96.0.1"]);
        for (k, v) in env {
            cmd.args(["-e", &format!("{k}={v}")]);
        }
        let o = run(cmd.arg(TAILSCALE_STANDIN).args([
            "sh",
            "-c",
            "/usr/local/bin/containerboot & sleep 3; kill -0 $! && echo still-running",
        ]));
        let _ = run(Command::new("docker").args(["rm", "-f", &name]));
        o
    };
    let o = start(&env);
    assert!(
        o.stdout_text().contains("Startup complete") && o.stdout_text().contains("still-running"),
        "the exported node does not start in a cluster:\n{}",
        text(&o)
    );
    // The control: the same container without TS_KUBE_SECRET exits as containerboot does.
    let without: Vec<_> = env
        .iter()
        .filter(|(k, _)| k != "TS_KUBE_SECRET")
        .cloned()
        .collect();
    let o = start(&without);
    assert!(
        !o.stdout_text().contains("still-running")
            && o.stderr_text()
                .contains("Kubernetes permissions are missing"),
        "{}",
        text(&o)
    );
}
