//! Who a request belongs to, for per-client limits, and what each client holds at once.
//!
//! Both transports' servers cap what one client may hold (`ksync-ws`: connections; `ksync-git`:
//! pushes in flight); they count the same [`ClientId`] the same way, here.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::Grant;

/// A client for per-client limits: its credentials' subject ([`Grant::subject`]: an API key's
/// configured name, a JWT's `sub`; never the credential itself) seen from one IP address. The
/// subject alone would make every user of one shared API key (or of JWTs without `sub`) one
/// client, capped together; the address bounds what one machine (or one proxy) can take with
/// one set of credentials. Without auth, the address alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId {
    subject: Option<String>,
    address: Option<IpAddr>,
}

impl ClientId {
    /// The client behind `grant` (its subject counts only when `auth_required`: without auth
    /// every grant is the same "anonymous") from `address`; `None` when neither is known, so
    /// clients cannot be told apart.
    /// The address counts by its [`host key`](Self::host_key).
    pub fn new(grant: &Grant, auth_required: bool, address: Option<IpAddr>) -> Option<Self> {
        let subject = auth_required.then(|| grant.subject.clone());
        let address = address.map(Self::host_key);
        (subject.is_some() || address.is_some()).then_some(Self { subject, address })
    }

    /// The address one host is counted under, by every per-address limit: IPv4 (also mapped
    /// in IPv6) as is, IPv6 by its /64, which a host usually owns whole (counted by its full
    /// address, one host escaped any cap by rotating through its /64).
    pub fn host_key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        }
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.subject, &self.address) {
            (Some(subject), Some(ip)) => write!(f, "subject {subject} from {ip}"),
            (Some(subject), None) => write!(f, "subject {subject}"),
            (None, Some(ip)) => write!(f, "address {ip}"),
            (None, None) => f.write_str("unknown client"),
        }
    }
}

/// How many of something each client holds at once, at most `cap` each. Bounded: an entry
/// goes when its count drops to zero, so there is at most one per place held.
#[derive(Debug)]
pub struct PerClientCounts {
    cap: usize,
    counts: Mutex<HashMap<ClientId, usize>>,
}

impl PerClientCounts {
    /// Counts of at most `cap` per client (0 counts as 1).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// The cap per client.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A place for `client`, given back when dropped; `None` when it holds `cap` already.
    pub fn take(self: &Arc<Self>, client: ClientId) -> Option<ClientPlace> {
        let mut counts = self.lock();
        let count = counts.entry(client.clone()).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        drop(counts);
        Some(ClientPlace {
            counts: Arc::clone(self),
            client,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, usize>> {
        // Counts are whole after every step, so a poisoned lock is safe to keep using.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One place of a client in a [`PerClientCounts`], given back when dropped (however the thing
/// it stands for ends).
#[derive(Debug)]
pub struct ClientPlace {
    counts: Arc<PerClientCounts>,
    client: ClientId,
}

impl ClientPlace {
    /// Whose place this is.
    pub fn client(&self) -> &ClientId {
        &self.client
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(count) = counts.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(subject: &str, ip: [u8; 4]) -> ClientId {
        let grant = Grant {
            subject: subject.into(),
            ..Grant::anonymous()
        };
        ClientId::new(&grant, true, Some(IpAddr::from(ip))).expect("known")
    }

    #[test]
    fn a_client_is_its_subject_from_one_address() {
        let counts = PerClientCounts::new(1);
        let first = counts.take(client("app", [10, 0, 0, 1])).expect("first");
        assert!(
            counts.take(client("app", [10, 0, 0, 1])).is_none(),
            "at its cap"
        );
        assert!(
            counts.take(client("app", [10, 0, 0, 2])).is_some(),
            "another machine"
        );
        assert!(
            counts.take(client("other", [10, 0, 0, 1])).is_some(),
            "another subject"
        );
        drop(first);
        assert!(
            counts.take(client("app", [10, 0, 0, 1])).is_some(),
            "given back"
        );
        assert!(
            counts.lock().is_empty(),
            "no entry left once nothing is held"
        );
    }

    /// Two addresses of one IPv6 /64 are one client (before, rotating through its /64 a
    /// host escaped every per-client cap); another /64 is another, and an IPv4-mapped
    /// address is its IPv4 one.
    #[test]
    fn ipv6_addresses_of_one_64_are_one_client() {
        let anonymous = Grant::anonymous();
        let from = |ip: &str| ClientId::new(&anonymous, false, Some(ip.parse().expect("ip")));
        let counts = PerClientCounts::new(1);
        let held = counts
            .take(from("2001:db8::1").expect("known"))
            .expect("first");
        assert!(
            counts.take(from("2001:db8::2").expect("known")).is_none(),
            "same /64"
        );
        assert!(
            counts
                .take(from("2001:db8:0:1::1").expect("known"))
                .is_some(),
            "another /64"
        );
        drop(held);
        assert_eq!(from("::ffff:10.0.0.1"), from("10.0.0.1"));
    }

    #[test]
    fn without_auth_the_address_alone_and_without_either_no_client() {
        let anonymous = Grant::anonymous();
        let ip = Some(IpAddr::from([127, 0, 0, 1]));
        let by_address = ClientId::new(&anonymous, false, ip).expect("by address");
        assert_eq!(by_address.to_string(), "address 127.0.0.1");
        assert_eq!(ClientId::new(&anonymous, false, None), None);
        assert_eq!(
            ClientId::new(&anonymous, true, None).map(|c| c.to_string()),
            Some("subject anonymous".to_owned())
        );
    }
}
