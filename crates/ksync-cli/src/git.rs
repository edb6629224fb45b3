//! Git-like client commands: `clone`, `emit`, `pull`, `push`, `sync`, `log`, `branch`,
//! `checkout`, `merge`, `status`.
//!
//! A working directory holds `.ksync/config.json` (the repository URL) and `.ksync/events.log`
//! (the local replica, a `FileStorage`). Commands find it from the current directory (or
//! `-C DIR`) upwards, as git does. Credentials come from `--token` / `--api-key` or the
//! `KSYNC_TOKEN` / `KSYNC_API_KEY` environment variables (one of the two kinds: both is a usage
//! error) and are never written to disk.
//!
//! Exit codes (see [`exit_code`]): 0 done; 1 other failure; 2 usage or local problem (not a
//! working directory, bad JSON, invalid name); 3 server unreachable, timed out or failing;
//! 4 credentials refused; 5 repository or branch not found; 6 the server refused some pushed
//! events (conflicts: `ksync pull` settles them, then `ksync push`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ksync_core::{Auth, Conflict, KSync, PullResult, PushResult, Storage, SyncError};
use ksync_git::{GitError, GitSyncClient, Phase, Progress};
use ksync_storage_file::FileStorage;
use serde::{Deserialize, Serialize};

const DIR_NAME: &str = ".ksync";
const CONFIG_FILE: &str = "config.json";
const LOG_FILE: &str = "events.log";
/// Transfers expected to be at least this many events show a progress bar.
const PROGRESS_MIN_EVENTS: u64 = 2_000;

/// The git-like commands, flattened into `ksync`'s command list.
#[derive(Debug, Subcommand)]
pub enum GitCommand {
    /// Clone a repository into a new working directory.
    Clone(CloneArgs),
    /// Record an event locally (sent by the next `ksync push`).
    Emit(EmitArgs),
    /// Fetch and merge the checked-out branch's new events from the server.
    Pull(Common),
    /// Send this branch's local events to the server.
    Push(Common),
    /// Pull, then push.
    Sync(Common),
    /// Show the local log, newest first.
    Log(LogArgs),
    /// List the server's branches, or create one from the current branch.
    Branch(BranchArgs),
    /// Switch to another branch.
    Checkout(CheckoutArgs),
    /// Merge another branch into the checked-out one (on the server; conflicts settled here).
    Merge(MergeArgs),
    /// Show the branch, what waits to be pushed, and how far behind the server we are.
    Status(Common),
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Run as if started in DIR.
    #[arg(short = 'C', value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Bearer token (a JWT or an opaque token). Not together with an API key.
    #[arg(long, env = "KSYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// API key (sent as X-Api-Key). Not together with a token.
    #[arg(
        long,
        env = "KSYNC_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Request timeout in seconds (at most 86400, a day; 0 means 1).
    #[arg(long, value_name = "SECS", default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(0..=86_400))]
    timeout: u64,
    /// PEM file of root certificates to trust for https:// besides the system's (a private
    /// CA, or the server's self-signed certificate).
    #[arg(long, env = "KSYNC_TLS_ROOT_CERT", value_name = "PEM")]
    tls_root_cert: Option<PathBuf>,
}

/// `ksync clone URL [--branch B] [DIR]`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// Repository URL, e.g. http://localhost:8080/git/my-repo.
    url: String,
    /// Directory to create (default: the repository name).
    target: Option<PathBuf>,
    /// Branch to check out.
    #[arg(long, short, default_value = "main")]
    branch: String,
    /// Create the repository on the server if it does not exist.
    #[arg(long)]
    create: bool,
    #[command(flatten)]
    common: Common,
}

/// `ksync emit TYPE JSON`.
#[derive(Debug, Args)]
pub struct EmitArgs {
    /// Event type, e.g. user_created.
    #[arg(value_name = "TYPE")]
    event_type: String,
    /// Event data as JSON, e.g. '{"name":"John"}'.
    #[arg(value_name = "JSON")]
    data: String,
    #[command(flatten)]
    common: Common,
}

/// `ksync log [-n N]`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// How many events to show.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 20)]
    max_count: usize,
    #[command(flatten)]
    common: Common,
}

/// `ksync branch [NAME]`.
#[derive(Debug, Args)]
pub struct BranchArgs {
    /// Branch to create (forked from the current branch at the version pulled).
    name: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `ksync checkout NAME`.
#[derive(Debug, Args)]
pub struct CheckoutArgs {
    /// Branch to switch to.
    name: String,
    #[command(flatten)]
    common: Common,
}

/// `ksync merge FROM`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Branch to merge into the checked-out one.
    from: String,
    #[command(flatten)]
    common: Common,
}

/// `.ksync/config.json`. A field this build does not know is a newer ksync's: refused (exit
/// 2, the field named) rather than ignored, since what it configures would not be done.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    url: String,
}

/// A local failure that is the user's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Usage(pub(crate) String);

/// Some pushed events were refused (exit code 6).
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} event(s) were refused by the server (conflicts); run `ksync pull` to settle them, then `ksync push`"
)]
struct Refused(usize);

/// Runs one command.
pub async fn run(command: GitCommand) -> Result<()> {
    match command {
        GitCommand::Clone(args) => clone(args).await,
        GitCommand::Emit(args) => {
            let data: serde_json::Value = serde_json::from_str(&args.data)
                .map_err(|e| Usage(format!("JSON argument is not valid JSON: {e}")))?;
            let wd = Workdir::open(&args.common).await?;
            let event = wd
                .ksync
                .emit(args.event_type, data)
                .await
                .context("recording the event")?;
            println!(
                "Recorded {} ({}) on branch {}; `ksync push` sends it.",
                event.id,
                event.event_type,
                wd.client().current_branch()
            );
            Ok(())
        }
        GitCommand::Pull(common) => {
            let wd = Workdir::open(&common).await?;
            let bar = wd.progress();
            let result = wd.ksync.pull().await;
            bar.finish_and_clear();
            print_pull(&result?);
            Ok(())
        }
        GitCommand::Push(common) => {
            let wd = Workdir::open(&common).await?;
            let bar = wd.progress();
            let result = wd.ksync.push().await;
            bar.finish_and_clear();
            print_push(&result?, &wd.client().current_branch())
        }
        GitCommand::Sync(common) => {
            let wd = Workdir::open(&common).await?;
            let bar = wd.progress();
            let result = wd.ksync.sync().await;
            bar.finish_and_clear();
            let result = result?;
            print_pull(&result.pull);
            print_push(&result.push, &wd.client().current_branch())
        }
        GitCommand::Log(args) => {
            let wd = Workdir::open(&args.common).await?;
            let storage = wd.ksync.replica().storage();
            let len = storage.len();
            let from = len.saturating_sub(args.max_count as u64);
            let mut events = storage.read_since(from, args.max_count)?;
            events.reverse();
            for stored in events {
                let e = stored.event;
                println!(
                    "{:>6}  {}  v{}  {}  {}  {}",
                    stored.seq, e.id, e.version, e.event_type, e.timestamp, e.data
                );
            }
            Ok(())
        }
        GitCommand::Branch(args) => {
            let wd = Workdir::open(&args.common).await?;
            let client = wd.client();
            match args.name {
                Some(name) => {
                    let info = client.create_branch(&name).await?;
                    println!(
                        "Created branch {} from {} at version {}; `ksync checkout {}` switches to it.",
                        info.name,
                        info.forked_from.as_deref().unwrap_or("-"),
                        info.forked_at.unwrap_or(0),
                        info.name
                    );
                }
                None => {
                    let current = client.current_branch();
                    for b in client.list_branches().await? {
                        let mark = if b.name == current { "*" } else { " " };
                        println!("{mark} {}  (version {})", b.name, b.server_version);
                    }
                }
            }
            Ok(())
        }
        GitCommand::Checkout(args) => {
            let wd = Workdir::open(&args.common).await?;
            let info = wd.client().checkout(&args.name).await?;
            println!(
                "Switched to branch {} (server version {}); `ksync pull` brings its events.",
                info.name, info.server_version
            );
            Ok(())
        }
        GitCommand::Merge(args) => {
            let wd = Workdir::open(&args.common).await?;
            let client = wd.client();
            let into = client.current_branch();
            let result = client.merge(&into, &args.from).await?;
            println!(
                "Merged {} into {}: {} new event(s), {} already present; {} is at version {}.",
                args.from, into, result.appended, result.duplicates, into, result.server_version
            );
            print_conflicts(&result.conflicts, "the merge");
            Ok(())
        }
        GitCommand::Status(common) => {
            let wd = Workdir::open(&common).await?;
            let client = wd.client();
            let local = client.local_status()?;
            println!("On branch {} of {}", local.branch, client.url());
            println!(
                "{} local event(s); {} to push; pulled up to version {}.",
                local.local_events, local.pending_events, local.pulled_version
            );
            let server = client.branch_info(&local.branch).await?;
            let behind = server.server_version.saturating_sub(local.pulled_version);
            if behind == 0 {
                println!(
                    "Up to date with the server (version {}).",
                    server.server_version
                );
            } else {
                println!(
                    "Behind the server by {behind} event(s) (server version {}); `ksync pull` fetches them.",
                    server.server_version
                );
            }
            Ok(())
        }
    }
}

async fn clone(args: CloneArgs) -> Result<()> {
    let client = build_client(&args.url, &args.common)?;
    let repo = client.repo();
    let base = args
        .common
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("."));
    let target = base.join(args.target.unwrap_or_else(|| PathBuf::from(&repo)));
    let marker = target.join(DIR_NAME);
    if marker.exists() {
        // An empty one is what a clone killed before it wrote its config leaves (its cleanup
        // never ran): no command takes it, so it is not a working directory to protect.
        let empty = std::fs::read_dir(&marker)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(Usage(format!(
                "{} is already a ksync working directory",
                target.display()
            ))
            .into());
        }
        std::fs::remove_dir(&marker)
            .with_context(|| format!("removing the empty {}", marker.display()))?;
    }
    let created_dir = !target.exists();
    std::fs::create_dir_all(target.join(DIR_NAME))
        .with_context(|| format!("creating {}", target.display()))?;
    let result = async {
        if args.create {
            client.create_repo().await?;
        }
        let config = Config { url: client.url() };
        // Whole or not at all: a crash never leaves a config no command would take.
        ksync_storage_file::write_file_durably(
            &target.join(DIR_NAME).join(CONFIG_FILE),
            &serde_json::to_vec_pretty(&config)?,
        )?;
        let wd = Workdir::with_client(&target, client).await?;
        let bar = wd.progress();
        let pulled = wd.client().clone(&config.url, &args.branch).await;
        bar.finish_and_clear();
        let pulled = pulled?;
        println!(
            "Cloned {repo} (branch {}) into {}: {} event(s), server version {}.",
            args.branch,
            target.display(),
            pulled.new_events.len(),
            pulled.server_version
        );
        print_conflicts(&pulled.conflicts, "the clone");
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        // As git does: a failed clone leaves nothing behind.
        let leftover = if created_dir {
            target.clone()
        } else {
            target.join(DIR_NAME)
        };
        let _ = std::fs::remove_dir_all(leftover);
    }
    result
}

fn build_client(url: &str, common: &Common) -> Result<GitSyncClient> {
    // As git does: the CLI works on a clone of a repository that exists, and a repository
    // gone from the server is an error (exit 5), not silently made anew and empty.
    let mut builder = GitSyncClient::builder(url)
        .create_repo_if_missing(false)
        .request_timeout(Duration::from_secs(common.timeout.max(1)))
        .connect_timeout(Duration::from_secs(common.timeout.clamp(1, 10)));
    if let Some(path) = &common.tls_root_cert {
        let pem = std::fs::read(path)
            .map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))?;
        builder = builder.tls_root_certificates_pem(pem);
    }
    match (&common.token, &common.api_key) {
        // Neither wins silently: a token left in the environment would hide the key given on
        // the command line, and the server would refuse (or grant) the wrong identity.
        (Some(_), Some(_)) => {
            return Err(Usage(
                "both a token (--token or KSYNC_TOKEN) and an API key (--api-key or KSYNC_API_KEY) are set: give one".into(),
            )
            .into());
        }
        (Some(token), None) => builder = builder.auth(Auth::token(token.clone())),
        (None, Some(key)) => builder = builder.auth(Auth::api_key(key.clone())),
        (None, None) => {}
    }
    builder.build().map_err(|e| match e {
        SyncError::Transport(_) | SyncError::Config(_) => anyhow::Error::new(Usage(e.to_string())),
        other => other.into(),
    })
}

/// An opened working directory.
struct Workdir {
    ksync: KSync<GitSyncClient>,
}

impl Workdir {
    async fn open(common: &Common) -> Result<Self> {
        let start = match &common.dir {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()?,
        };
        let root = find_root(&start).ok_or_else(|| {
            Usage(format!(
                "not a ksync working directory (nor any parent of {}); use `ksync clone URL`",
                start.display()
            ))
        })?;
        let raw = std::fs::read(root.join(DIR_NAME).join(CONFIG_FILE))
            .with_context(|| format!("reading {}", root.join(DIR_NAME).display()))?;
        let config: Config = serde_json::from_slice(&raw).map_err(|e| {
            Usage(format!(
                "{} is damaged or from a newer ksync: {e}",
                root.join(DIR_NAME).join(CONFIG_FILE).display()
            ))
        })?;
        let client = build_client(&config.url, common)?;
        Self::with_client(&root, client).await
    }

    async fn with_client(root: &Path, client: GitSyncClient) -> Result<Self> {
        let path = root.join(DIR_NAME).join(LOG_FILE);
        let storage: Arc<dyn Storage> = Arc::new(
            FileStorage::open(&path).with_context(|| format!("opening {}", path.display()))?,
        );
        let ksync = KSync::builder()
            .storage(storage)
            .sync_client(Arc::new(client))
            .build()
            .await?;
        Ok(Self { ksync })
    }

    fn client(&self) -> &GitSyncClient {
        self.ksync.client()
    }

    /// A progress bar fed by the client; drawn only on a terminal and for big transfers.
    fn progress(&self) -> ProgressBar {
        let bar = ProgressBar::hidden();
        let style = ProgressStyle::with_template(
            "{msg:>8} [{bar:30}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        let shown = bar.clone();
        self.client()
            .set_progress(Some(Arc::new(move |p: Progress| {
                if p.total >= PROGRESS_MIN_EVENTS && shown.is_hidden() {
                    shown.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                }
                shown.set_message(match p.phase {
                    Phase::Pull => "pulling",
                    Phase::Push => "pushing",
                });
                shown.set_length(p.total.max(p.done));
                shown.set_position(p.done);
            })));
        bar
    }
}

fn find_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| dir.join(DIR_NAME).join(CONFIG_FILE).is_file())
        .map(Path::to_path_buf)
}

fn print_pull(result: &PullResult) {
    if result.new_events.is_empty() {
        println!(
            "Already up to date (server version {}).",
            result.server_version
        );
    } else {
        println!(
            "Pulled {} new event(s) (server version {}).",
            result.new_events.len(),
            result.server_version
        );
    }
    print_conflicts(&result.conflicts, "the pull");
}

fn print_push(result: &PushResult, branch: &str) -> Result<()> {
    if result.pushed_events.is_empty() && result.rejected_events.is_empty() {
        println!(
            "Nothing to push on {branch} (server version {}).",
            result.server_version
        );
    } else {
        println!(
            "Pushed {} event(s) to {branch} (server version {}).",
            result.pushed_events.len(),
            result.server_version
        );
    }
    for e in &result.rejected_events {
        eprintln!(
            "refused: {} v{} ({}): the server holds other content under this id and version",
            e.id, e.version, e.event_type
        );
    }
    if result.rejected_events.is_empty() {
        Ok(())
    } else {
        Err(Refused(result.rejected_events.len()).into())
    }
}

fn print_conflicts(conflicts: &[Conflict], during: &str) {
    if conflicts.is_empty() {
        return;
    }
    eprintln!(
        "{} conflict(s) in {during}, settled by the conflict policy (last write wins); the resolutions go out with the next `ksync push`:",
        conflicts.len()
    );
    for c in conflicts {
        eprintln!(
            "  {} v{}: ours {} (t={}) / theirs {} (t={})",
            c.ours.id,
            c.ours.version,
            c.ours.data,
            c.ours.timestamp,
            c.theirs.data,
            c.theirs.timestamp
        );
    }
}

/// The process exit code for an error from [`run`] (see the module docs).
pub fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<Usage>() {
            return 2;
        }
        if cause.is::<Refused>() {
            return 6;
        }
        if let Some(sync) = cause.downcast_ref::<SyncError>() {
            return match sync {
                SyncError::Timeout(_) => 3,
                SyncError::Auth(_) => 4,
                SyncError::Config(_) | SyncError::InvalidEvent(_) => 2,
                SyncError::Transport(_) => match GitError::of(sync) {
                    Some(git) => match git.status() {
                        Some(404) => 5,
                        Some(401 | 403) => 4,
                        Some(400..=499) => 2,
                        _ => 3,
                    },
                    None => 3,
                },
                _ => 1,
            };
        }
    }
    1
}
