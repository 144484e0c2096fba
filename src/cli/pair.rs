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
        PairFormat::Code => "code",
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
                "wrote the pairing code of {}/{sidecar} to {} ({})",
                device,
                path.display(),
                what_it_holds(ctx, args, device, &sidecar)
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
            if matches!(args.format, PairFormat::Uri | PairFormat::Code) {
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

/// What a written code holds, for the warning beside it (docs/pairing.md, "What each form
/// holds"): the URI always holds the device token; the QR code (and so the PNG, SVG, terminal
/// drawing and `code`) holds the link and its single-use ticket, except while no address is
/// known, when it holds the URI; links hold tickets.
fn what_it_holds(ctx: &Context, args: &PairArgs, device: &str, sidecar: &str) -> &'static str {
    const TOKEN: &str = "it holds the device token, a long-lived credential: keep it private";
    const TICKET: &str =
        "it holds a single-use pairing ticket: keep it private until a device has paired with it";
    match args.format {
        PairFormat::Uri => TOKEN,
        PairFormat::Link => TICKET,
        _ => {
            let code =
                reconcile::pairing_code(&ctx.stack, &ctx.state(), device, Some(sidecar), "code");
            match code {
                Ok((_, text)) if !text.starts_with(b"soul://") => TICKET,
                _ => TOKEN,
            }
        }
    }
}
