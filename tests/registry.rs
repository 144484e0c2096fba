//! Images from a registry, pinned in stack.lock: a real registry (Debian's `docker-registry`)
//! on loopback, which the engine allows without TLS. The stack's image exists only there; a
//! tag pushed again with other content moves nothing until `soul update`; a stopped registry
//! stops nothing whose locked images are here.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use support::*;

/// `docker-registry` on 127.0.0.1, its storage in `dir`; stopped on drop.
struct Registry {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, None)
    }

    /// A registry that wants `htpasswd`'s user and password (basic auth).
    fn start_with(dir: &Path, htpasswd: Option<&str>) -> Registry {
        ensure_command("docker-registry", "docker-registry");
        ensure_command("curl", "curl");
        let port = free_port();
        let storage = dir.join("registry");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("registry.yml");
        let auth = match htpasswd {
            Some(line) => {
                let file = dir.join("htpasswd");
                std::fs::write(&file, format!("{line}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: soul-test\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                storage.display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            child: None,
            port,
            config,
        };
        r.resume();
        r
    }

    fn resume(&mut self) {
        let log = std::fs::File::create(self.config.with_extension("log")).unwrap();
        self.child = Some(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&self.config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let up = retry(Duration::from_secs(20), || {
            let o = run(Command::new("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://127.0.0.1:{}/v2/", self.port),
            ]));
            // 401: up, and wanting credentials.
            matches!(o.stdout_text().as_str(), "200" | "401").then_some(())
        });
        assert!(up.is_some(), "{}", read(self.config.with_extension("log")));
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pushes `image` as `<registry>/<name>` and removes that tag here, so that the engine
    /// has it only through the registry; returns the reference.
    fn push(&self, image: &str, name: &str) -> String {
        let reference = format!("127.0.0.1:{}/{name}", self.port);
        docker(&["tag", image, &reference]);
        docker(&["push", "-q", &reference]);
        docker(&["rmi", &reference]);
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn docker(args: &[&str]) -> String {
    let o = run(Command::new("docker").args(args));
    assert!(o.status.success(), "docker {args:?}: {}", text(&o));
    o.stdout_text().trim().to_string()
}

fn stack_kdl(image: &str, lan: u16) -> String {
    format!(
        "stack \"{{stack}}\"\nsidecar \"web\" {{\n    image \"{image}\"\n    port 80\n}}\nsidecar \"other\" {{\n    image \"{NGINX}\"\n    port 80\n}}\ntransport {{\n    lan port={lan}\n}}\n"
    )
}

/// The digest stack.lock holds for `reference`.
fn locked(s: &TestStack, reference: &str) -> Option<String> {
    read(s.dir.join("stack.lock"))
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{reference} ")).map(String::from))
}

#[test]
fn an_image_only_a_registry_has_is_locked_pulled_and_moved_only_by_soul_update() {
    ensure_images();
    let s = TestStack::new("lock");
    let mut registry = Registry::start(&s.dir);
    let image = registry.push(NGINX, &format!("{}-web:1", s.name));
    let lan = free_port();
    s.write(&stack_kdl(&image, lan));
    let o = s.apply();
    o.stderr_has("stack.lock: locked");
    let first = locked(&s, &image).expect("the image is locked");
    assert!(first.starts_with("sha256:"), "{first}");
    assert_eq!(
        locked(&s, NGINX).as_deref(),
        Some("local"),
        "an imported image is local"
    );
    let web = s.container_id("web", "app").expect("the app runs");
    assert_eq!(
        docker(&["inspect", "-f", "{{.Config.Image}}", &web]),
        format!("127.0.0.1:{}/{}-web@{first}", registry.port, s.name)
    );
    let lock_bytes = read(s.dir.join("stack.lock"));
    s.apply().stdout_has("0 changes");
    assert_eq!(read(s.dir.join("stack.lock")), lock_bytes, "byte-identical");

    // The tag pushed again with other content: apply runs what the lock says.
    let context = s.dir.join("v2");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {NGINX}\nLABEL v=2\n"),
    )
    .unwrap();
    let v2 = format!("{}-v2:1", s.name);
    docker(&["build", "-q", "-t", &v2, context.to_str().unwrap()]);
    registry.push(&v2, &format!("{}-web:1", s.name));
    let o = s.soul(&["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // soul update moves it, says so, and apply recreates only that app.
    let other = s.container_id("other", "app").unwrap();
    let o = s.soul(&["update"]);
    assert!(o.status.success(), "{}", text(&o));
    o.stdout_has(&format!("web: {image} "));
    let second = locked(&s, &image).unwrap();
    assert_ne!(second, first);
    s.apply();
    assert_ne!(
        s.container_id("web", "app").unwrap(),
        web,
        "web runs the new content"
    );
    assert_eq!(
        s.container_id("other", "app").unwrap(),
        other,
        "nothing else moved"
    );

    // The registry stopped: what is locked and here still applies.
    registry.stop();
    s.soul(&["down"]);
    s.apply();
    assert!(s.container_id("web", "app").is_some());
    // An image newly named that is only at the stopped registry: refused before any change,
    // naming the image.
    let before = s.containers();
    let missing = format!("127.0.0.1:{}/{}-gone:1", registry.port, s.name);
    s.write(&stack_kdl(&missing, lan));
    let o = s.soul(&["apply"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    o.stderr_has(&format!("cannot lock image {missing}"));
    assert_eq!(s.containers(), before, "nothing changed");
    // A digest pinned in stack.kdl that the registry does not hold: refused, nothing changed.
    registry.resume();
    let bogus = format!(
        "127.0.0.1:{}/{}-web@sha256:{}",
        registry.port,
        s.name,
        "0".repeat(64)
    );
    s.write(&stack_kdl(&bogus, lan));
    let o = s.soul(&["apply"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    o.stderr_has(&bogus);
    o.stderr_has("nothing that was running has been changed");
    assert_eq!(s.containers(), before, "nothing changed");
    // What this test pulled goes (by its references only: the content is also the test
    // image's, which other tests use).
    s.soul(&["down"]);
    let pulled = docker(&[
        "images",
        "--digests",
        "--format",
        "{{.Repository}}@{{.Digest}}",
        "--filter",
        &format!("reference=127.0.0.1:{}/*", registry.port),
    ]);
    for reference in pulled.lines().filter(|l| l.contains("@sha256:")) {
        let _ = run(Command::new("docker").args(["rmi", reference]));
    }
    docker(&["rmi", &v2]);
}

/// A registry that wants credentials: soul finds them as the docker CLI does, in
/// `$DOCKER_CONFIG/config.json`'s `auths` and through a credential helper it names; without any,
/// apply stops before any change, naming the registry and `docker login`.
#[test]
fn a_private_registrys_image_is_pulled_with_the_credentials_docker_login_left() {
    ensure_images();
    ensure_command("htpasswd", "apache2-utils");
    let s = TestStack::new("creds");
    let o = run(Command::new("htpasswd").args(["-nbB", "soul", "hunter2-secret"]));
    assert!(o.status.success(), "{}", text(&o));
    let mut registry = Registry::start_with(&s.dir, Some(o.stdout_text().trim()));
    let host = format!("127.0.0.1:{}", registry.port);
    // The docker CLI logs in (its own config dir) and pushes.
    let logged_in = s.dir.join("docker-auths");
    let mut login = Command::new("docker");
    login
        .arg("--config")
        .arg(&logged_in)
        .args(["login", &host, "-u", "soul", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = login.spawn().unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hunter2-secret")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let image = format!("{host}/{}-web:1", s.name);
    docker(&["tag", NGINX, &image]);
    let o = run(Command::new("docker")
        .arg("--config")
        .arg(&logged_in)
        .args(["push", "-q", &image]));
    assert!(o.status.success(), "{}", text(&o));
    docker(&["rmi", &image]);
    s.write(&stack_kdl(&image, free_port()));

    // No credentials: refused before anything exists, saying what to do.
    let nothing = s.dir.join("docker-empty");
    std::fs::create_dir_all(&nothing).unwrap();
    let o = s
        .command(&["apply"])
        .env("DOCKER_CONFIG", &nothing)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    o.stderr_has(&format!("docker login {host}"));
    assert!(s.containers().is_empty(), "{:?}", s.containers());

    // `docker login`'s auths.
    let o = s
        .command(&["apply"])
        .env("DOCKER_CONFIG", &logged_in)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("hunter2"),
        "the password is in the output"
    );
    assert!(s.container_id("web", "app").is_some());
    let digest = locked(&s, &image).expect("locked");

    // A credential helper (`credHelpers`), the image pulled again.
    s.soul(&["down"]);
    let pulled = format!("{host}/{}-web@{digest}", s.name);
    docker(&["rmi", &pulled]);
    let helped = s.dir.join("docker-helper");
    let bin = s.dir.join("bin");
    std::fs::create_dir_all(&helped).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        helped.join("config.json"),
        format!("{{\"credHelpers\":{{\"{host}\":\"soultest\"}}}}"),
    )
    .unwrap();
    let helper = bin.join("docker-credential-soultest");
    std::fs::write(
        &helper,
        "#!/bin/sh\nread server\nprintf '{\"ServerURL\":\"%s\",\"Username\":\"soul\",\"Secret\":\"hunter2-secret\"}' \"$server\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = s
        .command(&["apply"])
        .env("DOCKER_CONFIG", &helped)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(s.container_id("web", "app").is_some());
    s.soul(&["down"]);
    let _ = run(Command::new("docker").args(["rmi", &pulled]));
    registry.stop();
}
