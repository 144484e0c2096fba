//! `soul relay …`: serve the relay, show a running relay's state, print a stack's `allow` line.

use std::time::Duration;

use super::args::Output;
use super::{CliError, Context, Exit, out, terminated};
use crate::relay::config::RelayConfig;
use crate::relay::server::{self, Relay, Status};
use crate::relay::wire::AgentKey;
use crate::state::KeyProblem;

/// `soul relay serve`: until SIGTERM or SIGINT.
pub async fn serve(
    config: &std::path::Path,
    state_dir: Option<&std::path::Path>,
) -> Result<Exit, CliError> {
    let cfg = RelayConfig::load(config)?;
    let state_dir = state_dir.map_or_else(crate::relay::key::default_dir, |d| d.to_path_buf());
    let identity =
        crate::relay::key::load_or_make(&state_dir).map_err(|e| CliError::Io(e.to_string()))?;
    let bind = |addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::Io(format!("relay: cannot listen on {addr}: {e} (another process has it, or it needs privileges)"))
        })
    };
    let listener = bind(cfg.listen).await?;
    let status = match cfg.status {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    if cfg.allow.is_empty() {
        tracing::warn!(
            "relay: {} allows no stack yet: add `soul relay allow`'s line for each",
            config.display()
        );
    }
    tracing::info!(
        "relay listening on {} for {} allowed stack(s){}",
        cfg.listen,
        cfg.allow.len(),
        cfg.status
            .map(|s| format!(", status on http://{s}/status"))
            .unwrap_or_default()
    );
    tracing::info!(
        "relay key pin: {} (each stack's stack.kdl: relay \"<this host>:{}\" pin=\"{}\")",
        identity.pin,
        cfg.listen.port(),
        identity.pin
    );
    let relay = Relay::new(cfg, &identity);
    if let Some(listener) = status {
        tokio::spawn(server::serve_status(relay.clone(), listener));
    }
    relay.serve(listener, terminated()).await;
    Ok(Exit::Ok)
}

/// `soul relay status`.
pub async fn status(address: &str, output: Output) -> Result<Exit, CliError> {
    let url = format!("http://{address}/status");
    let unreachable = |e: String| {
        CliError::Io(format!(
            "cannot read the relay's status at {url}: {e} (is `soul relay serve` running there, with `status` in its file?)"
        ))
    };
    let (code, body) = crate::programs::get(&url, Duration::from_secs(5))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if !code.is_success() {
        return Err(unreachable(format!("it answered {code}")));
    }
    let status: Status = serde_json::from_slice(&body)
        .map_err(|e| unreachable(format!("not a relay's status: {e}")))?;
    match output {
        Output::Json => out(&format!("{}\n", String::from_utf8_lossy(&body))),
        Output::Human => out(&render_status(&status)),
    }
    Ok(Exit::Ok)
}

fn render_status(status: &Status) -> String {
    let mut s = format!(
        "relay on {}, up {} s, {} connection(s) not yet routed\nkey pin: {} (stack.kdl: relay \"<host>:<port>\" pin=\"{}\")\n",
        status.listen, status.uptime_s, status.pending, status.pin, status.pin
    );
    if status.stacks.is_empty() {
        s.push_str("no stack is allowed: add `soul relay allow`'s line to the relay's file\n");
    }
    for stack in &status.stacks {
        s.push_str(&format!(
            "stack {}: {} open session(s)\n",
            stack.stack, stack.open_sessions
        ));
        if stack.sidecars.is_empty() {
            s.push_str("  no sidecar registered\n");
        }
        for c in &stack.sidecars {
            s.push_str(&format!(
                "  {:<16} registered from {}, {} ready, {} waiting, {} session(s) so far\n",
                c.sidecar, c.agent, c.ready, c.waiting, c.sessions_total
            ));
            if let Some(name) = &c.public {
                s.push_str(&format!("  {:<16} public name {name}\n", ""));
            }
            if c.replaced > 0 {
                s.push_str(&format!(
                    "  {:<16} replaced by a newer registration {} time(s){}\n",
                    "",
                    c.replaced,
                    if c.replaced > 1 {
                        ": two machines may be serving this stack (`soul down` on the one that should not)"
                    } else {
                        ""
                    }
                ));
            }
        }
        if let Some(names) = &stack.names {
            s.push_str(&format!("  may claim: {}\n", names.join(" ")));
        }
    }
    s
}

/// `soul relay allow`: this stack's line for the relay's file.
pub fn allow(ctx: &Context) -> Result<Exit, CliError> {
    let key = ctx.state().read_key().map_err(|p| match p {
        KeyProblem::Missing => CliError::Usage(format!(
            "stack `{}` has no key yet in {}: run `soul apply` first",
            ctx.stack.stack,
            ctx.state.display()
        )),
        KeyProblem::Unreadable(why) => CliError::Usage(format!(
            "cannot read the stack key in {}: {why}",
            ctx.state.display()
        )),
    })?;
    if ctx.stack.relay.is_none() {
        eprintln!(
            "note: {} has no `relay` node yet; add `relay \"<relay host>:7000\" pin=\"…\"` (the pin from `soul relay status` on the relay) so the pods register",
            ctx.file.display()
        );
    }
    let agent = AgentKey::from_seed(key.relay_agent_seed());
    out(&format!(
        "allow \"{}\" key=\"{}\"\n",
        ctx.stack.stack,
        agent.public()
    ));
    Ok(Exit::Ok)
}
