//! The executor: carries out a [`Plan`] step by step against an [`Engine`]. It decides
//! nothing; the plan already holds every decision.

use crate::pod::ContainerSpec;

use super::plan::{Plan, Step};

/// The mutating calls a plan needs. The Docker runtime implements it; unit tests use a fake.
#[allow(async_fn_in_trait)]
pub trait Engine {
    type Error: std::error::Error + Send + Sync + 'static;
    async fn build_soul_image(&self, tags: &[String]) -> Result<(), Self::Error>;
    async fn pull_image(&self, image: &str) -> Result<(), Self::Error>;
    async fn create_volume(&self, name: &str, stack: &str) -> Result<(), Self::Error>;
    async fn create_network(
        &self,
        name: &str,
        stack: &str,
        sidecar: &str,
    ) -> Result<(), Self::Error>;
    async fn create_container(&self, spec: &ContainerSpec) -> Result<(), Self::Error>;
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

/// Runs every step in order; `on_step` hears about each one before it runs.
pub async fn execute<E: Engine>(
    engine: &E,
    stack: &str,
    plan: &Plan,
    mut on_step: impl FnMut(usize, &Step),
) -> Result<(), ExecuteError> {
    for (i, step) in plan.steps.iter().enumerate() {
        on_step(i, step);
        let result = match step {
            Step::BuildSoulImage { tags } => engine.build_soul_image(tags).await,
            Step::PullImage { image, .. } => engine.pull_image(image).await,
            Step::CreateVolume { name } => engine.create_volume(name, stack).await,
            Step::CreateNetwork { name, sidecar } => {
                engine.create_network(name, stack, sidecar).await
            }
            Step::RemoveContainer { id, .. } => engine.remove_container(id).await,
            Step::CreateContainer { spec, .. } => engine.create_container(spec).await,
            Step::StartContainer { name, .. } => engine.start_container(name).await,
            Step::RemoveNetwork { name } => engine.remove_network(name).await,
        };
        if let Err(e) = result {
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
                source: Box::new(e),
            });
        }
    }
    Ok(())
}
