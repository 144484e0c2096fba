//! The executor: carries out a [`Plan`] step by step against an [`Engine`]. It decides
//! nothing; the plan already holds every decision.

use sha2::{Digest, Sha256};

use crate::pairing::qr;
use crate::pod::ContainerSpec;
use crate::state::{RenderIndex, Rendered, StateDir, hex};

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
    async fn remove_network(&self, name: &str) -> Result<(), Self::Error>;
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

async fn run_steps<E: Engine>(
    engine: &E,
    state: &StateDir,
    stack: &str,
    plan: &Plan,
    renders: &mut RenderIndex,
    on_step: &mut impl FnMut(usize, &Step),
) -> Result<(), ExecuteError> {
    let owner = state.owner();
    for (i, step) in plan.steps.iter().enumerate() {
        on_step(i, step);
        let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match step {
            Step::WriteFile { path, content, .. } => write_file(state, path, content, renders),
            Step::RemoveFile { path } => {
                renders.files.remove(path);
                state.remove(path).map_err(Into::into)
            }
            other => run_engine_step(engine, stack, &owner, other)
                .await
                .map_err(Into::into),
        };
        if let Err(source) = result {
            let what = match step {
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
            return Err(ExecuteError {
                what,
                done: i,
                untouched: plan.steps[..i].iter().all(Step::is_image),
                source,
            });
        }
    }
    Ok(())
}

fn write_file(
    state: &StateDir,
    path: &str,
    content: &FileContent,
    renders: &mut RenderIndex,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match content {
        FileContent::Bytes(bytes) => state.write(path, bytes)?,
        FileContent::Qr { uri, format } => {
            let code = qr::encode(uri)?;
            let bytes = match format {
                QrFormat::Png => qr::png(&code)?,
                QrFormat::Svg => qr::svg(&code).into_bytes(),
                QrFormat::Text => qr::terminal(&code).into_bytes(),
            };
            state.write(path, &bytes)?;
            renders.files.insert(
                path.to_string(),
                Rendered {
                    source: hex(&Sha256::digest(uri.as_bytes())),
                    sha256: hex(&Sha256::digest(&bytes)),
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
        Step::PullImage { image, .. } => engine.pull_image(image).await,
        Step::CreateVolume { name } => engine.create_volume(name, stack).await,
        Step::CreateNetwork { name } => engine.create_network(name, stack).await,
        Step::RemoveContainer { id, .. } => engine.remove_container(id).await,
        Step::CreateContainer { spec, .. } => engine.create_container(spec, owner).await,
        Step::StartContainer { name, .. } => engine.start_container(name).await,
        Step::RemoveNetwork { name } => engine.remove_network(name).await,
        Step::RemoveDuplicateNetwork { id, .. } => engine.remove_network(id).await,
        Step::WriteFile { .. } | Step::RemoveFile { .. } => Ok(()),
    }
}
