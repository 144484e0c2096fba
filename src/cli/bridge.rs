//! `soul bridge …`: choosing transports, the addresses they give, their state.

use super::*;

/// Asks one question on the terminal; an empty answer takes the default.
pub(super) fn ask(question: &str, default: &str) -> Result<String, CliError> {
    eprint!("{question} [{default}]: ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Io(format!("cannot read the answer: {e}")))?;
    let answer = line.trim();
    Ok(if answer.is_empty() {
        default.to_string()
    } else {
        answer.to_string()
    })
}

/// The transport `bridge init` writes: the flags' choice, else the user's answer on a
/// terminal, else Tailscale.
pub(super) fn choose_transport(
    args: &InitArgs,
    interactive: bool,
) -> Result<crate::bridge::Choice, CliError> {
    use crate::bridge::{Choice, DEFAULT_AUTHKEY_FILE};
    let authkey = |default: &str| -> Result<String, CliError> {
        match &args.authkey_file {
            Some(p) => Ok(p.clone()),
            None if interactive => ask(
                "Auth-key file on this machine (soul never reads it into stack.kdl)",
                default,
            ),
            None => Ok(default.to_string()),
        }
    };
    let choice = if let Some(url) = &args.headscale {
        Choice::Headscale {
            url: url.clone(),
            authkey_file: authkey("/run/secrets/headscale-authkey")?,
        }
    } else if let Some(lighthouse) = &args.nebula {
        let need = |v: &Option<String>| v.clone().unwrap_or_default();
        Choice::Nebula {
            lighthouse: lighthouse.clone(),
            lighthouse_ip: need(&args.lighthouse_ip),
            ip: need(&args.nebula_ip),
            ca_file: need(&args.ca_file),
            cert_file: need(&args.cert_file),
            key_file: need(&args.key_file),
        }
    } else if args.tor {
        Choice::Tor
    } else if args.lan_only {
        Choice::LanOnly
    } else if args.tailscale || !interactive {
        Choice::Tailscale {
            authkey_file: authkey(DEFAULT_AUTHKEY_FILE)?,
            tags: args.tags.clone(),
        }
    } else {
        match ask(
            "Transport: tailscale, headscale, tor or lan-only",
            "tailscale",
        )?
        .as_str()
        {
            "tailscale" => Choice::Tailscale {
                authkey_file: authkey(DEFAULT_AUTHKEY_FILE)?,
                tags: args.tags.clone(),
            },
            "headscale" => Choice::Headscale {
                url: ask("Headscale URL", "https://headscale.example.com")?,
                authkey_file: authkey("/run/secrets/headscale-authkey")?,
            },
            "tor" => Choice::Tor,
            "lan-only" | "lan" => Choice::LanOnly,
            other => {
                return Err(CliError::Usage(format!(
                    "`{other}` is not a transport soul can set up here; pick tailscale, headscale, tor or lan-only (Nebula: --nebula …)"
                )));
            }
        }
    };
    Ok(choice)
}

pub(super) fn bridge_init(cli: &Cli, args: &InitArgs) -> Result<Exit, CliError> {
    let source = stack::read_source(&cli.file)?;
    let path = cli.file.display().to_string();
    let stack = stack::parse(&path, &source).map_err(StackError::Invalid)?;
    let interactive = std::io::stdin().is_terminal() && !args.yes;
    let choice = choose_transport(args, interactive)?;
    let crate::bridge::Edited { text: new, diff } =
        crate::bridge::edit(&path, &source, &stack, &choice)?;
    if diff.is_empty() {
        out(&format!("{path} already says that; nothing to change\n"));
        return Ok(Exit::Ok);
    }
    out(&diff);
    if interactive
        && !matches!(
            ask(&format!("Write {path}?"), "Y")?.as_str(),
            "Y" | "y" | "yes"
        )
    {
        out("nothing written\n");
        return Ok(Exit::Ok);
    }
    stack::write_source(&cli.file, &new)
        .map_err(|e| CliError::Io(format!("cannot write {path}: {e}")))?;
    out(&format!(
        "wrote {path}; commit it, then `soul apply` (or let `soul watch` pick it up)\n"
    ));
    Ok(Exit::Ok)
}

/// The sidecar a command is about: the one named, or the only one.
/// Every sidecar's known addresses, in the stack's order (overlays read from the pods).
pub(super) async fn current_addresses(
    ctx: &Context,
) -> Result<(Docker, Vec<Vec<crate::pairing::Address>>), CliError> {
    let stack = &ctx.stack;
    let docker = Docker::connect().await?;
    let discovered = reconcile::discover(&docker, stack, &ctx.state()).await?;
    let lan = crate::transport::lan_host(stack);
    Ok((
        docker,
        crate::transport::addresses(stack, lan.as_deref(), &discovered),
    ))
}

pub(super) async fn bridge_address(ctx: &Context, args: &AddressArgs) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    let sidecar = reconcile::one_sidecar(stack, args.sidecar.as_deref())?;
    let (_, all) = current_addresses(ctx).await?;
    let i = stack
        .sidecars
        .iter()
        .position(|s| s.name == sidecar)
        .unwrap_or(0);
    let known = all.get(i).cloned().unwrap_or_default();
    if known.is_empty() {
        return Err(CliError::Usage(format!(
            "no address of `{sidecar}` is known yet: run `soul apply`, and check `soul bridge status`"
        )));
    }
    let shown = if args.all { &known[..] } else { &known[..1] };
    out(&shown.iter().map(|a| format!("{a}\n")).collect::<String>());
    Ok(Exit::Ok)
}

pub(super) async fn bridge_status(ctx: &Context, output: Output) -> Result<Exit, CliError> {
    let stack = &ctx.stack;
    let (docker, all) = current_addresses(ctx).await?;
    let observed = reconcile::from_snapshot(docker.snapshot(&stack.stack).await?);
    let mut report = reconcile::transports_report(stack, &all, &observed);
    report.public = reconcile::public_names(stack, &ctx.state());
    // A tailnet node without an auth key waits for a login whose URL only its log shows.
    for t in report.transports.iter_mut().filter(|t| {
        !t.up
            && t.running == Some(true)
            && matches!(t.transport.as_str(), "tailscale" | "headscale")
    }) {
        let Some(container) = t.container.clone() else {
            continue;
        };
        let source = crate::runtime::logs::Source {
            label: container.clone(),
            container,
        };
        let options = crate::runtime::logs::Options {
            tail: Some(200),
            ..Default::default()
        };
        let mut lines = crate::runtime::logs::read(&docker, vec![source], options);
        let mut log = Vec::new();
        while let Some(line) = lines.recv().await {
            log.push(line.text);
        }
        t.login = crate::transport::login_url(log.iter().map(String::as_str));
    }
    match output {
        Output::Json => out(&json_text(&report)),
        Output::Human => out(&render_transports(&report)),
    }
    Ok(Exit::Ok)
}

pub(super) fn render_transports(report: &reconcile::TransportsReport) -> String {
    let mut s = format!("transports of stack `{}`\n", report.stack);
    for t in &report.transports {
        let state = match (t.up, t.running) {
            (true, _) => "up".to_string(),
            _ if t.login.is_some() => format!(
                "waiting for a login: open {} (good for about a minute; `soul restart {}` prints a new one)",
                t.login.as_deref().unwrap_or_default(),
                t.sidecar
            ),
            (_, Some(false)) => "down: container not running (`soul apply`)".into(),
            _ if t.address.is_none() => "down: address not known yet".into(),
            _ => format!("down: {}", t.health.as_deref().unwrap_or("unhealthy")),
        };
        s.push_str(&format!(
            "  {:<12} {:<10} {:<50} {state}\n",
            t.sidecar,
            t.transport,
            t.address.as_deref().unwrap_or("-"),
        ));
    }
    s.push_str(&super::report::public_lines(&report.public, unix_now()));
    s
}
