//! `soul pair`: a device's code in any form, and the pairing page.

use super::*;

/// `soul pair --serve`: the pairing page on loopback until Ctrl-C.
pub(super) async fn pair_page(ctx: &Context, port: u16) -> Result<Exit, CliError> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| CliError::Io(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Io(e.to_string()))?;
    let page = crate::pair_page::PairPage::new(ctx.stack.clone(), ctx.state())
        .map_err(|e| CliError::Io(format!("cannot make the page's address: {e}")))?;
    eprintln!(
        "pairing page of stack `{}`: http://{addr}{} (this machine only; Ctrl-C stops it)",
        ctx.stack.stack,
        page.path()
    );
    page.serve(listener, terminated())
        .await
        .map_err(|e| CliError::Io(format!("pairing page: {e}")))?;
    Ok(Exit::Ok)
}

pub(super) fn pair(ctx: &Context, args: &PairArgs) -> Result<Exit, CliError> {
    let (stack, state) = (&ctx.stack, ctx.state());
    let device = args.device.as_deref().unwrap_or_default();
    let ext = match args.format {
        PairFormat::Terminal => "txt",
        PairFormat::Uri => "uri",
        PairFormat::Link => "link",
        PairFormat::Png => "png",
        PairFormat::Svg => "svg",
    };
    let (sidecar, bytes) =
        reconcile::pairing_code(stack, &state, device, args.sidecar.as_deref(), ext)?;
    match &args.out {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(&bytes).map(|()| f))
                .map_err(|e| CliError::Io(format!("cannot write {}: {e}", path.display())))?;
            let _ = f.flush();
            eprintln!(
                "wrote the pairing code of {}/{sidecar} to {} (it holds a token: keep it private)",
                device,
                path.display()
            );
        }
        None if matches!(args.format, PairFormat::Png) && std::io::stdout().is_terminal() => {
            return Err(CliError::Usage(
                "a PNG on a terminal is unreadable: add --out FILE".into(),
            ));
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&bytes);
            if matches!(args.format, PairFormat::Uri) {
                let _ = stdout.write_all(b"\n");
            }
            if matches!(args.format, PairFormat::Terminal) {
                let _ = writeln!(
                    stdout,
                    "scan with a phone camera: the browser opens {sidecar} and pairs {} (one \
                     browser, once; `soul rotate --device {}` makes a new code)",
                    device, device
                );
            }
        }
    }
    Ok(Exit::Ok)
}
