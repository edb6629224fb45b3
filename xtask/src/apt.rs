//! Installing Debian packages a task needs (chromium for the browser tests, nats-server and
//! redis-server for the benchmarks), the way a new machine gets them: apt-get, as root.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Whether this process runs as root (apt-get needs it).
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `apt-get update`, then `apt-get install -y PACKAGE` (a new machine may have no package
/// lists yet). Fails when not root or when apt-get does.
pub(crate) fn install(package: &str) -> Result<()> {
    if !is_root() {
        bail!("{package} is not installed and this is not root: apt-get install {package}");
    }
    for args in [&["update", "-qq"][..], &["install", "-y", "-qq", package]] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
    }
    Ok(())
}
