//! testkit's [`SlowLink`](ksync_testkit::SlowLink) as a process, for the browser tests
//! (`cargo xtask browser` builds it): `slow_link <upstream addr> <bytes per second>` prints
//! `slow link on <addr>` and carries connections until it is killed; a line `cut` on its
//! stdin cuts the link ([`SlowLink::cut`](ksync_testkit::SlowLink::cut)).

use std::net::SocketAddr;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: slow_link <upstream addr> <bytes per second>";
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let rate: usize = args.next().ok_or(usage)?.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let link = ksync_testkit::SlowLink::start(upstream, rate).await;
        println!("slow link on {}", link.addr());
        loop {
            let line = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map(|_| line)
            })
            .await;
            match line {
                Ok(Ok(line)) if line.trim() == "cut" => link.cut(),
                // Stdin closed or unreadable: carry on until killed.
                Ok(Ok(line)) if line.is_empty() => std::future::pending::<()>().await,
                Ok(Ok(_)) => {}
                _ => std::future::pending::<()>().await,
            }
        }
    });
    Ok(())
}
