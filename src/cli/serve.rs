//! The long-running commands: `soul watch`, and the programs soul's image runs in pods (`soul
//! gate`, `soul pause`) with the signal that ends them.

use super::*;

pub(super) async fn watch(cli: &Cli, args: &WatchArgs) -> Result<Exit, CliError> {
    let opts = reconcile::WatchOptions {
        file: cli.file.clone(),
        state_dir: cli.state_dir.clone(),
        resync: args.resync,
        pull: args.pull,
        update: args.update,
        flap_restarts: args.flap_restarts,
        flap_window: args.flap_window,
        address_poll: args.address_poll,
        debounce: Duration::from_millis(50),
        after_pass: args.export_kubernetes.clone().map(|path| {
            let state_dir = cli.state_dir.clone();
            reconcile::AfterPass(std::sync::Arc::new(move |stack: &Stack| {
                let state = state_dir
                    .clone()
                    .unwrap_or_else(|| state::default_dir(&stack.stack));
                keep_kubernetes_export(stack, &state, &path);
            }))
        }),
    };
    reconcile::watch(opts, terminated()).await?;
    Ok(Exit::Ok)
}

pub(super) async fn gate(args: &GateArgs) -> Result<Exit, CliError> {
    let mut cfg = crate::gate::GateConfig::new(&args.stack, args.upstream, args.keys.clone());
    cfg.sidecar = args.sidecar.clone();
    let spent = args
        .spent
        .as_ref()
        .map(|d| d.join(args.sidecar.as_deref().unwrap_or("gate")));
    let volume = args
        .redeemed
        .as_ref()
        .map(|d| d.join(crate::gate::REDEEMED_FILE));
    cfg.earlier_spent = spent.iter().flat_map(|_| volume.clone()).collect();
    cfg.spent_file = spent.or(volume);
    cfg.header_timeout = args.header_timeout;
    cfg.slots = crate::gate::SlotLimits {
        max: args.max_connections as usize,
        per_source: args.per_source as usize,
        new_per_second: f64::from(args.per_source_rate),
        burst: 4.0 * f64::from(args.per_source_rate),
    };
    cfg.failures_per_minute = args.failures_per_minute;
    cfg.tls_only = args.tls_only;
    cfg.relay = match (&args.relay, &args.sidecar, &args.relay_pin) {
        (Some(relay), Some(sidecar), Some(pin)) => Some(crate::relay::agent::AgentConfig {
            relay: relay.clone(),
            pin: pin.clone(),
            stack: args.stack.clone(),
            sidecar: sidecar.clone(),
            key_file: args.keys.join(crate::state::layout::GATE_RELAY_KEY_FILE),
            state_file: args
                .redeemed
                .as_ref()
                .map(|d| d.join(crate::relay::agent::STATE_FILE)),
            public: args.public_name.clone(),
        }),
        _ => None,
    };
    if let (Some(name), Some(dir)) = (&args.public_name, &args.acme_dir) {
        cfg.public = Some(crate::gate::acme::PublicCert::new(name));
        cfg.acme = Some(crate::gate::acme::AcmeConfig {
            name: name.to_ascii_lowercase(),
            directory: args.acme_directory.clone(),
            ca_file: args.acme_ca.clone(),
            dir: dir.clone(),
            contact: args.acme_contact.clone(),
            retry: args.acme_retry,
        });
    }
    let threads = args.threads.map(usize::from);
    crate::gate::run(cfg, args.listen, threads, terminated()).await?;
    Ok(Exit::Ok)
}

/// Holds the pod's namespace until stopped, after installing its guard (or, with `--check`,
/// only checks that the guard is in place).
pub(super) async fn pause(args: &PauseArgs) -> Result<Exit, CliError> {
    let policy = args.gate_port.map(|gate_port| crate::guard::Policy {
        gate_port,
        open_udp: args.open_udp.clone(),
    });
    if let (Some(policy), true) = (&policy, args.check) {
        return match crate::guard::installed(policy)? {
            true => Ok(Exit::Ok),
            false => Err(CliError::Unguarded {
                gate_port: policy.gate_port,
            }),
        };
    }
    if let Some(policy) = policy {
        // Never stop holding the namespace over this: the pod stays up, and the pause
        // container's health check reports it as unguarded.
        let port = policy.gate_port;
        match crate::guard::install(&policy) {
            Ok(()) => tracing::info!("only the gate's port {port} answers from outside the pod"),
            Err(e) => tracing::error!("the pod's ports are NOT private: {e}"),
        }
    }
    crate::programs::pause()
        .await
        .map_err(|source| CliError::Program {
            program: "pause",
            source,
        })?;
    Ok(Exit::Ok)
}

/// Resolves on SIGTERM or SIGINT.
pub(super) async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
