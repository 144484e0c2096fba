//! Images from a registry, pinned in stack.lock: a real registry (Debian's `docker-registry`)
//! on loopback, which the engine allows without TLS, and a private one with TLS (the test's
//! own CA where the engine looks for it) and passwords. The stack's image exists only there; a
//! tag pushed again with other content moves nothing until `soul update` (or a watch with
//! `--update`); a stopped registry stops nothing whose locked images are here; what soul
//! pulled and no longer runs is listed and removed by `soul prune`, nothing else.

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
    /// With TLS: the CA's file, and the directory the engine reads it from
    /// (`/etc/docker/certs.d/<host:port>`, removed on drop).
    tls: Option<(PathBuf, PathBuf)>,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, None)
    }

    /// A registry with TLS (a certificate for 127.0.0.1 from a CA made here, placed where the
    /// engine looks for a registry's CA) that wants `htpasswd`'s user and password.
    fn start_private(dir: &Path, htpasswd: &str) -> Registry {
        ensure_command("openssl", "openssl");
        let port = free_port();
        let pki = dir.join("registry-pki");
        std::fs::create_dir_all(&pki).unwrap();
        let o = run(Command::new("sh").current_dir(&pki).arg("-ec").arg(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout ca.key -out ca.crt -days 2 -subj /CN=soul-test-registry-ca 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
             printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext
             openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
               -out server.crt -days 2 -extfile ext 2>/dev/null",
        ));
        assert!(o.status.success(), "openssl: {}", text(&o));
        let certs_d = PathBuf::from(format!("/etc/docker/certs.d/127.0.0.1:{port}"));
        std::fs::create_dir_all(&certs_d).unwrap();
        std::fs::copy(pki.join("ca.crt"), certs_d.join("ca.crt")).unwrap();
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            pki.join("server.crt").display(),
            pki.join("server.key").display()
        );
        Registry::start_on(
            dir,
            port,
            Some(htpasswd),
            &tls,
            Some((pki.join("ca.crt"), certs_d)),
        )
    }

    /// A registry that wants `htpasswd`'s user and password (basic auth).
    fn start_with(dir: &Path, htpasswd: Option<&str>) -> Registry {
        Registry::start_on(dir, free_port(), htpasswd, "", None)
    }

    fn start_on(
        dir: &Path,
        port: u16,
        htpasswd: Option<&str>,
        tls: &str,
        tls_files: Option<(PathBuf, PathBuf)>,
    ) -> Registry {
        ensure_command("docker-registry", "docker-registry");
        ensure_command("curl", "curl");
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
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
                storage.display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            child: None,
            port,
            config,
            tls: tls_files,
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
            let mut curl = Command::new("curl");
            curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
            let scheme = match &self.tls {
                Some((ca, _)) => {
                    curl.arg("--cacert").arg(ca);
                    "https"
                }
                None => "http",
            };
            let o = run(curl.arg(format!("{scheme}://127.0.0.1:{}/v2/", self.port)));
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
        if let Some((_, certs_d)) = &self.tls {
            let _ = std::fs::remove_dir_all(certs_d);
        }
    }
}

fn stack_kdl(image: &str, lan: u16) -> String {
    format!(
        "stack \"{{stack}}\"\nsidecar \"web\" {{\n    image \"{image}\"\n    port 80\n}}\nsidecar \"other\" {{\n    image \"{NGINX}\"\n    port 80\n}}\ntransport {{\n    lan port={lan}\n}}\n"
    )
}

/// An image of the test's own content (the test image with a label naming `s` and `v`), so
/// that no other image or test shares its ID; returns its local tag.
fn variant(s: &TestStack, v: &str) -> String {
    let context = s.dir.join(format!("variant-{v}"));
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {NGINX}\nLABEL soul.test.stack={} v={v}\n", s.name),
    )
    .unwrap();
    let tag = format!("{}-v{v}:1", s.name);
    docker(&["build", "-q", "-t", &tag, context.to_str().unwrap()]);
    tag
}

/// Pushes variant `v` as the stack's `web` image and leaves the registry the only holder.
fn push_web(s: &TestStack, registry: &Registry, v: &str) -> String {
    let local = variant(s, v);
    let reference = registry.push(&local, &format!("{}-web:1", s.name));
    docker(&["rmi", &local]);
    reference
}

/// Whether the engine has an image under `reference`.
fn engine_has(reference: &str) -> bool {
    run(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", reference]))
        .status
        .success()
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
    let image = push_web(&s, &registry, "1");
    let lan = free_port();
    s.write(&stack_kdl(&image, lan));
    let o = s.apply();
    o.stderr_has("stack.lock: locked");
    let first = locked(&s, &image).expect("the image is locked");
    assert!(first.starts_with("sha256:"), "{first}");
    let first_ref = format!("127.0.0.1:{}/{}-web@{first}", registry.port, s.name);
    // Not on a terminal: one line for the pull, when it is done.
    o.stdout_has(&format!("pulled {first_ref}: "));
    assert_eq!(
        locked(&s, NGINX).as_deref(),
        Some("local"),
        "an imported image is local"
    );
    let web = s.container_id("web", "app").expect("the app runs");
    assert_eq!(
        inspect(&web, "{{.Config.Image}}"),
        format!("127.0.0.1:{}/{}-web@{first}", registry.port, s.name)
    );
    let lock_bytes = read(s.dir.join("stack.lock"));
    s.apply().stdout_has("0 changes");
    assert_eq!(read(s.dir.join("stack.lock")), lock_bytes, "byte-identical");
    // Another machine's worth of state (its own state dir and containers), given the
    // committed stack.kdl and stack.lock: the same lock, byte for byte, and the same bytes run.
    let elsewhere = TestStack::new("lock2");
    elsewhere.write(&stack_kdl(&image, free_port()));
    std::fs::write(elsewhere.dir.join("stack.lock"), &lock_bytes).unwrap();
    elsewhere.apply();
    assert_eq!(read(elsewhere.dir.join("stack.lock")), lock_bytes);
    assert_eq!(
        inspect(
            &elsewhere.container_id("web", "app").unwrap(),
            "{{.Config.Image}}"
        ),
        first_ref
    );
    elsewhere.soul(&["down"]);

    // The tag pushed again with other content: apply runs what the lock says.
    push_web(&s, &registry, "2");
    let o = s.soul(&["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // soul update moves it, says so, and apply recreates only that app.
    let other = s.container_id("other", "app").unwrap();
    let o = s.soul(&["update"]);
    assert!(o.status.success(), "{}", text(&o));
    o.stdout_has(&format!("web: {image} "));
    let second = locked(&s, &image).unwrap();
    assert_ne!(second, first);
    // plan says that what runs differs from the lock: web's app is recreated, nothing else.
    let o = s.soul(&["plan", "--detailed-exitcode"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    o.stdout_has(&format!("{}-web@{second}", s.name));
    assert!(!o.stdout_text().contains("_other_app"), "{}", text(&o));
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
    // What the first lock ran is unused now: status lists it, prune removes it, and nothing
    // soul did not pull (the test image the variants are built on).
    s.soul(&["status"])
        .stdout_has(&format!("    {first_ref}\n"));
    let o = s.soul(&["prune"]);
    o.stdout_has(&format!("- image {first_ref}"));
    assert!(!engine_has(&first_ref), "{first_ref} is still here");
    assert!(engine_has(NGINX));
    let second_ref = format!("127.0.0.1:{}/{}-web@{second}", registry.port, s.name);
    assert!(engine_has(&second_ref), "prune removed what runs");
    assert!(!s.soul(&["status"]).stdout_text().contains("unused images"));

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
    o.stderr_has("cannot be reached");
    assert_eq!(s.containers(), before, "nothing changed");
    // A tag the registry does not have: refused, saying so.
    registry.resume();
    s.write(&stack_kdl(&missing, lan));
    let o = s.soul(&["apply"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    o.stderr_has(&format!("has no image {missing}"));
    assert_eq!(s.containers(), before, "nothing changed");
    // A digest pinned in stack.kdl that the registry does not hold: refused, nothing changed.
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
    // Down with --images: what soul pulled for the stack goes with it.
    s.soul(&["down", "--images"])
        .stdout_has(&format!("- image {second_ref}"));
    assert!(!engine_has(&second_ref));
    assert!(engine_has(NGINX));
}

/// `soul watch --update`: a tag pushed again is noticed within the interval, stack.lock moves,
/// one line says so, and the app is recreated on the new content.
#[test]
fn a_watch_with_update_moves_the_lock_and_the_app_when_a_tag_moves() {
    ensure_images();
    let s = TestStack::new("lockwatch");
    let registry = Registry::start(&s.dir);
    let image = push_web(&s, &registry, "1");
    s.write(&stack_kdl(&image, free_port()));
    s.apply();
    let first = locked(&s, &image).expect("locked");
    let web = s.container_id("web", "app").expect("web runs");
    let log = s.dir.join("watch.log");
    let _watch = Running(
        s.command(&["watch", "--update", "1s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Its first pass runs what stack.lock says (a watch once ran the tags instead).
    wait_until(
        Duration::from_secs(30),
        || read(&log).contains("reconciled in"),
        || format!("no pass:\n{}", read(&log)),
    );
    assert_eq!(
        s.container_id("web", "app"),
        Some(web.clone()),
        "{}",
        read(&log)
    );
    push_web(&s, &registry, "2");
    wait_until(
        Duration::from_secs(60),
        || {
            locked(&s, &image).is_some_and(|d| d != first)
                && s.container_id("web", "app").is_some_and(|id| id != web)
        },
        || format!("the watch did not move web:\n{}", read(&log)),
    );
    let second = locked(&s, &image).unwrap();
    let said = read(&log);
    assert!(
        said.contains(&format!("image update: web: {image} ")),
        "{said}"
    );
    assert_eq!(
        inspect(&s.container_id("web", "app").unwrap(), "{{.Config.Image}}"),
        format!("127.0.0.1:{}/{}-web@{second}", registry.port, s.name)
    );
    drop(_watch);
    s.soul(&["down", "--images"]);
}

/// A registry with TLS that wants credentials: soul finds them as the docker CLI does, in
/// `$DOCKER_CONFIG/config.json`'s `auths` and through a credential helper it names; without any,
/// or with a wrong password, apply stops before any change, naming the registry and
/// `docker login`.
#[test]
fn a_private_registrys_image_is_pulled_with_the_credentials_docker_login_left() {
    ensure_images();
    ensure_command("htpasswd", "apache2-utils");
    let s = TestStack::new("creds");
    let o = run(Command::new("htpasswd").args(["-nbB", "soul", "hunter2-secret"]));
    assert!(o.status.success(), "{}", text(&o));
    let mut registry = Registry::start_private(&s.dir, o.stdout_text().trim());
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

    // A wrong password: the same, and the password is not repeated.
    let wrong = s.dir.join("docker-wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("soul:not-the-password");
    std::fs::write(
        wrong.join("config.json"),
        format!("{{\"auths\":{{\"{host}\":{{\"auth\":\"{basic}\"}}}}}}"),
    )
    .unwrap();
    let o = s
        .command(&["apply"])
        .env("DOCKER_CONFIG", &wrong)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    o.stderr_has(&format!("docker login {host}"));
    assert!(!text(&o).contains("not-the-password"), "{}", text(&o));
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
