//! `plan()` as a table of situations → steps, and a property: applying a plan to a model of
//! the engine always converges (the next plan is empty).

use std::collections::BTreeMap;

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::*;
use crate::pod::{EnvValue, NetworkMode, PortMap};

fn container(stack: &str, sidecar: &str, role: Role, image: &str, port: u16) -> ContainerSpec {
    let pause = crate::pod::container_name(stack, sidecar, Role::Pause);
    ContainerSpec {
        name: crate::pod::container_name(stack, sidecar, role),
        stack: stack.into(),
        sidecar: sidecar.into(),
        role,
        image: image.into(),
        command: None,
        env: BTreeMap::new(),
        mounts: vec![],
        network_mode: match role {
            Role::Pause => NetworkMode::Bridge(crate::pod::network_name(stack)),
            _ => NetworkMode::Container(pause),
        },
        ports: match role {
            Role::Pause => vec![PortMap {
                host: port,
                container: 80,
            }],
            _ => vec![],
        },
        health: None,
        restart: "unless-stopped".into(),
        cap_add: vec![],
        devices: vec![],
    }
}

fn pod(sidecar: &str, lan_port: u16) -> PodSpec {
    PodSpec {
        sidecar: sidecar.into(),
        network: crate::pod::network_name("home"),
        containers: vec![
            container("home", sidecar, Role::Pause, "soul:0", lan_port),
            container("home", sidecar, Role::App, "nginx:1", lan_port),
        ],
    }
}

fn desired(pods: Vec<PodSpec>) -> Desired {
    let mut images: Vec<ImageNeed> = Vec::new();
    for p in &pods {
        for c in &p.containers {
            if !images.iter().any(|i| i.reference == c.image) {
                images.push(ImageNeed {
                    reference: c.image.clone(),
                    source: if c.image.starts_with("soul") {
                        ImageSource::Soul
                    } else {
                        ImageSource::Registry
                    },
                    used_by: vec![p.sidecar.clone()],
                });
            }
        }
    }
    Desired {
        stack: "home".into(),
        pods,
        volumes: vec![crate::pod::NamedVolume::declared("home", "data")],
        external_volumes: vec![],
        images,
        stopped: Default::default(),
        files: vec![
            DesiredFile::bytes("stack.key", "stack key".into(), b"k".to_vec()),
            DesiredFile {
                path: "pairing/a/notes.png".into(),
                what: "pairing QR (png) for a/notes".into(),
                content: FileContent::Qr {
                    text: "soul://pair?x".into(),
                    format: QrFormat::Png,
                },
                // As the render index reports it once the file was rendered.
                hash: Some(Sha256::digest(b"Png:soul://pair?x").into()),
            },
        ],
    }
}

/// A model of the engine: applies one step to what is observed.
fn simulate(o: &mut Observed, step: &Step) {
    static IDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let counter = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match step {
        Step::BuildSoulImage { tags } => {
            for t in tags {
                o.images.insert(t.clone(), format!("sha256:{counter}"));
            }
        }
        Step::PullImage { image, .. } => {
            o.images.insert(image.clone(), format!("sha256:{counter}"));
        }
        Step::CreateVolume { name } => {
            o.volumes.insert(name.clone());
        }
        Step::CreateNetwork { name, .. } => {
            o.networks.insert(name.clone());
        }
        Step::RemoveNetwork { name, .. } => {
            o.networks.remove(name);
        }
        Step::RemoveDuplicateNetwork { id, .. } => o.duplicate_networks.retain(|(_, d)| d != id),
        Step::RemoveVolume { name } => {
            o.volumes.remove(name);
        }
        Step::RemoveContainer { id, .. } => o.containers.retain(|c| c.id != *id),
        Step::WriteFile { path, content, .. } => {
            let bytes = match content {
                FileContent::Bytes(b) => b.clone(),
                FileContent::Qr { text, format } => format!("{format:?}:{text}").into_bytes(),
            };
            o.files.insert(path.clone(), Sha256::digest(&bytes).into());
        }
        Step::RemoveFile { path } => {
            o.files.remove(path);
        }
        Step::CreateContainer { spec, .. } => {
            assert!(
                !o.containers.iter().any(|c| c.name == spec.name),
                "name clash creating {}",
                spec.name
            );
            assert!(
                o.images.contains_key(&spec.image),
                "image {} not present at create",
                spec.image
            );
            o.containers.push(ObservedContainer {
                id: format!("c{counter}"),
                name: spec.name.clone(),
                sidecar: Some(spec.sidecar.clone()),
                role: Some(spec.role),
                config_hash: Some(spec.config_hash()),
                owner: None,
                running: false,
                state: "created".into(),
                health: None,
                image: spec.image.clone(),
                image_id: o.images[&spec.image].clone(),
            });
        }
        Step::StartContainer { name, .. } => {
            let c = o
                .containers
                .iter_mut()
                .find(|c| c.name == *name)
                .expect("start of a container that exists");
            c.running = true;
            c.state = "running".into();
        }
    }
}

fn converge(d: &Desired, o: &mut Observed) -> Plan {
    let p = plan(d, o);
    for s in &p.steps {
        simulate(o, s);
    }
    p
}

fn summary(p: &Plan) -> Vec<String> {
    p.steps.iter().map(|s| s.to_string()).collect()
}

#[test]
fn from_nothing_creates_everything_in_order() {
    let d = desired(vec![pod("notes", 8443)]);
    let p = plan(&d, &Observed::default());
    assert_eq!(
        summary(&p),
        [
            "build soul's image soul:0 from this binary",
            "pull image nginx:1 (for notes)",
            "write stack.key: stack key",
            "write pairing/a/notes.png: pairing QR (png) for a/notes",
            "create volume soul_home_data",
            "create network soul_home",
            "create container soul_home_notes_pause from soul:0 (missing)",
            "start container soul_home_notes_pause (missing)",
            "create container soul_home_notes_app from nginx:1 (missing)",
            "start container soul_home_notes_app (missing)",
        ]
    );
}

#[test]
fn converged_plans_nothing() {
    let d = desired(vec![pod("notes", 8443), pod("wiki", 8444)]);
    let mut o = Observed::default();
    converge(&d, &mut o);
    assert!(plan(&d, &o).is_empty());
}

#[test]
fn situations() {
    type Change = fn(&mut Desired, &mut Observed);
    let table: &[(&str, Change, &[&str])] = &[
        (
            "app env changes: only the app is recreated",
            |d, _| {
                d.pods[0].containers[1].env.insert(
                    "TZ".into(),
                    EnvValue {
                        value: "UTC".into(),
                        sensitive: false,
                    },
                );
            },
            &[
                "remove container soul_home_notes_app (config changed)",
                "create container soul_home_notes_app from nginx:1 (config changed)",
                "start container soul_home_notes_app (config changed)",
            ],
        ),
        (
            "LAN port changes: pause and its dependents are recreated, dependents removed first",
            |d, _| {
                d.pods[0].containers[0].ports[0].host = 9000;
            },
            &[
                "remove container soul_home_notes_app (pod's pause container is new)",
                "remove container soul_home_notes_pause (config changed)",
                "create container soul_home_notes_pause from soul:0 (config changed)",
                "start container soul_home_notes_pause (config changed)",
                "create container soul_home_notes_app from nginx:1 (pod's pause container is new)",
                "start container soul_home_notes_app (pod's pause container is new)",
            ],
        ),
        (
            "app removed by hand: created again",
            |_, o| {
                o.containers.retain(|c| c.name != "soul_home_notes_app");
            },
            &[
                "create container soul_home_notes_app from nginx:1 (missing)",
                "start container soul_home_notes_app (missing)",
            ],
        ),
        (
            "app stopped: started",
            |_, o| {
                o.containers
                    .iter_mut()
                    .filter(|c| c.name == "soul_home_notes_app")
                    .for_each(|c| c.running = false);
            },
            &["start container soul_home_notes_app (not running)"],
        ),
        (
            "pause stopped: started, and the app recreated into its new namespace",
            |_, o| {
                o.containers
                    .iter_mut()
                    .filter(|c| c.name == "soul_home_notes_pause")
                    .for_each(|c| c.running = false);
            },
            &[
                "remove container soul_home_notes_app (pod's pause container is new)",
                "start container soul_home_notes_pause (not running)",
                "create container soul_home_notes_app from nginx:1 (pod's pause container is new)",
                "start container soul_home_notes_app (pod's pause container is new)",
            ],
        ),
        (
            "sidecar removed: its containers go; the stack's network and the volume stay",
            |d, _| {
                d.pods.pop();
            },
            &[
                "remove container soul_home_wiki_pause (no longer declared)",
                "remove container soul_home_wiki_app (no longer declared)",
            ],
        ),
        (
            "image tag moved: the app is recreated, the pause container is not",
            |_, o| {
                o.images.insert("nginx:1".into(), "sha256:new".into());
                o.images.insert("soul:0".into(), "sha256:newsoul".into());
            },
            &[
                "remove container soul_home_notes_app (image updated)",
                "create container soul_home_notes_app from nginx:1 (image updated)",
                "start container soul_home_notes_app (image updated)",
                "remove container soul_home_wiki_app (image updated)",
                "create container soul_home_wiki_app from nginx:1 (image updated)",
                "start container soul_home_wiki_app (image updated)",
            ],
        ),
        (
            "network removed by hand: recreated once, and every pod with it",
            |_, o| {
                o.networks.remove("soul_home");
            },
            &[
                "create network soul_home",
                "remove container soul_home_notes_app (pod's pause container is new)",
                "remove container soul_home_notes_pause (pod network is new)",
                "create container soul_home_notes_pause from soul:0 (pod network is new)",
                "start container soul_home_notes_pause (pod network is new)",
                "create container soul_home_notes_app from nginx:1 (pod's pause container is new)",
                "start container soul_home_notes_app (pod's pause container is new)",
                "remove container soul_home_wiki_app (pod's pause container is new)",
                "remove container soul_home_wiki_pause (pod network is new)",
                "create container soul_home_wiki_pause from soul:0 (pod network is new)",
                "start container soul_home_wiki_pause (pod network is new)",
                "create container soul_home_wiki_app from nginx:1 (pod's pause container is new)",
                "start container soul_home_wiki_app (pod's pause container is new)",
            ],
        ),
        (
            "a network name made twice by racing runs: the unused copy goes, nothing else",
            |_, o| {
                o.duplicate_networks
                    .push(("soul_home".into(), "0123456789abcdef".into()));
            },
            &["remove network 0123456789ab, an unused duplicate of soul_home"],
        ),
        (
            "a duplicate with a declared name is removed",
            |_, o| {
                let mut c = o.containers[1].clone();
                c.id = "dup".into();
                o.containers.push(c);
            },
            &["remove container soul_home_notes_app (no longer declared)"],
        ),
    ];
    for (what, change, expect) in table {
        let mut d = desired(vec![pod("notes", 8443), pod("wiki", 8444)]);
        let mut o = Observed::default();
        converge(&d, &mut o);
        change(&mut d, &mut o);
        let p = plan(&d, &o);
        assert_eq!(summary(&p), *expect, "{what}");
        converge(&d, &mut o);
        assert!(plan(&d, &o).is_empty(), "{what}: did not converge");
    }
}

#[test]
fn files_are_written_when_their_bytes_differ_or_are_unknown_and_removed_when_undesired() {
    let mut d = desired(vec![pod("notes", 8443)]);
    let mut o = Observed::default();
    converge(&d, &mut o);
    // Deleted, corrupted, and stray files.
    o.files.remove("pairing/a/notes.png");
    o.files.insert("stack.key".into(), [0; 32]);
    o.files.insert("pairing/bob/notes.uri".into(), [1; 32]);
    assert_eq!(
        summary(&plan(&d, &o)),
        [
            "write stack.key: stack key",
            "write pairing/a/notes.png: pairing QR (png) for a/notes",
            "remove pairing/bob/notes.uri",
        ]
    );
    converge(&d, &mut o);
    // A rendering whose result is not known yet is always written.
    d.files[1].hash = None;
    assert_eq!(
        summary(&plan(&d, &o)),
        ["write pairing/a/notes.png: pairing QR (png) for a/notes"]
    );
}

#[test]
fn a_missing_image_comes_before_anything_is_touched() {
    let mut d = desired(vec![pod("notes", 8443)]);
    let mut o = Observed::default();
    converge(&d, &mut o);
    d.pods[0].containers[1].image = "nginx:2".into();
    d.images.push(ImageNeed {
        reference: "nginx:2".into(),
        source: ImageSource::Registry,
        used_by: vec!["notes".into()],
    });
    let p = plan(&d, &o);
    assert!(matches!(&p.steps[0], Step::PullImage { image, .. } if image == "nginx:2"));
    assert!(p.steps[1..].iter().all(|s| !s.is_image()));
}

#[test]
fn plan_output_never_shows_env_values() {
    let mut d = desired(vec![pod("notes", 8443)]);
    d.pods[0].containers[1].env.insert(
        "DB_PASSWORD".into(),
        EnvValue {
            value: "hunter2".into(),
            sensitive: true,
        },
    );
    let p = plan(&d, &Observed::default());
    let text = summary(&p).join("\n");
    assert!(!text.contains("hunter2"));
}

fn arb_observed_change() -> impl Strategy<Value = u8> {
    0u8..8
}

proptest! {
    /// For random desired states and random damage to the engine, the plan converges in one go.
    #[test]
    fn any_plan_converges(
        sidecars in proptest::collection::btree_set("[a-e]", 1..5),
        first_ports in proptest::collection::vec(1000u16..1010, 5),
        damage in proptest::collection::vec((arb_observed_change(), 0usize..10), 0..6),
        old in proptest::collection::btree_set("[a-h]", 0..4),
    ) {
        let pods: Vec<PodSpec> = sidecars.iter().zip(&first_ports).map(|(s, p)| pod(s, *p)).collect();
        let d = desired(pods);
        // Start from a previous desired state (other sidecars), converged, then damaged.
        let prev = desired(old.iter().map(|s| pod(s, 2000)).collect());
        let mut o = Observed::default();
        converge(&prev, &mut o);
        for (kind, i) in damage {
            let n = o.containers.len().max(1);
            match kind {
                0 => { if !o.containers.is_empty() { o.containers.remove(i % n); } }
                1 => { if let Some(c) = o.containers.get_mut(i % n) { c.running = false; } }
                2 => { if let Some(c) = o.containers.get_mut(i % n) { c.config_hash = Some("stale".into()); } }
                3 => { let n = o.networks.iter().nth(i % o.networks.len().max(1)).cloned(); if let Some(n) = n { o.networks.remove(&n); } }
                4 => { o.images.insert("nginx:1".into(), format!("sha256:moved{i}")); }
                5 => { o.images.clear(); }
                6 => { if let Some(c) = o.containers.get(i % n).cloned() { let mut c = c; c.id = format!("dup{i}"); o.containers.push(c); } }
                _ => { o.volumes.clear(); }
            }
        }
        converge(&d, &mut o);
        let again = plan(&d, &o);
        prop_assert!(again.is_empty(), "not converged: {:?}", summary(&again));
        // Exactly one container per declared name.
        let mut names: Vec<&str> = o.containers.iter().map(|c| c.name.as_str()).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        prop_assert_eq!(before, names.len());
    }
}

#[test]
fn a_volume_soul_0_1_made_keeps_its_data_under_its_old_name() {
    let mut d = desired(vec![pod("notes", 8443)]);
    d.pods[0].containers[1].mounts.push(crate::pod::Mount {
        kind: MountKind::Volume,
        source: "soul_home_data".into(),
        target: "/data".into(),
        read_only: false,
    });
    // soul 0.1 made the volume under its old name (its containers go: their names changed).
    let mut o = Observed {
        volumes: BTreeSet::from(["soul-home-data".to_string()]),
        ..Observed::default()
    };
    converge(&d, &mut o);
    assert_eq!(
        o.volumes,
        BTreeSet::from(["soul-home-data".to_string()]),
        "no new, empty volume"
    );
    let bound = with_legacy_volumes(&d, &o);
    assert_eq!(
        bound.pods[0].containers[1].mounts[0].source,
        "soul-home-data"
    );
    assert!(plan(&d, &o).is_empty(), "{:?}", plan(&d, &o));
    // Once the new name exists too, it is the one mounted.
    o.volumes.insert("soul_home_data".into());
    assert_eq!(
        with_legacy_volumes(&d, &o).pods[0].containers[1].mounts[0].source,
        "soul_home_data"
    );
}

#[test]
fn foreign_objects_with_a_needed_name_are_conflicts_not_adopted() {
    let mut d = desired(vec![pod("notes", 8443)]);
    d.external_volumes = vec!["compose_notes-data".into()];
    let mut o = Observed {
        foreign: vec![
            Foreign {
                kind: ObjectKind::Volume,
                name: "soul_home_data".into(),
                owner: None,
            },
            Foreign {
                kind: ObjectKind::Network,
                name: "soul_home".into(),
                owner: Some("other".into()),
            },
            // Not a name this stack needs: no conflict.
            Foreign {
                kind: ObjectKind::Container,
                name: "unrelated".into(),
                owner: None,
            },
        ],
        ..Observed::default()
    };
    let p = plan(&d, &o);
    let text: Vec<String> = p.conflicts.iter().map(|c| c.to_string()).collect();
    assert_eq!(p.conflicts.len(), 3, "{text:#?}");
    assert!(text[0].contains("external=#true"), "{}", text[0]);
    assert!(text[1].contains("stack `other`"), "{}", text[1]);
    assert!(
        text[2].contains("docker volume create compose_notes-data"),
        "{}",
        text[2]
    );
    o.external_volumes.insert("compose_notes-data".into());
    assert_eq!(plan(&d, &o).conflicts.len(), 2);
}

#[test]
fn a_hundred_sidecars_make_one_network() {
    // One network per pod took one of the engine's ~30 default address pools each: a
    // 30-sidecar stack failed to apply beside one other network.
    let pods: Vec<PodSpec> = (0..100)
        .map(|i| pod(&format!("s{i}"), 9000 + i as u16))
        .collect();
    let p = plan(&desired(pods), &Observed::default());
    let networks: Vec<&Step> = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::CreateNetwork { .. }))
        .collect();
    assert_eq!(networks.len(), 1, "{networks:?}");
}
