//! The Docker engine through bollard: observe what carries soul's labels, carry out single
//! mutations, pull images with progress, and build soul's own image offline. It makes no
//! decisions (that is `reconcile`'s job) and knows only the pod's value types.

mod create;
pub mod credentials;
pub mod endpoint;
mod image;
pub mod logs;
mod progress;
mod unused;
pub use unused::ImageFacts;
mod snapshot;

use create::create_body;
pub use snapshot::{ContainerInfo, Snapshot};

use std::collections::{BTreeMap, HashMap};

use bollard::Docker as Bollard;
use bollard::models::{
    ContainerCreateBody, HealthConfig, HostConfig, Mount as DockerMount, MountType,
    NetworkCreateRequest, PortBinding, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder,
};
use futures_util::StreamExt;

use crate::pod::{ContainerSpec, MountKind, NetworkMode, ObjectKind, label};

pub use image::{SOUL_BINARY_LABEL, binary_id, soul_rootfs};

/// What can go wrong talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine's address could not be found (a Docker context that cannot be read), or is
    /// of a kind soul cannot talk to.
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
    #[error(
        "cannot talk to the Docker engine at {0}: soul speaks to unix:// sockets and plain tcp:// or http:// endpoints"
    )]
    UnsupportedEndpoint(String),
    /// The engine did not answer at all (socket missing, daemon down, wrong DOCKER_HOST).
    #[error("cannot reach the Docker engine at {host}: {source}")]
    Unreachable {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The engine answered with an error.
    #[error("{0}")]
    Engine(#[from] bollard::errors::Error),
    /// An image could not be pulled.
    #[error("{0}")]
    Pull(String),
    /// soul's own image could not be built.
    #[error("building soul's image: {0}")]
    Build(String),
}

impl RuntimeError {
    /// Whether the engine is simply not there (so the CLI can exit with its own code).
    pub fn is_unreachable(&self) -> bool {
        match self {
            RuntimeError::Unreachable { .. } => true,
            RuntimeError::Engine(e) => is_connection_error(e),
            _ => false,
        }
    }
}

fn is_connection_error(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        e,
        E::IOError { .. } | E::HyperResponseError { .. } | E::HttpClientError { .. }
    )
}

/// A connection to the Docker engine at `DOCKER_HOST` (default: the local socket).
#[derive(Clone)]
pub struct Docker {
    docker: Bollard,
    endpoint: endpoint::Endpoint,
}

impl Docker {
    /// Connects and agrees on an API version; an engine that does not answer is
    /// [`RuntimeError::Unreachable`].
    pub async fn connect() -> Result<Docker, RuntimeError> {
        Docker::connect_to(endpoint::find(&endpoint::Process)?).await
    }

    /// Connects to `endpoint`.
    pub async fn connect_to(endpoint: endpoint::Endpoint) -> Result<Docker, RuntimeError> {
        const TIMEOUT_SECS: u64 = 120;
        let host = endpoint.host.clone();
        let unreachable = |source| RuntimeError::Unreachable {
            host: endpoint.to_string(),
            source,
        };
        let version = bollard::API_DEFAULT_VERSION;
        let docker = if let Some(path) = host.strip_prefix("unix://") {
            Bollard::connect_with_unix(path, TIMEOUT_SECS, version)
        } else if host.starts_with("tcp://") || host.starts_with("http://") {
            Bollard::connect_with_http(&host, TIMEOUT_SECS, version)
        } else {
            return Err(RuntimeError::UnsupportedEndpoint(endpoint.to_string()));
        }
        .map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        Ok(Docker { docker, endpoint })
    }

    /// The engine this client talks to, and how soul found it.
    pub fn endpoint(&self) -> &endpoint::Endpoint {
        &self.endpoint
    }

    fn stack_filter(stack: &str) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_string(),
            vec![format!("{}={stack}", label::STACK)],
        )])
    }

    /// The image ID `reference` points at, or `None` when the engine does not have it.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        Ok(self.image_labels(reference).await?.map(|(id, _)| id))
    }

    /// The repository digests the engine holds for a local image (`RepoDigests`: `repo@sha256:…`,
    /// what the registry served for a pulled tag), or `None` when the engine does not have it.
    /// An image built or imported here has none.
    pub async fn repo_digests(&self, reference: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        Ok(self
            .inspect_image(reference)
            .await?
            .map(|i| i.repo_digests.unwrap_or_default()))
    }

    /// What the engine says of the image `reference` names, or `None` when it has none.
    async fn inspect_image(
        &self,
        reference: &str,
    ) -> Result<Option<bollard::models::ImageInspect>, RuntimeError> {
        match self.docker.inspect_image(reference).await {
            Ok(i) => Ok(Some(i)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The digest the registry serves for `reference` now (a multi-platform image's index, so
    /// one digest serves every platform), asked through the engine (its registry settings and
    /// certificates), without pulling.
    pub async fn registry_digest(&self, reference: &str) -> Result<String, RuntimeError> {
        let creds = credentials::for_image(reference).map_err(RuntimeError::Pull)?;
        match self.docker.inspect_registry_image(reference, creds).await {
            Ok(d) => d.descriptor.digest.ok_or_else(|| {
                RuntimeError::Pull(format!("the registry gave no digest for {reference}"))
            }),
            Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                Err(RuntimeError::Pull(credentials::explain(reference, message)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The image's ID and labels, or `None` when the engine does not have it.
    pub async fn image_labels(
        &self,
        reference: &str,
    ) -> Result<Option<(String, HashMap<String, String>)>, RuntimeError> {
        Ok(self.inspect_image(reference).await?.map(|i| {
            (
                i.id.unwrap_or_default(),
                i.config.and_then(|c| c.labels).unwrap_or_default(),
            )
        }))
    }

    /// The labels of the container, network or volume with exactly this name, if one exists,
    /// whoever made it: soul checks a name is free (or its own) before creating anything.
    pub async fn labels_of(
        &self,
        kind: ObjectKind,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        let found = match kind {
            ObjectKind::Container => self
                .docker
                .inspect_container(name, None)
                .await
                .map(|c| c.config.and_then(|c| c.labels).unwrap_or_default()),
            // By exact name (inspecting a network also matches ID prefixes); the first of several.
            ObjectKind::Network => return Ok(self.networks_named(name).await?.into_iter().next()),
            ObjectKind::Volume => self.docker.inspect_volume(name).await.map(|v| v.labels),
        };
        match found {
            Ok(labels) => Ok(Some(labels)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The labels of every network named exactly `name` (the engine allows several).
    pub async fn networks_named(
        &self,
        name: &str,
    ) -> Result<Vec<HashMap<String, String>>, RuntimeError> {
        let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
        Ok(self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await?
            .into_iter()
            // The engine's name filter matches substrings.
            .filter(|n| n.name.as_deref() == Some(name))
            .map(|n| n.labels.unwrap_or_default())
            .collect())
    }

    /// Pulls an image, showing its progress ([`progress::Pull`]): bars on a terminal, one line
    /// when it is done elsewhere.
    pub async fn pull_image(&self, reference: &str) -> Result<(), RuntimeError> {
        let options = CreateImageOptionsBuilder::default()
            .from_image(reference)
            .build();
        let creds = credentials::for_image(reference).map_err(RuntimeError::Pull)?;
        let mut stream = self.docker.create_image(Some(options), None, creds);
        let mut shown = progress::Pull::start(reference);
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(e) => {
                    shown.abandon();
                    return Err(match e {
                        bollard::errors::Error::DockerResponseServerError { message, .. } => {
                            RuntimeError::Pull(credentials::explain(reference, message))
                        }
                        bollard::errors::Error::DockerStreamError { error } => {
                            RuntimeError::Pull(credentials::explain(reference, error))
                        }
                        other => RuntimeError::Engine(other),
                    });
                }
            };
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                shown.abandon();
                return Err(RuntimeError::Pull(credentials::explain(reference, detail)));
            }
            let (current, total) = info
                .progress_detail
                .map_or((None, None), |p| (p.current, p.total));
            shown.update(
                info.id.as_deref(),
                info.status.as_deref().unwrap_or_default(),
                current,
                total,
            );
        }
        shown.finish();
        Ok(())
    }

    /// Removes the images soul built from other binaries (they carry [`SOUL_BINARY_LABEL`]) that
    /// only content tags name (`soul:<version>-<build>`, never `soul:latest` or a version a
    /// person tagged with `soul image`), that are over an hour old and that no container uses
    /// (the engine refuses to remove those; that refusal is fine).
    pub async fn remove_unused_soul_images(&self, keep: &str) -> Result<(), RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![SOUL_BINARY_LABEL.to_string()])]);
        let images = self
            .docker
            .list_images(Some(
                bollard::query_parameters::ListImagesOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        let an_hour_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            - 3600;
        for image in images {
            let stale = image.created < an_hour_ago
                && !image.repo_tags.iter().any(|t| t == keep)
                && image.repo_tags.iter().all(|t| image::is_content_tag(t));
            if !stale {
                continue;
            }
            if self.remove_reference(&image.id).await? {
                tracing::info!("removed unused soul image {}", image.repo_tags.join(", "));
            }
        }
        Ok(())
    }

    /// Builds soul's own image from this very binary and tags it with every reference given.
    pub async fn build_soul_image(&self, tags: &[String]) -> Result<(), RuntimeError> {
        image::build(&self.docker, tags).await
    }

    pub async fn create_volume(&self, name: &str, stack: &str) -> Result<(), RuntimeError> {
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.into()),
                labels: Some(HashMap::from([(label::STACK.into(), stack.into())])),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Claims `stack` for the state dir `owner`, unless it is claimed already: returns the
    /// owner of the claim, whoever made it. Two state dirs racing both learn the same winner.
    pub async fn claim(&self, stack: &str, owner: &str) -> Result<String, RuntimeError> {
        let volume = self
            .docker
            .create_volume(VolumeCreateRequest {
                name: Some(crate::pod::claim_name(stack)),
                labels: Some(HashMap::from([
                    (label::CLAIM.into(), stack.into()),
                    (label::STATE_DIR.into(), owner.into()),
                ])),
                ..Default::default()
            })
            .await?;
        Ok(volume
            .labels
            .get(label::STATE_DIR)
            .cloned()
            .unwrap_or_default())
    }

    /// The state dir that claims `stack`, if any does.
    pub async fn claim_owner(&self, stack: &str) -> Result<Option<String>, RuntimeError> {
        let labels = self
            .labels_of(ObjectKind::Volume, &crate::pod::claim_name(stack))
            .await?;
        Ok(labels
            .filter(|l| l.get(label::CLAIM).map(String::as_str) == Some(stack))
            .and_then(|l| l.get(label::STATE_DIR).cloned()))
    }

    /// Gives up the claim on `stack` (nothing when there is none).
    pub async fn release_claim(&self, stack: &str) -> Result<(), RuntimeError> {
        self.remove_volume(&crate::pod::claim_name(stack)).await
    }

    pub async fn create_network(&self, name: &str, stack: &str) -> Result<(), RuntimeError> {
        self.docker
            .create_network(NetworkCreateRequest {
                name: name.into(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([(label::STACK.into(), stack.into())])),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Creates a container. When the name is taken by a container of the same stack that the
    /// plan did not see (a create or removal by a run killed mid-call, finished by the engine
    /// after this run looked), that leftover is removed and the create retried; a name held by
    /// anything else stays an error.
    pub async fn create_container(
        &self,
        spec: &ContainerSpec,
        owner: &str,
    ) -> Result<(), RuntimeError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        // A removal still in progress holds the name a little longer than inspect shows it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let conflict = match self
                .docker
                .create_container(Some(options.clone()), create_body(spec, owner))
                .await
            {
                Ok(_) => return Ok(()),
                Err(
                    e @ bollard::errors::Error::DockerResponseServerError {
                        status_code: 409, ..
                    },
                ) if tokio::time::Instant::now() < deadline => e,
                Err(e) => return Err(e.into()),
            };
            match self.labels_of(ObjectKind::Container, &spec.name).await? {
                // Being removed: wait for the name to be free.
                None => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                // Left by a run of this stack and state dir (not by another owner's run).
                Some(labels)
                    if labels.get(label::STACK) == Some(&spec.stack)
                        && labels.get(label::STATE_DIR).is_none_or(|o| o == owner) =>
                {
                    tracing::info!("removing {}: left behind by an interrupted run", spec.name);
                    self.remove_container(&spec.name).await?;
                }
                Some(_) => return Err(conflict.into()),
            }
        }
    }

    pub async fn start_container(&self, name: &str) -> Result<(), RuntimeError> {
        self.docker.start_container(name, None).await?;
        Ok(())
    }

    /// Stops a container (SIGTERM, then SIGKILL after 10 s); one already stopped is left so.
    pub async fn stop_container(&self, name: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::StopContainerOptionsBuilder::default()
            .t(10)
            .build();
        match self.docker.stop_container(name, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Restarts a container (stops it if it runs, then starts it).
    pub async fn restart_container(&self, name: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::RestartContainerOptionsBuilder::default()
            .t(10)
            .build();
        self.docker.restart_container(name, Some(options)).await?;
        Ok(())
    }

    /// The contents of a file inside a container (running or not), or `None` when the
    /// container or the file does not exist yet.
    pub async fn read_file(
        &self,
        container: &str,
        path: &str,
    ) -> Result<Option<String>, RuntimeError> {
        let options = bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self
            .docker
            .download_from_container(container, Some(options));
        let mut archive = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => archive.extend_from_slice(&bytes),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        let mut tar = tar::Archive::new(archive.as_slice());
        let Ok(mut entries) = tar.entries() else {
            return Ok(None);
        };
        let Some(Ok(mut entry)) = entries.next() else {
            return Ok(None);
        };
        let mut text = String::new();
        use std::io::Read;
        Ok(entry.read_to_string(&mut text).ok().map(|_| text))
    }

    /// Runs a command in a running container and returns its standard output, or `None`
    /// when the container is not running or the command fails.
    pub async fn exec_output(
        &self,
        container: &str,
        cmd: &[String],
    ) -> Result<Option<String>, RuntimeError> {
        use bollard::exec::StartExecResults;
        let config = bollard::models::ExecConfig {
            cmd: Some(cmd.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(false),
            ..Default::default()
        };
        let exec = match self.docker.create_exec(container, config).await {
            Ok(e) => e,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut out = String::new();
        if let StartExecResults::Attached { mut output, .. } =
            self.docker.start_exec(&exec.id, None).await?
        {
            while let Some(chunk) = output.next().await {
                if let bollard::container::LogOutput::StdOut { message } = chunk? {
                    out.push_str(&String::from_utf8_lossy(&message));
                }
            }
        }
        let code = self.docker.inspect_exec(&exec.id).await?.exit_code;
        Ok((code == Some(0)).then_some(out))
    }

    /// This stack's container events as `(action, container name)`, e.g. `("die", "soul-…")`
    /// or `("health_status: unhealthy", …)`. The stream ends when the engine goes away.
    pub fn container_events(
        &self,
        stack: &str,
    ) -> impl futures_util::Stream<Item = Result<(String, String), RuntimeError>> + use<> {
        let mut filters = Self::stack_filter(stack);
        filters.insert("type".into(), vec!["container".into()]);
        let options = bollard::query_parameters::EventsOptionsBuilder::default()
            .filters(&filters)
            .build();
        self.docker.events(Some(options)).map(|item| {
            let e = item?;
            let name = e
                .actor
                .and_then(|a| a.attributes)
                .and_then(|mut attrs| attrs.remove("name"))
                .unwrap_or_default();
            Ok((e.action.unwrap_or_default(), name))
        })
    }

    /// Removes a container (by ID or name; force: it may be running; its volumes are kept). When a removal is already in progress (asked by
    /// a run killed mid-call), waits for that one to finish instead.
    pub async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
                while self.labels_of(ObjectKind::Container, id).await?.is_some() {
                    if tokio::time::Instant::now() > deadline {
                        return Err(RuntimeError::Engine(
                            bollard::errors::Error::DockerResponseServerError {
                                status_code: 409,
                                message,
                            },
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Ok(())
            }
            other => gone_is_fine(other),
        }
    }

    pub async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        gone_is_fine(self.docker.remove_network(name).await)
    }

    pub async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        let options = RemoveVolumeOptionsBuilder::default().force(false).build();
        gone_is_fine(self.docker.remove_volume(name, Some(options)).await)
    }
}

/// A removal of something already gone did what was asked.
fn gone_is_fine(result: Result<(), bollard::errors::Error>) -> Result<(), RuntimeError> {
    match result {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => Ok(other?),
    }
}
