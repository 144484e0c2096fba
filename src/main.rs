//! The `soul` binary: parse arguments, set up logging, run one command, exit with its code.

use clap::Parser;
use soul::cli::{Cli, Command, Exit, LogFormat, RelayCommand, run};
use tracing_subscriber::EnvFilter;

fn main() {
    // A link named `soul-bridge` runs `soul bridge …`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().to_string());
    if invoked_as.as_deref() == Some("soul-bridge") {
        args.insert(1, "bridge".into());
    }
    // Flag errors are invalid input: exit 1, as `soul --help` says (clap's own default is 2,
    // which soul keeps for `plan --detailed-exitcode`'s "changes pending").
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() {
                Exit::Failure
            } else {
                Exit::Ok
            };
            std::process::exit(code as i32);
        }
    };
    // Long-running commands report what they do (watch: each pass; the gate: its audit log);
    // one-shot commands stay quiet.
    let long_running = matches!(
        cli.command,
        Command::Watch(_)
            | Command::Gate { .. }
            | Command::Pause { .. }
            | Command::Connect(_)
            | Command::Relay(RelayCommand::Serve { .. })
    );
    let default = match cli.verbose {
        0 if long_running => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("SOUL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_format == LogFormat::Json {
        logs.json().init();
    } else {
        logs.init();
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start soul's runtime: {e}");
            std::process::exit(Exit::Failure as i32);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprint!("{}", e.report());
            e.exit()
        }
    };
    std::process::exit(code as i32);
}
