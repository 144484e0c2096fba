//! The commands that drive a stack: validate, plan, apply, down, rotate, and soul's image.

use super::*;

pub(super) fn validate(ctx: &Context) -> Result<Exit, CliError> {
    let s = &ctx.stack;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    out(&format!(
        "{} is valid: stack `{}`, {}, {}, transports: {}\n",
        ctx.file.display(),
        s.stack,
        plural(s.sidecars.len(), "sidecar"),
        plural(s.devices.len(), "device"),
        s.transport_order()
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(Exit::Ok)
}

pub(super) async fn plan(ctx: &Context, args: &PlanArgs) -> Result<Exit, CliError> {
    let Pass { plan, lock, .. } = prepare(ctx, &ctx.state()).await?;
    if let Some(change) = &lock {
        eprintln!("{}", lock_note(change, "would lock"));
    }
    let stack = &ctx.stack;
    match args.output {
        Output::Json => out(&json_text(&json!({
            "stack": stack.stack,
            "file": ctx.file,
            "changes": plan.steps.len(),
            "steps": plan.steps,
            "kept_volumes": plan.kept,
        }))),
        Output::Human if plan.is_empty() => out(&format!(
            "stack `{}` is up to date: nothing to do\n",
            stack.stack
        )),
        Output::Human => {
            let mut s = format!(
                "soul apply would take {} step{} for stack `{}`:\n",
                plan.steps.len(),
                if plan.steps.len() == 1 { "" } else { "s" },
                stack.stack
            );
            for step in &plan.steps {
                s.push_str(&format!("  {} {step}\n", sigil(step)));
            }
            out(&s);
        }
    }
    if args.output == Output::Human {
        for name in &plan.kept {
            eprintln!("{}", kept_note(name));
        }
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        Exit::ChangesPending
    } else {
        Exit::Ok
    })
}

/// `soul update`: each locked image's tag asked at its registry, the lock rewritten, each move
/// printed; `--apply` then applies.
pub(super) async fn update(ctx: &Context, args: &UpdateArgs) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    for s in &args.sidecars {
        reconcile::one_sidecar(stack, Some(s))?;
    }
    let docker = Docker::connect().await?;
    let reconcile::Update {
        change,
        moved,
        failed,
    } = reconcile::update(&docker, stack, &Host, &ctx.state(), &args.sidecars).await?;
    for m in &moved {
        out(&format!("{m}\n"));
    }
    for (reference, why) in &failed {
        eprintln!("{reference}: cannot ask its registry: {why} (its lock entry is kept)");
    }
    let (moved, failed) = (moved.len(), failed.len());
    change.write()?;
    if moved == 0 {
        out("every image is at what its tag names: stack.lock unchanged\n");
    } else {
        eprintln!(
            "{}: {moved} image(s) moved — commit it with stack.kdl{}",
            change.path.display(),
            if args.apply {
                ""
            } else {
                "; `soul apply` runs them"
            }
        );
    }
    if args.apply {
        apply(ctx).await?;
    }
    Ok(if failed > 0 { Exit::Failure } else { Exit::Ok })
}

/// What `plan` and `apply` say of stack.lock's new and dropped entries.
fn lock_note(change: &reconcile::LockChange, verb: &str) -> String {
    let mut s = format!("{}: ", change.path.display());
    let mut parts = Vec::new();
    if !change.added.is_empty() {
        parts.push(format!("{verb} {}", change.added.join(", ")));
    }
    if !change.dropped.is_empty() {
        parts.push(format!(
            "dropped {} (no longer in stack.kdl)",
            change.dropped.join(", ")
        ));
    }
    if parts.is_empty() {
        parts.push("written".into());
    }
    s.push_str(&parts.join("; "));
    s.push_str(" — commit it with stack.kdl");
    s
}

/// What `plan` and `apply` say of a volume soul made that nothing declared mounts any more.
pub(super) fn kept_note(name: &str) -> String {
    let why = if name.contains("_tailscale-")
        || name.contains("_headscale-")
        || name.ends_with("_tailscale")
        || name.ends_with("_headscale")
    {
        "it holds a tailnet node made with other tags or another control server (a change of either makes a new node)"
    } else {
        "nothing in stack.kdl mounts it any more"
    };
    format!(
        "note: volume {name} is kept with its data: {why}; remove it with `docker volume rm {name}` once you are sure, or `soul down --volumes` removes it with the stack's others"
    )
}

pub(super) fn sigil(step: &Step) -> char {
    match step {
        Step::RemoveContainer { .. }
        | Step::RemoveVolume { .. }
        | Step::RemoveNetwork { .. }
        | Step::RemoveDuplicateNetwork { .. } => '-',
        Step::StartContainer { .. } => '>',
        _ => '+',
    }
}

pub(super) async fn apply(ctx: &Context) -> Result<Exit, CliError> {
    let started = Instant::now();
    let stack = &ctx.stack;
    for s in reconcile::stopped(&ctx.state()) {
        eprintln!("note: `{s}` is stopped (`soul stop`): left as it is until `soul start {s}`");
    }
    if let Some(file) = stack.relay.as_ref().and_then(|r| r.token_file.as_ref()) {
        eprintln!(
            "note: `relay token-file={file}` is not used: the relay admits this stack by its agent key (`soul relay allow` prints the line for the relay's file)"
        );
    }
    let state = ctx.open_state()?;
    let _lock = lock(&state, stack, "is applying")?;
    let Pass {
        desired,
        docker,
        plan,
        lock,
    } = prepare(ctx, &state).await?;
    // The lock first: what runs is what it says.
    if let Some(change) = &lock {
        change.write()?;
        eprintln!("{}", lock_note(change, "locked"));
    }
    for name in &plan.kept {
        eprintln!("{}", kept_note(name));
    }
    if plan.is_empty() {
        out(&format!(
            "stack `{}` is up to date: 0 changes ({} ms)\n",
            stack.stack,
            started.elapsed().as_millis()
        ));
        return Ok(Exit::Ok);
    }
    let applied = reconcile::converge(
        &docker,
        stack,
        &state,
        &Host,
        &desired,
        &plan,
        |at, step| {
            if at.pass == 0 {
                tracing::info!(step = %step, "applying");
            }
            out(&format!(
                "  [{}/{}] {} {step}\n",
                at.index + 1,
                at.of,
                sigil(step)
            ));
        },
    )
    .await?;
    for m in &applied.missing_addresses {
        eprintln!(
            "warning: the {m} is not known yet; `soul apply` again (or `soul watch`) adds it to the pairing codes"
        );
    }
    out(&render_applied(
        stack,
        &desired,
        applied.changes,
        started.elapsed(),
    ));
    Ok(Exit::Ok)
}

/// What apply says when it is done: how much it changed, the LAN ports, how to pair.
pub(super) fn render_applied(
    stack: &Stack,
    desired: &Desired,
    total: usize,
    took: Duration,
) -> String {
    let mut summary = format!(
        "applied {total} change{} to stack `{}` in {:.2} s\n",
        if total == 1 { "" } else { "s" },
        stack.stack,
        took.as_secs_f64()
    );
    if let Some(ports) = stack.lan_ports() {
        for (pod, port) in desired.pods.iter().zip(ports) {
            summary.push_str(&format!("  {}: LAN port {port}\n", pod.sidecar));
        }
    }
    if let Some(d) = stack.devices.first() {
        summary.push_str(&format!(
            "  pairing codes: `soul pair {}` (and `soul devices` for all {})\n",
            d.name,
            stack.devices.len()
        ));
    }
    summary
}

pub(super) async fn down(ctx: &Context, args: &DownArgs) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    let dir = ctx.open_state()?;
    let _lock = lock(&dir, stack, "holds")?;
    let docker = Docker::connect().await?;
    reconcile::check_ownership(&docker, stack, &dir).await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    let plan = reconcile::plan_down(&observed, args.volumes);
    let removed = plan.steps.len();
    reconcile::run(&docker, &dir, stack, &plan, |i, step| {
        out(&format!("  [{}/{removed}] - {step}\n", i + 1));
    })
    .await?;
    // Down: the stack is nobody's now (another state dir may take it up).
    docker.release_claim(&stack.stack).await?;
    if !args.volumes && !observed.volumes.is_empty() {
        let kept: Vec<&str> = observed.volumes.iter().map(String::as_str).collect();
        out(&format!(
            "  kept {} named volume{} ({}); `soul down --volumes` removes them\n",
            kept.len(),
            if kept.len() == 1 { "" } else { "s" },
            kept.join(", ")
        ));
    }
    if args.images {
        say_pruned(&reconcile::prune(&docker, &dir).await?);
    }
    out(&format!(
        "stack `{}` is down ({removed} removed)\n",
        stack.stack
    ));
    Ok(Exit::Ok)
}

/// `soul prune`: the images soul pulled for this stack that no container uses, removed.
pub(super) async fn prune(ctx: &Context) -> Result<Exit, CliError> {
    // A stack never applied here pulled nothing: no state dir is made for it.
    if !ctx.state().path().exists() {
        out("no unused image that soul pulled for this stack\n");
        return Ok(Exit::Ok);
    }
    let dir = ctx.open_state()?;
    let _lock = lock(&dir, &ctx.stack, "holds")?;
    let docker = Docker::connect().await?;
    let removed = reconcile::prune(&docker, &dir).await?;
    if removed.is_empty() {
        out("no unused image that soul pulled for this stack\n");
    }
    say_pruned(&removed);
    Ok(Exit::Ok)
}

fn say_pruned(removed: &[reconcile::UnusedImage]) {
    for i in removed {
        out(&format!(
            "  - image {} ({:.1} MB)\n",
            i.reference,
            i.size as f64 / 1e6
        ));
    }
}

pub(super) async fn image() -> Result<Exit, CliError> {
    let docker = Docker::connect().await?;
    let tags = vec![
        SoulImage::current().reference,
        format!("{}:{}", SoulImage::REPOSITORY, env!("CARGO_PKG_VERSION")),
        format!("{}:latest", SoulImage::REPOSITORY),
    ];
    docker.build_soul_image(&tags).await?;
    let exe = std::env::current_exe().unwrap_or_default();
    out(&format!(
        "built {} from {}\n",
        tags.join(", "),
        display(&exe)
    ));
    Ok(Exit::Ok)
}

pub(super) async fn rotate(cli: &Cli, args: &RotateArgs) -> Result<Exit, CliError> {
    let (stack, bumped) = stack::edit::rotate_file(&cli.file, args.device.as_deref())?;
    let ctx = Context::of(cli, stack);
    let what = match &args.device {
        Some(d) => format!("device `{d}` generation"),
        None => "secret-generation".into(),
    };
    if args.new_key {
        for aside in ctx
            .open_state()?
            .set_aside_lost_key(unix_now())
            .map_err(|e| CliError::Io(format!("cannot move the lost stack key aside: {e}")))?
        {
            out(&format!("moved aside: {aside}\n"));
        }
    }
    out(&format!(
        "{}: {what} {} → {} (commit this edit)\n",
        ctx.file.display(),
        bumped.from,
        bumped.to
    ));
    apply(&ctx).await
}
