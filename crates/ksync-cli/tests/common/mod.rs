//! Helpers the `ksync` binary's tests share: running it, signalling it, starting
//! `ksync serve` and reading its address. Each test binary uses its own share of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The `ksync` binary under test.
pub fn ksync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ksync"))
}

/// Sends `SIG<name>` (`TERM`, `INT`, `HUP`) to `child`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {}", child.id());
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    signal(child, "TERM");
}

/// A `ksync serve` that printed its listening line.
pub struct Served {
    pub child: Child,
    /// `IP:PORT` from the listening line.
    pub addr: String,
    /// The listening line itself.
    pub first_line: String,
}

/// Starts `ksync serve --bind 127.0.0.1:0 ARGS` with `envs`, its stderr going to `stderr`
/// (a pipe that is read at the end, or `Stdio::null()`), and waits for its listening line.
pub fn serve(args: &[&str], envs: &[(&str, &str)], stderr: Stdio) -> Served {
    serve_from(ksync(), args, envs, stderr)
}

/// [`serve`] through `command`, which runs `ksync` with the arguments it is given (the
/// binary itself, or a shell that sets something up and execs it).
pub fn serve_from(
    mut command: Command,
    args: &[&str],
    envs: &[(&str, &str)],
    stderr: Stdio,
) -> Served {
    command
        .arg("serve")
        .args(["--bind", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn ksync serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut first_line = String::new();
    BufReader::new(stdout)
        .read_line(&mut first_line)
        .expect("read first line");
    let addr = first_line
        .strip_prefix("ksync listening on ws://")
        .or_else(|| first_line.strip_prefix("ksync listening on wss://"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
        .to_owned();
    Served {
        child,
        addr,
        first_line,
    }
}

/// Runs `command` (piped output) to its end, which must come within 10 s: a start-up
/// failure taken for a good configuration would otherwise serve (and wait) forever.
pub fn finishes(mut command: Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ksync");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill");
            let output = child.wait_with_output().expect("wait");
            panic!(
                "{command:?} is still running: {}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

/// The lines of `output` (a child's stdout or stderr) as they come, read on a thread that
/// ends at EOF (when the child is gone) or when the receiver is dropped.
pub fn lines(output: impl Read + Send + 'static) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}
