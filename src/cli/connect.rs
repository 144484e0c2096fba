//! `soul connect`: a pairing in, a local port (or one probe) out.

use super::args::ConnectArgs;
use super::{CliError, Exit, out, terminated};
use crate::client::{self, Connector, Pairing, store};

pub async fn run(args: &ConnectArgs) -> Result<Exit, CliError> {
    let dir = store::dir().ok_or_else(|| {
        CliError::Usage(
            "neither XDG_CONFIG_HOME nor HOME is set: soul has nowhere to keep the pairing".into(),
        )
    })?;
    if args.list {
        out(&list(&dir));
        return Ok(Exit::Ok);
    }
    let arg = args.pairing.as_deref().unwrap_or_default();
    let (pairing, unstored) = pairing_of(arg, &dir).await?;
    let connector = Connector::new(pairing);
    // A code that carried its token is stored once a gate has answered with the pinned key,
    // not before: a code no gate stands behind leaves nothing behind.
    let keep = |stored: bool| -> Result<(), CliError> {
        if unstored && stored {
            store_pairing(&dir, &connector.pairing)?;
        }
        Ok(())
    };
    if args.probe {
        let (choice, stream) = connector.choose().await?;
        keep(true)?;
        follow_home(&dir, &connector, stream, &choice.address).await;
        out(&format!(
            "{}\n",
            serde_json::json!({
                "path": choice.address.transport.as_str(),
                "address": format!("{}:{}", choice.address.host, choice.address.port),
                "ms": choice.took.as_millis() as u64,
            })
        ));
        return Ok(Exit::Ok);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Io(format!("cannot listen on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::Io(e.to_string()))?;
    let p = &connector.pairing;
    match connector.choose().await {
        Ok((choice, stream)) => {
            keep(true)?;
            follow_home(&dir, &connector, stream, &choice.address).await;
            tracing::info!("path: {} ({} ms)", choice.address, choice.took.as_millis())
        }
        Err(e) if unstored => tracing::warn!(
            "{e}; trying again at the first local connection (the pairing is not stored until its gate answers)"
        ),
        Err(e) => tracing::warn!("{e}; trying again at the first local connection"),
    }
    out(&format!(
        "soul connect: http://{local} → {} of stack {} as {}\n",
        p.sidecar, p.stack, p.device
    ));
    tokio::spawn(connector.clone().maintain());
    client::forward::serve(listener, connector, terminated()).await;
    Ok(Exit::Ok)
}

/// Asks the gate where it is now and, when that changed, rewrites the stored pairing so that
/// the next race starts from the new addresses (this run keeps racing the ones it started
/// with). A gate that does not answer (older than this endpoint) changes nothing; a transport
/// the gate's list does not name keeps its stored addresses.
async fn follow_home(
    dir: &std::path::Path,
    connector: &Connector,
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    over: &crate::pairing::Address,
) {
    let pairing = &connector.pairing;
    // The gate's list replaces the stored addresses of each transport it names; those of a
    // transport it does not name now (the relay while the pod is not registered) are kept.
    let merged = |now: Vec<crate::pairing::Address>| {
        let named: Vec<_> = now.iter().map(|a| a.transport).collect();
        let kept = pairing
            .addresses
            .iter()
            .filter(|a| !named.contains(&a.transport))
            .cloned();
        now.iter().cloned().chain(kept).collect::<Vec<_>>()
    };
    match connector.home_addresses(stream, over).await.map(merged) {
        Ok(now) if !now.is_empty() && now != pairing.addresses => {
            let moved = Pairing {
                addresses: now,
                ..pairing.clone()
            };
            match store::save(dir, &moved) {
                Ok(path) => eprintln!(
                    "the gate's addresses changed: {} now lists {}",
                    path.display(),
                    moved
                        .addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(e) => tracing::warn!("cannot update the stored pairing: {e}"),
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("{e}"),
    }
}

/// A stored pairing by name or path, else a code; and whether it still has to be stored. A
/// link's ticket is traded for the token over a pinned handshake, and such a pairing is stored
/// at once (the ticket is spent); a code that carried its token is stored by the caller once a
/// gate has answered.
async fn pairing_of(arg: &str, dir: &std::path::Path) -> Result<(Pairing, bool), CliError> {
    let stored = dir.join(format!("{arg}.json"));
    if !arg.contains('/') && stored.is_file() {
        return Ok((
            store::load(&stored).map_err(|e| CliError::Usage(e.to_string()))?,
            false,
        ));
    }
    if arg.ends_with(".json") && std::path::Path::new(arg).is_file() {
        let pairing =
            store::load(std::path::Path::new(arg)).map_err(|e| CliError::Usage(e.to_string()))?;
        return Ok((pairing, false));
    }
    let code = client::read_code(arg)?;
    let redeemed = crate::pairing::Payload::parse(&code).is_ok_and(|p| p.token.is_none());
    let pairing = match Pairing::from_code(&code).await {
        Err(client::ClientError::Code(crate::pairing::PayloadError::NotACode))
            if code.starts_with("http") && code.contains("soul_ticket=") =>
        {
            // Not echoed: it holds a ticket.
            return Err(CliError::Usage(
                "that is a browser link without its `#…` part, which tells a program the addresses and the pin: give the whole code (`soul pair DEVICE --format code` prints it, the state dir keeps it as pairing/<device>/<sidecar>.code)".into(),
            ));
        }
        Err(client::ClientError::Code(crate::pairing::PayloadError::NotACode)) => {
            return Err(CliError::Usage(format!(
                "`{arg}` is neither a pairing code, a file holding one, nor a stored pairing (`soul connect --list` lists them)"
            )));
        }
        other => other?,
    };
    if redeemed {
        store_pairing(dir, &pairing)?;
    }
    Ok((pairing, !redeemed))
}

/// Stores a pairing and says where.
fn store_pairing(dir: &std::path::Path, pairing: &Pairing) -> Result<(), CliError> {
    let path = store::save(dir, pairing).map_err(|e| {
        CliError::Io(format!(
            "cannot store the pairing in {}: {e}",
            dir.display()
        ))
    })?;
    eprintln!(
        "paired: stored as {} (next time: soul connect {}.{}.{})",
        path.display(),
        pairing.stack,
        pairing.sidecar,
        pairing.device
    );
    Ok(())
}

fn list(dir: &std::path::Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(String::from)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return format!("no pairing stored in {}\n", dir.display());
    }
    names.iter().map(|n| format!("{n}\n")).collect()
}
