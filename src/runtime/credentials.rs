//! Registry credentials as the docker CLI finds them: `config.json` (in `$DOCKER_CONFIG`, else
//! `~/.docker`) with its `auths`, `credsStore` and `credHelpers` (the `docker-credential-*`
//! programs), through the `docker_credential` crate. The engine itself holds none: a client
//! sends them with each pull.

use bollard::auth::DockerCredentials;
use docker_credential::{CredentialRetrievalError, DockerCredential};

/// Docker Hub's key in `config.json`.
const DOCKER_HUB: &str = "https://index.docker.io/v1/";

/// The registry an image reference is pulled from, as `config.json` keys it: the first path
/// part when it names a host (a `.` or `:` in it, or `localhost`), else Docker Hub.
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => DOCKER_HUB,
    }
}

/// The credentials for `reference`'s registry, if the user has any; why not, when a
/// configured helper fails.
pub fn for_image(reference: &str) -> Result<Option<DockerCredentials>, String> {
    let server = registry_of(reference);
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")));
    if !dir.is_some_and(|d| d.join("config.json").is_file()) {
        return Ok(None);
    }
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => Ok(Some(DockerCredentials {
            username: Some(username),
            password: Some(password),
            serveraddress: Some(server.to_string()),
            ..DockerCredentials::default()
        })),
        Ok(DockerCredential::IdentityToken(token)) => Ok(Some(DockerCredentials {
            identitytoken: Some(token),
            serveraddress: Some(server.to_string()),
            ..DockerCredentials::default()
        })),
        Err(
            CredentialRetrievalError::NoCredentialConfigured
            | CredentialRetrievalError::ConfigNotFound,
        ) => Ok(None),
        Err(e) => Err(format!(
            "cannot get the credentials for {server} from docker's config: {e}"
        )),
    }
}

/// A registry's refusal, with what to do: `docker login <registry>` when it wants credentials;
/// checking the name, tag or digest when it has no such image; its address and network when it
/// cannot be reached.
pub fn explain(reference: &str, message: String) -> String {
    let m = message.to_ascii_lowercase();
    let registry = registry_of(reference);
    let has = |words: &[&str]| words.iter().any(|w| m.contains(w));
    if has(&["manifest unknown", "not found", "name unknown"]) && !has(&["unauthorized"]) {
        return format!(
            "{message} (the registry {registry} has no image {reference}: check the name, and the tag or digest)"
        );
    }
    if has(&[
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "no route to host",
        "tls handshake timeout",
    ]) {
        return format!(
            "{message} (the registry {registry} cannot be reached: check its address and this machine's network)"
        );
    }
    let wants_login = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "denied",
    ]
    .iter()
    .any(|w| m.contains(w));
    if wants_login {
        let registry = if registry == DOCKER_HUB { "" } else { registry };
        format!(
            "{message} (the registry wants credentials: `docker login {registry}`, which soul reads from docker's config)"
        )
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_of_a_reference_is_its_host_or_docker_hub() {
        assert_eq!(registry_of("ghcr.io/org/notes:1.4"), "ghcr.io");
        assert_eq!(registry_of("127.0.0.1:5000/notes:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("jellyfin/jellyfin:10.9"), DOCKER_HUB);
        assert_eq!(registry_of("nginx:1.27"), DOCKER_HUB);
        assert!(
            explain("ghcr.io/a/b:1", "unauthorized: x".into()).contains("`docker login ghcr.io`")
        );
        let missing = explain("ghcr.io/a/b:1", "manifest unknown".into());
        assert!(
            missing.contains("the registry ghcr.io has no image ghcr.io/a/b:1"),
            "{missing}"
        );
        let away = explain(
            "127.0.0.1:5000/b:1",
            "Get \"https://127.0.0.1:5000/v2/\": dial tcp 127.0.0.1:5000: connect: connection refused"
                .into(),
        );
        assert!(away.contains("127.0.0.1:5000 cannot be reached"), "{away}");
        assert_eq!(
            explain("ghcr.io/a/b:1", "toomanyrequests".into()),
            "toomanyrequests"
        );
    }
}
