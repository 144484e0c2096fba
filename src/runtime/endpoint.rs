//! Which Docker engine soul talks to, found the way the `docker` CLI finds it: `DOCKER_HOST`;
//! else the context `DOCKER_CONTEXT` names, or the current context of `~/.docker/config.json`
//! (`$DOCKER_CONFIG/config.json`), whose endpoint is in `contexts/meta/<sha256 of its
//! name>/meta.json`; else a rootless engine's socket at `$XDG_RUNTIME_DIR/docker.sock`; else the
//! system socket.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The system engine's socket.
pub const SYSTEM_SOCKET: &str = "unix:///var/run/docker.sock";

/// An engine address, and how soul came to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// `unix:///path` or `tcp://host:port`.
    pub host: String,
    pub source: Source,
}

/// Where an [`Endpoint`] came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "name")]
pub enum Source {
    DockerHost,
    /// A Docker CLI context, by name.
    Context(String),
    Rootless,
    System,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::DockerHost => write!(f, "{} (DOCKER_HOST)", self.host),
            Source::Context(name) => write!(f, "{} (docker context `{name}`)", self.host),
            Source::Rootless => write!(f, "{} (rootless, $XDG_RUNTIME_DIR)", self.host),
            Source::System => write!(f, "{} (the system socket)", self.host),
        }
    }
}

/// Why the endpoint could not be found.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "docker context `{name}` is named by {by} but {meta} cannot be read ({why}): `docker context ls` lists the contexts"
    )]
    Context {
        name: String,
        by: &'static str,
        meta: String,
        why: String,
    },
}

/// What finding the endpoint reads: soul's environment and files.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn read(&self, path: &Path) -> std::io::Result<String>;
    fn exists(&self, path: &Path) -> bool;
}

/// The process's own environment and file system.
pub struct Process;

impl Environment for Process {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// The engine to talk to, as the `docker` CLI would pick it.
pub fn find(env: &dyn Environment) -> Result<Endpoint, EndpointError> {
    if let Some(host) = env.var("DOCKER_HOST") {
        return Ok(Endpoint {
            host,
            source: Source::DockerHost,
        });
    }
    let config = env
        .var("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".docker")));
    let named = match env.var("DOCKER_CONTEXT") {
        Some(name) => Some((name, "DOCKER_CONTEXT")),
        None => config
            .as_ref()
            .and_then(|dir| env.read(&dir.join("config.json")).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["currentContext"].as_str().map(str::to_string))
            .filter(|name| !name.is_empty())
            .map(|name| (name, "config.json's currentContext")),
    };
    if let Some((name, by)) = named.filter(|(name, _)| name != "default") {
        let meta = config
            .unwrap_or_default()
            .join("contexts/meta")
            .join(hex::encode(Sha256::digest(name.as_bytes())))
            .join("meta.json");
        let host = env
            .read(&meta)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
            })
            .and_then(|v| {
                v["Endpoints"]["docker"]["Host"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "it names no docker endpoint".to_string())
            })
            .map_err(|why| EndpointError::Context {
                name: name.clone(),
                by,
                meta: meta.display().to_string(),
                why,
            })?;
        return Ok(Endpoint {
            host,
            source: Source::Context(name),
        });
    }
    if let Some(dir) = env.var("XDG_RUNTIME_DIR") {
        let socket = Path::new(&dir).join("docker.sock");
        if env.exists(&socket) {
            return Ok(Endpoint {
                host: format!("unix://{}", socket.display()),
                source: Source::Rootless,
            });
        }
    }
    Ok(Endpoint {
        host: SYSTEM_SOCKET.into(),
        source: Source::System,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Fake {
        vars: BTreeMap<&'static str, String>,
        files: BTreeMap<PathBuf, String>,
    }

    impl Environment for Fake {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn exists(&self, path: &Path) -> bool {
            self.files.contains_key(path)
        }
    }

    fn meta(name: &str) -> PathBuf {
        Path::new("/home/me/.docker/contexts/meta")
            .join(hex::encode(Sha256::digest(name.as_bytes())))
            .join("meta.json")
    }

    #[test]
    fn the_endpoint_is_found_as_the_docker_cli_finds_it() {
        let mut env = Fake::default();
        env.vars.insert("HOME", "/home/me".into());
        assert_eq!(find(&env).unwrap().source, Source::System);

        env.vars.insert("XDG_RUNTIME_DIR", "/run/user/1000".into());
        env.files
            .insert("/run/user/1000/docker.sock".into(), String::new());
        assert_eq!(
            find(&env).unwrap().host,
            "unix:///run/user/1000/docker.sock"
        );

        env.files.insert(
            "/home/me/.docker/config.json".into(),
            r#"{"currentContext":"proxy"}"#.into(),
        );
        env.files.insert(
            meta("proxy"),
            r#"{"Name":"proxy","Endpoints":{"docker":{"Host":"unix:///tmp/proxy.sock"}}}"#.into(),
        );
        let found = find(&env).unwrap();
        assert_eq!(found.host, "unix:///tmp/proxy.sock");
        assert_eq!(found.source, Source::Context("proxy".into()));

        env.vars.insert("DOCKER_CONTEXT", "missing".into());
        let err = find(&env).unwrap_err().to_string();
        assert!(
            err.contains("`missing`") && err.contains("DOCKER_CONTEXT"),
            "{err}"
        );
        env.vars.insert("DOCKER_CONTEXT", "default".into());
        assert_eq!(find(&env).unwrap().source, Source::Rootless);

        env.vars.insert("DOCKER_HOST", "tcp://10.0.0.5:2375".into());
        assert_eq!(
            find(&env).unwrap().to_string(),
            "tcp://10.0.0.5:2375 (DOCKER_HOST)"
        );
    }
}
