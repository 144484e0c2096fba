//! `soul logs`: the output of a stack's containers, line by line, each line named by its
//! sidecar and role as `docker compose logs` names them by service. Following (`-f`) goes on
//! across recreations: when a container's stream ends, the container of the same name is
//! attached again once it runs, from that moment on.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::Docker;

/// One container to read: its name on the engine, and how its lines are labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub container: String,
    /// `<sidecar>-<role>`.
    pub label: String,
}

/// Which lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub follow: bool,
    /// Unix seconds: only lines written since then.
    pub since: Option<i64>,
    /// Only the last this many lines of each container (before following).
    pub tail: Option<u64>,
}

/// A line of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub label: String,
    pub text: String,
}

/// How often a followed container that is gone (being recreated) is looked for again.
const REATTACH_EVERY: Duration = Duration::from_millis(250);

/// Reads `sources` into the returned channel: each container's lines in order; without
/// `follow`, the channel closes when all are read.
pub fn read(docker: &Docker, sources: Vec<Source>, options: Options) -> mpsc::Receiver<Line> {
    let (tx, rx) = mpsc::channel(1024);
    for source in sources {
        let (docker, tx) = (docker.docker.clone(), tx.clone());
        tokio::spawn(async move {
            let mut since = options.since;
            let mut tail = options.tail;
            loop {
                let attached = read_one(&docker, &source, options.follow, since, tail, &tx).await;
                if !options.follow || tx.is_closed() {
                    return;
                }
                // Gone or stopped: from now on, only what the next container of that name says.
                since = Some(now());
                tail = None;
                if !attached {
                    tokio::time::sleep(REATTACH_EVERY).await;
                } else {
                    wait_until_running(&docker, &source.container).await;
                }
            }
        });
    }
    rx
}

/// One attachment to a container's logs; whether it attached at all.
async fn read_one(
    docker: &bollard::Docker,
    source: &Source,
    follow: bool,
    since: Option<i64>,
    tail: Option<u64>,
    tx: &mpsc::Sender<Line>,
) -> bool {
    let mut options = LogsOptionsBuilder::default()
        .follow(follow)
        .stdout(true)
        .stderr(true)
        .tail(&tail.map_or_else(|| "all".to_string(), |n| n.to_string()));
    if let Some(since) = since {
        options = options.since(i32::try_from(since).unwrap_or(i32::MAX));
    }
    let mut stream = docker.logs(&source.container, Some(options.build()));
    let mut attached = false;
    let mut partial = String::new();
    while let Some(item) = stream.next().await {
        let Ok(chunk) = item else { break };
        attached = true;
        let bytes = match chunk {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => message,
            LogOutput::StdIn { .. } => continue,
        };
        partial.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = partial.find('\n') {
            let text = partial[..end].trim_end_matches('\r').to_string();
            partial.drain(..=end);
            let line = Line {
                label: source.label.clone(),
                text,
            };
            if tx.send(line).await.is_err() {
                return true;
            }
        }
    }
    if !partial.is_empty() {
        let _ = tx
            .send(Line {
                label: source.label.clone(),
                text: partial,
            })
            .await;
    }
    attached
}

/// Waits until a container of that name exists and runs (its stream ended: it stopped, or is
/// being recreated).
async fn wait_until_running(docker: &bollard::Docker, name: &str) {
    loop {
        tokio::time::sleep(REATTACH_EVERY).await;
        let running = docker
            .inspect_container(name, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.running)
            .unwrap_or(false);
        if running {
            return;
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
