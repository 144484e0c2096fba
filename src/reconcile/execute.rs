//! The executor: carries out a [`Plan`] step by step against an [`Engine`]. It decides
//! nothing; the plan already holds every decision.

use sha2::{Digest, Sha256};

use crate::pairing::qr;
use crate::pod::ContainerSpec;
use crate::state::{RenderIndex, Rendered, StateDir};

use super::plan::{FileContent, Plan, QrFormat, Step};

/// The mutating calls a plan needs. The Docker runtime implements it; unit tests use a fake.
#[allow(async_fn_in_trait)]
pub trait Engine {
    type Error: std::error::Error + Send + Sync + 'static;
    async fn build_soul_image(&self, tags: &[String]) -> Result<(), Self::Error>;
    async fn pull_image(&self, image: &str) -> Result<(), Self::Error>;
    async fn create_volume(&self, name: &str, stack: &str) -> Result<(), Self::Error>;
    async fn create_network(&self, name: &str, stack: &str) -> Result<(), Self::Error>;
    /// Creates a container, labelled with `owner`, the state dir it belongs to.
    async fn create_container(&self, spec: &ContainerSpec, owner: &str) -> Result<(), Self::Error>;
    async fn start_container(&self, name: &str) -> Result<(), Self::Error>;
    async fn remove_container(&self, id: &str) -> Result<(), Self::Error>;
    /// Removes a network by its name or ID.
    async fn remove_network(&self, name_or_id: &str) -> Result<(), Self::Error>;
    async fn remove_volume(&self, name: &str) -> Result<(), Self::Error>;
}

/// A step that failed, and how far the plan got.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ExecuteError {
    /// The failed step, described for people (never with secret values).
    pub what: String,
    /// How many steps completed before it.
    pub done: usize,
    /// Whether only image steps had run: nothing running was touched.
    pub untouched: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Runs every step in order; `on_step` hears about each one before it runs. File steps go to
/// `state`, whose render index is kept in step with the QR files written or removed.
pub async fn execute<E: Engine>(
    engine: &E,
    state: &StateDir,
    stack: &str,
    plan: &Plan,
    mut on_step: impl FnMut(usize, &Step),
) -> Result<(), ExecuteError> {
    let mut renders = state.read_render_index();
    let renders_before = renders.clone();
    let result = run_steps(engine, state, stack, plan, &mut renders, &mut on_step).await;
    if renders != renders_before {
        // Losing the index only costs a re-render next pass; the steps' outcome matters more.
        if let Err(e) = state.write_render_index(&renders) {
            tracing::warn!("cannot update the render index: {e}");
        }
    }
    result
}

/// How many images are pulled at once: the engine downloads each image's layers in parallel
/// already; a few images side by side keep a slow registry from serialising the rest.
pub const PULLS_AT_ONCE: usize = 3;

async fn run_steps<E: Engine>(
    engine: &E,
    state: &StateDir,
    stack: &str,
    plan: &Plan,
    renders: &mut RenderIndex,
    on_step: &mut impl FnMut(usize, &Step),
) -> Result<(), ExecuteError> {
    let owner = state.owner();
    let mut i = 0;
    while i < plan.steps.len() {
        // A run of pulls goes side by side, a lane each; a run of container creations and
        // starts over several pods goes pod by pod side by side, each pod's steps in order.
        let pulls = plan.steps[i..]
            .iter()
            .take_while(|s| matches!(s, Step::PullImage { .. }))
            .count();
        let (lanes, at_once) = if pulls > 1 {
            ((i..i + pulls).map(|k| vec![k]).collect(), PULLS_AT_ONCE)
        } else {
            (pod_lanes(&plan.steps, i, stack), PODS_AT_ONCE)
        };
        if lanes.len() > 1 {
            let owner = owner.as_str();
            side_by_side(plan, &lanes, at_once, on_step, |step| async move {
                match step {
                    Step::PullImage { image, .. } => pull(engine, state, image).await,
                    other => run_engine_step(engine, stack, owner, other)
                        .await
                        .map_err(Into::into),
                }
            })
            .await
            .map_err(|(k, source)| failed(plan, k, source))?;
            i += lanes.iter().map(Vec::len).sum::<usize>();
            continue;
        }
        let step = &plan.steps[i];
        on_step(i, step);
        let result: Result<(), StepError> = match step {
            Step::WriteFile { path, content, .. } => write_file(state, path, content, renders),
            Step::RemoveFile { path } => {
                renders.files.remove(path);
                state.remove(path).map_err(Into::into)
            }
            Step::PullImage { image, .. } => pull(engine, state, image).await,
            other => run_engine_step(engine, stack, &owner, other)
                .await
                .map_err(Into::into),
        };
        result.map_err(|source| failed(plan, i, source))?;
        i += 1;
    }
    Ok(())
}

type StepError = Box<dyn std::error::Error + Send + Sync>;

/// Pulls `image` and records that soul pulled it (what `soul prune` may remove later).
async fn pull<E: Engine>(engine: &E, state: &StateDir, image: &str) -> Result<(), StepError> {
    engine.pull_image(image).await?;
    state.record_pulled(image)?;
    Ok(())
}

/// How many pods' containers are created and started at once: pods share nothing but the
/// network (made before), and the engine does the work of each.
pub const PODS_AT_ONCE: usize = 4;

/// The pod whose container a step creates or starts.
fn pod_of<'a>(step: &'a Step, stack: &str) -> Option<&'a str> {
    match step {
        Step::CreateContainer { spec, .. } => Some(&spec.sidecar),
        Step::StartContainer { name, .. } => crate::pod::sidecar_in_name(stack, name),
        _ => None,
    }
}

/// The run of container creations and starts that begins at step `from`, as one lane of step
/// indices per pod (each in plan order), pods in order of first appearance.
fn pod_lanes(steps: &[Step], from: usize, stack: &str) -> Vec<Vec<usize>> {
    let mut lanes: Vec<(&str, Vec<usize>)> = Vec::new();
    for (k, step) in steps.iter().enumerate().skip(from) {
        let Some(pod) = pod_of(step, stack) else {
            break;
        };
        match lanes.iter_mut().find(|(p, _)| *p == pod) {
            Some((_, lane)) => lane.push(k),
            None => lanes.push((pod, vec![k])),
        }
    }
    lanes.into_iter().map(|(_, lane)| lane).collect()
}

/// Runs each lane's steps in order, `at_once` lanes at a time, each step announced as it
/// starts; the first failure (its index in the plan) stops the rest.
async fn side_by_side<'a, F, Fut>(
    plan: &'a Plan,
    lanes: &[Vec<usize>],
    at_once: usize,
    on_step: &mut impl FnMut(usize, &Step),
    run: F,
) -> Result<(), (usize, StepError)>
where
    F: Fn(&'a Step) -> Fut,
    Fut: std::future::Future<Output = Result<(), StepError>>,
{
    use futures_util::StreamExt as _;
    let on_step = std::cell::RefCell::new(on_step);
    let (on_step, run) = (&on_step, &run);
    let mut running = futures_util::stream::iter(lanes.iter().map(|lane| async move {
        for &k in lane {
            let step = &plan.steps[k];
            (*on_step.borrow_mut())(k, step);
            run(step).await.map_err(|e| (k, e))?;
        }
        Ok(())
    }))
    .buffer_unordered(at_once);
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(())
}

/// The error of step `i`, described for people.
fn failed(plan: &Plan, i: usize, source: StepError) -> ExecuteError {
    let what = match &plan.steps[i] {
        Step::PullImage { image, used_by } => format!(
            "cannot get image `{image}` for sidecar {}",
            used_by
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("cannot {other}"),
    };
    ExecuteError {
        what,
        done: i,
        untouched: plan.steps[..i].iter().all(Step::is_image),
        source,
    }
}

fn write_file(
    state: &StateDir,
    path: &str,
    content: &FileContent,
    renders: &mut RenderIndex,
) -> Result<(), StepError> {
    match content {
        FileContent::Bytes(bytes) => state.write(path, bytes)?,
        FileContent::Qr { text, format } => {
            let code = qr::encode(text)?;
            let bytes = match format {
                QrFormat::Png => qr::png(&code)?,
                QrFormat::Svg => qr::svg(&code).into_bytes(),
                QrFormat::Text => qr::terminal(&code).into_bytes(),
            };
            state.write(path, &bytes)?;
            renders.files.insert(
                path.to_string(),
                Rendered {
                    source: hex::encode(Sha256::digest(text.as_bytes())),
                    sha256: hex::encode(Sha256::digest(&bytes)),
                },
            );
        }
    }
    Ok(())
}

async fn run_engine_step<E: Engine>(
    engine: &E,
    stack: &str,
    owner: &str,
    step: &Step,
) -> Result<(), E::Error> {
    match step {
        Step::BuildSoulImage { tags } => engine.build_soul_image(tags).await,
        Step::CreateVolume { name } => engine.create_volume(name, stack).await,
        Step::CreateNetwork { name } => engine.create_network(name, stack).await,
        Step::RemoveContainer { id, .. } => engine.remove_container(id).await,
        Step::CreateContainer { spec, .. } => engine.create_container(spec, owner).await,
        Step::StartContainer { name, .. } => engine.start_container(name).await,
        Step::RemoveNetwork { name, id } => {
            engine.remove_network(id.as_ref().unwrap_or(name)).await
        }
        Step::RemoveVolume { name } => engine.remove_volume(name).await,
        Step::RemoveDuplicateNetwork { id, .. } => engine.remove_network(id).await,
        // Run by run_steps itself: they touch the state dir too.
        Step::PullImage { .. } | Step::WriteFile { .. } | Step::RemoveFile { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::Role;
    use crate::reconcile::plan::Reason;
    use std::sync::Mutex;

    /// An engine that records each call, and fails the one named `fail`.
    #[derive(Default)]
    struct FakeEngine {
        calls: Mutex<Vec<String>>,
        fail: Option<&'static str>,
    }

    impl FakeEngine {
        fn call(&self, what: String) -> Result<(), std::io::Error> {
            let failed = self.fail.is_some_and(|f| what.starts_with(f));
            self.calls.lock().unwrap().push(what);
            if failed {
                return Err(std::io::Error::other("the engine said no"));
            }
            Ok(())
        }
    }

    impl Engine for FakeEngine {
        type Error = std::io::Error;
        async fn build_soul_image(&self, tags: &[String]) -> Result<(), Self::Error> {
            self.call(format!("build {}", tags.join(",")))
        }
        async fn pull_image(&self, image: &str) -> Result<(), Self::Error> {
            self.call(format!("pull {image}"))
        }
        async fn create_volume(&self, name: &str, stack: &str) -> Result<(), Self::Error> {
            self.call(format!("volume {name} of {stack}"))
        }
        async fn create_network(&self, name: &str, stack: &str) -> Result<(), Self::Error> {
            self.call(format!("network {name} of {stack}"))
        }
        async fn create_container(
            &self,
            spec: &ContainerSpec,
            owner: &str,
        ) -> Result<(), Self::Error> {
            self.call(format!(
                "create {} owned by {}",
                spec.name,
                !owner.is_empty()
            ))
        }
        async fn start_container(&self, name: &str) -> Result<(), Self::Error> {
            self.call(format!("start {name}"))
        }
        async fn remove_container(&self, id: &str) -> Result<(), Self::Error> {
            self.call(format!("rm {id}"))
        }
        async fn remove_network(&self, name_or_id: &str) -> Result<(), Self::Error> {
            self.call(format!("rm-network {name_or_id}"))
        }
        async fn remove_volume(&self, name: &str) -> Result<(), Self::Error> {
            self.call(format!("rm-volume {name}"))
        }
    }

    fn plan() -> Plan {
        let spec = ContainerSpec::in_pod("s", "web", Role::App, "nginx:1");
        Plan {
            steps: vec![
                Step::PullImage {
                    image: "nginx:1".into(),
                    used_by: vec!["web".into()],
                },
                Step::CreateNetwork {
                    name: "soul_s".into(),
                },
                Step::WriteFile {
                    path: "pairing/a/web.uri".into(),
                    what: "pairing URI".into(),
                    content: FileContent::Bytes(b"soul://pair?x".to_vec()),
                },
                Step::WriteFile {
                    path: "pairing/a/web.png".into(),
                    what: "pairing QR".into(),
                    content: FileContent::Qr {
                        text: "soul://pair?x".into(),
                        format: QrFormat::Png,
                    },
                },
                Step::CreateContainer {
                    spec: Box::new(spec),
                    reason: Reason::Missing,
                },
                Step::StartContainer {
                    name: "soul_s_web_app".into(),
                    reason: Reason::Missing,
                },
                Step::RemoveNetwork {
                    name: "soul_old".into(),
                    id: Some("net-id".into()),
                },
            ],
            ..Plan::default()
        }
    }

    fn run(engine: &FakeEngine, state: &StateDir, plan: &Plan) -> Result<Vec<usize>, ExecuteError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut heard = vec![];
        rt.block_on(execute(engine, state, "s", plan, |i, _| heard.push(i)))
            .map(|()| heard)
    }

    #[test]
    fn steps_run_in_order_engine_steps_on_the_engine_and_files_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let engine = FakeEngine::default();
        let heard = run(&engine, &state, &plan()).unwrap();
        assert_eq!(heard, [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            *engine.calls.lock().unwrap(),
            [
                "pull nginx:1",
                "network soul_s of s",
                "create soul_s_web_app owned by true",
                "start soul_s_web_app",
                "rm-network net-id",
            ]
        );
        assert_eq!(state.read("pairing/a/web.uri").unwrap(), b"soul://pair?x");
        let png = state.read("pairing/a/web.png").unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        // The render index knows which URI the PNG was rendered from, so the next pass need
        // not render it again to know it is right.
        let index = state.read_render_index();
        let rendered = &index.files["pairing/a/web.png"];
        assert_eq!(
            rendered.source,
            hex::encode(Sha256::digest(b"soul://pair?x"))
        );
        assert_eq!(rendered.sha256, hex::encode(Sha256::digest(&png)));
    }

    #[test]
    fn a_failed_step_stops_the_plan_and_says_how_far_it_got() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let engine = FakeEngine {
            fail: Some("pull"),
            ..FakeEngine::default()
        };
        let e = run(&engine, &state, &plan()).unwrap_err();
        assert_eq!((e.done, e.untouched), (0, true), "nothing running touched");
        assert_eq!(
            e.what, "cannot get image `nginx:1` for sidecar `web`",
            "says what and for whom"
        );
        assert_eq!(
            engine.calls.lock().unwrap().len(),
            1,
            "nothing after it ran"
        );
        assert!(state.read("pairing/a/web.uri").is_err());

        let engine = FakeEngine {
            fail: Some("create"),
            ..FakeEngine::default()
        };
        let e = run(&engine, &state, &plan()).unwrap_err();
        assert_eq!((e.done, e.untouched), (4, false));
        assert!(
            e.what.starts_with("cannot create container soul_s_web_app"),
            "{}",
            e.what
        );
        assert!(e.to_string().contains("the engine said no"));
        // Files written before the failure stay, and the index says so.
        assert!(state.read("pairing/a/web.png").is_ok());
        assert!(
            state
                .read_render_index()
                .files
                .contains_key("pairing/a/web.png")
        );
    }

    #[test]
    fn pulls_and_pods_go_side_by_side_each_pod_in_its_order_and_pulls_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let pod = |sidecar: &str| {
            [
                Step::CreateContainer {
                    spec: Box::new(ContainerSpec::in_pod("s", sidecar, Role::App, "a:1")),
                    reason: Reason::Missing,
                },
                Step::StartContainer {
                    name: format!("soul_s_{sidecar}_app"),
                    reason: Reason::Missing,
                },
            ]
        };
        let mut steps = vec![
            Step::PullImage {
                image: "r.example/a@sha256:1".into(),
                used_by: vec!["web".into()],
            },
            Step::PullImage {
                image: "r.example/b@sha256:2".into(),
                used_by: vec!["db".into()],
            },
        ];
        steps.extend(pod("web"));
        steps.extend(pod("db"));
        steps.push(Step::RemoveNetwork {
            name: "soul_old".into(),
            id: None,
        });
        let plan = Plan {
            steps,
            ..Plan::default()
        };
        assert_eq!(pod_lanes(&plan.steps, 2, "s"), [vec![2, 3], vec![4, 5]]);
        let engine = FakeEngine::default();
        let mut heard = run(&engine, &state, &plan).unwrap();
        heard.sort();
        assert_eq!(heard, [0, 1, 2, 3, 4, 5, 6], "every step announced once");
        let calls = engine.calls.lock().unwrap().clone();
        let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
        assert!(at("create soul_s_web_app owned by true") < at("start soul_s_web_app"));
        assert!(at("create soul_s_db_app owned by true") < at("start soul_s_db_app"));
        assert_eq!(calls.last().unwrap(), "rm-network soul_old");
        assert_eq!(
            state.pulled().into_iter().collect::<Vec<_>>(),
            ["r.example/a@sha256:1", "r.example/b@sha256:2"]
        );

        let engine = FakeEngine {
            fail: Some("start soul_s_db"),
            ..FakeEngine::default()
        };
        let e = run(&engine, &state, &plan).unwrap_err();
        assert_eq!(e.done, 5, "{}", e.what);
        assert!(
            e.what.starts_with("cannot start container soul_s_db_app"),
            "{}",
            e.what
        );
        assert!(
            !engine
                .calls
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.starts_with("rm-network")),
            "nothing after the run ran"
        );
    }
}
