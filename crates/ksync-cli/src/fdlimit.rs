//! `ksync serve` raises its soft open-file limit to the hard limit at start, as Go programs
//! (nats-server among them) do: the soft limit is often 1,024, far below the 10,000
//! WebSockets `--max-connections` allows, and a server out of file descriptors fails every
//! accept and every log file it opens.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors needed besides connections and open rooms' logs: listeners, data directory
/// lock, the runtime's own.
const SPARE: u64 = 256;

/// Linux's default ceiling (`fs.nr_open`), tried when the hard limit is "unlimited" (which
/// `setrlimit` refuses as a soft limit for open files).
const UNLIMITED_TRY: u64 = 1 << 20;

/// Raises the soft limit of open files to the hard one, and warns when what is then in force
/// is below the `descriptors` that connections and open rooms' logs need. Returns
/// the soft limit in force (`None`: unlimited).
pub fn raise_open_file_limit(descriptors: u64) -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let in_force = match current {
        None => return None,
        Some(current) => {
            let target = maximum.unwrap_or(UNLIMITED_TRY);
            if current >= target {
                current
            } else {
                let raised = Rlimit {
                    current: Some(target),
                    maximum,
                };
                match setrlimit(Resource::Nofile, raised) {
                    Ok(()) => {
                        tracing::debug!(from = current, to = target, "raised the open-file limit");
                        target
                    }
                    Err(error) => {
                        tracing::warn!(%error, limit = current, "could not raise the open-file limit");
                        current
                    }
                }
            }
        }
    };
    let needed = descriptors.saturating_add(SPARE);
    if in_force < needed {
        tracing::warn!(
            limit = in_force,
            needed,
            "the open-file limit is below what the connection limits need (open rooms' logs \
             included): connections past it fail to be accepted, rooms past it to open (raise \
             it with `ulimit -n`, or LimitNOFILE= under systemd)"
        );
    }
    Some(in_force)
}
