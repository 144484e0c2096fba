//! `soul watch` against the real engine: it follows edits, repairs drift, survives invalid
//! edits, engine outages and `kill -9`, and coalesces bursts.

mod support;

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

fn kdl(lan: u16, greeting: &str, sidecars: usize) -> String {
    let mut s = String::from("stack \"{stack}\"\n");
    for i in 0..sidecars {
        s.push_str(&format!(
            "sidecar \"s{i}\" {{\n    image \"soul:latest\"\n    command \"demo-app\" \"--port=8080\"\n    port 8080\n    env \"GREETING\" \"{greeting}\"\n}}\n"
        ));
    }
    s.push_str(&format!(
        "transport {{\n    lan port={lan}\n}}\ndevice \"tester\"\n"
    ));
    s
}

/// A running `soul watch`, killed on drop; its stderr goes to a file.
struct Watch {
    child: Child,
    log: PathBuf,
}

impl Watch {
    fn start(s: &TestStack, docker_host: Option<&str>) -> Watch {
        let log = s.dir.join(format!("watch-{}.log", now()));
        let mut cmd = s.command(&["watch", "--resync", "60s"]);
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(h) = docker_host {
            cmd.env("DOCKER_HOST", h);
        }
        Watch {
            child: cmd.spawn().expect("start soul watch"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn passes(&self) -> usize {
        self.log().matches("reconciled in").count()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    wait_until(timeout, f, || format!("timed out waiting for {what}"));
}

/// What the demo app on `lan` says to the paired test device (through the gate).
fn greeting(s: &TestStack, lan: u16) -> Option<String> {
    let token = std::fs::read_to_string(s.state().join("tokens/tester.jwt")).ok()?;
    http_get_as(lan, "/", token.trim(), Duration::from_millis(300))
        .filter(|(code, _)| *code == 200)
        .map(|(_, b)| b.trim().to_string())
}

fn running(s: &TestStack, sidecar: &str) -> bool {
    docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Running}}",
        &s.container(sidecar, "app"),
    ])
    .as_deref()
        == Some("true")
}

/// `soul watch` of a one-sidecar stack greeting "one", after its first pass served it.
fn watching_one(s: &TestStack) -> (u16, Watch) {
    let lan = free_port();
    s.write(&kdl(lan, "one", 1));
    let w = Watch::start(s, None);
    wait_for("the first pass", Duration::from_secs(60), || {
        greeting(s, lan).as_deref() == Some("one")
    });
    (lan, w)
}

#[test]
fn follows_edits_and_repairs_removed_and_stopped_containers() {
    ensure_images();
    let s = TestStack::new("wfollow");
    let (lan, w) = watching_one(&s);

    // An edit is applied without any command; only the app is recreated.
    let pause = s.container_id("s0", "pause");
    s.write(&kdl(lan, "two", 1));
    wait_for("the edit to be applied", Duration::from_secs(20), || {
        greeting(&s, lan).as_deref() == Some("two")
    });
    assert_eq!(s.container_id("s0", "pause"), pause);

    // `docker rm -f` and `docker stop` are repaired.
    docker(&["rm", "-f", &s.container("s0", "app")]);
    wait_for(
        "the removed app to come back",
        Duration::from_secs(20),
        || running(&s, "s0") && greeting(&s, lan).is_some(),
    );
    docker(&["stop", "-t", "1", &s.container("s0", "app")]);
    wait_for(
        "the stopped app to run again",
        Duration::from_secs(20),
        || running(&s, "s0") && greeting(&s, lan).is_some(),
    );

    // `soul status` works while watch runs and reports the last pass.
    let o = s.soul(&["status", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["watch"]["passes"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["watch"]["config_valid"], true);
    assert!(v["watch"]["next_resync_at"].is_u64());
    assert!(w.log().contains("reconciled in"), "{}", w.log());
}

#[test]
fn an_invalid_edit_keeps_the_pod_running_and_a_fix_converges() {
    ensure_images();
    let s = TestStack::new("winvalid");
    let lan = free_port();
    s.write(&kdl(lan, "good", 1));
    let w = Watch::start(&s, None);
    wait_for("the first pass", Duration::from_secs(60), || {
        greeting(&s, lan).as_deref() == Some("good")
    });
    let before = s.containers();

    s.write(&kdl(lan, "bad", 1).replace("port 8080\n", "port 99999\n"));
    wait_for("the error to be reported", Duration::from_secs(20), || {
        let o = s.soul(&["status", "--output", "json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .map(|v| v["watch"]["config_valid"] == false)
            .unwrap_or(false)
    });
    let o = s.soul(&["status", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let err = v["watch"]["config_error"].as_str().unwrap();
    assert!(err.contains(":5:10:") && err.contains("65535"), "{err}");
    assert!(v["watch"]["config_invalid_since"].is_u64());
    let human = s.soul(&["status"]);
    human.stdout_has("config INVALID since");
    assert!(
        w.log().contains("still running the last good config"),
        "{}",
        w.log()
    );
    assert_eq!(s.containers(), before, "an invalid edit touched the pod");
    assert_eq!(greeting(&s, lan).as_deref(), Some("good"));

    s.write(&kdl(lan, "fixed", 1));
    wait_for("the fix to converge", Duration::from_secs(20), || {
        greeting(&s, lan).as_deref() == Some("fixed")
    });
    let o = s.soul(&["status", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["watch"]["config_valid"], true);
}

#[test]
fn watch_survives_edits_that_crashed_the_parser() {
    ensure_images();
    let s = TestStack::new("wcrash");
    let lan = free_port();
    s.write(&kdl(lan, "good", 1));
    let mut w = Watch::start(&s, None);
    wait_for("the first pass", Duration::from_secs(60), || {
        greeting(&s, lan).as_deref() == Some("good")
    });
    let before = s.containers();
    // Each of these once panicked (a column past 65,535), overflowed the stack (deep nesting)
    // or took exponential time (unclosed slashdashed blocks) in the parser, killing the watch.
    let mut edits = files_that_broke_the_parser();
    edits.extend([
        (
            "wide column",
            format!(
                "{}{}bogus\n",
                kdl(lan, "good", 1).replace("{stack}", &s.name),
                "\t".repeat(70_000)
            )
            .into_bytes(),
            ":70001:",
        ),
        ("invalid UTF-8", b"stack \"x\"\n\xff".to_vec(), ":2:1:"),
    ]);
    for (what, bytes, expected) in edits {
        std::fs::write(s.file(), bytes).unwrap();
        wait_for(what, Duration::from_secs(20), || {
            let o = s.soul(&["status", "--output", "json"]);
            serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .ok()
                .and_then(|v| v["watch"]["config_error"].as_str().map(String::from))
                .is_some_and(|e| e.contains(expected))
        });
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "{what}: soul watch died:\n{}",
            w.log()
        );
        assert_eq!(s.containers(), before, "{what}: the edit touched the pod");
        assert_eq!(greeting(&s, lan).as_deref(), Some("good"), "{what}");
    }
}

/// A Unix-socket forwarder to the real engine that can be cut and restored.
struct EngineProxy {
    path: PathBuf,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
}

impl EngineProxy {
    fn start(path: &Path) -> EngineProxy {
        let p = EngineProxy {
            path: path.to_path_buf(),
            up: Arc::new(AtomicBool::new(false)),
            conns: Arc::default(),
        };
        p.restore();
        p
    }

    fn restore(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind proxy");
        self.up.store(true, Ordering::SeqCst);
        let (up, conns) = (self.up.clone(), self.conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if !up.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                conns
                    .lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), engine.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                    (engine, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// The engine "goes away": the socket disappears and open connections drop.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        let _ = UnixStream::connect(&self.path); // wake the accept loop (fails: file is gone)
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A one-sidecar stack kept by a `soul watch` that reaches the engine through a proxy the
/// test can cut, after its first pass.
fn watched_behind_a_proxy(tag: &str) -> (TestStack, u16, EngineProxy, Watch) {
    ensure_images();
    let s = TestStack::new(tag);
    let lan = free_port();
    s.write(&kdl(lan, "up", 1));
    let proxy = EngineProxy::start(&s.dir.join("engine.sock"));
    let host = format!("unix://{}", proxy.path.display());
    let w = Watch::start(&s, Some(&host));
    wait_for("the first pass", Duration::from_secs(60), || {
        greeting(&s, lan).as_deref() == Some("up")
    });
    (s, lan, proxy, w)
}

/// With the Docker socket gone for 30 s, `soul watch` logged not one line, and it noticed the
/// engine back only 7–15 s after it returned.
#[test]
fn the_engine_going_away_and_coming_back_is_said_once_each_and_noticed_within_seconds() {
    let (s, _, proxy, w) = watched_behind_a_proxy("waway");
    proxy.cut();
    wait_for("the engine's absence said", Duration::from_secs(10), || {
        w.log().contains("the Docker engine went away")
    });
    // Away for a while, with the app gone meanwhile (removed on the real engine).
    docker(&["rm", "-f", &s.container("s0", "app")]);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        w.log().matches("the Docker engine went away").count(),
        1,
        "{}",
        w.log()
    );
    let returned = Instant::now();
    proxy.restore();
    wait_for("the engine's return said", Duration::from_secs(10), || {
        w.log().contains("the Docker engine is back")
    });
    let noticed = returned.elapsed();
    assert!(
        noticed < Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    eprintln!("figure: the engine's return noticed after {noticed:?}");
    wait_for("the repair", Duration::from_secs(30), || running(&s, "s0"));
    assert_eq!(w.log().matches("the Docker engine is back").count(), 1);
}

#[test]
fn an_engine_outage_is_retried_with_backoff_and_recovered_from() {
    let (s, lan, proxy, w) = watched_behind_a_proxy("wengine");

    proxy.cut();
    docker(&["rm", "-f", &s.container("s0", "app")]);
    s.write(&kdl(lan, "after the outage", 1)); // a trigger while the engine is away
    wait_for("backoff warnings", Duration::from_secs(20), || {
        w.log().matches("unreachable").count() >= 2
    });
    assert!(!running(&s, "s0"));
    std::thread::sleep(Duration::from_secs(2));
    let attempts = w.log().matches("unreachable").count();
    assert!(
        attempts < 15,
        "no backoff: {attempts} attempts in a few seconds:\n{}",
        w.log()
    );

    proxy.restore();
    wait_for(
        "recovery once the engine is back",
        Duration::from_secs(40),
        || greeting(&s, lan).as_deref() == Some("after the outage"),
    );
    assert_eq!(s.containers().len(), 3, "duplicates after recovery");
    assert!(w.child.id() > 0);
}

#[test]
fn apply_killed_at_any_instant_then_the_very_next_apply_converges() {
    ensure_images();
    let s = TestStack::new("akill");
    let lan = free_port();
    s.write(&kdl(lan, "a", 2));
    // Each round changes the greeting (the apps are recreated) and kills apply part-way: before
    // it starts, between its steps, right after a create request it sent. The next apply
    // must succeed at once (it once failed with 409: the killed create was still finishing).
    for (round, delay_ms) in [0u64, 20, 60, 120, 200, 300, 450, 650, 900, 1200]
        .into_iter()
        .enumerate()
    {
        let greeting_now = format!("a{round}");
        s.write(&kdl(lan, &greeting_now, 2));
        let mut apply = s.spawn_quiet(&["apply"]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = apply.kill(); // SIGKILL
        apply.wait().unwrap();
        let o = s.soul(&["apply"]);
        assert!(
            o.status.success(),
            "round {round} (killed after {delay_ms} ms): {}",
            text(&o)
        );
        let o = s.soul(&["plan", "--detailed-exitcode"]);
        assert_eq!(o.status.code(), Some(0), "round {round}: {}", text(&o));
        wait_for("the new greeting", Duration::from_secs(20), || {
            (0..2).all(|i| greeting(&s, lan + i).as_deref() == Some(greeting_now.as_str()))
        });
    }
}

#[test]
fn a_second_watch_of_the_same_stack_refuses_to_start() {
    ensure_images();
    let s = TestStack::new("wtwice");
    let (_lan, w) = watching_one(&s);
    let o = run(std::process::Command::new("timeout")
        .arg("20")
        .arg(SOUL)
        .args([
            "-f",
            s.file().to_str().unwrap(),
            "--state-dir",
            s.state().to_str().unwrap(),
            "watch",
        ]));
    o.exited(1);
    let err = o.stderr_text();
    assert!(
        err.contains("soul watch already keeps") && err.contains(&format!("pid {}", w.child.id())),
        "{err}"
    );
}

#[test]
fn kill_9_mid_pass_then_restart_converges_without_duplicates() {
    ensure_images();
    let s = TestStack::new("wkill");
    let lan = free_port();
    s.write(&kdl(lan, "k", 4));
    for delay_ms in [150u64, 400, 900] {
        let mut w = Watch::start(&s, None);
        std::thread::sleep(Duration::from_millis(delay_ms));
        w.child.kill().unwrap(); // SIGKILL
        w.child.wait().unwrap();
        // Change something so the next start has work to do again.
        s.write(&kdl(lan, &format!("k{delay_ms}"), 4));
    }
    let w = Watch::start(&s, None);
    let converged = || (0..4).all(|i| greeting(&s, lan + i).as_deref() == Some("k900"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !converged() {
        if Instant::now() > deadline {
            let token = s.token("tester");
            let answers: Vec<_> = (0..4)
                .map(|i| http_get_as(lan + i, "/", &token, Duration::ZERO))
                .collect();
            panic!(
                "timed out waiting for convergence after the kills: {answers:?}\n{}\ncontainers: {:?}",
                w.log(),
                s.containers()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let names: Vec<String> = s.containers().into_iter().map(|(n, _)| n).collect();
    let mut expected: Vec<String> = (0..4)
        .flat_map(|i| {
            [
                s.container(&format!("s{i}"), "app"),
                s.container(&format!("s{i}"), "gate"),
                s.container(&format!("s{i}"), "pause"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(names, expected, "duplicate or orphaned containers");
    let leftovers: Vec<_> = walk(&s.state())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".soul-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_burst_of_100_writes_coalesces_into_a_few_passes() {
    ensure_images();
    let s = TestStack::new("wburst");
    let lan = free_port();
    s.write(&kdl(lan, "start", 1));
    let w = Watch::start(&s, None);
    wait_for("the first pass", Duration::from_secs(60), || {
        greeting(&s, lan).as_deref() == Some("start")
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = w.passes();
    for i in 0..100 {
        s.write(&kdl(lan, &format!("burst {i}"), 1));
    }
    wait_for(
        "the last write to be applied",
        Duration::from_secs(30),
        || greeting(&s, lan).as_deref() == Some("burst 99"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let passes = w.passes() - before;
    assert!(
        (1..=6).contains(&passes),
        "100 writes made {passes} passes:\n{}",
        w.log()
    );
}

#[test]
fn sighup_reconciles_now_and_sigterm_leaves_containers_running() {
    ensure_images();
    let s = TestStack::new("wsignal");
    let lan = free_port();
    s.write(&kdl(lan, "sig", 1));
    let mut w = Watch::start(&s, None);
    wait_for("the first pass", Duration::from_secs(60), || {
        greeting(&s, lan).as_deref() == Some("sig")
    });
    let pid = w.child.id().to_string();
    run(std::process::Command::new("kill").args(["-HUP", &pid]));
    wait_for("a SIGHUP pass", Duration::from_secs(10), || {
        w.log().contains("trigger=SIGHUP")
    });
    run(std::process::Command::new("kill").args(["-TERM", &pid]));
    let status = w.child.wait().unwrap();
    assert!(status.success(), "watch exit: {status:?}");
    assert!(running(&s, "s0"), "SIGTERM must leave containers running");
    let mut log = String::new();
    std::fs::File::open(&w.log)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("containers keep running"), "{log}");
}

#[test]
fn a_deliberate_stop_survives_a_running_watch_until_start_and_restart_keeps_the_pod() {
    ensure_images();
    let s = TestStack::new("wstop");
    let lan = free_port();
    s.write(&kdl(lan, "up", 2));
    s.apply();
    let w = Watch::start(&s, None);
    wait_for("the watch's first pass", Duration::from_secs(30), || {
        w.passes() >= 1
    });

    s.soul(&["stop", "s0"])
        .exited(0)
        .stdout_has("until `soul start`");
    assert!(!running(&s, "s0"), "soul stop stopped the pod");
    // The stop is events (die, stop) for the watch, and SIGHUP asks for a pass at once: the
    // watch runs passes and leaves the pod stopped; the other pod is untouched.
    let passes = w.passes();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &w.child.id().to_string()])
        .status();
    wait_for("a pass after the stop", Duration::from_secs(20), || {
        w.passes() > passes
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !running(&s, "s0"),
        "watch undid a deliberate stop:\n{}",
        w.log()
    );
    assert!(running(&s, "s1"));
    s.soul(&["apply"]).exited(0);
    assert!(!running(&s, "s0"), "apply undid a deliberate stop");
    s.soul(&["status"])
        .exited(0)
        .stdout_has("pod s0 (stopped by `soul stop`");
    s.soul(&["restart", "s0"])
        .exited(1)
        .stderr_has("soul start s0");

    s.soul(&["start", "s0"]).exited(0);
    wait_for("the started pod to serve", Duration::from_secs(20), || {
        running(&s, "s0") && greeting(&s, lan).as_deref() == Some("up")
    });

    // Restart: the same containers, started again, serving again.
    let app = s.container_id("s0", "app");
    s.soul(&["restart", "s0"]).exited(0).stdout_has("restarted");
    assert_eq!(s.container_id("s0", "app"), app);
    wait_for(
        "the restarted pod to serve",
        Duration::from_secs(20),
        || greeting(&s, lan).as_deref() == Some("up"),
    );
}
