//! Limits per client address and per user (`websocket.per_ip`, `websocket.per_user`,
//! `websocket.trusted_proxies`): who the client is, how fast one address may open WebSocket
//! connections, how many it may hold, and how many connections one user may hold.
//!
//! [`PeerLimits`] owns that state for the whole node. It answers with RAII permits that give
//! their place back when the connection ends, or with a typed refusal ([`IpRefused`],
//! [`UserRefused`]) that says which limit and, for the connect rate, how long until a retry can
//! succeed. A limit that is off (0) keeps no state at all. Memory stays bounded: an address's
//! entry is dropped as soon as it holds no connection and its connect-rate bucket has refilled
//! (at once when its last connection ends, or by a sweep that runs from time to time as new
//! connections come in); a user's entry is dropped with its last connection.
//!
//! The client address is the TCP peer, except behind a trusted proxy (see
//! [`PeerLimits::client_ip`]); a client can never choose its own address by sending
//! `X-Forwarded-For` itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use hyper::header::HeaderMap;
use ipnet::IpNet;

use super::TokenBucket;
use crate::config::PeerLimitSettings;

/// The header a proxy names the client (and earlier proxies) in, left to right.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// Shortest and longest pause between two sweeps of idle address entries.
const SWEEP_MIN: Duration = Duration::from_secs(1);
const SWEEP_MAX: Duration = Duration::from_secs(60);

/// Per-address and per-user connection limits of one node.
#[derive(Debug)]
pub struct PeerLimits {
    max_per_ip: usize,
    /// New connections per second per address; 0: off.
    connect_rate: f64,
    connect_burst: u32,
    max_per_user: usize,
    trusted_proxies: Vec<IpNet>,
    ips: DashMap<IpAddr, IpEntry>,
    users: DashMap<Box<str>, usize>,
    /// Time base of `next_sweep_ms`.
    epoch: Instant,
    /// When the next sweep of idle address entries is due, in ms after `epoch`.
    next_sweep_ms: AtomicU64,
    sweep_every: Duration,
}

/// What is known about one client address.
#[derive(Debug)]
struct IpEntry {
    /// Live connections (counted only when the per-address connection limit is on).
    live: usize,
    /// Connect-rate bucket (only when the per-address connect rate is on).
    bucket: Option<TokenBucket>,
}

impl IpEntry {
    /// Nothing to remember: no live connection and a bucket as good as new.
    fn idle(&self, now: Instant) -> bool {
        self.live == 0 && self.bucket.as_ref().is_none_or(|b| b.is_full(now))
    }
}

/// Why a client address may not open another connection now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpRefused {
    /// The address holds `websocket.per_ip.max_connections` connections.
    #[error(
        "{ip} already holds {limit} connections, the most one client address may hold; \
         close one first"
    )]
    TooManyConnections { ip: IpAddr, limit: usize },
    /// The address used up its `websocket.per_ip.connect_rate` burst.
    #[error(
        "{ip} opens connections faster than allowed; retry in {}s",
        ceil_secs(.retry_after)
    )]
    ConnectRate { ip: IpAddr, retry_after: Duration },
}

impl IpRefused {
    /// Whole seconds (rounded up, at least 1) until a retry can succeed, for `Retry-After`;
    /// `None` for the connection limit, where that depends on the client closing one.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            IpRefused::TooManyConnections { .. } => None,
            IpRefused::ConnectRate { retry_after, .. } => Some(ceil_secs(retry_after)),
        }
    }

    /// The same wait in milliseconds (rounded up, at least 1), for a JSON `retryAfter`.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            IpRefused::TooManyConnections { .. } => None,
            IpRefused::ConnectRate { retry_after, .. } => {
                Some((retry_after.as_nanos().div_ceil(1_000_000) as u64).max(1))
            }
        }
    }
}

fn ceil_secs(d: &Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Why a user may not open another connection now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this user already holds {limit} connections, the most one user may hold; close one first")]
pub struct UserRefused {
    pub limit: usize,
}

/// One connection's place in its address's count; given back when dropped. A permit from a
/// node without a per-address connection limit holds nothing.
#[derive(Debug, Default)]
#[must_use = "the connection counts against its address only while the permit is held"]
pub struct IpPermit {
    held: Option<(Arc<PeerLimits>, IpAddr)>,
}

/// One connection's place in its user's count; given back when dropped. A permit from a node
/// without a per-user limit (or for an anonymous connection) holds nothing.
#[derive(Debug, Default)]
#[must_use = "the connection counts against its user only while the permit is held"]
pub struct UserPermit {
    held: Option<(Arc<PeerLimits>, Box<str>)>,
}

/// Every peer permit one connection holds, kept for as long as the connection lives.
#[derive(Debug, Default)]
pub struct PeerPermits {
    pub ip: IpPermit,
    pub user: UserPermit,
}

impl PeerLimits {
    pub fn new(settings: &PeerLimitSettings) -> Arc<Self> {
        let connect_rate = if settings.connect_rate_per_ip.is_finite() {
            settings.connect_rate_per_ip.max(0.0)
        } else {
            0.0
        };
        let connect_burst = settings.connect_burst_per_ip.max(1);
        // Sweep about as often as an emptied bucket takes to refill: an entry then outlives its
        // usefulness by at most one more such period.
        let sweep_every = if connect_rate > 0.0 {
            Duration::from_secs_f64((f64::from(connect_burst) / connect_rate).min(60.0))
                .clamp(SWEEP_MIN, SWEEP_MAX)
        } else {
            SWEEP_MAX
        };
        Arc::new(PeerLimits {
            max_per_ip: settings.max_connections_per_ip,
            connect_rate,
            connect_burst,
            max_per_user: settings.max_connections_per_user,
            trusted_proxies: settings.trusted_proxies.clone(),
            ips: DashMap::new(),
            users: DashMap::new(),
            epoch: Instant::now(),
            next_sweep_ms: AtomicU64::new(duration_ms(sweep_every)),
            sweep_every,
        })
    }

    /// The client's address: the TCP peer; when the peer is a trusted proxy, the first address
    /// in `X-Forwarded-For`, read from the right, that is not a trusted proxy (proxies append
    /// the address they got the request from, so everything left of the first untrusted hop
    /// may have been written by the client). A malformed entry stops the walk at the last good
    /// address. IPv4-mapped IPv6 addresses count as the IPv4 address.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.ip().to_canonical();
        if !self.is_trusted(client) {
            return client;
        }
        // Several X-Forwarded-For fields are one list in the order they came (RFC 9110 5.3).
        for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            let Ok(list) = value.to_str() else {
                return client;
            };
            for hop in list.rsplit(',') {
                let Some(ip) = parse_hop(hop) else {
                    return client;
                };
                client = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Whether any per-address limit is on.
    pub fn per_ip_enabled(&self) -> bool {
        self.max_per_ip > 0 || self.connect_rate > 0.0
    }

    /// Admits one new connection from `ip` now.
    pub fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Result<IpPermit, IpRefused> {
        self.admit_ip_at(ip, Instant::now())
    }

    /// Admits one new connection from `ip` at `now`: checks the address's live connections,
    /// then takes one token of its connect-rate bucket. A refused connection takes nothing.
    pub fn admit_ip_at(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<IpPermit, IpRefused> {
        if !self.per_ip_enabled() {
            return Ok(IpPermit::default());
        }
        self.maybe_sweep(now);
        let mut entry = self.ips.entry(ip).or_insert_with(|| IpEntry {
            live: 0,
            bucket: (self.connect_rate > 0.0)
                .then(|| TokenBucket::new(self.connect_rate, self.connect_burst)),
        });
        let entry = entry.value_mut();
        if self.max_per_ip > 0 && entry.live >= self.max_per_ip {
            return Err(IpRefused::TooManyConnections {
                ip,
                limit: self.max_per_ip,
            });
        }
        if let Some(bucket) = &mut entry.bucket {
            bucket
                .try_take(now)
                .map_err(|retry_after| IpRefused::ConnectRate { ip, retry_after })?;
        }
        if self.max_per_ip == 0 {
            return Ok(IpPermit::default());
        }
        entry.live += 1;
        Ok(IpPermit {
            held: Some((Arc::clone(self), ip)),
        })
    }

    fn release_ip(&self, ip: IpAddr, now: Instant) {
        if let Entry::Occupied(mut entry) = self.ips.entry(ip) {
            let e = entry.get_mut();
            e.live = e.live.saturating_sub(1);
            if e.idle(now) {
                entry.remove();
            }
        }
    }

    /// Admits one more connection of `user`.
    pub fn admit_user(self: &Arc<Self>, user: &str) -> Result<UserPermit, UserRefused> {
        if self.max_per_user == 0 {
            return Ok(UserPermit::default());
        }
        let mut live = self.users.entry(Box::from(user)).or_insert(0);
        if *live >= self.max_per_user {
            return Err(UserRefused {
                limit: self.max_per_user,
            });
        }
        *live += 1;
        drop(live);
        Ok(UserPermit {
            held: Some((Arc::clone(self), Box::from(user))),
        })
    }

    fn release_user(&self, user: Box<str>) {
        if let Entry::Occupied(mut entry) = self.users.entry(user) {
            let live = entry.get_mut();
            *live = live.saturating_sub(1);
            if *live == 0 {
                entry.remove();
            }
        }
    }

    /// Live connections counted for `ip` (0 without a per-address connection limit).
    pub fn connections_of_ip(&self, ip: IpAddr) -> usize {
        self.ips.get(&ip).map_or(0, |e| e.live)
    }

    /// Live connections counted for `user` (0 without a per-user limit).
    pub fn connections_of_user(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |n| *n)
    }

    /// Addresses with state kept (live connections, or a bucket still refilling).
    pub fn tracked_ips(&self) -> usize {
        self.ips.len()
    }

    /// Users with state kept (live connections).
    pub fn tracked_users(&self) -> usize {
        self.users.len()
    }

    /// Forgets every address that holds no connection and whose bucket has refilled at `now`.
    pub fn sweep(&self, now: Instant) {
        self.ips.retain(|_, e| !e.idle(now));
    }

    /// Sweeps when one is due; only one caller at a time wins the turn.
    fn maybe_sweep(&self, now: Instant) {
        let now_ms = duration_ms(now.saturating_duration_since(self.epoch));
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        if now_ms < due {
            return;
        }
        let next = now_ms.saturating_add(duration_ms(self.sweep_every));
        if self
            .next_sweep_ms
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.sweep(now);
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:80`), as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        if let Some((limits, ip)) = self.held.take() {
            limits.release_ip(ip, Instant::now());
        }
    }
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        if let Some((limits, user)) = self.held.take() {
            limits.release_user(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP address")
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 40000)
    }

    fn limits(tweak: impl FnOnce(&mut PeerLimitSettings)) -> Arc<PeerLimits> {
        let mut settings = PeerLimitSettings::default();
        tweak(&mut settings);
        PeerLimits::new(&settings)
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(v).expect("header"));
        }
        headers
    }

    fn trusting(nets: &[&str]) -> Arc<PeerLimits> {
        limits(|s| {
            s.trusted_proxies = nets.iter().map(|n| n.parse().expect("net")).collect();
        })
    }

    #[test]
    fn per_ip_limit_admits_n_refuses_the_next_and_drop_frees_a_place() {
        let peers = limits(|s| s.max_connections_per_ip = 2);
        let a = ip("192.0.2.1");
        let first = peers.admit_ip(a).expect("first");
        let _second = peers.admit_ip(a).expect("second");
        assert_eq!(peers.connections_of_ip(a), 2);
        let refused = peers.admit_ip(a).expect_err("third is over the limit");
        assert_eq!(refused, IpRefused::TooManyConnections { ip: a, limit: 2 });
        assert_eq!(refused.retry_after_secs(), None);
        // Another address has its own count.
        let _other = peers.admit_ip(ip("192.0.2.2")).expect("another address");
        drop(first);
        assert_eq!(peers.connections_of_ip(a), 1);
        let _third = peers.admit_ip(a).expect("a place came back");
        assert!(peers.admit_ip(a).is_err());
    }

    #[test]
    fn connect_rate_burst_then_refusal_with_retry_hint_then_recovery() {
        // 2 connections per second, bursts of 3.
        let peers = limits(|s| {
            s.connect_rate_per_ip = 2.0;
            s.connect_burst_per_ip = 3;
        });
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(peers.admit_ip_at(a, t0).is_ok(), "burst connection {i}");
        }
        let refused = peers.admit_ip_at(a, t0).expect_err("burst used up");
        match &refused {
            IpRefused::ConnectRate {
                ip: who,
                retry_after,
            } => {
                assert_eq!(*who, a);
                assert_eq!(*retry_after, Duration::from_millis(500));
            }
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        assert_eq!(refused.retry_after_secs(), Some(1));
        assert_eq!(refused.retry_after_ms(), Some(500));
        assert!(refused.to_string().contains("retry in 1s"), "{refused}");
        // Another address is not slowed down.
        assert!(peers.admit_ip_at(ip("192.0.2.2"), t0).is_ok());
        // Just before the hint: still refused; at the hint: one more, and only one.
        assert!(peers
            .admit_ip_at(a, t0 + Duration::from_millis(499))
            .is_err());
        let t1 = t0 + Duration::from_millis(500);
        assert!(peers.admit_ip_at(a, t1).is_ok(), "recovered at the hint");
        assert!(peers.admit_ip_at(a, t1).is_err());
        // Rate alone counts no live connections.
        assert_eq!(peers.connections_of_ip(a), 0);
    }

    #[test]
    fn a_refusal_for_the_connection_limit_takes_no_rate_token() {
        let peers = limits(|s| {
            s.max_connections_per_ip = 1;
            s.connect_rate_per_ip = 1.0;
            s.connect_burst_per_ip = 2;
        });
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        let held = peers.admit_ip_at(a, t0).expect("first");
        for _ in 0..5 {
            assert!(matches!(
                peers.admit_ip_at(a, t0),
                Err(IpRefused::TooManyConnections { .. })
            ));
        }
        drop(held);
        assert!(
            peers.admit_ip_at(a, t0).is_ok(),
            "the second token of the burst is still there"
        );
    }

    #[test]
    fn retry_hints_round_up() {
        let r = |ms| IpRefused::ConnectRate {
            ip: ip("192.0.2.1"),
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(r(1).retry_after_secs(), Some(1));
        assert_eq!(r(1000).retry_after_secs(), Some(1));
        assert_eq!(r(1001).retry_after_secs(), Some(2));
        assert_eq!(r(0).retry_after_secs(), Some(1));
        assert_eq!(r(0).retry_after_ms(), Some(1));
        let tiny = IpRefused::ConnectRate {
            ip: ip("192.0.2.1"),
            retry_after: Duration::from_micros(1500),
        };
        assert_eq!(tiny.retry_after_ms(), Some(2));
    }

    #[test]
    fn limits_that_are_off_keep_no_state() {
        let peers = limits(|_| {});
        assert!(!peers.per_ip_enabled());
        let permits: Vec<_> = (0..100)
            .map(|_| peers.admit_ip(ip("192.0.2.1")).expect("no limit"))
            .collect();
        let users: Vec<_> = (0..100)
            .map(|_| peers.admit_user("u1").expect("no limit"))
            .collect();
        assert_eq!((peers.tracked_ips(), peers.tracked_users()), (0, 0));
        drop((permits, users));

        // The connection limit alone keeps no bucket: an entry goes with its last connection.
        let peers = limits(|s| s.max_connections_per_ip = 5);
        let p = peers.admit_ip(ip("192.0.2.1")).expect("admitted");
        assert_eq!(peers.tracked_ips(), 1);
        drop(p);
        assert_eq!(peers.tracked_ips(), 0);
    }

    #[test]
    fn per_user_limit_admits_n_refuses_the_next_and_drop_frees_a_place() {
        let peers = limits(|s| s.max_connections_per_user = 2);
        let first = peers.admit_user("u1").expect("first");
        let second = peers.admit_user("u1").expect("second");
        let refused = peers.admit_user("u1").expect_err("third is over the limit");
        assert_eq!(refused, UserRefused { limit: 2 });
        let other = peers.admit_user("u2").expect("another user");
        assert_eq!(peers.connections_of_user("u1"), 2);
        drop(first);
        assert_eq!(peers.connections_of_user("u1"), 1);
        let third = peers.admit_user("u1").expect("a place came back");
        assert!(peers.admit_user("u1").is_err());
        drop((second, third, other));
        assert_eq!(
            peers.tracked_users(),
            0,
            "users with no connection are forgotten"
        );
    }

    #[test]
    fn address_entries_are_pruned_once_idle() {
        // A used bucket takes a whole second to refill: far longer than this test needs to
        // drop its permits.
        let peers = limits(|s| {
            s.max_connections_per_ip = 10;
            s.connect_rate_per_ip = 1.0;
            s.connect_burst_per_ip = 10;
        });
        let t0 = Instant::now();
        let held: Vec<_> = (0..50u8)
            .map(|i| {
                peers
                    .admit_ip_at(IpAddr::from([198, 51, 100, i]), t0)
                    .expect("admitted")
            })
            .collect();
        assert_eq!(peers.tracked_ips(), 50);
        // Live connections are never forgotten, however late the sweep.
        peers.sweep(t0 + Duration::from_secs(3600));
        assert_eq!(peers.tracked_ips(), 50);
        drop(held);
        // Their buckets, used at t0, are still refilling.
        peers.sweep(t0);
        assert_eq!(
            peers.tracked_ips(),
            50,
            "the rate state outlives the connections"
        );
        peers.sweep(t0 + Duration::from_millis(999));
        assert_eq!(peers.tracked_ips(), 50);
        // Once a bucket is full again, the entry goes.
        peers.sweep(t0 + Duration::from_secs(1));
        assert_eq!(peers.tracked_ips(), 0);
    }

    #[test]
    fn a_flood_of_addresses_is_swept_by_later_admissions() {
        let peers = limits(|s| {
            s.connect_rate_per_ip = 1.0;
            s.connect_burst_per_ip = 2;
        });
        let t0 = Instant::now();
        for i in 0..1000u16 {
            let [hi, lo] = i.to_be_bytes();
            let _ = peers.admit_ip_at(IpAddr::from([10, 0, hi, lo]), t0);
        }
        assert_eq!(peers.tracked_ips(), 1000);
        // Once a sweep is due (every 2 s here: the time an emptied bucket takes to refill), an
        // admission from anywhere clears every refilled entry; only the newcomer is left.
        let later = t0 + Duration::from_secs(5);
        let _ = peers.admit_ip_at(ip("192.0.2.7"), later);
        assert_eq!(peers.tracked_ips(), 1);
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let none = trusting(&[]);
        let headers = xff(&["203.0.113.7"]);
        assert_eq!(none.client_ip(peer("127.0.0.1"), &headers), ip("127.0.0.1"));
        let some = trusting(&["10.0.0.0/8"]);
        assert_eq!(some.client_ip(peer("192.0.2.1"), &headers), ip("192.0.2.1"));
    }

    #[test]
    fn forwarded_for_from_a_trusted_proxy_names_the_first_untrusted_hop() {
        let peers = trusting(&["10.0.0.0/8", "127.0.0.1/32"]);
        let lb = peer("10.1.2.3");
        // One proxy.
        assert_eq!(
            peers.client_ip(lb, &xff(&["203.0.113.7"])),
            ip("203.0.113.7")
        );
        // A client-written prefix is skipped: the rightmost untrusted hop wins.
        assert_eq!(
            peers.client_ip(lb, &xff(&["198.51.100.1, 203.0.113.7, 10.9.9.9"])),
            ip("203.0.113.7")
        );
        // Several header fields are one list, in order.
        assert_eq!(
            peers.client_ip(lb, &xff(&["198.51.100.1, 203.0.113.7", "10.9.9.9"])),
            ip("203.0.113.7")
        );
        // Ports and IPv6 forms, IPv4-mapped addresses as IPv4.
        assert_eq!(
            peers.client_ip(lb, &xff(&["203.0.113.7:5555"])),
            ip("203.0.113.7")
        );
        assert_eq!(
            peers.client_ip(lb, &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            peers.client_ip(lb, &xff(&["::ffff:203.0.113.7"])),
            ip("203.0.113.7")
        );
        assert_eq!(
            peers.client_ip(peer("::ffff:10.1.2.3"), &xff(&["203.0.113.7"])),
            ip("203.0.113.7"),
            "a mapped proxy address is trusted like the IPv4 one"
        );
        // Only trusted hops: the leftmost is as far as the chain goes.
        assert_eq!(
            peers.client_ip(lb, &xff(&["10.0.0.5, 10.0.0.6"])),
            ip("10.0.0.5")
        );
        // No header: the proxy itself.
        assert_eq!(peers.client_ip(lb, &HeaderMap::new()), ip("10.1.2.3"));
    }

    #[test]
    fn malformed_forwarded_for_stops_at_the_last_good_address() {
        let peers = trusting(&["10.0.0.0/8"]);
        let lb = peer("10.1.2.3");
        for bad in [
            "",
            "not-an-ip",
            "203.0.113.7 198.51.100.1",
            "unknown",
            " , ",
        ] {
            assert_eq!(
                peers.client_ip(lb, &xff(&[bad])),
                ip("10.1.2.3"),
                "{bad:?} names nobody"
            );
        }
        // Garbage left of a trusted hop: that hop is as far as the chain can be believed.
        assert_eq!(
            peers.client_ip(lb, &xff(&["garbage, 10.0.0.9"])),
            ip("10.0.0.9")
        );
        // Garbage left of the client: the client is already found.
        assert_eq!(
            peers.client_ip(lb, &xff(&["garbage, 203.0.113.7"])),
            ip("203.0.113.7")
        );
        // A value that is not visible ASCII.
        let mut headers = HeaderMap::new();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"203.0.113.\xff").expect("opaque header"),
        );
        assert_eq!(peers.client_ip(lb, &headers), ip("10.1.2.3"));
    }
}
