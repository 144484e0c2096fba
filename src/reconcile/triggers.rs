//! What wakes the watch loop, each source apart from the loop itself (as kube-runtime keeps
//! its triggers apart from its controller): edits of stack.kdl (a file watcher), the engine's
//! container events (and the engine going and coming back), this host's addresses and the
//! pods' relay registrations (polled), SIGHUP, and `git pull` of the stack's repository. Each
//! fires a [`Trigger`] into the shared [`Triggers`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::flaps::FlapTracker;
use super::watch::*;
use crate::backoff::{Backoff, jitter};
use crate::runtime::Docker;
use crate::stack;
use crate::state::StateDir;
use crate::transport;

/// What woke the loop. Every trigger runs the same whole pass; the trigger is only logged and
/// recorded in the watch status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    Start,
    /// stack.kdl was written (after the debounce).
    StackFile,
    /// The engine answered again after the event stream broke.
    EngineBack,
    /// A container of this stack died, stopped, was removed or changed health.
    Container {
        action: String,
        name: String,
    },
    /// This host's LAN address changed (pairing codes carry it).
    AddressChanged,
    Hangup,
    /// `--pull` fast-forwarded the repository.
    GitPull,
    /// `--update`: time to ask the registries whether a locked tag moved.
    ImageUpdate,
    /// The periodic resync: drift that no event reported.
    Resync,
    /// The retry after a failed pass, or when a held-back repair is due.
    Retry,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Start => f.write_str("start"),
            Trigger::StackFile => f.write_str("stack.kdl changed"),
            Trigger::EngineBack => f.write_str("engine back"),
            Trigger::Container { action, name } => write!(f, "docker {action} {name}"),
            Trigger::AddressChanged => f.write_str("address changed"),
            Trigger::Hangup => f.write_str("SIGHUP"),
            Trigger::GitPull => f.write_str("git pull"),
            Trigger::ImageUpdate => f.write_str("image update check"),
            Trigger::Resync => f.write_str("resync"),
            Trigger::Retry => f.write_str("retry"),
        }
    }
}

/// Triggers waiting for the next pass; `notify` wakes the loop. A `Notify` holds at most one
/// permit, so any number of triggers during a pass yields exactly one more pass.
#[derive(Default)]
pub struct Triggers {
    pub(super) notify: Notify,
    waiting: Mutex<BTreeSet<Trigger>>,
}

impl Triggers {
    pub fn fire(&self, trigger: Trigger) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(trigger);
        }
        self.notify.notify_one();
    }

    pub(super) fn take(&self) -> Vec<Trigger> {
        self.waiting
            .lock()
            .map(|mut w| std::mem::take(&mut *w).into_iter().collect())
            .unwrap_or_default()
    }
}

/// Watches the file's directory (editors replace files by renaming; `git checkout` deletes and
/// creates) and fires once the file has been quiet for `debounce`.
pub(super) fn watch_file(
    file: &Path,
    debounce: Duration,
    triggers: Arc<Triggers>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    use notify::Watcher;
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = file.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reads of the file (soul's own, every pass) are not changes.
        if let Ok(event) = res
            && matches!(
                event.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Remove(_)
            )
            && event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
        {
            let _ = tx.send(());
        }
    })
    .map_err(|source| WatchError::Notify {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: dir.clone(),
            source,
        })?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Let the burst settle, then swallow it.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            triggers.fire(Trigger::StackFile);
        }
    });
    Ok(watcher)
}

/// How often, at most, the engine is tried again while it is away: its return is noticed
/// within this (and a pass follows at once).
pub(super) const ENGINE_RETRY_CAP: Duration = Duration::from_secs(1);

/// Follows this stack's container events; reconnects when the engine goes away, trying at
/// least every [`ENGINE_RETRY_CAP`], and says once that it went and once that it is back.
pub(super) fn spawn_events(
    stack: String,
    triggers: Arc<Triggers>,
    flaps: Arc<Mutex<FlapTracker>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(250), ENGINE_RETRY_CAP);
        let mut connected_before = false;
        // Since when the engine has been away (logged once when it goes).
        let mut away: Option<Instant> = None;
        loop {
            match Docker::connect().await {
                Ok(docker) => {
                    if let Some(since) = away.take() {
                        tracing::info!(
                            "the Docker engine is back after {:.1} s: converging",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    if connected_before {
                        // The engine may have restarted: look at everything again.
                        triggers.fire(Trigger::EngineBack);
                    }
                    connected_before = true;
                    let mut stream = Box::pin(docker.container_events(&stack));
                    let mut got_one = false;
                    let ended = loop {
                        let Some(item) = stream.next().await else {
                            break "its event stream ended".to_string();
                        };
                        let (action, name) = match item {
                            Ok(event) => event,
                            Err(e) => break e.to_string(),
                        };
                        got_one = true;
                        backoff.reset();
                        let relevant =
                            matches!(action.as_str(), "die" | "destroy" | "stop" | "kill" | "oom")
                                || action.starts_with("health_status");
                        if action == "die"
                            && let Ok(mut f) = flaps.lock()
                        {
                            f.died(&name, Instant::now());
                        }
                        if relevant {
                            triggers.fire(Trigger::Container { action, name });
                        }
                    };
                    if got_one {
                        backoff.reset();
                    }
                    went_away(&mut away, &ended);
                }
                Err(e) => went_away(&mut away, &e.to_string()),
            }
            tokio::time::sleep(backoff.next_delay(jitter())).await;
        }
    })
}

/// Says, once, that the engine went away.
pub(super) fn went_away(away: &mut Option<Instant>, why: &str) {
    if away.is_none() {
        tracing::warn!("the Docker engine went away ({why}): waiting for it, trying every second");
        *away = Some(Instant::now());
    }
}

/// Fires when this host's LAN address changes, or when a pod's relay agent registers or drops
/// its registration (pairing codes carry both). The registrations are also compared with those
/// the last pass put into the codes (`state`'s recorded addresses): a registration that began
/// and ended between two polls, which a pass saw for another reason, must leave the codes too.
pub(super) async fn poll_addresses(
    file: PathBuf,
    state: StateDir,
    every: Duration,
    triggers: Arc<Triggers>,
) {
    let mut docker: Option<Docker> = None;
    let mut last = addresses_now(&file, &mut docker).await;
    // The recorded registrations a pass was last asked to correct: asked once per difference.
    let mut corrected = None;
    loop {
        tokio::time::sleep(every).await;
        let now = addresses_now(&file, &mut docker).await;
        let recorded = super::pass::recorded_relay(&state);
        if now != last {
            tracing::info!(
                "addresses changed (this host's, or the relay's registrations): {last:?} → {now:?}"
            );
            last = now;
            triggers.fire(Trigger::AddressChanged);
        } else if let Some((_, relay)) = &now
            && *relay != recorded
            && corrected.as_ref() != Some(&recorded)
        {
            tracing::info!(
                "the pairing codes carry relay registrations {recorded:?}; registered now: {relay:?}"
            );
            corrected = Some(recorded);
            triggers.fire(Trigger::AddressChanged);
        }
    }
}

/// This host's LAN address and the sidecars registered with the relay.
pub(super) async fn addresses_now(
    file: &Path,
    docker: &mut Option<Docker>,
) -> Option<(Option<String>, std::collections::BTreeSet<String>)> {
    let stack = stack::load(file).ok()?;
    let lan = transport::lan_host(&stack);
    if stack.relay.is_none() {
        return Some((lan, Default::default()));
    }
    if docker.is_none() {
        *docker = Docker::connect().await.ok();
    }
    let relay = match docker.as_ref() {
        Some(d) => super::pass::relay_registered(d, &stack)
            .await
            .unwrap_or_default(),
        None => Default::default(),
    };
    Some((lan, relay))
}

pub(super) async fn on_sighup(triggers: Arc<Triggers>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        triggers.fire(Trigger::Hangup);
    }
}

/// Every `every`: when the file is in a git work tree with an upstream, fetch and
/// fast-forward. A dirty tree or diverged history is reported, never forced.
pub(super) async fn git_pull(file: PathBuf, every: Duration, triggers: Arc<Triggers>) {
    let dir = std::path::absolute(&file)
        .ok()
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    loop {
        tokio::time::sleep(every).await;
        match pull_once(&dir).await {
            Ok(true) => {
                tracing::info!("git: fast-forwarded {}", dir.display());
                triggers.fire(Trigger::GitPull);
            }
            Ok(false) => tracing::debug!("git: {} is up to date", dir.display()),
            Err(why) => tracing::warn!("git pull in {}: {why}", dir.display()),
        }
    }
}

/// Every `every`: asks for an image update check (`soul watch --update`), run by the loop
/// before its pass.
pub(super) async fn image_updates(every: Duration, triggers: Arc<Triggers>) {
    loop {
        tokio::time::sleep(every).await;
        triggers.fire(Trigger::ImageUpdate);
    }
}

/// Why `git pull` did not move the stack's work tree.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot run git: {0}")]
    Git(#[from] std::io::Error),
    #[error("not a git work tree with an upstream branch; nothing to pull")]
    NoUpstream,
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("the work tree has local changes; not pulling (commit or stash them):\n{0}")]
    LocalChanges(String),
    #[error("cannot fast-forward to the upstream (history diverged); not forcing: {0}")]
    Diverged(String),
}

/// One fetch and fast-forward; `Ok(true)` when HEAD moved.
pub async fn pull_once(dir: &Path) -> Result<bool, PullError> {
    let git = |args: &[&str]| {
        let mut c = tokio::process::Command::new("git");
        c.arg("-C").arg(dir).args(args).kill_on_drop(true);
        c
    };
    let out = |o: std::process::Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).trim().to_string();
    let run = |mut c: tokio::process::Command| async move { c.output().await };
    let upstream = run(git(&[
        "rev-parse",
        "--abbrev-ref",
        "--symbolic-full-name",
        "@{u}",
    ]))
    .await?;
    if !upstream.status.success() {
        return Err(PullError::NoUpstream);
    }
    let fetch = run(git(&["fetch", "--quiet"])).await?;
    if !fetch.status.success() {
        return Err(PullError::Fetch(err(&fetch)));
    }
    let dirty = out(run(git(&["status", "--porcelain", "--untracked-files=no"])).await?);
    if !dirty.is_empty() {
        return Err(PullError::LocalChanges(dirty));
    }
    let before = out(run(git(&["rev-parse", "HEAD"])).await?);
    let merge = run(git(&["merge", "--ff-only", "--quiet", "@{u}"])).await?;
    if !merge.status.success() {
        return Err(PullError::Diverged(err(&merge)));
    }
    let after = out(run(git(&["rev-parse", "HEAD"])).await?);
    Ok(before != after)
}
