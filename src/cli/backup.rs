//! `soul state export` and `soul state import` (the backup): the state bundle ([`crate::state::bundle`])
//! written to and read from a file, its passphrase from a file or asked on the terminal
//! without echo.

use std::io::{BufRead as _, IsTerminal as _};

use age::secrecy::SecretString;

use super::*;
use crate::state::bundle;

/// The longest passphrase soul reads from a file.
const MAX_PASSPHRASE_FILE: u64 = 4096;

pub(super) fn export(ctx: &Context, args: &StateExportArgs) -> Result<Exit, CliError> {
    let state = ctx.state();
    let passphrase = passphrase(args.passphrase_file.as_deref(), true)?;
    let bytes = bundle::export(&state, &ctx.stack.stack, passphrase, unix_now())?;
    write_new(&args.out, &bytes)?;
    // Said only once the file is there.
    let _ = bundle::record_export(&state, unix_now());
    eprintln!(
        "wrote the state bundle of stack `{}` to {} (the stack key, the device registry and the spent pairing tickets; encrypted with your passphrase). Keep it, and the passphrase, off this machine; restore with `soul state import {}`",
        ctx.stack.stack,
        args.out.display(),
        args.out.display()
    );
    Ok(Exit::Ok)
}

pub(super) fn import(ctx: &Context, args: &StateImportArgs) -> Result<Exit, CliError> {
    let bytes = crate::files::read_bounded(&args.bundle, bundle::MAX_BUNDLE)
        .map_err(|e| CliError::Io(format!("cannot read {}: {e}", args.bundle.display())))?;
    let passphrase = passphrase(args.passphrase_file.as_deref(), false)?;
    let opened = bundle::open(&bytes, passphrase, &ctx.stack.stack)?;
    let state = ctx.open_state()?;
    let _lock = lock(&state, &ctx.stack, "holds")?;
    let moved = bundle::import(&state, &opened, args.replace, unix_now())?;
    for m in &moved {
        eprintln!("moved aside: {}", state.path().join(m).display());
    }
    eprintln!(
        "imported stack `{}` ({} device{}, exported {}) into {}: run `soul apply` — every paired device keeps its token, and each gate its pin",
        opened.stack,
        opened.devices,
        if opened.devices == 1 { "" } else { "s" },
        super::report::when(opened.exported_at),
        state.path().display()
    );
    Ok(Exit::Ok)
}

/// Writes `bytes` to a new file, 0600; an existing file is an error (a bundle is never
/// overwritten by another).
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |e: std::io::Error| CliError::Io(format!("cannot write {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::Usage(format!(
                    "{} exists: choose another --out (a bundle is never overwritten)",
                    path.display()
                ))
            } else {
                io(e)
            }
        })?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}

/// The passphrase: the first line of `file`, or asked on the terminal (twice when `confirm`).
fn passphrase(file: Option<&Path>, confirm: bool) -> Result<SecretString, CliError> {
    if let Some(file) = file {
        let bytes = crate::files::read_bounded(file, MAX_PASSPHRASE_FILE)
            .map_err(|e| CliError::Io(format!("cannot read {}: {e}", file.display())))?;
        let line = String::from_utf8_lossy(&bytes)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if line.is_empty() {
            return Err(CliError::Usage(format!(
                "{} holds no passphrase on its first line",
                file.display()
            )));
        }
        return Ok(SecretString::from(line));
    }
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()
        .filter(|t| t.is_terminal())
        .ok_or_else(|| {
            CliError::Usage(
                "no terminal to ask the passphrase on: give --passphrase-file FILE".into(),
            )
        })?;
    let first = ask_hidden(&tty, "passphrase: ")?;
    if first.is_empty() {
        return Err(CliError::Usage(
            "an empty passphrase protects nothing".into(),
        ));
    }
    if confirm && ask_hidden(&tty, "passphrase again: ")? != first {
        return Err(CliError::Usage("the two passphrases differ".into()));
    }
    Ok(SecretString::from(first))
}

/// One line read from the terminal with its echo off (restored afterwards).
fn ask_hidden(tty: &std::fs::File, prompt: &str) -> Result<String, CliError> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let io = |e: std::io::Error| CliError::Io(format!("cannot read the passphrase: {e}"));
    let mut out = tty;
    out.write_all(prompt.as_bytes()).map_err(io)?;
    let saved = tcgetattr(tty).map_err(|e| io(e.into()))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(tty, OptionalActions::Flush, &quiet).map_err(|e| io(e.into()))?;
    let mut line = String::new();
    let read = std::io::BufReader::new(tty).read_line(&mut line);
    let _ = tcsetattr(tty, OptionalActions::Flush, &saved);
    let _ = out.write_all(b"\n");
    read.map_err(io)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}
