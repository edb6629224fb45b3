//! Child processes: the test binary re-executes one of its own tests as the child.
//!
//! A child test is an ordinary `#[test]` that returns at once unless its environment variable
//! is set; the parent runs `current_exe() --exact <test> --nocapture` with that variable, reads
//! the lines the child prints on stdout and keeps its stderr in a file (to grep it later).

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

/// Lines buffered between the reader thread and the test. Overflow policy: the reader thread
/// blocks, so the child blocks on its stdout pipe (back-pressure; no line is dropped).
const LINE_QUEUE: usize = 65_536;

/// A running child process.
#[derive(Debug)]
pub struct ChildProcess {
    child: std::process::Child,
    lines: Receiver<String>,
    stderr_path: PathBuf,
}

/// Starts `current_exe() --exact <test> --nocapture` with `env`, stderr written to
/// `stderr_path`.
pub fn spawn(test: &str, env: &[(&str, String)], stderr_path: &Path) -> io::Result<ChildProcess> {
    let exe = std::env::current_exe()?;
    let stderr = File::create(stderr_path)?;
    let mut command = Command::new(exe);
    command
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("child has no stdout"))?;
    let (tx, rx): (SyncSender<String>, Receiver<String>) = sync_channel(LINE_QUEUE);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints `test <name> ... ` without a newline before the test's output.
            let line = match line
                .strip_prefix("test ")
                .and_then(|l| l.split_once(" ... "))
            {
                Some((_, rest)) => rest.to_owned(),
                None => line,
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(ChildProcess {
        child,
        lines: rx,
        stderr_path: stderr_path.to_path_buf(),
    })
}

impl ChildProcess {
    /// The next stdout line, waiting at most `timeout`; `None` on timeout or end of output.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        // Timeout or end of output alike: no line.
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits (at most `timeout`) for a line starting with `prefix` and returns the rest of it.
    pub fn expect_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.line(left)?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
    }

    /// Every line already printed, without waiting.
    pub fn drain(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap the process; returns the lines it printed before dying.
    pub fn kill(mut self) -> io::Result<Vec<String>> {
        self.child.kill()?;
        self.child.wait()?;
        // The reader thread ends at EOF; wait for it so no acknowledged line is missed.
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            rest.push(line);
        }
        Ok(rest)
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`) with `kill(1)`.
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill -{signal} failed: {status}")))
        }
    }

    /// The file holding the child's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Resident memory of the child, in KiB, from `/proc/<pid>/status` (`None` elsewhere).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.pid())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Never leave a child behind (a failed assertion unwinds through here).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid`, in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
