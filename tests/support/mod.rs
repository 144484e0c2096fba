//! The shared harness of soul's integration tests: runs the real `soul` binary against the
//! real Docker engine with unique stack names and free ports, builds the test images when
//! missing, and cleans up on drop.
#![allow(dead_code)]

pub mod memory;
pub mod netns;
pub mod public_name;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const SOUL: &str = env!("CARGO_BIN_EXE_soul");
/// A real nginx from Debian's packages, made by `.ci/test-images.sh` with `docker import`.
pub const NGINX: &str = "soul-test/nginx:1";
/// Debian's tor, made the same way.
pub const TOR: &str = "soul-test/tor:1";
/// Debian's nebula (with curl and iproute2), for the Nebula transport and its test peers.
pub const NEBULA: &str = "soul-test/nebula:1";
/// A stand-in for tailscale/tailscale that answers `tailscale status --json` (no tailnet can
/// be reached here) and whose entrypoint checks what containerboot checks at start, exiting as
/// it does (`.ci/tailscale-standin/containerboot`).
pub const TAILSCALE_STANDIN: &str = "soul-test/tailscale-standin:3";

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command and returns its output, panicking with context if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn text(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One `soul` run, built and asserted on in a line (as just's and ripgrep's tests do):
/// `Soul::offline().args(["validate", "-f", f]).run().success().stdout_has("stack `notes`")`.
pub struct Soul(Command);

impl Soul {
    pub fn new() -> Soul {
        Soul(Command::new(SOUL))
    }

    /// With DOCKER_HOST pointing at nothing, from the repository root: any Docker call would
    /// exit 3.
    pub fn offline() -> Soul {
        let mut soul = Soul::new();
        soul.0
            .current_dir(repo())
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock");
        soul
    }

    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Soul {
        self.0.args(args);
        self
    }

    pub fn env(mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Soul {
        self.0.env(name, value);
        self
    }

    pub fn run(mut self) -> Ran {
        Ran(run(&mut self.0))
    }
}

/// A finished `soul` run; each assertion shows the whole run when it fails.
pub struct Ran(pub Output);

impl Ran {
    pub fn success(self) -> Ran {
        assert!(self.0.status.success(), "soul failed:\n{}", text(&self.0));
        self
    }

    /// Exited with `code` (1: invalid input, 3: engine unreachable, …).
    pub fn code(self, code: i32) -> Ran {
        assert_eq!(self.0.status.code(), Some(code), "{}", text(&self.0));
        self
    }

    pub fn stdout(&self) -> String {
        self.0.stdout_text()
    }

    pub fn stderr(&self) -> String {
        self.0.stderr_text()
    }

    pub fn stdout_has(self, part: &str) -> Ran {
        self.0.stdout_has(part);
        self
    }

    pub fn stderr_has(self, part: &str) -> Ran {
        self.0.stderr_has(part);
        self
    }
}

/// What a finished command said, and assertions on it that show the whole run when they fail:
/// `let o = s.soul(&["apply"]); o.exited(1).stderr_has("no such image");`.
pub trait Said {
    fn output(&self) -> &Output;

    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.output().stdout).into_owned()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.output().stderr).into_owned()
    }

    fn exited(&self, code: i32) -> &Self {
        assert_eq!(
            self.output().status.code(),
            Some(code),
            "{}",
            text(self.output())
        );
        self
    }

    fn stdout_has(&self, part: &str) -> &Self {
        assert!(
            self.stdout_text().contains(part),
            "no {part:?} on stdout:\n{}",
            text(self.output())
        );
        self
    }

    fn stderr_has(&self, part: &str) -> &Self {
        assert!(
            self.stderr_text().contains(part),
            "no {part:?} on stderr:\n{}",
            text(self.output())
        );
        self
    }

    fn stdout_lacks(&self, part: &str) -> &Self {
        assert!(
            !self.stdout_text().contains(part),
            "{part:?} on stdout:\n{}",
            text(self.output())
        );
        self
    }

    fn stderr_lacks(&self, part: &str) -> &Self {
        assert!(
            !self.stderr_text().contains(part),
            "{part:?} on stderr:\n{}",
            text(self.output())
        );
        self
    }
}

impl Said for Output {
    fn output(&self) -> &Output {
        self
    }
}

/// A Docker socket that does not exist.
pub const NO_ENGINE: &str = "unix:///nonexistent/docker.sock";

/// `docker …`, returning trimmed stdout; panics on failure.
pub fn docker(args: &[&str]) -> String {
    let o = run(Command::new("docker").args(args));
    assert!(o.status.success(), "docker {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `docker inspect -f FORMAT OBJECT`, trimmed; panics when the object is not there.
pub fn inspect(object: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, object])
}

/// `docker …` that may fail; returns stdout on success.
pub fn docker_ok(args: &[&str]) -> Option<String> {
    let o = run(Command::new("docker").args(args));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Serializes one-time setup across test processes (nextest runs each test in its own).
fn with_file_lock<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let path = std::env::temp_dir().join(format!("soul-tests-{name}.lock"));
    let file = std::fs::File::create(&path).expect("lock file");
    file.lock().expect("lock");
    let r = f();
    drop(file);
    r
}

/// Makes sure `command` is on this machine, installing Debian's `package` when it is not: the
/// suite installs what it needs (as root, from the machine's configured package sources).
pub fn ensure_command(command: &str, package: &str) {
    let have = || {
        run(Command::new("sh").args(["-c", &format!("command -v {command}")]))
            .status
            .success()
    };
    with_file_lock("apt", || {
        if have() {
            return;
        }
        let o = run(Command::new("sh")
            .args([
                "-c",
                &format!("apt-get update -qq && apt-get install -y -qq {package}"),
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"));
        assert!(
            o.status.success() && have(),
            "this test needs `{command}` (Debian's `{package}`), and installing it failed \
             (run the suite as root, or `apt-get install {package}` first):\n{}",
            text(&o)
        );
    })
}

/// Files that once overflowed the parser's stack (deep nesting) or took it exponential time
/// (unclosed slashdashed blocks), with what soul's diagnostic for each must say.
pub fn files_that_broke_the_parser() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        (
            "deep blocks",
            "a{".repeat(1_270).into_bytes(),
            "nest more than",
        ),
        (
            "deep comments",
            "/*".repeat(3_591).into_bytes(),
            "nest more than",
        ),
        (
            "slashdash blocks",
            "\n/-{/**/'//x".repeat(40).into_bytes(),
            "nest more than",
        ),
    ]
}

/// Makes sure soul's own image (from this build) and the nginx test image exist.
pub fn ensure_images() {
    with_file_lock("images", || {
        if [NGINX, TOR, NEBULA, TAILSCALE_STANDIN]
            .iter()
            .any(|image| docker_ok(&["image", "inspect", image]).is_none())
        {
            let o = run(Command::new("bash").arg(repo().join(".ci/test-images.sh")));
            assert!(
                o.status.success(),
                "building test images failed:\n{}",
                text(&o)
            );
        }
        // `soul apply` builds soul's image when it is missing or stale; building it once
        // here keeps parallel tests from all building it at the same time.
        let o = run(Command::new(SOUL)
            .arg("plan")
            .arg("-f")
            .arg(repo().join("stack.kdl"))
            .arg("--output")
            .arg("json"));
        let stale = String::from_utf8_lossy(&o.stdout).contains("build-soul-image");
        if stale {
            let o = run(Command::new(SOUL).arg("image"));
            assert!(o.status.success(), "soul image failed:\n{}", text(&o));
        }
    })
}

/// A free TCP port on this machine whose next three ports are free too (stacks with several
/// sidecars publish consecutive LAN ports); never the same block twice in one test process.
pub fn free_port() -> u16 {
    free_ports(4)
}

/// The first of `n` consecutive free TCP ports, never handed out twice in one test process.
pub fn free_ports(n: u16) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        if port > 65_000 - n {
            continue;
        }
        let block: Vec<u16> = (port..port + n).collect();
        let mut used = HANDED_OUT.lock().unwrap();
        let free = block
            .iter()
            .all(|p| !used.contains(p) && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok());
        if free {
            used.extend(block);
            return port;
        }
    }
}

/// GET `path` on 127.0.0.1:`port` without credentials; retries until `timeout`. Returns
/// (status code, body).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    retry(timeout, || try_get(port, path, ""))
}

/// GET `path` on 127.0.0.1:`port` as a paired device (`Authorization: Bearer <token>`), the
/// way a client passes a pod's gate; retries until `timeout` or a 200.
pub fn http_get_as(port: u16, path: &str, token: &str, timeout: Duration) -> Option<(u16, String)> {
    let auth = format!("Authorization: Bearer {token}\r\n");
    let mut last = None;
    let ok = retry(timeout, || {
        last = try_get(port, path, &auth);
        last.clone().filter(|(code, _)| *code == 200)
    });
    ok.or(last)
}

/// Waits with [`retry`] until `done`, or fails the test saying `what` (asked only then).
pub fn wait_until(within: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    assert!(
        retry(within, || done().then_some(())).is_some(),
        "{}",
        what()
    );
}

/// The shared wait: `attempt` until it gives something or `timeout` passes, 100 ms apart.
pub fn retry<T>(timeout: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = attempt() {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn try_get(port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// One test's stack: its own name, stack.kdl, state dir, and cleanup.
pub struct TestStack {
    pub name: String,
    pub dir: PathBuf,
}

impl TestStack {
    /// A stack named `t<pid>-<tag>` (unique per test process and test).
    pub fn new(tag: &str) -> TestStack {
        let mut name = format!("t{}-{tag}", std::process::id());
        name.truncate(32);
        let dir = std::env::temp_dir().join(format!("soul-test-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        TestStack { name, dir }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("stack.kdl")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Writes stack.kdl; `{stack}` in the text becomes this stack's name.
    pub fn write(&self, kdl: &str) {
        std::fs::write(self.file(), kdl.replace("{stack}", &self.name)).expect("write stack.kdl");
    }

    /// `soul -f <file> --state-dir <state> <args…>`.
    pub fn soul(&self, args: &[&str]) -> Output {
        run(&mut self.command(args))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(SOUL);
        cmd.arg("-f")
            .arg(self.file())
            .arg("--state-dir")
            .arg(self.state())
            .args(args);
        cmd
    }

    /// soul run in the background on this stack, its output dropped (a run a test kills).
    pub fn spawn_quiet(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The same, pointed at an engine that is not there (`DOCKER_HOST` is
    /// [`NO_ENGINE`]): what soul says before, or instead of, any call to one.
    pub fn command_without_engine(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(args);
        cmd.env("DOCKER_HOST", NO_ENGINE);
        cmd
    }

    /// The current token of `device`, as apply wrote it into the state dir.
    pub fn token(&self, device: &str) -> String {
        read(self.state().join(format!("tokens/{device}.jwt")))
            .trim()
            .to_string()
    }

    /// `soul apply`, asserting success.
    pub fn apply(&self) -> Output {
        let o = self.soul(&["apply"]);
        assert!(o.status.success(), "soul apply failed:\n{}", text(&o));
        o
    }

    pub fn container(&self, sidecar: &str, role: &str) -> String {
        format!("soul_{}_{sidecar}_{role}", self.name)
    }

    /// The ID of a container, or None when it does not exist.
    pub fn container_id(&self, sidecar: &str, role: &str) -> Option<String> {
        docker_ok(&["inspect", "-f", "{{.Id}}", &self.container(sidecar, role)])
    }

    /// Every container carrying this stack's label: (name, id).
    pub fn containers(&self) -> Vec<(String, String)> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=dev.soul.stack={}", self.name),
            "--format",
            "{{.Names}} {{.ID}}",
        ]);
        let mut v: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        v.sort();
        v
    }

    pub fn networks(&self) -> Vec<String> {
        self.labelled("network")
    }

    pub fn volumes(&self) -> Vec<String> {
        self.labelled("volume")
    }

    /// Names of the networks or volumes carrying this stack's label.
    fn labelled(&self, kind: &str) -> Vec<String> {
        let filter = format!("label=dev.soul.stack={}", self.name);
        let mut names: Vec<String> =
            docker(&[kind, "ls", "--filter", &filter, "--format", "{{.Name}}"])
                .lines()
                .map(String::from)
                .collect();
        names.sort();
        names
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        let _ = self.soul(&["down", "--volumes"]);
        let filter = format!("label=dev.soul.stack={}", self.name);
        if let Some(ids) = docker_ok(&["ps", "-aq", "--filter", &filter]) {
            for id in ids.lines() {
                let _ = docker_ok(&["rm", "-f", id]);
            }
        }
        // `down` cannot read a stack.kdl a test left invalid: what carries the label goes too,
        // so no network is left to take an address pool on the shared engine.
        for kind in ["network", "volume"] {
            if let Some(ids) = docker_ok(&[kind, "ls", "-q", "--filter", &filter]) {
                for id in ids.lines() {
                    let _ = docker_ok(&[kind, "rm", id]);
                }
            }
        }
        // The stack's claim (no stack label: it is no part of the pods).
        let _ = docker_ok(&["volume", "rm", &soul::pod::claim_name(&self.name)]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Docker events for this stack's objects between two instants (unix seconds, fractional).
pub fn events_between(stack: &str, since: f64, until: f64) -> Vec<String> {
    docker(&[
        "events",
        "--since",
        &format!("{since:.3}"),
        "--until",
        &format!("{until:.3}"),
        "--filter",
        &format!("label=dev.soul.stack={stack}"),
        "--format",
        "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
    ])
    .lines()
    .map(String::from)
    .collect()
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Reads a file relative to the repository root.
pub fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(repo().join(path)).expect("read file")
}

/// `curl` over TLS to the gate on loopback, with the key pinned when `pin` is given (`-k`: the
/// certificate is self-signed; the pin is what a soul client checks). Returns curl's exit
/// code, the HTTP status, and the HTTP version used.
pub fn curl_tls(
    port: u16,
    path: &str,
    token: Option<&str>,
    pin: Option<&str>,
) -> (i32, u16, String) {
    ensure_command("curl", "curl");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sk",
        "-o",
        "/dev/null",
        "-m",
        "5",
        "-w",
        "%{http_code} %{http_version}",
    ]);
    if let Some(pin) = pin {
        cmd.args(["--pinnedpubkey", pin]);
    }
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let o = run(cmd.arg(format!("https://127.0.0.1:{port}{path}")));
    let out = o.stdout_text();
    let (code, version) = out.split_once(' ').unwrap_or(("0", ""));
    (
        o.status.code().unwrap_or(-1),
        code.parse().unwrap_or(0),
        version.to_string(),
    )
}

/// `curl` over TLS as [`curl_tls`], retried with [`retry`] until it gets an HTTP answer or
/// `timeout` passes: the status, or curl's own error (its exit code and what it said), never a
/// bare 0 for a pod that was not ready yet.
pub fn curl_tls_answer(
    port: u16,
    path: &str,
    token: Option<&str>,
    pin: Option<&str>,
    timeout: Duration,
) -> Result<u16, String> {
    ensure_command("curl", "curl");
    let mut last = String::new();
    let answered = retry(timeout, || {
        let mut cmd = Command::new("curl");
        cmd.args(["-sSk", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}"]);
        if let Some(pin) = pin {
            cmd.args(["--pinnedpubkey", pin]);
        }
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let o = run(cmd.arg(format!("https://127.0.0.1:{port}{path}")));
        last = format!(
            "curl exited {:?}: {}",
            o.status.code(),
            o.stderr_text().trim()
        );
        o.status
            .success()
            .then(|| o.stdout_text().trim().parse::<u16>().ok())
            .flatten()
    });
    answered.ok_or(last)
}

/// The pin of the certificate a TLS server presents, as openssl (not soul) computes it.
pub fn served_pin(port: u16) -> String {
    ensure_command("openssl", "openssl");
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null \\
         | openssl x509 -pubkey -noout | openssl pkey -pubin -outform der \\
         | openssl dgst -sha256 -binary | openssl base64 -A"
    );
    let o = run(Command::new("sh").args(["-c", &script]));
    format!("sha256//{}", o.stdout_text().trim())
}

/// How the tests run Chromium: headless, as root in a container-less test, no first-run pages.
pub const HEADLESS_CHROMIUM: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
];

/// Headless Chromium with its profile in `profile`, opening `url`; returns the DOM it ends on
/// (`--virtual-time-budget` lets the page's form post and the redirects run first).
pub fn chromium(profile: &std::path::Path, url: &str) -> String {
    let o = run(Command::new("timeout")
        .args(["90", "chromium"])
        .args(HEADLESS_CHROMIUM)
        .args([
            "--virtual-time-budget=5000",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            url,
        ]));
    assert!(o.status.success(), "chromium failed:\n{}", text(&o));
    o.stdout_text()
}

/// Every URL in a Chromium profile's History database, most recent visit last.
pub fn history(profile: &std::path::Path) -> Vec<String> {
    let db = profile.join("Default/History");
    let o = run(Command::new("sqlite3")
        .arg(&db)
        .arg("select u.url from visits v join urls u on u.id = v.url order by v.visit_time"));
    assert!(
        o.status.success(),
        "reading {}:\n{}",
        db.display(),
        text(&o)
    );
    o.stdout_text().lines().map(String::from).collect()
}

/// `nebula-cert` with `args` in `dir` (Debian's nebula, installed when missing).
pub fn nebula_cert(dir: &Path, args: &[&str]) {
    ensure_command("nebula-cert", "nebula");
    let o = run(Command::new("nebula-cert").args(args).current_dir(dir));
    assert!(o.status.success(), "nebula-cert {args:?}: {}", text(&o));
}

/// A Nebula CA in `dir/pki` and a certificate signed by it for each `(name, ip/prefix)`:
/// `<name>.crt` and `<name>.key` beside `ca.crt`. Returns the directory.
pub fn nebula_pki(dir: &Path, nodes: &[(&str, &str)]) -> PathBuf {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    nebula_cert(
        &pki,
        &[
            "ca",
            "-name",
            "soul-test",
            "-out-crt",
            "ca.crt",
            "-out-key",
            "ca.key",
        ],
    );
    for (name, ip) in nodes {
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        nebula_cert(
            &pki,
            &[
                "sign", "-ca-crt", "ca.crt", "-ca-key", "ca.key", "-name", name, "-ip", ip,
                "-out-crt", &crt, "-out-key", &key,
            ],
        );
    }
    pki
}

/// The demo app (soul's own image, serving on 8080) as sidecar `name`, as stack.kdl spells it.
pub fn demo_sidecar(name: &str) -> String {
    format!(
        "sidecar \"{name}\" {{\n    image \"soul:latest\"\n    command \"demo-app\" \"--port=8080\"\n    port 8080\n}}\n"
    )
}

/// A child process that is killed and reaped when dropped, so a test that fails half-way
/// leaves no watch, forwarder or capture running behind it.
pub struct Running(pub std::process::Child);

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
