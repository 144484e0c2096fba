//! The command line: the dispatch to one library call per command. Each command's handler
//! lives in the room of its concern — `converge` (validate, plan, apply, down, rotate),
//! `report` (status, devices), `pods` (logs, stop, start, restart), `bridge`, `export`,
//! `pair`, `init`, `serve` (watch, gate, pause), `connect`, `relay` — on what they
//! share: `context` (the flags resolved once, the lock, a prepared pass) and `outcome` (exit
//! codes, and the one place where errors become them). The arguments are `args`'s. Adding a
//! command touches its handler and the dispatch below.

mod args;
mod backup;
mod bridge;
mod connect;
mod context;
mod converge;
mod export;
mod init;
mod outcome;
mod pair;
mod pods;
mod program_args;
mod relay;
mod report;
mod serve;

use bridge::*;
use context::*;
use converge::*;
use export::*;
use init::*;
pub use outcome::{CliError, Exit};
use pair::*;
use pods::*;
use report::*;
use serve::*;

pub use args::*;
pub use program_args::{GateArgs, PauseArgs};

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::machine::Host;
use crate::reconcile::{self, Desired, PassError, Plan, SoulImage, Step, unix_now};
use crate::runtime::{Docker, RuntimeError};
use crate::stack::{self, Stack, StackError};
use crate::state::{self, StateDir, StateError};

/// Writes to stdout; a closed pipe (`soul plan | head`) ends the program quietly.
fn out(s: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<Exit, CliError> {
    match &cli.command {
        Command::Init(args) => init(&cli, args),
        Command::Validate => validate(&Context::load(&cli)?),
        Command::Schema => {
            out(&stack::schema_json());
            Ok(Exit::Ok)
        }
        Command::Plan(args) => plan(&Context::load(&cli)?, args).await,
        Command::Apply => apply(&Context::load(&cli)?).await,
        Command::Update(args) => update(&Context::load(&cli)?, args).await,
        Command::Status(args) => status(&cli, args.output).await,
        Command::Watch(args) => watch(&cli, args).await,
        Command::Down(args) => down(&Context::load(&cli)?, args).await,
        Command::Prune => prune(&Context::load(&cli)?).await,
        Command::Logs(args) => logs(&Context::load(&cli)?, args).await,
        Command::Stop(args) => stop(&Context::load(&cli)?, args).await,
        Command::Start(args) => start(&Context::load(&cli)?, args).await,
        Command::Restart(args) => restart(&Context::load(&cli)?, args).await,
        Command::Image => image().await,
        Command::Completions { shell } => {
            out(&completions(*shell));
            Ok(Exit::Ok)
        }
        Command::Man { out: dir } => man(dir.as_deref()),
        Command::Devices(args) => devices(&Context::load(&cli)?, args.output),
        Command::Pair(args) if args.serve => pair_page(&Context::load(&cli)?, args.port).await,
        Command::Pair(args) => pair(&Context::load(&cli)?, args),
        Command::Rotate(args) => rotate(&cli, args).await,
        Command::Export(ExportCommand::Compose { out: path }) => {
            export_compose(&Context::load(&cli)?, path.as_deref())
        }
        Command::Export(ExportCommand::Kubernetes { out: path }) => {
            export_kubernetes(&Context::load(&cli)?, path.as_deref())
        }
        Command::State(StateCommand::Export(args)) => backup::export(&Context::load(&cli)?, args),
        Command::State(StateCommand::Import(args)) => backup::import(&Context::load(&cli)?, args),
        Command::Connect(args) => connect::run(args).await,
        Command::Relay(RelayCommand::Serve { config, state_dir }) => {
            relay::serve(config, state_dir.as_deref()).await
        }
        Command::Relay(RelayCommand::Status { status, output }) => {
            relay::status(status, *output).await
        }
        Command::Relay(RelayCommand::Allow) => relay::allow(&Context::load(&cli)?),
        Command::Bridge(BridgeCommand::Init(args)) => bridge_init(&cli, args),
        Command::Bridge(BridgeCommand::Status(args)) => {
            bridge_status(&Context::load(&cli)?, args.output).await
        }
        Command::Bridge(BridgeCommand::Address(args)) => {
            bridge_address(&Context::load(&cli)?, args).await
        }
        Command::Gate(args) => gate(args).await,
        Command::Pause(args) => pause(args).await,
        Command::DemoApp { port } => {
            crate::programs::demo_app(*port, async {
                let _ = crate::programs::pause().await;
            })
            .await
            .map_err(|source| CliError::Program {
                program: "demo-app",
                source,
            })?;
            Ok(Exit::Ok)
        }
        Command::Probe { url, timeout } => match crate::programs::probe(url, *timeout).await {
            Ok(()) => Ok(Exit::Ok),
            Err(e) => {
                eprintln!("probe {url}: {e}");
                Ok(Exit::Failure)
            }
        },
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
