//! What a stack looks like: `soul status` and `soul devices`, as text or JSON.

use super::*;

pub(super) async fn status(cli: &Cli, output: Output) -> Result<Exit, CliError> {
    let stack = match stack::load(&cli.file).map_err(CliError::from) {
        Ok(s) => s,
        // A running watch keeps the last good config; show what it runs, and why.
        Err(CliError::Stack(StackError::Invalid(d))) => {
            // The state dir: the one named by --state-dir, else the declared stack's.
            let state_dir = cli.state_dir.clone().or_else(|| {
                reconcile::declared_name(&cli.file).map(|name| state::default_dir(&name))
            });
            let last_good = state_dir.and_then(|dir| {
                let state = StateDir::at(&dir);
                let src = state.read(reconcile::LAST_GOOD_FILE).ok()?;
                stack::parse(reconcile::LAST_GOOD_FILE, &String::from_utf8_lossy(&src)).ok()
            });
            match last_good {
                Some(s) => {
                    eprintln!(
                        "warning: {} is invalid; showing the last good config that soul runs:\n{}",
                        cli.file.display(),
                        d.render(std::io::stderr().is_terminal())
                    );
                    s
                }
                None => return Err(StackError::Invalid(d).into()),
            }
        }
        Err(e) => return Err(e),
    };
    let ctx = Context::of(cli, stack);
    let stack = &ctx.stack;
    let desired = match reconcile::resolve(stack, &Host, &ctx.state) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("warning: cannot tell whether containers match stack.kdl: {e}");
            None
        }
    };
    let docker = Docker::connect().await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    // Compared as the planner compares: a soul 0.1 volume is mounted under its old name.
    let desired = desired.map(|d| reconcile::with_legacy_volumes(&d, &observed).into_owned());
    let watch = reconcile::WatchStatus::read(&ctx.state());
    let mut report = reconcile::status_report(stack, desired.as_ref(), &observed, watch);
    report.engine = Some(docker.endpoint().clone());
    report.stopped = reconcile::stopped(&ctx.state()).into_iter().collect();
    report.public = reconcile::public_names(stack, &ctx.state());
    report.backup = reconcile::Backup::of(&ctx.state());
    report.relay = reconcile::relay_conflicts(&docker, stack).await?;
    report.unused_images = reconcile::unused_images(&docker, &ctx.state()).await?;
    match output {
        Output::Json => out(&json_text(&report)),
        Output::Human => out(&render_status(&report, &cli.file)),
    }
    Ok(Exit::Ok)
}

/// A report as pretty JSON, with a final newline.
pub(super) fn json_text(report: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string_pretty(report).unwrap_or_default();
    s.push('\n');
    s
}

pub(super) fn render_status(report: &reconcile::StatusReport, file: &Path) -> String {
    let mut s = format!("stack `{}` ({})\n", report.stack, file.display());
    if let Some(engine) = &report.engine {
        s.push_str(&format!("  engine {engine}\n"));
    }
    for pod in &report.pods {
        let held = if report.stopped.contains(&pod.sidecar) {
            format!(
                " (stopped by `soul stop`; `soul start {}` starts it)",
                pod.sidecar
            )
        } else {
            String::new()
        };
        s.push_str(&format!("  pod {}{held}\n", pod.sidecar));
        for c in &pod.containers {
            let health = c
                .health
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            let current = match c.current {
                Some(true) => "up to date",
                Some(false) => "differs from stack.kdl: `soul apply` recreates it",
                None if c.state == "missing" => "`soul apply` creates it",
                None => "unknown",
            };
            s.push_str(&format!(
                "    {:<6} {:<22} {:<28} {current}\n",
                c.role.as_str(),
                format!("{}{health}", c.state),
                c.image.as_deref().unwrap_or("-"),
            ));
        }
    }
    s.push_str(&watch_lines(report.watch.as_ref()));
    s.push_str(&public_lines(&report.public, unix_now()));
    s.push_str(&relay_conflict_lines(&report.relay, unix_now()));
    match (report.backup.has_key, report.backup.exported_at) {
        (true, None) => s.push_str(
            "  backup: the stack key was never exported: `soul state export --out FILE` (without it, a lost disk takes every pairing with it)\n",
        ),
        (true, Some(t)) => s.push_str(&format!("  backup: exported {}\n", when(t))),
        (false, _) => {}
    }
    if !report.unused_images.is_empty() {
        let size: u64 = report.unused_images.iter().map(|i| i.size).sum();
        s.push_str(&format!(
            "  unused images soul pulled ({:.1} MB; `soul prune` removes them):\n",
            size as f64 / 1e6
        ));
        for i in &report.unused_images {
            s.push_str(&format!("    {}\n", i.reference));
        }
    }
    for u in &report.undeclared {
        s.push_str(&format!(
            "  undeclared: {} ({}): `soul apply` removes it\n",
            u.name, u.state
        ));
    }
    s
}

/// What this machine's gates saw of another machine registering the same stack at the relay.
/// A take-over is said for a day: long enough to be seen, not forever after a move.
pub(super) fn relay_conflict_lines(relay: &reconcile::RelayConflicts, now: u64) -> String {
    let mut s = String::new();
    for r in &relay.replaced {
        s.push_str(&format!(
            "  relay: another machine registered {} at the relay ({}, {}): it serves the stack there now, this one does not. If the stack moved, `soul down` here; if not, two machines run it\n",
            r.sidecar,
            r.by,
            when(r.at)
        ));
    }
    for r in relay
        .took_over
        .iter()
        .filter(|r| now.saturating_sub(r.at) < 24 * 3600)
    {
        s.push_str(&format!(
            "  relay: {} took the relay's registration over from {} ({}), which was told to stop: if another machine still runs this stack, `soul down` it there (two machines of one stack take the name from each other)\n",
            r.sidecar,
            r.by,
            when(r.at)
        ));
    }
    s
}

/// One line per public name: its certificate's expiry, or why there is none yet.
pub(super) fn public_lines(names: &[reconcile::PublicName], now: u64) -> String {
    let mut s = String::new();
    for p in names {
        let cert = match p.acme.as_ref().and_then(|a| a.not_after) {
            Some(t) if t > now => format!("certificate valid for {}", span(t - now)),
            Some(_) => "certificate expired".to_string(),
            None => "no certificate yet".to_string(),
        };
        s.push_str(&format!(
            "  public https://{}/ ({}): {cert}\n",
            p.name, p.sidecar
        ));
        if let Some(acme) = &p.acme
            && let Some(e) = &acme.last_error
        {
            let retry = acme
                .retry_at
                .map(|t| format!(" (next try in {})", span(t.saturating_sub(now))))
                .unwrap_or_default();
            s.push_str(&format!("    last ACME error: {e}{retry}\n"));
        }
        if p.acme.is_none() {
            s.push_str("    the gate has not reported yet (`soul apply` starts it)\n");
        }
    }
    s
}

/// How long ago `t` (Unix seconds) was: `5h ago`.
pub(super) fn when(t: u64) -> String {
    format!("{} ago", span(unix_now().saturating_sub(t)))
}

/// A duration in the largest unit that fits: `42s`, `17m`, `5h`, `89d`.
fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

pub(super) fn devices(ctx: &Context, output: Output) -> Result<Exit, CliError> {
    let state = ctx.state();
    let now = unix_now();
    let report = reconcile::devices_report(&ctx.stack, &state, now);
    match output {
        Output::Json => out(&json_text(&report)),
        Output::Human => out(&render_devices(&report, &state, now)),
    }
    Ok(Exit::Ok)
}

pub(super) fn render_devices(
    report: &reconcile::DevicesReport,
    state: &StateDir,
    now: u64,
) -> String {
    let mut s = format!(
        "devices of stack `{}` ({})\n",
        report.stack,
        state.path().display()
    );
    if report.devices.is_empty() {
        s.push_str("  none: add `device \"alice-phone\"` to stack.kdl and apply\n");
    }
    for d in &report.devices {
        let expiry = match d.expires_at {
            Some(t) if t <= now => "expired".to_string(),
            Some(t) => format!("expires in {}d", (t - now) / 86_400),
            None => "no expiry".into(),
        };
        let token = if d.token_current {
            "token current"
        } else {
            "token not issued yet: run `soul apply`"
        };
        s.push_str(&format!(
            "  {:<20} generation {:<3} {:<18} {token}; {} pairing files\n",
            d.name,
            d.generation,
            expiry,
            d.artifacts.len(),
        ));
    }
    s
}

/// `soul status`'s lines about a running `soul watch`.
pub(super) fn watch_lines(watch: Option<&reconcile::WatchStatus>) -> String {
    let Some(w) = watch else {
        return "  watch: not running (`soul watch` keeps this stack converged)\n".into();
    };
    let now = unix_now();
    let ago = |t: u64| format!("{} s ago", now.saturating_sub(t));
    let mut s = format!("  watch: running (pid {}), {} passes\n", w.pid, w.passes);
    if let Some(at) = w.last_pass_at {
        s.push_str(&format!(
            "    last pass {} ({}), {} ms, {} changes\n",
            ago(at),
            w.last_pass_trigger.as_deref().unwrap_or("-"),
            w.last_pass_ms.unwrap_or(0),
            w.last_pass_changes.map_or("-".into(), |c| c.to_string())
        ));
    }
    if let Some(next) = w.next_resync_at {
        s.push_str(&format!(
            "    next resync in {} s\n",
            next.saturating_sub(now)
        ));
    }
    if let Some(e) = &w.last_error {
        s.push_str(&format!("    last pass failed: {e}\n"));
    }
    if !w.config_valid {
        s.push_str(&format!(
            "    config INVALID since {}: {}; running the last good config\n",
            w.config_invalid_since.map_or("?".into(), ago),
            w.config_error.as_deref().unwrap_or("?")
        ));
    }
    for d in &w.degraded {
        s.push_str(&format!("    degraded: {d} keeps restarting\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two machines of one stack at the relay: each machine's status says its side, the newer
    /// one's for a day.
    #[test]
    fn each_machine_says_its_side_of_a_relay_registration_taken_over() {
        let now = unix_now();
        let record = |by: &str, at: u64| reconcile::RelayReplaced {
            sidecar: "notes".into(),
            by: by.into(),
            at,
        };
        let old_machine = reconcile::RelayConflicts {
            replaced: vec![record("203.0.113.9:40000", now - 60)],
            took_over: Vec::new(),
        };
        let said = relay_conflict_lines(&old_machine, now);
        assert!(
            said.contains("another machine registered notes at the relay (203.0.113.9:40000")
                && said.contains("`soul down` here"),
            "{said}"
        );
        let new_machine = reconcile::RelayConflicts {
            replaced: Vec::new(),
            took_over: vec![record("198.51.100.4:51000", now - 3600)],
        };
        let said = relay_conflict_lines(&new_machine, now);
        assert!(
            said.contains("notes took the relay's registration over from 198.51.100.4:51000"),
            "{said}"
        );
        let a_day_later = relay_conflict_lines(&new_machine, now + 24 * 3600);
        assert!(a_day_later.is_empty(), "{a_day_later}");
    }
}
