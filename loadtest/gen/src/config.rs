//! What one run does: the command line, shared with the worker processes as JSON.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Scenario {
    /// Every connection subscribes to the same topic; publications fan out to all of them.
    Fanout,
    /// `--topics` topics (default: one per connection), connection i on topic i mod topics;
    /// publications go round-robin over the topics.
    Topics,
    /// Connection i is user `u<i mod users>`; messages go round-robin to the users
    /// (wsgate: `POST /api/ws/send`, or the user's Redis channel).
    Users,
    /// Connections (each subscribed to one topic unless `--topics 0`) held idle: server RSS per
    /// connection.
    Idle,
    /// As many connects as the server takes (JWT auth with `--jwt-secret`): connects per
    /// second and the server's CPU per connect.
    Storm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Target {
    /// wsgate: `/ws?user_id=..`, `subscribe` message, `POST /api/publish` / `/api/ws/send`.
    Wsgate,
    /// Socket.IO 4 (`loadtest/peers/socketio-server.js`): engine.io v4 over WebSocket,
    /// `42["subscribe",..]`, `POST /publish` / `/send`.
    Socketio,
    /// nginx + nchan (`loadtest/peers/nchan.conf`): WebSocket subscribers on `/sub/<channel>`,
    /// `POST /pub/<channel>`.
    Nchan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum PublishVia {
    /// The target's HTTP publish endpoint.
    Http,
    /// wsgate only: Redis `PUBLISH` on the topic's or user's channel (no seq, no history).
    Redis,
    /// wsgate only: Redis `FCALL wsgate_publish` (seq, history), as a backend would.
    Fcall,
}

/// How a worker process reads its sockets once they are connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Receive {
    /// One io_uring per worker with a multishot `recvmsg` on every socket (see `uring.rs`);
    /// falls back to epoll, saying so, where the kernel refuses io_uring.
    #[default]
    Uring,
    /// tokio (epoll): one `recvmsg` per readable socket.
    Epoll,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct Config {
    /// What to run.
    #[arg(long, value_enum, default_value = "fanout")]
    pub scenario: Scenario,
    /// Which server speaks on the other end.
    #[arg(long, value_enum, default_value = "wsgate")]
    pub target: Target,
    /// WebSocket addresses HOST:PORT (comma list); connection i goes to address i mod n.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    pub ws: Vec<String>,
    /// HTTP publish addresses (comma list; default: the --ws addresses); publication g goes
    /// to address g mod n.
    #[arg(long, value_delimiter = ',')]
    pub http: Vec<String>,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Topics (topics, idle) or users (users); fanout uses 1. 0 with idle: no subscription.
    #[arg(long)]
    pub topics: Option<usize>,
    /// Publications per second (all streams together).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Publications sent back to back at each tick (rate stays the average).
    #[arg(long, default_value_t = 1)]
    pub burst: usize,
    /// Publications in all (default: rate x duration).
    #[arg(long)]
    pub publications: Option<u64>,
    /// Seconds of publishing, when --publications is not given.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes of each publication's JSON `data` (with the timestamp and sequence markers).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Offer permessage-deflate on every connection (and require it to be negotiated).
    #[arg(long)]
    pub compression: bool,
    /// How publications are sent.
    #[arg(long, value_enum, default_value = "http")]
    pub publish: PublishVia,
    /// How the workers read their sockets after connecting (not during the connect storm,
    /// which reads nothing after the upgrade).
    #[arg(long, value_enum, env = "LOADGEN_RECEIVE", default_value = "uring")]
    #[serde(default)]
    pub receive: Receive,
    /// Run the Redis probe beside wsgate (a plain subscriber on the run's channels: the
    /// one-hop baseline). It costs Redis a delivery and the generator a read per publication;
    /// `--probe false` leaves both to the server under test.
    #[arg(long, env = "LOADGEN_PROBE", default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub probe: bool,
    /// Redis for `--publish redis|fcall`.
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: String,
    /// Server processes to watch for CPU and RSS (comma list; their child processes count too).
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Other processes whose CPU is reported on its own line (Redis), not as the server's.
    #[arg(long, value_delimiter = ',')]
    pub aux_pid: Vec<u32>,
    /// Worker processes holding the connections (at least enough for the fd limit).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N, connection i from address i mod N.
    #[arg(long, default_value_t = 8)]
    pub source_ips: usize,
    /// HS256 secret: every connection carries a JWT (`sub` `u<i>`, `exp` in an hour).
    #[arg(long, env = "LOADGEN_JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// Connects in flight at once, per worker process.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// HTTP (or Redis) connections publishing in parallel, each pipelined.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Publish requests in flight per publishing connection.
    #[arg(long, default_value_t = 64)]
    pub pipeline: usize,
    /// Seconds to wait after the last publication for the deliveries to arrive.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Seconds between "all connected" and the first publication (idle: before reading RSS).
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// idle: seconds to hold the connections after measuring.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Write the result as JSON to this file (the table goes to stdout either way).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A label for the result (the comparison table's column name).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Channel/topic name prefix (default: `lg-<random>`, fresh per run).
    #[arg(long)]
    pub prefix: Option<String>,
}

impl Config {
    /// Streams publications go to (topics or users); 0 when nothing is published.
    pub fn streams(&self) -> usize {
        match self.scenario {
            Scenario::Fanout => 1,
            Scenario::Topics | Scenario::Users => self.topics.unwrap_or(self.connections).max(1),
            Scenario::Idle => self.topics.unwrap_or(1),
            Scenario::Storm => 0,
        }
    }

    /// Whether this scenario publishes.
    pub fn publishes(&self) -> bool {
        matches!(
            self.scenario,
            Scenario::Fanout | Scenario::Topics | Scenario::Users
        )
    }

    pub fn total_publications(&self) -> u64 {
        if !self.publishes() {
            return 0;
        }
        self.publications
            .unwrap_or((self.rate * self.duration).round() as u64)
    }

    /// Publications stream `s` gets: publication g goes to stream g mod streams as its number
    /// g / streams.
    pub fn per_stream(&self, s: usize) -> u64 {
        let streams = self.streams() as u64;
        if streams == 0 {
            return 0;
        }
        let total = self.total_publications();
        total / streams + u64::from((s as u64) < total % streams)
    }

    pub fn prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or("lg")
    }

    /// The topic (channel, room) or user name of stream `s`.
    pub fn stream_name(&self, s: usize) -> String {
        match self.scenario {
            Scenario::Users => format!("{}-u{s}", self.prefix()),
            _ => format!("{}-t{s}", self.prefix()),
        }
    }

    /// The user id of connection `i`.
    pub fn user_of(&self, i: usize) -> String {
        match self.scenario {
            Scenario::Users => self.stream_name(i % self.streams()),
            _ => format!("{}-c{i}", self.prefix()),
        }
    }

    pub fn http_addrs(&self) -> &[String] {
        if self.http.is_empty() {
            &self.ws
        } else {
            &self.http
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: Config,
    }

    #[test]
    fn publications_split_over_streams() {
        let cfg = Cli::parse_from([
            "x",
            "--scenario",
            "topics",
            "--connections",
            "7",
            "--publications",
            "100",
        ])
        .cfg;
        assert_eq!(cfg.streams(), 7);
        let total: u64 = (0..7).map(|s| cfg.per_stream(s)).sum();
        assert_eq!(total, 100);
        assert_eq!(cfg.per_stream(0), 15);
        assert_eq!(cfg.per_stream(6), 14);
    }
}
