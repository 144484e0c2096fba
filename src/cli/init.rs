//! Getting started and documentation: `soul init`, man pages, shell completions.

use super::*;

/// `soul init`: a first stack.kdl at `-f` (never over an existing file).
pub(super) fn init(cli: &Cli, args: &InitStackArgs) -> Result<Exit, CliError> {
    use crate::stack::init::{Init, name_from};
    let path = &cli.file;
    if path.exists() {
        return Err(CliError::Usage(format!(
            "{} exists: soul init never overwrites a stack file; edit it, or move it away first",
            path.display()
        )));
    }
    let interactive = std::io::stdin().is_terminal();
    let needs_flags = || {
        CliError::Usage(
            "without a terminal to ask on, soul init needs --image IMAGE and --port PORT (the port the service listens on)".into(),
        )
    };
    let image = match &args.image {
        Some(image) => image.clone(),
        None if interactive => ask("Image of your service", "nginx:latest")?,
        None => return Err(needs_flags()),
    };
    let port = match args.port {
        Some(port) => port,
        None if interactive => ask("Port it listens on inside its container", "80")?
            .parse()
            .map_err(|_| CliError::Usage("a port is a number from 1 to 65535".into()))?,
        None => return Err(needs_flags()),
    };
    let directory = std::env::current_dir()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let stack = match &args.name {
        Some(name) if name_from(name, "") == *name => name.clone(),
        Some(name) => {
            return Err(CliError::Usage(format!(
                "`{name}` is not a stack name (lowercase letters, digits and dashes, starting with a letter, at most 32): try `{}`",
                name_from(name, "home")
            )));
        }
        None => name_from(&directory, "home"),
    };
    let init = Init { stack, image, port };
    let text = init.text();
    stack::parse(&path.display().to_string(), &text).map_err(StackError::Invalid)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| CliError::Io(format!("cannot write {}: {e}", path.display())))?;
    out(&format!(
        "wrote {} (stack `{}`, sidecar `{}` on LAN port 8443, device `my-phone`)\nnext: `soul apply`, then `soul pair my-phone` and scan the code with the phone\n",
        path.display(),
        init.stack,
        init.sidecar()
    ));
    Ok(Exit::Ok)
}

/// `soul man`: the top page on stdout, or every page into `dir`.
pub(super) fn man(dir: Option<&Path>) -> Result<Exit, CliError> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            clap_mangen::generate_to(cmd, dir).map_err(|e| {
                CliError::Io(format!(
                    "cannot write the manual pages into {}: {e}",
                    dir.display()
                ))
            })?;
            eprintln!("wrote soul.1 and a page per command into {}", dir.display());
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| CliError::Io(format!("cannot render the manual page: {e}")))?;
            out(&String::from_utf8_lossy(&page));
        }
    }
    Ok(Exit::Ok)
}

/// A completion script for `shell`, generated from the argument definitions.
pub(super) fn completions(shell: Shell) -> String {
    use clap_complete::{generate, shells};
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    match shell {
        Shell::Bash => generate(shells::Bash, &mut cmd, "soul", &mut script),
        Shell::Zsh => generate(shells::Zsh, &mut cmd, "soul", &mut script),
        Shell::Fish => generate(shells::Fish, &mut cmd, "soul", &mut script),
    }
    String::from_utf8_lossy(&script).into_owned()
}
