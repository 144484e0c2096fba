//! Resolve: a validated [`Stack`] plus what only this machine knows (secret files, soul's
//! environment, soul's own image) → the [`Desired`] state the planner works towards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::machine::Machine;
use crate::pod::{
    ContainerSpec, EnvValue, HealthCheck, Mount, MountKind, NamedVolume, PodSpec, PortMap, Role,
    network_name,
};
use crate::stack::{EnvSource, Health, Sidecar, Stack, parse_duration};
use crate::transport::{self, PodContext};

use super::plan::{Desired, DesiredFile, ImageNeed, ImageSource};

/// soul's own image: the tag soul's parts run from, and the repository that marks an image
/// as soul's (built from the binary, never pulled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoulImage {
    /// `soul:<version>-<build>`: named by this binary's content (its build ID), so copies of
    /// one build share it, and other builds on the same engine neither re-tag it nor disturb
    /// the containers that run from it. The pause and gate containers, and apps whose stack
    /// names `soul` or `soul:<anything>`, run from it.
    pub reference: String,
}

impl SoulImage {
    pub const REPOSITORY: &str = "soul";

    pub fn current() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        let reference = match crate::runtime::binary_id() {
            Ok(id) => format!("{}:{version}-{}", Self::REPOSITORY, &id[..id.len().min(12)]),
            Err(_) => format!("{}:{version}", Self::REPOSITORY),
        };
        SoulImage { reference }
    }

    /// Whether `image` names soul's own image (`soul`, `soul:latest`, `soul:<version>`).
    pub fn is_soul(image: &str) -> bool {
        image == Self::REPOSITORY
            || image
                .strip_prefix(Self::REPOSITORY)
                .is_some_and(|rest| rest.starts_with(':'))
    }
}

/// Why the stack cannot be resolved on this machine (checked before any Docker call).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// stack.lock cannot be read.
    #[error("{}: {why} (it is written by soul: restore it from git, or delete it to lock the images anew)", path.display())]
    Lock { path: PathBuf, why: String },
    /// An `env … file=` names a file that cannot be read.
    #[error("sidecar `{sidecar}`, env `{env}`: cannot read {path}: {source}")]
    EnvFile {
        sidecar: String,
        env: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A transport needs a file or device this machine lacks.
    #[error(transparent)]
    Transport(#[from] transport::MachineError),
    /// An env value read from a file or soul's environment holds a NUL byte.
    #[error(
        "sidecar `{sidecar}`, env `{env}`: the value holds a NUL byte, which no process environment can carry; fix the file or variable it comes from"
    )]
    EnvNul { sidecar: String, env: String },
    /// `acme ca-file=` names a file that cannot be read.
    #[error(
        "`acme ca-file=`: cannot read {path}: {source}; give the PEM root of the ACME CA (only a test CA needs one)"
    )]
    AcmeCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bind mount names a host path this machine lacks (Docker would refuse the container).
    #[error(
        "sidecar `{sidecar}`, volume `{path}`: no such path on this machine; create it (`mkdir -p {path}`) or fix the path in stack.kdl"
    )]
    BindSource { sidecar: String, path: PathBuf },
    /// An `env … from-env=` names a variable soul's environment lacks.
    #[error(
        "sidecar `{sidecar}`, env `{env}`: soul's environment has no `{var}`; export it before running soul, or use file="
    )]
    EnvVar {
        sidecar: String,
        env: String,
        var: String,
    },
}

/// Resolves the stack into the pods, volumes, images and transport files this machine should
/// have. `state_dir` is where transport files live (containers bind-mount them from there).
pub fn resolve(
    stack: &Stack,
    machine: &dyn Machine,
    state_dir: &Path,
) -> Result<Desired, ResolveError> {
    let state_dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let drivers = transport::drivers(stack);
    for driver in &drivers {
        driver.check_machine(machine)?;
    }
    let mut files = Vec::new();
    let soul = SoulImage::current();
    let lan_ports = stack.lan_ports();
    let mut pods = Vec::new();
    let mut volumes = Vec::new();
    let mut external_volumes = Vec::new();
    let mut images: Vec<ImageNeed> = Vec::new();
    let mut need =
        |reference: &str, sidecar: &str| match images.iter_mut().find(|n| n.reference == reference)
        {
            Some(n) if !n.used_by.iter().any(|s| s == sidecar) => n.used_by.push(sidecar.into()),
            Some(_) => {}
            None => images.push(ImageNeed {
                reference: reference.into(),
                source: if SoulImage::is_soul(reference) {
                    ImageSource::Soul
                } else {
                    ImageSource::Registry
                },
                used_by: vec![sidecar.into()],
            }),
        };

    for (i, sidecar) in stack.sidecars.iter().enumerate() {
        let network = network_name(&stack.stack);
        // The LAN port leads to the gate, never to the app.
        let ports = lan_ports
            .as_ref()
            .map(|p| {
                vec![PortMap {
                    host: p[i],
                    container: stack.gate.port,
                }]
            })
            .unwrap_or_default();
        let mut guard: Vec<String> = vec![
            "pause".into(),
            "--gate-port".into(),
            stack.gate.port.to_string(),
        ];
        for port in drivers.iter().flat_map(|d| d.guard_udp()) {
            guard.extend(["--open-udp".into(), port.to_string()]);
        }
        // It lets in from outside the pod only the gate's port and replies to the pod's own
        // connections (crate::guard): the only container with NET_ADMIN that soul makes, and
        // it runs nothing but soul. Its health check asks the same command to check.
        let pause =
            ContainerSpec::in_pod(&stack.stack, &sidecar.name, Role::Pause, &soul.reference)
                .on_network(&network, ports)
                .command(guard.clone())
                .health(HealthCheck {
                    test: ["CMD".into(), "/soul".into()]
                        .into_iter()
                        .chain(guard)
                        .chain(["--check".into()])
                        .collect(),
                    interval_ms: 30_000,
                    timeout_ms: 5_000,
                    retries: 1,
                })
                .privileges("NET_ADMIN", &[]);
        need(&pause.image, &sidecar.name);

        if let Some(v) = sidecar
            .volumes
            .iter()
            .find(|v| v.is_bind() && !machine.exists(&v.source))
        {
            return Err(ResolveError::BindSource {
                sidecar: sidecar.name.clone(),
                path: v.source.clone().into(),
            });
        }
        let mounts: Vec<Mount> = sidecar
            .volumes
            .iter()
            .map(|v| {
                let (kind, source) = if v.is_bind() {
                    (MountKind::Bind, v.source.clone())
                } else if v.external {
                    if !external_volumes.contains(&v.source) {
                        external_volumes.push(v.source.clone());
                    }
                    (MountKind::Volume, v.source.clone())
                } else {
                    let volume = NamedVolume::declared(&stack.stack, &v.source);
                    let name = volume.name.clone();
                    if !volumes.contains(&volume) {
                        volumes.push(volume);
                    }
                    (MountKind::Volume, name)
                };
                Mount {
                    kind,
                    source,
                    target: v.target.clone(),
                    read_only: v.read_only,
                }
            })
            .collect();
        // `soul:latest` in a stack means this soul's own image (the demo app).
        let image = if SoulImage::is_soul(&sidecar.image) {
            &soul.reference
        } else {
            &sidecar.image
        };
        let mut app = ContainerSpec::in_pod(&stack.stack, &sidecar.name, Role::App, image);
        app.command = sidecar.command.clone();
        app.env = env_of(sidecar, machine)?;
        app.mounts = mounts;
        app.health = sidecar
            .health
            .as_ref()
            .map(|h| health_check(h, &sidecar.image));
        need(&app.image, &sidecar.name);
        let gate = gate_container(stack, sidecar, &soul, &state_dir, machine);
        if let Some(path) = stack.acme.as_ref().and_then(|a| a.ca_file.as_ref())
            && stack.public_name(&sidecar.name).is_some()
            && !files
                .iter()
                .any(|f: &DesiredFile| f.path == crate::state::layout::gate_file(ACME_CA_FILE))
        {
            let pem = machine
                .read_file(path)
                .map_err(|source| ResolveError::AcmeCa {
                    path: path.into(),
                    source,
                })?;
            files.push(DesiredFile::bytes(
                &crate::state::layout::gate_file(ACME_CA_FILE),
                "the ACME CA's root".into(),
                pem.into_bytes(),
            ));
        }
        let gate_state = gate_volume(stack, sidecar);
        if !volumes.contains(&gate_state) {
            volumes.push(gate_state);
        }
        let mut containers = vec![pause, app, gate];
        let ctx = PodContext::of(stack, sidecar, &state_dir);
        for driver in &drivers {
            let c = driver.contribute(&ctx);
            for spec in c.containers {
                need(&spec.image, &sidecar.name);
                containers.push(spec);
            }
            for v in c.volumes {
                if !volumes.contains(&v) {
                    volumes.push(v);
                }
            }
            for (path, bytes) in c.files {
                let what = format!("{} config for {}", driver.kind().as_str(), sidecar.name);
                files.push(DesiredFile::bytes(&path, what, bytes));
            }
        }
        pods.push(PodSpec {
            sidecar: sidecar.name.clone(),
            network,
            containers,
        });
    }
    let mut desired = Desired {
        stack: stack.stack.clone(),
        pods,
        volumes,
        external_volumes,
        images,
        files,
        stopped: BTreeSet::new(),
    };
    // Images run as stack.lock pins them (what is not locked yet, `prepare` locks).
    super::lock::pin(&mut desired, &read_lock(stack)?);
    Ok(desired)
}

/// The stack's lock file, or an empty lock when it has none.
pub fn read_lock(stack: &Stack) -> Result<super::lock::Lock, ResolveError> {
    let Some(path) = &stack.lock_file else {
        return Ok(super::lock::Lock::default());
    };
    match crate::files::read_bounded(path, 1 << 20) {
        Ok(bytes) => super::lock::Lock::parse(&String::from_utf8_lossy(&bytes)).map_err(|why| {
            ResolveError::Lock {
                path: path.clone(),
                why,
            }
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(super::lock::Lock::default()),
        Err(e) => Err(ResolveError::Lock {
            path: path.clone(),
            why: e.to_string(),
        }),
    }
}

/// The pod's front door: `soul gate` from soul's image in the pod's namespace, listening on
/// the gate port and forwarding to the app on 127.0.0.1. It reads the stack's public key and
/// the device registry from the state dir's `gate/` directory, mounted read-only (a directory,
/// so that soul's atomic renames reach it).
fn gate_container(
    stack: &Stack,
    sidecar: &Sidecar,
    soul: &SoulImage,
    state_dir: &Path,
    machine: &dyn Machine,
) -> ContainerSpec {
    const KEYS: &str = "/gate";
    const REDEEMED: &str = GATE_WRITABLE;
    const SPENT: &str = "/spent";
    const ACME: &str = "/acme";
    let port = stack.gate.port;
    // The gate bind-mounts the state dir: one deleted and made anew (another id) is a new
    // mount source, and the gate must be recreated to see it.
    let state_id = machine
        .read_file(
            &state_dir
                .join(crate::state::STATE_ID_FILE)
                .to_string_lossy(),
        )
        .unwrap_or_default();
    let mut command = vec![
        "gate".to_string(),
        "--stack".into(),
        stack.stack.clone(),
        "--listen".into(),
        format!("0.0.0.0:{port}"),
        "--upstream".into(),
        format!("127.0.0.1:{}", sidecar.port),
        "--keys".into(),
        KEYS.into(),
        "--sidecar".into(),
        sidecar.name.clone(),
        "--redeemed".into(),
        REDEEMED.into(),
        "--spent".into(),
        SPENT.into(),
    ];
    if stack.gate.tls_only {
        command.push("--tls-only".into());
    }
    // A public name: claimed at the relay, its certificate obtained by ACME into the state
    // dir's `acme/<sidecar>` (read-write: the account and the certificate live at home).
    let public = stack.public_name(&sidecar.name);
    if let Some(name) = &public {
        command.extend([
            "--public-name".into(),
            name.clone(),
            "--acme-dir".into(),
            format!("{ACME}/{}", sidecar.name),
        ]);
        let acme = stack.acme.clone().unwrap_or_default();
        if let Some(directory) = acme.directory {
            command.extend(["--acme-directory".into(), directory]);
        }
        if acme.ca_file.is_some() {
            command.extend(["--acme-ca".into(), format!("{KEYS}/{ACME_CA_FILE}")]);
        }
        if let Some(contact) = acme.contact {
            command.extend(["--acme-contact".into(), contact]);
        }
    }
    // With a relay, the gate's agent dials out to it: nothing new listens in the pod.
    if let Some(relay) = &stack.relay {
        command.extend(["--relay".into(), relay.endpoint.clone()]);
        if let Some(pin) = &relay.pin {
            command.extend(["--relay-pin".into(), pin.clone()]);
        }
    }
    let mut gate = ContainerSpec::in_pod(&stack.stack, &sidecar.name, Role::Gate, &soul.reference)
        .command(command)
        .bind(
            state_dir
                .join(crate::state::layout::GATE_DIR)
                .to_string_lossy()
                .into_owned(),
            KEYS,
            true,
        )
        // Its own volume: the relay agent's state (and the spent links of earlier versions).
        .volume(&gate_volume(stack, sidecar).name, REDEEMED)
        // The pairing links it has spent, in the state dir: they outlive the pod and its
        // volumes (`soul down --volumes`), so a used link stays used.
        .bind(
            state_dir
                .join(crate::state::layout::SPENT_DIR)
                .to_string_lossy()
                .into_owned(),
            SPENT,
            false,
        )
        .health(HealthCheck {
            test: vec![
                "CMD".into(),
                "/soul".into(),
                "probe".into(),
                format!("http://127.0.0.1:{port}{}", crate::gate::HEALTH_PATH),
            ],
            interval_ms: 10_000,
            timeout_ms: 2_000,
            retries: 3,
        });
    if public.is_some() {
        let acme = state_dir.join(crate::state::layout::ACME_DIR);
        gate = gate.bind(acme.to_string_lossy().into_owned(), ACME, false);
    }
    let state_id = state_id.trim();
    if !state_id.is_empty() {
        gate = gate.env("SOUL_STATE_ID", state_id);
    }
    // A bind mount holds on to the directory it was made from: `gate/` or `spent/` deleted and
    // written anew (a restored backup keeps its state.id) must recreate the gate, or it goes on
    // serving the old, deleted files.
    let mounted: Vec<String> = [
        crate::state::layout::GATE_DIR,
        crate::state::layout::SPENT_DIR,
    ]
    .iter()
    .filter_map(|d| machine.identity(&state_dir.join(d).to_string_lossy()))
    .collect();
    if !mounted.is_empty() {
        gate = gate.env("SOUL_MOUNTS", mounted.join(","));
    }
    gate
}

/// In the gate's directory: the ACME CA's root (`acme ca-file=`), which the gate trusts for the
/// directory's HTTPS.
pub const ACME_CA_FILE: &str = "acme-ca.pem";

/// The file inside a gate that says its relay agent is registered (on the gate's volume).
pub fn gate_relay_state() -> String {
    format!("{GATE_WRITABLE}/{}", crate::relay::agent::STATE_FILE)
}

/// The file inside a gate that says a newer registration at the relay replaced its agent's.
pub fn gate_relay_replaced() -> String {
    format!("{GATE_WRITABLE}/{}", crate::relay::agent::REPLACED_FILE)
}

/// Where a gate records that its registration replaced another machine's at the relay.
pub fn gate_relay_took_over() -> String {
    format!("{GATE_WRITABLE}/{}", crate::relay::agent::TOOK_OVER_FILE)
}

/// Where the gate's volume is mounted: the gate writes there (redeemed links, relay state).
const GATE_WRITABLE: &str = "/redeemed";

/// The gate's own volume in a pod (its record of redeemed pairing links).
fn gate_volume(stack: &Stack, sidecar: &Sidecar) -> NamedVolume {
    NamedVolume::state(&stack.stack, &sidecar.name, "gate")
}

fn env_of(
    sidecar: &Sidecar,
    machine: &dyn Machine,
) -> Result<BTreeMap<String, EnvValue>, ResolveError> {
    let mut env = BTreeMap::new();
    for e in &sidecar.env {
        let value = match e.source() {
            EnvSource::Literal(v) => EnvValue {
                value: v.into(),
                sensitive: false,
            },
            EnvSource::File(path) => {
                let content = machine
                    .read_file(path)
                    .map_err(|source| ResolveError::EnvFile {
                        sidecar: sidecar.name.clone(),
                        env: e.name.clone(),
                        path: path.into(),
                        source,
                    })?;
                // Secret files usually end with one newline that is not part of the secret.
                let value = content
                    .strip_suffix('\n')
                    .map(|s| s.strip_suffix('\r').unwrap_or(s))
                    .unwrap_or(&content);
                EnvValue {
                    value: value.into(),
                    sensitive: true,
                }
            }
            EnvSource::FromEnv(var) => EnvValue {
                value: machine.env_var(var).ok_or_else(|| ResolveError::EnvVar {
                    sidecar: sidecar.name.clone(),
                    env: e.name.clone(),
                    var: var.into(),
                })?,
                sensitive: true,
            },
        };
        if value.value.contains('\0') {
            return Err(ResolveError::EnvNul {
                sidecar: sidecar.name.clone(),
                env: e.name.clone(),
            });
        }
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

/// A Docker health check from `health`. An HTTP URL is probed with soul's own prober in
/// soul's image, and with curl or wget (whichever the image has) in any other image.
fn health_check(h: &Health, image: &str) -> HealthCheck {
    let ms = |d: &Option<String>, default: u64| {
        d.as_deref()
            .and_then(parse_duration)
            .map_or(default, |d| d.as_millis() as u64)
    };
    let test = match (&h.url, &h.cmd) {
        (Some(url), _) if SoulImage::is_soul(image) => {
            vec!["CMD".into(), "/soul".into(), "probe".into(), url.clone()]
        }
        (Some(url), _) => {
            let q = shell_quote(url);
            vec![
                "CMD-SHELL".into(),
                format!("curl -fsS -o /dev/null {q} || wget -q -O /dev/null {q}"),
            ]
        }
        (None, cmd) => vec!["CMD-SHELL".into(), cmd.clone().unwrap_or_default()],
    };
    HealthCheck {
        test,
        interval_ms: ms(&h.interval, 10_000),
        timeout_ms: ms(&h.timeout, 5_000),
        retries: h.retries.unwrap_or(3),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::NetworkMode;
    use crate::stack::parse;

    struct Fake;
    impl Machine for Fake {
        fn read_file(&self, path: &str) -> std::io::Result<String> {
            match path {
                "/run/secrets/db" => Ok("s3cret\n".into()),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file",
                )),
            }
        }
        fn env_var(&self, name: &str) -> Option<String> {
            (name == "KEY").then(|| "k".into())
        }
        fn exists(&self, path: &str) -> bool {
            path == "/run/secrets/ts"
        }
    }

    const SRC: &str = r#"stack "home"
sidecar "notes" {
    image "nginx:1"
    port 80
    env "DB" file="/run/secrets/db"
    env "API" from-env="KEY"
    env "TZ" "UTC"
    volume "data" "/data"
    health "http://127.0.0.1:80/"
}
sidecar "demo" {
    image "soul:latest"
    port 8080
    volume "data" "/shared" read-only=#true
    health "http://127.0.0.1:8080/healthz"
}
"#;

    #[test]
    fn pods_volumes_and_images() {
        let stack = parse("s", SRC).unwrap_or_else(|d| panic!("{d}"));
        let d = resolve(&stack, &Fake, Path::new("/state")).expect("resolves");
        assert_eq!(d.pods.len(), 2);
        let notes = &d.pods[0];
        assert_eq!(notes.network, "soul_home");
        let (pause, app, gate) = (
            &notes.containers[0],
            &notes.containers[1],
            &notes.containers[2],
        );
        assert_eq!(pause.role, Role::Pause);
        // The LAN port leads to the gate port, not to the app's port 80.
        assert_eq!(
            pause.ports,
            vec![PortMap {
                host: 8443,
                container: 8443
            }]
        );
        // The pause container guards the app's port and leaves only the gate's open.
        assert_eq!(
            pause.command.as_ref().unwrap().join(" "),
            "pause --gate-port 8443"
        );
        assert!(pause.health.as_ref().unwrap().test.ends_with(&[
            "--gate-port".into(),
            "8443".into(),
            "--check".into()
        ]));
        assert_eq!(pause.cap_add, ["NET_ADMIN"]);
        assert_eq!(gate.role, Role::Gate);
        assert_eq!(
            gate.network_mode,
            NetworkMode::Container("soul_home_notes_pause".into())
        );
        let cmd = gate.command.clone().unwrap().join(" ");
        assert_eq!(
            cmd,
            "gate --stack home --listen 0.0.0.0:8443 --upstream 127.0.0.1:80 --keys /gate --sidecar notes --redeemed /redeemed --spent /spent"
        );
        assert_eq!(gate.mounts[0].source, "/state/gate");
        assert!(gate.mounts[0].read_only && gate.env.is_empty());
        // Redeemed pairing links are recorded on the gate's own volume, kept like app data.
        assert_eq!(gate.mounts[1].source, "soul-state_home_notes_gate");
        assert!(!gate.mounts[1].read_only);
        assert_eq!(
            gate.health.as_ref().unwrap().test[3],
            "http://127.0.0.1:8443/.soul/health"
        );
        assert_eq!(d.pods[1].containers[0].ports[0].host, 8444);
        assert_eq!(
            app.network_mode,
            NetworkMode::Container("soul_home_notes_pause".into())
        );
        assert_eq!(app.env["DB"].value, "s3cret");
        assert!(app.env["DB"].sensitive && app.env["API"].sensitive && !app.env["TZ"].sensitive);
        assert_eq!(app.mounts[0].source, "soul_home_data");
        assert_eq!(
            d.volumes
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            [
                "soul_home_data",
                "soul-state_home_notes_gate",
                "soul-state_home_demo_gate"
            ]
        );
        assert_eq!(app.restart, "unless-stopped");
        assert!(app.health.as_ref().unwrap().test[1].contains("curl"));
        let demo_app = &d.pods[1].containers[1];
        assert_eq!(
            demo_app.health.as_ref().unwrap().test[..3],
            ["CMD", "/soul", "probe"]
        );
        let refs: Vec<(&str, ImageSource)> = d
            .images
            .iter()
            .map(|i| (i.reference.as_str(), i.source))
            .collect();
        assert!(refs.contains(&("nginx:1", ImageSource::Registry)));
        // `soul:latest` in the stack is this soul's own image, by content.
        let soul = SoulImage::current().reference;
        assert_eq!(demo_app.image, soul);
        assert!(refs.contains(&(soul.as_str(), ImageSource::Soul)));
        assert!(!refs.iter().any(|(r, _)| *r == "soul:latest"), "{refs:?}");
        let pause_need = d.images.iter().find(|i| i.reference == soul).unwrap();
        assert_eq!(pause_need.used_by, vec!["notes".to_string(), "demo".into()]);
    }

    #[test]
    fn missing_secret_file_names_sidecar_env_and_path() {
        let src = SRC.replace("/run/secrets/db", "/nope");
        let stack = parse("s", &src).unwrap();
        let e = resolve(&stack, &Fake, Path::new("/state"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("notes") && e.contains("DB") && e.contains("/nope"),
            "{e}"
        );
        let src = SRC.replace("from-env=\"KEY\"", "from-env=\"MISSING\"");
        let e = resolve(&parse("s", &src).unwrap(), &Fake, Path::new("/state"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MISSING") && e.contains("API"), "{e}");
    }

    #[test]
    fn transport_secret_files_and_tun_are_checked() {
        let base = "stack \"h\"\nsidecar \"x\" { image \"i\"; port 80; }\n";
        let ts = |body: &str| parse("s", &format!("{base}transport {{ {body} }}\n")).unwrap();
        let e = resolve(
            &ts("tailscale authkey-file=\"/nope\" { userspace #true; }"),
            &Fake,
            Path::new("/s"),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`tailscale`") && msg.contains("/nope") && msg.contains("authkey-file"),
            "{msg}"
        );
        // Fake has no /dev/net/tun: kernel mode names the fix.
        let e = resolve(
            &ts("tailscale authkey-file=\"/run/secrets/ts\""),
            &Fake,
            Path::new("/s"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("userspace #true"), "{e}");
        let d = resolve(
            &ts("tailscale authkey-file=\"/run/secrets/ts\" { userspace #true; }"),
            &Fake,
            Path::new("/s"),
        )
        .unwrap();
        assert_eq!(d.pods[0].containers[3].name, "soul_h_x_tailscale");
    }

    #[test]
    fn soul_image_names() {
        assert!(SoulImage::is_soul("soul"));
        assert!(SoulImage::is_soul("soul:latest"));
        assert!(!SoulImage::is_soul("soulful:1"));
        assert!(!SoulImage::is_soul("ghcr.io/x/soul:1"));
    }

    /// Every container keeps the config hash it had before the container builder and the
    /// transport rooms (soul 0.1's specs): a refactor that changed a spec would recreate every
    /// user's containers on upgrade. Changed on purpose once since: nebula's config gained
    /// `punchy.respond` (a peer that cannot reach the pod first still gets a tunnel), which
    /// recreates nebula containers once on upgrade; and the gate records spent pairing links
    /// in the state dir's `spent/` (they outlived `soul down --volumes` nowhere else), which
    /// recreates gates once on upgrade (each reads its volume's earlier record too); and a
    /// tailnet node's serve config left its hash (containerboot reloads it by itself) while
    /// its state volume took the name of its identity (tags, control server), which recreates
    /// tailscale containers once on upgrade, and gives a node with tags or a Headscale server
    /// a new node state once (the old volume is kept and reported).
    const EXPECTED_HASHES: [&str; 12] = [
        "pause b5c47e1482b475c7639cde711fedf31f",
        "app c35aa7bb8dddabcc2045da8ef225a9a7",
        "gate 0ad2283b0b949ce88a4902abc56fb03d",
        "tailscale 22795c7ed7ccb2e44995fdd5166346aa",
        "nebula 4a6419f4c7b9c9956e6bd0244eb11efe",
        "tor 3e410b0c7ad1a43253c58e1520ee371c",
        "pause b5c47e1482b475c7639cde711fedf31f",
        "app c35aa7bb8dddabcc2045da8ef225a9a7",
        "gate 0ad2283b0b949ce88a4902abc56fb03d",
        "tailscale 6d2af4cf4f7c56aa24392110ed74f4fa",
        "nebula 4a6419f4c7b9c9956e6bd0244eb11efe",
        "tor 3e410b0c7ad1a43253c58e1520ee371c",
    ];

    #[test]
    fn config_hashes_of_every_transport_are_what_they_were() {
        struct Everything;
        impl Machine for Everything {
            fn read_file(&self, _: &str) -> std::io::Result<String> {
                Ok("secret".into())
            }
            fn env_var(&self, _: &str) -> Option<String> {
                None
            }
            fn exists(&self, _: &str) -> bool {
                true
            }
        }
        let kdl = |tailnet: &str| {
            format!(
                "stack \"allt\"\nsidecar \"web\" {{\n  image \"nginx:1\"\n  port 80\n  volume \"data\" \"/data\"\n  env \"K\" file=\"/s\"\n}}\ntransport {{\n  lan port=9000\n  {tailnet}\n  nebula lighthouse=\"1.2.3.4:4242\" lighthouse-ip=\"10.9.0.1\" ip=\"10.9.0.5/24\" ca-file=\"/etc/n/ca.crt\" cert-file=\"/etc/n/h.crt\" key-file=\"/etc/n/h.key\"\n  tor\n}}\n"
            )
        };
        let mut hashes = vec![];
        for tailnet in [
            "tailscale authkey-file=\"/run/secrets/ts\" tags=\"tag:x\" userspace=#true",
            "headscale url=\"https://hs.example\" authkey-file=\"/run/secrets/hs\"",
        ] {
            let stack = parse("s", &kdl(tailnet)).unwrap_or_else(|d| panic!("{d}"));
            let d = resolve(&stack, &Everything, Path::new("/var/lib/soul/allt")).unwrap();
            for c in d.pods.iter().flat_map(|p| &p.containers) {
                // soul's own image names this build: the rest of those specs is compared.
                let mut c = c.clone();
                if matches!(c.role, Role::Gate | Role::Pause) {
                    c.image = "soul".into();
                }
                hashes.push(format!("{} {}", c.role, c.config_hash()));
            }
        }
        assert_eq!(hashes, EXPECTED_HASHES);
    }
}
