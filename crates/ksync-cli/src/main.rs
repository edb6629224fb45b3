//! The `ksync` command line: `ksync serve` runs the server; client commands talk to one.
//!
//! Each command group lives in its own module with an `Args` type (clap derive) and an
//! `async fn run(args) -> anyhow::Result<()>`; adding one is a variant in [`Command`] and an arm
//! in `main`.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc rather than the system's: the relay allocates and frees a few small buffers per
/// event on two worker threads, where glibc's malloc took about a fifth of the relay's CPU
/// (free-list consolidation, arena growth by `mprotect`); with mimalloc the relay spends
/// about 12% less CPU per delivery (`cargo xtask bench ws`, profiled). Set here, in the binary:
/// a library leaves the choice to the application embedding it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod emit;
mod fdlimit;
mod git;
mod peer;
mod serve;
mod watch;

/// kSync: keep event logs in step across replicas.
#[derive(Debug, Parser)]
#[command(name = "ksync", version = ksync_server::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sync server (WebSocket relay + HTTP) until SIGINT/SIGTERM.
    // Boxed: its many flags make it far larger than the other commands.
    Serve(Box<serve::ServeArgs>),
    #[command(flatten)]
    Git(git::GitCommand),
    /// Run a P2P peer: print its addresses, connect, emit, and print received events.
    Peer(peer::PeerArgs),
    /// Join a server's room over WebSocket and print its events (history or --since SEQ or
    /// --live, then live).
    Watch(watch::WatchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ksync: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Git(command) => git::run(command).await,
            Command::Peer(args) => peer::run(args).await,
            Command::Watch(args) => watch::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ksync: {}", report(&error));
            if let Some(code) = serve::exit_code(&error) {
                // Cut short on purpose: no waiting for blocking tasks either.
                runtime.shutdown_background();
                return ExitCode::from(code);
            }
            ExitCode::from(git::exit_code(&error))
        }
    }
}

/// The error and its causes, `: `-separated, each said once: many error types put their
/// source's message in their own as well (`relay: {0}` with `#[from]`), so printing the whole
/// chain (`{:#}`) repeated them. A cause already contained in the message before it is
/// skipped.
fn report(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    let mut previous = out.clone();
    for cause in error.chain().skip(1) {
        let message = cause.to_string();
        if !previous.contains(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        previous = message;
    }
    out
}

/// Until SIGINT or SIGTERM, or `duration` seconds when given (`--duration` of the commands
/// that run until stopped: `peer`, `watch`).
async fn until_stopped(signal: &mut ksync_server::ShutdownSignal, duration: Option<u64>) {
    match duration {
        Some(secs) => {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(secs)) => {}
                () = signal.recv() => {}
            }
        }
        None => signal.recv().await,
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
