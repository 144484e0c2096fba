//! The commands on running pods: logs, stop, start, restart.

use super::*;

/// `soul logs`: the chosen containers' output, `<sidecar>-<role> | line`, until it ends (or,
/// with `-f`, until Ctrl-C).
pub(super) async fn logs(ctx: &Context, args: &LogsArgs) -> Result<Exit, CliError> {
    use crate::pod::{Role, label, role_in_name};
    use crate::runtime::logs;
    let stack = &ctx.stack;
    if let Some(sidecar) = &args.sidecar {
        reconcile::one_sidecar(stack, Some(sidecar))?;
    }
    let role = match args.role.as_deref().map(|r| (r, Role::parse(r))) {
        Some((_, Some(role))) => Some(role),
        Some((r, None)) => {
            let roles: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            return Err(CliError::Usage(format!(
                "`{r}` is not a role: pick one of {}",
                roles.join(", ")
            )));
        }
        None => None,
    };
    let docker = Docker::connect().await?;
    let mut sources: Vec<logs::Source> = docker
        .snapshot(&stack.stack)
        .await?
        .containers
        .into_iter()
        .filter_map(|c| {
            let sidecar = c.labels.get(label::SIDECAR)?.clone();
            let r = role_in_name(&c.name)?;
            let wanted = args.sidecar.as_ref().is_none_or(|s| *s == sidecar)
                && role.is_none_or(|want| want == r);
            wanted.then(|| logs::Source {
                container: c.name,
                label: format!("{sidecar}-{r}"),
            })
        })
        .collect();
    sources.sort_by(|a, b| a.label.cmp(&b.label));
    if sources.is_empty() {
        return Err(CliError::Usage(format!(
            "no container of stack `{}` matches: run `soul apply`, or check `soul status`",
            stack.stack
        )));
    }
    let width = sources.iter().map(|s| s.label.len()).max().unwrap_or(0);
    let since = args
        .since
        .map(|d| unix_now().saturating_sub(d.as_secs()) as i64);
    let options = logs::Options {
        follow: args.follow,
        since,
        tail: args.tail,
    };
    let mut lines = logs::read(&docker, sources, options);
    let stop = terminated();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(l) => out(&format!("{:<width$} | {}\n", l.label, l.text)),
                None => break,
            },
            () = &mut stop => break,
        }
    }
    Ok(Exit::Ok)
}

/// The sidecars a command names: the one given (which must exist), else all.
pub(super) fn pods_of(ctx: &Context, args: &PodsArgs) -> Result<Vec<String>, CliError> {
    match &args.sidecar {
        Some(name) => Ok(vec![reconcile::one_sidecar(&ctx.stack, Some(name))?]),
        None => Ok(ctx.stack.sidecars.iter().map(|s| s.name.clone()).collect()),
    }
}

/// The containers of `sidecars` on the engine, the pod's namespace holder (pause) first.
pub(super) async fn pod_containers(
    docker: &Docker,
    ctx: &Context,
    sidecars: &[String],
) -> Result<Vec<String>, CliError> {
    use crate::pod::{Role, label, role_in_name};
    let mut names: Vec<(bool, String)> = docker
        .snapshot(&ctx.stack.stack)
        .await?
        .containers
        .into_iter()
        .filter(|c| {
            c.labels
                .get(label::SIDECAR)
                .is_some_and(|s| sidecars.contains(s))
        })
        .map(|c| (role_in_name(&c.name) != Some(Role::Pause), c.name))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|(_, name)| name).collect())
}

/// `soul stop`: records the pods as stopped (so apply and watch leave them), then stops their
/// containers, dependents before the namespace holder.
pub(super) async fn stop(ctx: &Context, args: &PodsArgs) -> Result<Exit, CliError> {
    let sidecars = pods_of(ctx, args)?;
    let state = ctx.open_state()?;
    let _lock = lock(&state, &ctx.stack, "holds")?;
    let mut stopped = reconcile::stopped(&state);
    stopped.extend(sidecars.iter().cloned());
    let docker = Docker::connect().await?;
    reconcile::check_ownership(&docker, &ctx.stack, &state).await?;
    reconcile::record_stopped(&state, &stopped)
        .map_err(|e| CliError::Io(format!("cannot record the stop: {e}")))?;
    for name in pod_containers(&docker, ctx, &sidecars).await?.iter().rev() {
        docker.stop_container(name).await?;
        out(&format!("  stopped {name}\n"));
    }
    out(&format!(
        "stopped {}; `soul apply` and `soul watch` leave {} so until `soul start`\n",
        sidecars.join(", "),
        if sidecars.len() == 1 { "it" } else { "them" }
    ));
    Ok(Exit::Ok)
}

/// `soul start`: clears `soul stop`'s record for the pods, then applies.
pub(super) async fn start(ctx: &Context, args: &PodsArgs) -> Result<Exit, CliError> {
    let sidecars = pods_of(ctx, args)?;
    let state = ctx.open_state()?;
    {
        let _lock = lock(&state, &ctx.stack, "holds")?;
        let mut stopped = reconcile::stopped(&state);
        stopped.retain(|s| !sidecars.contains(s));
        reconcile::record_stopped(&state, &stopped)
            .map_err(|e| CliError::Io(format!("cannot clear the stop: {e}")))?;
    }
    apply(ctx).await
}

/// `soul restart`: each pod's namespace holder, then its other containers (which join the new
/// namespace when they start again).
pub(super) async fn restart(ctx: &Context, args: &PodsArgs) -> Result<Exit, CliError> {
    let sidecars = pods_of(ctx, args)?;
    let state = ctx.open_state()?;
    let held = reconcile::stopped(&state);
    if let Some(s) = sidecars.iter().find(|s| held.contains(*s)) {
        return Err(CliError::Usage(format!(
            "`{s}` is stopped (`soul stop`): `soul start {s}` starts it"
        )));
    }
    let _lock = lock(&state, &ctx.stack, "holds")?;
    let docker = Docker::connect().await?;
    reconcile::check_ownership(&docker, &ctx.stack, &state).await?;
    for name in pod_containers(&docker, ctx, &sidecars).await? {
        docker.restart_container(&name).await?;
        out(&format!("  restarted {name}\n"));
    }
    Ok(Exit::Ok)
}
