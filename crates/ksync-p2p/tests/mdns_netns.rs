//! mDNS discovery, really tried.
//!
//! libp2p's mDNS skips loopback interfaces (multicast does not run over `lo`), and sending
//! multicast on the host's real interface would leave the machine, so this test builds its own
//! LAN: two network namespaces joined by a veth pair, one peer in each. The test binary
//! re-executes itself inside each namespace (`ip netns exec`) as a peer with
//! `discoveryMethod: mdns`; each must find the other with no address given, connect, and
//! receive the other's event. Where namespaces cannot be made (not root, no `ip`), it says why
//! and counts the test as skipped; it never pretends to pass.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "KSYNC_MDNS_ROLE";
const KEY_DIR: &str = "KSYNC_MDNS_KEY_DIR";
const NETWORK: &str = "KSYNC_MDNS_NETWORK";

fn main() -> ExitCode {
    match std::env::var(ROLE) {
        Ok(role) => child(&role),
        Err(_) => parent(),
    }
}

/// One peer inside a namespace: start with mDNS, publish one event, wait for the other's.
fn child(role: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("child {role}: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let key_dir = std::env::var(KEY_DIR).unwrap_or_else(|_| ".".into());
        let network = std::env::var(NETWORK).unwrap_or_else(|_| "mdns-test".into());
        let client = ksync_p2p::P2PSyncClient::builder(
            format!("mdns-{role}"),
            ksync_p2p::DiscoveryMethod::Mdns,
        )
        .key_dir(key_dir)
        .network(network)
        .anti_entropy_interval(Duration::from_millis(500))
        .build()
        .expect("build");
        client.start().await.expect("start");
        let mine = ksync_core::Event::new(
            format!("hello-from-{role}"),
            "greeting",
            serde_json::json!({ "role": role }),
            1,
        );
        // Before anyone is connected: catch-up carries it once mDNS has found the other.
        let _ = client.broadcast(mine).await;
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            let others: Vec<String> = client
                .replica()
                .storage()
                .read_since(0, 16)
                .expect("read")
                .into_iter()
                .map(|s| s.event.id)
                .filter(|id| id != &format!("hello-from-{role}"))
                .collect();
            if let Some(other) = others.first() {
                println!(
                    "peer {role} ({}) found {:?} by mDNS and received {other}",
                    client.local_peer_id(),
                    client.connected_peers()
                );
                // Stay a moment so the other side can fetch our event too.
                tokio::time::sleep(Duration::from_secs(2)).await;
                return ExitCode::SUCCESS;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "peer {role}: nothing received; connected to {:?}, listening on {:?}",
                    client.connected_peers(),
                    client.listen_addrs()
                );
                return ExitCode::FAILURE;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the namespaces (and so the veth pair) however the test ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn parent() -> ExitCode {
    let pid = std::process::id();
    let (ns_a, ns_b) = (format!("ksync-mdns-{pid}-a"), format!("ksync-mdns-{pid}-b"));
    if let Err(why) = ip(&["netns", "add", &ns_a]) {
        println!(
            "SKIPPED mdns discovery over network namespaces: cannot create a namespace here ({why})"
        );
        println!("mdns_netns: 0 passed, 0 failed, 1 skipped");
        return ExitCode::SUCCESS;
    }
    let mut guard = Namespaces(vec![ns_a.clone()]);
    let setup = (|| {
        ip(&["netns", "add", &ns_b])?;
        guard.0.push(ns_b.clone());
        // The veth pair is created inside the namespaces: the host's interfaces are untouched.
        ip(&[
            "-n", &ns_a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
            "netns", &ns_b,
        ])?;
        for (ns, dev, addr) in [
            (&ns_a, "veth-a", "10.231.0.1/24"),
            (&ns_b, "veth-b", "10.231.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok::<(), String>(())
    })();
    if let Err(why) = setup {
        println!("FAILED to build the test LAN: {why}");
        println!("mdns_netns: 0 passed, 1 failed");
        return ExitCode::FAILURE;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            println!("FAILED: cannot find the test binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keys = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            println!("FAILED: tempdir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let network = format!("mdns-{pid}");
    let mut children = Vec::new();
    for (role, ns) in [("a", &ns_a), ("b", &ns_b)] {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .env(ROLE, role)
            .env(KEY_DIR, keys.path())
            .env(NETWORK, &network)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(c) => children.push((role, c)),
            Err(e) => {
                println!("FAILED: spawning peer {role}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut failed = false;
    for (role, mut child) in children {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    break;
                }
            }
        }
        match child.wait_with_output() {
            Ok(out) => {
                print!("{}", String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    failed = true;
                    println!(
                        "peer {role} failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            Err(e) => {
                failed = true;
                println!("peer {role}: {e}");
            }
        }
    }
    drop(guard);
    if failed {
        println!("mdns_netns: 0 passed, 1 failed");
        ExitCode::FAILURE
    } else {
        println!("mdns_netns: 1 passed, 0 failed");
        ExitCode::SUCCESS
    }
}
