//! Images no container uses: what the engine says of an image soul pulled (its ID and size),
//! which images any container of the engine uses (running or not, any tool's), and the
//! removal of one reference, which the engine refuses while a container uses it.

use std::collections::HashSet;

use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveImageOptionsBuilder};

use super::{Docker, RuntimeError};

/// An image the engine has, as a reference names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub id: String,
    /// Bytes on disk as the engine counts them.
    pub size: u64,
}

impl Docker {
    /// The image IDs of every container on the engine, of any state and any tool.
    pub async fn images_in_use(&self) -> Result<HashSet<String>, RuntimeError> {
        let options = ListContainersOptionsBuilder::default().all(true).build();
        Ok(self
            .docker
            .list_containers(Some(options))
            .await?
            .into_iter()
            .filter_map(|c| c.image_id)
            .collect())
    }

    /// What the engine has under `reference`, or `None` when it has nothing there.
    pub async fn image_facts(&self, reference: &str) -> Result<Option<ImageFacts>, RuntimeError> {
        Ok(self.inspect_image(reference).await?.map(|i| ImageFacts {
            id: i.id.unwrap_or_default(),
            size: i.size.unwrap_or(0).max(0) as u64,
        }))
    }

    /// Removes `reference` (never forced): the image's content goes with its last reference
    /// only, so an image another tag still names stays. `false` when a container uses it
    /// (the engine's 409) or it was gone already.
    pub async fn remove_reference(&self, reference: &str) -> Result<bool, RuntimeError> {
        let options = RemoveImageOptionsBuilder::default().force(false).build();
        match self
            .docker
            .remove_image(reference, Some(options), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
