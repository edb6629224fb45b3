//! `cargo xtask browser`: the dashboard and the JavaScript client in a real, headless Chromium.
//!
//! 1. Makes sure Debian's `chromium` is installed (installs it with apt-get when running as
//!    root; fails with a clear message otherwise) and that `node` is there.
//! 2. Installs `playwright-core` (pinned) from npm into `target/browser-node/` (it drives the
//!    system Chromium; Playwright's own browser downloads are never used).
//! 3. Builds the real `ksync` binary, the `browser_peer` example (a Rust
//!    `WebSocketSyncClient` driven over stdin/stdout) and testkit's `slow_link` example (a
//!    throttling TCP proxy, `SlowLink`).
//! 4. Starts `ksync serve --bind 127.0.0.1:0 --in-memory`, reads the bound address from its
//!    output, runs the node test scripts in `tests/browser/` against it (some start servers of
//!    their own: file storage for the restart test, auth), then stops the server.
//!
//! The dashboard screenshot under load lands in `target/artifacts/dashboard.png`.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The playwright-core release the scripts were written against.
const PLAYWRIGHT_CORE: &str = "playwright-core@1.65.1";
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";
/// Each test file's limit (a hung browser must not hang CI).
const TEST_TIMEOUT_MS: u32 = 120_000;

/// Runs the browser tests; `args` may name test files (default: every `tests/browser/*.test.mjs`).
pub(crate) fn run(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    let chromium = ensure_chromium()?;
    ensure_node()?;
    let target = crate::target_dir(&root)?;
    let node_dir = target.join("browser-node");
    let playwright = ensure_playwright(&node_dir)?;

    // One invocation: one feature resolution and one lock wait for both. `--workspace`: features
    // resolved as `cargo test --workspace` resolves them, so after CI's test step nothing but
    // the two targets is built.
    let manifest = root.join("Cargo.toml");
    let manifest = manifest
        .to_str()
        .context("the workspace path must be UTF-8")?;
    crate::cargo(&[
        "build",
        "--manifest-path",
        manifest,
        "--workspace",
        "--bin",
        "ksync",
        "--example",
        "browser_peer",
        "--example",
        "slow_link",
    ])?;
    let ksync = target.join("debug").join("ksync");
    let peer = target.join("debug").join("examples").join("browser_peer");
    let slow_link = target.join("debug").join("examples").join("slow_link");
    let artifacts = target.join("artifacts");
    std::fs::create_dir_all(&artifacts).context("creating target/artifacts")?;
    // Only this run's screenshot may be reported below.
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);

    let tests = test_files(&root, args)?;
    let server = Server::start(&ksync)?;
    eprintln!("ksync serve is listening on {}", server.addr);
    // Readable output on the console, TAP in a file for the counts printed at the end.
    let tap = node_dir.join("results.tap");
    let _ = std::fs::remove_file(&tap);
    let status = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .arg(format!("--test-timeout={TEST_TIMEOUT_MS}"))
        .args(["--test-reporter=spec", "--test-reporter-destination=stdout"])
        .arg("--test-reporter=tap")
        .arg(format!("--test-reporter-destination={}", tap.display()))
        .args(&tests)
        .current_dir(&root)
        .env("KSYNC_BIN", &ksync)
        .env("KSYNC_PEER_BIN", &peer)
        .env("KSYNC_SLOW_LINK_BIN", &slow_link)
        .env("KSYNC_URL", format!("http://{}", server.addr))
        .env("KSYNC_PLAYWRIGHT", &playwright)
        .env("KSYNC_CHROMIUM", &chromium)
        .env("KSYNC_ARTIFACTS", &artifacts)
        .status()
        .context("running node --test")?;
    let server_log = server.stop()?;
    let counts = std::fs::read_to_string(&tap).unwrap_or_default();
    let count = |label: &str| {
        counts
            .lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (passed, failed) = (count("# pass "), count("# fail "));
    println!("browser: {passed} passed, {failed} failed");
    if passed == 0 && status.success() {
        bail!("node ran no browser test");
    }
    if !status.success() {
        eprintln!("--- shared ksync serve log ---\n{server_log}");
        bail!("browser tests failed ({status})");
    }
    if screenshot.exists() {
        eprintln!("dashboard screenshot: {}", screenshot.display());
    }
    eprintln!(
        "browser tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn test_files(root: &Path, args: &[String]) -> Result<Vec<PathBuf>> {
    if !args.is_empty() {
        return Ok(args.iter().map(PathBuf::from).collect());
    }
    let dir = root.join("tests").join("browser");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".test.mjs"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.test.mjs files in {}", dir.display());
    }
    Ok(files)
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Chromium to drive: `KSYNC_CHROMIUM`, or Debian's package (installed when missing).
fn ensure_chromium() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KSYNC_CHROMIUM") {
        let path = PathBuf::from(path);
        if !path.exists() {
            bail!("KSYNC_CHROMIUM={} does not exist", path.display());
        }
        return Ok(path);
    }
    let path = PathBuf::from(DEFAULT_CHROMIUM);
    if path.exists() && runs(DEFAULT_CHROMIUM, "--version") {
        return Ok(path);
    }
    eprintln!("chromium is not installed: installing Debian's package");
    if !crate::apt::is_root() {
        bail!(
            "Chromium is missing at {DEFAULT_CHROMIUM} and this is not root, so it cannot be \
             installed here. Install it (`sudo apt-get install -y chromium`) or point \
             KSYNC_CHROMIUM at a Chromium binary; the browser tests cannot run without one."
        );
    }
    crate::apt::install("chromium").context(
        "Chromium could not be installed with apt-get; the browser tests need Debian's \
         `chromium` package (browser downloads by Playwright do not work here)",
    )?;
    if !runs(DEFAULT_CHROMIUM, "--version") {
        bail!("apt-get installed chromium, but {DEFAULT_CHROMIUM} --version does not run");
    }
    Ok(path)
}

fn ensure_node() -> Result<()> {
    let output = Command::new("node").arg("--version").output().context(
        "node is not installed: the browser tests are node scripts (apt-get install nodejs npm)",
    )?;
    let version = String::from_utf8_lossy(&output.stdout);
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 18 {
        bail!(
            "node {} is too old: the browser tests need node 18 or later",
            version.trim()
        );
    }
    Ok(())
}

/// Installs playwright-core into `node_dir` unless the pinned version is already there;
/// returns the package directory.
fn ensure_playwright(node_dir: &Path) -> Result<PathBuf> {
    let package = node_dir.join("node_modules").join("playwright-core");
    let wanted = PLAYWRIGHT_CORE
        .rsplit_once('@')
        .map(|(_, v)| v)
        .unwrap_or_default();
    let installed = std::fs::read_to_string(package.join("package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json["version"].as_str().map(str::to_owned));
    if installed.as_deref() == Some(wanted) {
        return Ok(package);
    }
    std::fs::create_dir_all(node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    eprintln!("installing {PLAYWRIGHT_CORE} into {}", node_dir.display());
    let status = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--prefix",
        ])
        .arg(node_dir)
        .arg(PLAYWRIGHT_CORE)
        // playwright-core downloads no browser itself; make sure nothing tries.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .status()
        .context("running npm (apt-get install npm)")?;
    if !status.success() || !package.join("package.json").exists() {
        bail!("npm install {PLAYWRIGHT_CORE} failed ({status})");
    }
    Ok(package)
}

/// `ksync serve --in-memory` on a free port; stopped (SIGTERM, then kill) on drop.
struct Server {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(ksync: &Path) -> Result<Self> {
        let mut child = Command::new(ksync)
            .args(["serve", "--bind", "127.0.0.1:0", "--in-memory"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", ksync.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let stderr = child.stderr.take().context("server stderr")?;
        // Bounded by the server's output: one line at a time, read by this process.
        let (log_tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if log_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ws://").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = addr_tx.send(addr);
                }
            }
        });
        let mut server = Self {
            child,
            addr: String::new(),
            log,
        };
        match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) if !addr.is_empty() => server.addr = addr,
            _ => {
                let log = server.drain_log();
                bail!("ksync serve did not print its address within 30 s:\n{log}");
            }
        }
        Ok(server)
    }

    fn drain_log(&mut self) -> String {
        let mut out = String::new();
        while let Ok(line) = self.log.try_recv() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// SIGTERM, wait for the clean shutdown; returns the server's log.
    fn stop(mut self) -> Result<String> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Give the stderr thread a moment to pass on the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let log = self.drain_log();
                if !status.success() {
                    bail!("ksync serve exited with {status}:\n{log}");
                }
                return Ok(log);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let log = self.drain_log();
                bail!("ksync serve did not stop within 20 s of SIGTERM:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
