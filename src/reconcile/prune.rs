//! The images soul pulled for a stack that no container uses any longer (a tag `soul update`
//! moved, a sidecar removed, a stack taken down): listed by `soul status`, removed by
//! `soul prune` and `soul down --images`. Only references the state dir records as pulled by
//! soul ([`StateDir::pulled`]) are ever considered; an image another tag still names keeps its
//! content.

use serde::Serialize;

use crate::runtime::{Docker, RuntimeError};
use crate::state::StateDir;

/// A pulled image no container uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnusedImage {
    pub reference: String,
    pub size: u64,
}

/// The images soul pulled for this state dir that no container of the engine uses. References
/// whose images are gone (removed by anyone) are forgotten on the way.
pub async fn unused_images(
    docker: &Docker,
    state: &StateDir,
) -> Result<Vec<UnusedImage>, RuntimeError> {
    let pulled = state.pulled();
    if pulled.is_empty() {
        return Ok(Vec::new());
    }
    let in_use = docker.images_in_use().await?;
    let mut unused = Vec::new();
    let mut gone = Vec::new();
    for reference in pulled {
        match docker.image_facts(&reference).await? {
            None => gone.push(reference),
            Some(facts) if !in_use.contains(&facts.id) => unused.push(UnusedImage {
                reference,
                size: facts.size,
            }),
            Some(_) => {}
        }
    }
    if let Err(e) = state.forget_pulled(&gone) {
        tracing::warn!("cannot update the record of pulled images: {e}");
    }
    Ok(unused)
}

/// Removes the unused images [`unused_images`] finds; returns those removed. An image a
/// container started using meanwhile is left (the engine refuses, and soul does not force).
pub async fn prune(docker: &Docker, state: &StateDir) -> Result<Vec<UnusedImage>, RuntimeError> {
    let mut removed = Vec::new();
    for image in unused_images(docker, state).await? {
        if docker.remove_reference(&image.reference).await? {
            removed.push(image);
        }
    }
    let gone: Vec<String> = removed.iter().map(|i| i.reference.clone()).collect();
    if let Err(e) = state.forget_pulled(&gone) {
        tracing::warn!("cannot update the record of pulled images: {e}");
    }
    Ok(removed)
}
