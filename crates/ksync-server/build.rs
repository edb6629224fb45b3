//! Names the build: the git commit it was made from, so that `/health` and `ksync --version`
//! tell builds of one version apart. Sets `KSYNC_BUILD_COMMIT` (12 hex digits, or empty when
//! unknown) and `KSYNC_VERSION` (`0.1.0 (commit 0123456789ab)`, or just the version).
//!
//! The commit is, in order: `KSYNC_BUILD_COMMIT` from the environment if set and not empty
//! (for builds from a source tree without `.git`, such as a container build); else `git rev-parse HEAD` in this
//! crate's directory, if git is there and tracks this file (a crate unpacked from a registry
//! inside some other repository is not that repository's build); else unknown. Nothing here
//! fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=KSYNC_BUILD_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let (commit, source) = match std::env::var("KSYNC_BUILD_COMMIT") {
        Ok(given) if !given.trim().is_empty() => {
            let commit = short(given.trim());
            if commit.is_none() {
                println!("cargo::warning=KSYNC_BUILD_COMMIT is not a commit id (hex): ignored");
            }
            (commit, "environment")
        }
        _ => (from_git(&dir), "git"),
    };
    // For this crate's tests: a commit given by the builder need not be in the checkout.
    println!("cargo::rustc-env=KSYNC_BUILD_COMMIT_SOURCE={source}");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let long = match &commit {
        Some(commit) => format!("{version} (commit {commit})"),
        None => version,
    };
    println!(
        "cargo::rustc-env=KSYNC_BUILD_COMMIT={}",
        commit.unwrap_or_default()
    );
    println!("cargo::rustc-env=KSYNC_VERSION={long}");
}

/// The first 12 digits of a commit id given as hex, else `None`.
fn short(id: &str) -> Option<String> {
    let id = id.to_ascii_lowercase();
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id[..12].to_owned())
}

/// Runs git in `dir`; its trimmed output if it succeeded.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn from_git(dir: &Path) -> Option<String> {
    git(dir, &["ls-files", "--error-unmatch", "build.rs"])?;
    // Build again when HEAD moves (a commit, a checkout): HEAD itself, its reflog, the branch
    // it names (loose or packed). Only paths that exist: Cargo runs a script whose watched
    // path is missing on every build.
    let mut watched = vec!["HEAD".to_owned(), "logs/HEAD".into(), "packed-refs".into()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        // Relative to `dir` unless absolute (`join` keeps an absolute one as it is).
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]).map(|p| dir.join(p))
            && path.exists()
        {
            println!("cargo::rerun-if-changed={}", path.display());
        }
    }
    short(&git(dir, &["rev-parse", "HEAD"])?)
}
