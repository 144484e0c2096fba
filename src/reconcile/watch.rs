//! `soul watch`: keeps the machine on stack.kdl. Every [`Trigger`] — a change of the file, a
//! Docker event of this stack, the resync timer, a change of this host's address, SIGHUP, a
//! git pull — runs the same whole pass (level-triggered); triggers that arrive during a pass
//! coalesce into one more pass. A pass ends in an [`Action`]: wait, or run again at a given
//! time (a held-back repair, or [`error_policy`]'s backoff with jitter after any failure). An
//! invalid edit keeps the last good config running; containers that keep dying are reported
//! degraded and repaired ever more slowly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::runtime::Docker;
use crate::stack::{self, Stack, StackError};
use crate::state::{self, StateDir};

use super::flaps::FlapTracker;
use super::pass::{PassError, prepare, run, unix_now};
use super::plan::{Plan, Reason, Step};
use crate::backoff::{Backoff, jitter};
use crate::machine::Host;

use super::triggers::*;
pub use super::triggers::{Trigger, Triggers, pull_once};
pub use crate::state::layout::{LAST_GOOD_FILE, WATCH_STATUS_FILE};

/// How `soul watch` runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub file: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// Periodic resync, so missed events still converge.
    pub resync: Duration,
    /// Fetch and fast-forward the file's git work tree this often.
    pub pull: Option<Duration>,
    /// Ask the registries this often whether a locked tag moved; when one did, move
    /// stack.lock and apply (`--update`; off by default: a GitOps user reviews lock changes).
    pub update: Option<Duration>,
    /// Restarts within `flap_window` after which a container is reported degraded.
    pub flap_restarts: usize,
    pub flap_window: Duration,
    /// How often this host's addresses are checked for changes.
    pub address_poll: Duration,
    /// Quiet time after a file event before the pass (editors write in several steps).
    pub debounce: Duration,
    /// Run after every pass that succeeded, with the stack it converged to (`soul watch
    /// --export-kubernetes` keeps a committed export current with it).
    pub after_pass: Option<AfterPass>,
}

/// What runs after each successful pass.
#[derive(Clone)]
pub struct AfterPass(pub std::sync::Arc<dyn Fn(&Stack) + Send + Sync>);

impl std::fmt::Debug for AfterPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterPass(..)")
    }
}

/// Why watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// stack.kdl is invalid and no last good copy exists.
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("cannot watch {path}: {source}")]
    Notify {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
}

/// What a running watch tells `soul status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchStatus {
    pub pid: u32,
    pub started_at: u64,
    pub passes: u64,
    pub last_pass_at: Option<u64>,
    pub last_pass_ms: Option<u64>,
    pub last_pass_changes: Option<usize>,
    pub last_pass_trigger: Option<String>,
    pub last_error: Option<String>,
    pub next_resync_at: Option<u64>,
    pub config_valid: bool,
    pub config_invalid_since: Option<u64>,
    pub config_error: Option<String>,
    pub degraded: Vec<String>,
}

impl WatchStatus {
    /// The status of a watch that is running now, if any.
    pub fn read(state: &StateDir) -> Option<WatchStatus> {
        let s: WatchStatus = serde_json::from_slice(&state.read(WATCH_STATUS_FILE).ok()?).ok()?;
        let alive = std::fs::read(format!("/proc/{}/cmdline", s.pid))
            .map(|c| String::from_utf8_lossy(&c).contains("soul"))
            .unwrap_or(false);
        alive.then_some(s)
    }
}

/// What the loop does after a pass (kube-runtime's `Action`): wait for the next trigger, or
/// also run again at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    AwaitChange,
    RequeueAt(Instant),
}

impl Action {
    fn deadline(self) -> Option<Instant> {
        match self {
            Action::AwaitChange => None,
            Action::RequeueAt(at) => Some(at),
        }
    }
}

/// The one error policy of the loop: a failed pass, whatever failed, is retried after a
/// jittered, growing delay (0.5 s up to 30 s); a successful pass resets it.
fn error_policy(failures: &mut Backoff, e: &PassError, trigger: &str) -> Action {
    let delay = failures.next_delay(jitter());
    let what = if e.is_unreachable() {
        "the Docker engine is unreachable"
    } else {
        "pass failed"
    };
    tracing::warn!(%trigger, "{what}: {e}; retrying in {:.1} s", delay.as_secs_f64());
    Action::RequeueAt(Instant::now() + delay)
}

fn joined(triggers: &[Trigger]) -> String {
    triggers
        .iter()
        .map(Trigger::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// stack.kdl as last read, and the last valid version of it.
struct Config {
    file: PathBuf,
    good: Stack,
    invalid_since: Option<u64>,
    error: Option<String>,
}

impl Config {
    /// Re-reads the file; an invalid one is reported and the last good config stays.
    fn reload(&mut self, state: &StateDir) {
        // Read once: the copy kept as last good is the very text that was validated.
        let loaded = stack::read_source(&self.file).and_then(|src| {
            stack::parse(&self.file.display().to_string(), &src)
                .map(|s| (s, src))
                .map_err(StackError::Invalid)
        });
        match loaded {
            Ok((mut s, src)) => {
                // Its stack.lock too: a watch runs what the lock says, as apply does.
                s.lock_file = Some(stack::lock_file_of(&self.file));
                if self.invalid_since.take().is_some() {
                    tracing::info!("{} is valid again", self.file.display());
                }
                self.error = None;
                if state.read(LAST_GOOD_FILE).ok().as_deref() != Some(src.as_bytes())
                    && let Err(e) = state.write(LAST_GOOD_FILE, src.as_bytes())
                {
                    tracing::warn!("cannot keep a copy of the last good stack.kdl: {e}");
                }
                self.good = s;
            }
            Err(e) => {
                let first = first_error(&e);
                if self.error.as_deref() != Some(first.as_str()) {
                    let report = match &e {
                        StackError::Invalid(d) => d.render(false),
                        other => other.to_string(),
                    };
                    tracing::error!(
                        "{} is invalid; still running the last good config of stack `{}`:\n{report}",
                        self.file.display(),
                        self.good.stack
                    );
                }
                self.invalid_since.get_or_insert_with(unix_now);
                self.error = Some(first);
            }
        }
    }
}

fn first_error(e: &StackError) -> String {
    match e {
        StackError::Invalid(d) => d
            .problems
            .first()
            .map(|p| {
                let (l, c) = d.line_col(p.span.offset);
                format!("{}:{l}:{c}: {}", d.path, p.message)
            })
            .unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    }
}

/// The stack name a file declares, even when the file is otherwise invalid.
pub fn declared_name(file: &Path) -> Option<String> {
    stack::declared_name(&stack::read_source(file).ok()?)
}

/// Runs until `shutdown` resolves. Containers are left running.
pub async fn watch(
    opts: WatchOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WatchError> {
    let state_for = |name: &str| {
        opts.state_dir
            .clone()
            .unwrap_or_else(|| state::default_dir(name))
    };
    let (good, state) = match stack::load(&opts.file) {
        Ok(s) => {
            let state = StateDir::open(&state_for(&s.stack))?;
            (s, state)
        }
        Err(e) => {
            // Start on the last good copy when there is one: a bad edit must not keep the
            // machine from coming back after a reboot.
            let Some(name) = declared_name(&opts.file)
                .or_else(|| opts.state_dir.as_ref().map(|_| String::new()))
            else {
                return Err(e.into());
            };
            let state = StateDir::open(&state_for(&name))?;
            let src = state
                .read(LAST_GOOD_FILE)
                .map_err(|_| WatchError::Stack(e))?;
            let mut good = stack::parse(LAST_GOOD_FILE, &String::from_utf8_lossy(&src))
                .map_err(StackError::Invalid)?;
            good.lock_file = Some(stack::lock_file_of(&opts.file));
            (good, state)
        }
    };
    // One watch per stack: a second would take turns with the first, each undoing the other.
    let _watching = state.watch_lock()?;
    state.clean_temp_files();
    let mut config = Config {
        file: opts.file.clone(),
        good,
        invalid_since: None,
        error: None,
    };
    config.reload(&state);

    let triggers = Arc::new(Triggers::default());
    let flaps = Arc::new(Mutex::new(FlapTracker::new(
        opts.flap_restarts,
        opts.flap_window,
    )));
    let _file_watcher = watch_file(&opts.file, opts.debounce, triggers.clone())?;
    let mut events = spawn_events(config.good.stack.clone(), triggers.clone(), flaps.clone());
    let mut events_for = config.good.stack.clone();
    let addresses = tokio::spawn(poll_addresses(
        opts.file.clone(),
        state.clone(),
        opts.address_poll,
        triggers.clone(),
    ));
    let hup = tokio::spawn(on_sighup(triggers.clone()));
    let pull = opts
        .pull
        .map(|every| tokio::spawn(git_pull(opts.file.clone(), every, triggers.clone())));
    let image_updates = opts
        .update
        .map(|every| tokio::spawn(image_updates(every, triggers.clone())));

    let mut status = WatchStatus {
        pid: std::process::id(),
        started_at: unix_now(),
        ..Default::default()
    };
    let mut failures = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut action = Action::AwaitChange;
    // One Docker client for the whole watch (see `pass_with`).
    let mut docker: Option<Docker> = None;
    let mut next_resync = Instant::now();
    triggers.fire(Trigger::Start);
    tokio::pin!(shutdown);

    loop {
        let fired = tokio::select! {
            _ = &mut shutdown => break,
            _ = triggers.notify.notified() => triggers.take(),
            _ = tokio::time::sleep_until(next_resync) => vec![Trigger::Resync],
            _ = sleep_until_opt(action.deadline()) => vec![Trigger::Retry],
        };
        let reason = joined(&fired);
        config.reload(&state);
        if config.good.stack != events_for {
            events.abort();
            events = spawn_events(config.good.stack.clone(), triggers.clone(), flaps.clone());
            events_for = config.good.stack.clone();
        }
        let update = fired.contains(&Trigger::ImageUpdate);
        let started = Instant::now();
        let outcome = tokio::select! {
            // A pass is short; a signal during it lets the current step finish and stops at
            // the next await point between steps.
            r = pass_with(&mut docker, &config.good, &state, &flaps, update) => Some(r),
            _ = &mut shutdown => None,
        };
        let Some(outcome) = outcome else { break };
        let elapsed = started.elapsed();
        status.passes += 1;
        status.last_pass_at = Some(unix_now());
        status.last_pass_ms = Some(elapsed.as_millis() as u64);
        status.last_pass_trigger = Some(reason.clone());
        match outcome {
            Ok(PassReport {
                changes,
                deferred_until,
            }) => {
                failures.reset();
                status.last_error = None;
                status.last_pass_changes = Some(changes);
                action = deferred_until.map_or(Action::AwaitChange, Action::RequeueAt);
                tracing::info!(trigger = %reason, "reconciled in {} ms: {changes} change{}", elapsed.as_millis(), if changes == 1 { "" } else { "s" });
                if let Some(after) = &opts.after_pass {
                    (after.0)(&config.good);
                }
            }
            Err(e) => {
                action = error_policy(&mut failures, &e, &reason);
                status.last_error = Some(e.to_string());
            }
        }
        next_resync = Instant::now() + opts.resync;
        status.next_resync_at = Some(unix_now() + opts.resync.as_secs());
        status.config_valid = config.error.is_none();
        status.config_invalid_since = config.invalid_since;
        status.config_error = config.error.clone();
        let degraded = flaps
            .lock()
            .map(|mut f| f.degraded(Instant::now()))
            .unwrap_or_default();
        for d in degraded.iter().filter(|d| !status.degraded.contains(d)) {
            tracing::warn!(
                "container {d} is degraded: it restarted {}+ times within {:?}",
                opts.flap_restarts,
                opts.flap_window
            );
        }
        status.degraded = degraded;
        if let Ok(bytes) = serde_json::to_vec_pretty(&status)
            && let Err(e) = state.write(WATCH_STATUS_FILE, &bytes)
        {
            tracing::warn!("cannot write {WATCH_STATUS_FILE}: {e}");
        }
    }
    events.abort();
    addresses.abort();
    hup.abort();
    for task in [pull, image_updates].into_iter().flatten() {
        task.abort();
    }
    let _ = state.remove(WATCH_STATUS_FILE);
    tracing::info!("soul watch stopped; containers keep running");
    Ok(())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What a successful pass did.
struct PassReport {
    changes: usize,
    /// Repairs of flapping containers that were held back, and when to try again.
    deferred_until: Option<Instant>,
}

/// `--update`'s check: stack.lock moved to what the tags name now, one log line per image
/// that moved; the pass that follows applies it. A failure is logged and the lock kept.
async fn update_images(docker: &Docker, stack: &Stack, state: &StateDir) {
    match super::update(docker, stack, &Host, state, &[]).await {
        Ok(update) => {
            for (reference, why) in &update.failed {
                tracing::warn!("image update check: {reference}: cannot ask its registry: {why}");
            }
            if update.moved.is_empty() {
                tracing::debug!("image update check: every locked tag is where it was");
            } else if let Err(e) = update.change.write() {
                tracing::warn!("image update check: {e}");
            } else {
                for m in &update.moved {
                    tracing::info!("image update: {m} (stack.lock moved)");
                }
            }
        }
        Err(e) => tracing::warn!("image update check: {e}"),
    }
}

/// One pass on the watch's Docker client, connecting first when it has none. After a failed
/// pass the client is dropped and the next pass connects anew: that is what tells an engine
/// that is away (the connection fails: "unreachable") from one that refused a step, and an
/// engine that came back may speak another API version. With `update`, `--update`'s image
/// check runs first, so the pass applies what it moved.
async fn pass_with(
    docker: &mut Option<Docker>,
    stack: &Stack,
    state: &StateDir,
    flaps: &Mutex<FlapTracker>,
    update: bool,
) -> Result<PassReport, PassError> {
    let client = match docker.take() {
        Some(client) => client,
        None => Docker::connect().await?,
    };
    if update {
        update_images(&client, stack, state).await;
    }
    let report = one_pass(&client, stack, state, flaps).await;
    if report.is_ok() {
        *docker = Some(client);
    }
    report
}

async fn one_pass(
    docker: &Docker,
    stack: &Stack,
    state: &StateDir,
    flaps: &Mutex<FlapTracker>,
) -> Result<PassReport, PassError> {
    let lock_dir = state.clone();
    let name = stack.stack.clone();
    let _lock = tokio::task::spawn_blocking(move || {
        lock_dir.lock(|holder| {
            tracing::info!(
                "waiting: another soul process{} is applying stack `{name}`",
                holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
            );
        })
    })
    .await
    .map_err(|e| PassError::Internal(e.to_string()))??;
    let planned = prepare(docker, stack, &Host, state, unix_now()).await?;
    if let Some(change) = &planned.lock {
        change.write()?;
        for image in &change.added {
            tracing::info!(image = %image, "locked in {}", change.path.display());
        }
    }
    let now = Instant::now();
    let (plan, deferred_until) = {
        let mut f = flaps
            .lock()
            .map_err(|_| PassError::Internal("flap tracker poisoned".into()))?;
        defer_flapping(planned.plan, |name| f.next_repair(name, now), now)
    };
    let changes = plan.steps.len();
    run(
        docker,
        state,
        stack,
        &plan,
        |_, step| tracing::info!(step = %step, "applying"),
    )
    .await?;
    if let Ok(mut f) = flaps.lock() {
        for name in repairs(&plan) {
            f.repaired(&name, Instant::now());
        }
    }
    Ok(PassReport {
        changes,
        deferred_until,
    })
}

/// App containers that this plan starts or creates because they were stopped or gone.
fn repairs(plan: &Plan) -> Vec<String> {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::StartContainer {
                name,
                reason: Reason::Stopped | Reason::Missing,
            } if crate::pod::role_in_name(name) == Some(crate::pod::Role::App) => {
                Some(name.clone())
            }
            _ => None,
        })
        .collect()
}

/// Holds back the repair of app containers that may not be repaired yet (they keep dying):
/// their steps leave the plan, and the earliest time they may run is returned.
fn defer_flapping(
    plan: Plan,
    mut next_repair: impl FnMut(&str) -> Instant,
    now: Instant,
) -> (Plan, Option<Instant>) {
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut until: Option<Instant> = None;
    for name in repairs(&plan) {
        let at = next_repair(&name);
        if at > now {
            until = Some(until.map_or(at, |u: Instant| u.min(at)));
            tracing::info!(
                "holding back the repair of {name} for {:.1} s: it keeps dying",
                (at - now).as_secs_f64()
            );
            held.insert(name);
        }
    }
    let steps = plan
        .steps
        .into_iter()
        .filter(|s| {
            let name = match s {
                Step::RemoveContainer { name, .. } | Step::StartContainer { name, .. } => {
                    name.as_str()
                }
                Step::CreateContainer { spec, .. } => spec.name.as_str(),
                _ => return true,
            };
            !held.contains(name)
        })
        .collect();
    (
        Plan {
            steps,
            conflicts: plan.conflicts,
            kept: plan.kept,
        },
        until,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{ContainerSpec, Role, container_name};

    fn start(name: &str, reason: Reason) -> Step {
        Step::StartContainer {
            name: name.into(),
            reason,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_during_a_pass_coalesce_into_one_more_pass() {
        let t = Arc::new(Triggers::default());
        for i in 0..100 {
            t.fire(Trigger::Container {
                action: "die".into(),
                name: format!("c{}", i % 3),
            });
        }
        // One wake-up, all reasons at once.
        t.notify.notified().await;
        assert_eq!(
            joined(&t.take()),
            "docker die c0, docker die c1, docker die c2"
        );
        let again = tokio::time::timeout(Duration::from_secs(1), t.notify.notified()).await;
        assert!(again.is_err(), "a burst must not queue more than one pass");
    }

    /// The flap guard looked for names ending in `-app`, soul 0.1's; since containers are
    /// named `soul_<stack>_<sidecar>_app` it held nothing back, and a crash-looping app was
    /// repaired at every event.
    #[tokio::test(start_paused = true)]
    async fn repairs_of_flapping_apps_are_held_back_under_their_real_container_names() {
        let now = Instant::now();
        let spec = ContainerSpec::in_pod("h", "a", Role::App, "i");
        let (a, b) = (spec.name.clone(), container_name("h", "b", Role::App));
        assert_eq!(a, "soul_h_a_app");
        let gate = container_name("h", "a", Role::Gate);
        let plan = Plan {
            steps: vec![
                Step::CreateContainer {
                    spec: Box::new(spec),
                    reason: Reason::Missing,
                },
                start(&a, Reason::Missing),
                start(&b, Reason::Stopped),
                start(&gate, Reason::Stopped),
            ],
            ..Plan::default()
        };
        let later = now + Duration::from_secs(4);
        let (kept, until) = defer_flapping(plan, |n| if n == a { later } else { now }, now);
        assert_eq!(
            kept.steps,
            vec![start(&b, Reason::Stopped), start(&gate, Reason::Stopped)]
        );
        assert_eq!(until, Some(later));
        assert_eq!(
            repairs(&kept),
            vec![b.clone()],
            "only apps are flap-guarded"
        );
    }

    #[test]
    fn the_declared_name_is_found_in_an_invalid_file() {
        let dir = std::env::temp_dir().join(format!("soul-watch-name-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("stack.kdl");
        std::fs::write(&f, "stack \"home\"\nsidecar \"x\" { port 99999999; }\n").unwrap();
        assert_eq!(declared_name(&f).as_deref(), Some("home"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
