//! mDNS discovery, really tried.
//!
//! libp2p's mDNS skips loopback interfaces (multicast does not run over `lo`), and sending
//! multicast on the host's real interface would leave the machine, so this test builds its own
//! LAN: two network namespaces joined by a veth pair, one peer in each. The test binary
//! re-executes itself inside each namespace (`ip netns exec`) as a peer with
//! `discoveryMethod: mdns`; each must find the other with no address given, connect, and
//! receive the other's event.
//!
//! Two environments cannot run it, and the test says which and counts itself skipped (it never
//! pretends to pass): namespaces cannot be made (not root, no `ip`), or the host's kernel does
//! not carry multicast between them, which a plain UDP multicast probe (no libp2p) checks
//! first. Past the probe, a peer that finds nothing fails the test, and its libp2p mDNS trace
//! is printed so the failure can be read.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "KSYNC_MDNS_ROLE";
const KEY_DIR: &str = "KSYNC_MDNS_KEY_DIR";
const NETWORK: &str = "KSYNC_MDNS_NETWORK";
const LOG_FILE: &str = "KSYNC_MDNS_LOG_FILE";
const PROBE_IFACE: &str = "KSYNC_MDNS_PROBE_IFACE";

/// The mDNS group; the probe uses it on a port of its own so it cannot answer a real peer.
const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const PROBE_PORT: u16 = 5354;
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

fn main() -> ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("probe-recv") => probe_recv(),
        Ok("probe-send") => probe_send(),
        Ok(role) => child(role),
        Err(_) => parent(),
    }
}

fn probe_iface() -> Option<Ipv4Addr> {
    std::env::var(PROBE_IFACE).ok()?.parse().ok()
}

/// Joins the group on this namespace's veth address and waits for one datagram.
fn probe_recv() -> ExitCode {
    let run = || -> std::io::Result<SocketAddr> {
        let iface = probe_iface().ok_or_else(|| std::io::Error::other("no probe interface"))?;
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PROBE_PORT))?;
        socket.join_multicast_v4(&MDNS_GROUP, &iface)?;
        socket.set_read_timeout(Some(Duration::from_secs(6)))?;
        let mut buf = [0u8; 64];
        let (_, from) = socket.recv_from(&mut buf)?;
        Ok(from)
    };
    match run() {
        Ok(from) => {
            println!("multicast probe received from {from}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("multicast probe not received: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends to the group from this namespace's veth address, as libp2p's mDNS does.
fn probe_send() -> ExitCode {
    let run = || -> std::io::Result<()> {
        let iface = probe_iface().ok_or_else(|| std::io::Error::other("no probe interface"))?;
        let socket = UdpSocket::bind((iface, 0))?;
        for _ in 0..40 {
            socket.send_to(b"ksync-probe", (MDNS_GROUP, PROBE_PORT))?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("multicast probe not sent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends libp2p's mDNS and swarm traces to a file, read back only if the test fails.
fn trace_to_file() {
    let Ok(path) = std::env::var(LOG_FILE) else {
        return;
    };
    let Ok(file) = std::fs::File::create(path) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "libp2p_mdns=trace,libp2p_swarm=debug,libp2p_tcp=debug,ksync_p2p=debug",
        ))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

/// One peer inside a namespace: start with mDNS, publish one event, wait for the other's.
fn child(role: &str) -> ExitCode {
    trace_to_file();
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
        for (ns, dev, addr) in [(&ns_a, "veth-a", ADDR_A), (&ns_b, "veth-b", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
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
    let in_namespace = |ns: &str, role: &str, envs: &[(&str, String)]| -> Result<Child, String> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .arg(&exe)
            .env(ROLE, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        command
            .spawn()
            .map_err(|e| format!("spawning {role} in {ns}: {e}"))
    };

    // First, does this kernel carry multicast between the namespaces at all?
    let probe = (|| {
        let receiver = in_namespace(&ns_b, "probe-recv", &[(PROBE_IFACE, ADDR_B.to_string())])?;
        std::thread::sleep(Duration::from_millis(300));
        let sender = in_namespace(&ns_a, "probe-send", &[(PROBE_IFACE, ADDR_A.to_string())])?;
        let received = receiver.wait_with_output().map_err(|e| e.to_string())?;
        let _ = sender.wait_with_output();
        let said = String::from_utf8_lossy(&received.stdout).trim().to_string();
        Ok::<_, String>((received.status.success(), said))
    })();
    match probe {
        Ok((true, said)) => println!("{said}"),
        Ok((false, said)) => {
            println!(
                "SKIPPED mdns discovery over network namespaces: this kernel does not carry \
                 multicast between them ({said})"
            );
            println!("mdns_netns: 0 passed, 0 failed, 1 skipped");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            println!("FAILED to run the multicast probe: {why}");
            println!("mdns_netns: 0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    }

    let keys = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            println!("FAILED: tempdir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let network = format!("mdns-{pid}");
    let log_of = |role: &str| keys.path().join(format!("peer-{role}.log"));
    let mut children = Vec::new();
    for (role, ns) in [("a", &ns_a), ("b", &ns_b)] {
        let envs = [
            (KEY_DIR, keys.path().display().to_string()),
            (NETWORK, network.clone()),
            (LOG_FILE, log_of(role).display().to_string()),
        ];
        match in_namespace(ns, role, &envs) {
            Ok(c) => children.push((role, c)),
            Err(why) => {
                println!("FAILED: {why}");
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
                    print_log_tail(role, &log_of(role));
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

/// The last lines of a failed peer's trace: enough to see what mDNS sent and heard.
fn print_log_tail(role: &str, path: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        println!("peer {role}: no trace at {}", path.display());
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(60);
    println!(
        "--- peer {role} trace (last {} lines) ---",
        lines.len() - from
    );
    for line in &lines[from..] {
        println!("{line}");
    }
}
