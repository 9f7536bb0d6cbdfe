//! Command line and environment (SPEC section 9): the [`Cli`] that `main.rs` parses, and how its
//! values are layered over the config file into one validated [`Settings`].
//!
//! Precedence, lowest first: built-in defaults, the YAML file (`--config` / `WSGATE_CONFIG`),
//! `WSGATE_*` environment variables, command-line flags. clap resolves env against flags (a flag
//! wins); [`resolve`] applies the file first and then every flag/env value that is set.
//!
//! Empty list values are dropped: `WSGATE_REDIS_URL=` (set but empty) therefore means "no Redis,
//! in-process broker" even if the file names one, and `WSGATE_API_KEYS=` means "no keys"
//! (the HTTP API answers loopback peers only).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::file::{parse_listen, split_list, ConfigError, FileConfig};
use super::{Secret, Settings};
use crate::runtime::RuntimeOptions;

const ABOUT: &str = "wsgate: a horizontally scaled WebSocket gateway";

const LONG_ABOUT: &str = "\
wsgate is a horizontally scaled WebSocket gateway. Clients connect over WebSocket (GET /ws and \
configured aliases), subscribe to topics and exchange JSON messages; backends publish to topics, \
users or everyone through Redis pub/sub or the HTTP API (/api/publish, /api/ws/send, \
/api/ws/broadcast). Without a Redis URL one node runs with in-process fan-out; with one, any \
number of stateless nodes behind an ordinary load balancer share topics, presence and the \
connection limit.

Settings come from the YAML file (--config), then WSGATE_* environment variables, then flags; \
later ones win. Run without a subcommand to start the gateway.";

const AFTER_HELP: &str = "\
Examples:
  wsgate                                      in-process broker on 0.0.0.0:8080
  wsgate --config /etc/wsgate.yaml --listen 0.0.0.0:9000
  WSGATE_REDIS_URL=redis://redis:6379 WSGATE_NODE_ID=edge-1 wsgate
  wsgate check-config /etc/wsgate.yaml        validate a file and print what it resolves to";

/// `wsgate [FLAGS]` runs the gateway; `wsgate check-config FILE` checks a config file.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "wsgate",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands; none means "run the gateway".
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Parse and validate a config file (no env or flags applied), print what it resolves to,
    /// and exit 0 if it can run, 2 if not.
    CheckConfig {
        /// The YAML config file to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Flags (and their `WSGATE_*` environment variables) for running the gateway.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Settings (flag beats env var beats config file)")]
pub struct RunArgs {
    /// YAML config file.
    #[arg(long, env = "WSGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// HTTP + WebSocket listener [default: 0.0.0.0:8080].
    #[arg(long, env = "WSGATE_LISTEN", value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,

    /// This node's name in logs and the API [default: generated].
    #[arg(long, env = "WSGATE_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Redis broker URL(s), comma separated; several URLs shard topics. Absent: in-process broker.
    #[arg(
        long,
        env = "WSGATE_REDIS_URL",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub redis_url: Option<Vec<String>>,

    /// Connection limit: cluster-wide with Redis, node-wide without [default: 10000].
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest inbound message in bytes, all fragments together [default: 65536].
    #[arg(long, env = "WSGATE_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,

    /// HS256 secret; turns on JWT authentication. Prefer the env var: flags show up in `ps`.
    #[arg(
        long,
        env = "WSGATE_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// HTTP API key(s), comma separated; sent as `X-API-Key: KEY` or `Authorization: Bearer KEY`.
    /// None: the API answers loopback peers only.
    #[arg(
        long = "api-key",
        env = "WSGATE_API_KEYS",
        value_name = "KEY[,KEY...]",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Option<Vec<String>>,

    /// permessage-deflate: on or off (also true/false, 1/0, yes/no) [default: on].
    #[arg(long, env = "WSGATE_COMPRESSION", value_name = "on|off", value_parser = parse_on_off)]
    pub compression: Option<bool>,

    /// Seconds a SIGTERM drain spreads its disconnects over [default: 30].
    #[arg(long, env = "WSGATE_DRAIN_SECONDS", value_name = "N")]
    pub drain_seconds: Option<u64>,

    /// Tokio worker threads [default: one per CPU the process may use].
    #[arg(long, env = "WSGATE_WORKER_THREADS", value_name = "N", value_parser = parse_worker_threads)]
    pub worker_threads: Option<usize>,

    /// Pin worker thread i to the i-th CPU the process may use (its affinity mask): on or off
    /// [default: off]. For a node that shares a small machine (see `wsgate::runtime`).
    #[arg(long, env = "WSGATE_PIN_WORKERS", value_name = "on|off", value_parser = parse_on_off)]
    pub pin_workers: Option<bool>,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,wsgate=debug`.
    #[arg(long, env = "WSGATE_LOG", value_name = "LEVEL", default_value = "info")]
    pub log: String,

    /// Log line format: `text` (human-readable) or `json` (one JSON object per line, for log
    /// collectors).
    #[arg(
        long,
        env = "WSGATE_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2026-11-23T14:23:22.540Z  INFO wsgate::node: wsgate listening node=edge-1 ...`
    #[default]
    Text,
    /// `{"timestamp":"...","level":"INFO","message":"wsgate listening","node":"edge-1",...}`
    Json,
}

impl RunArgs {
    /// Writes every flag/env value that is set onto `settings` (the file is applied before).
    pub fn apply_overrides(&self, settings: &mut Settings) {
        if let Some(listen) = self.listen {
            settings.listen = listen;
        }
        if let Some(node_id) = &self.node_id {
            settings.node_id = node_id.trim().to_string();
        }
        if let Some(urls) = &self.redis_url {
            settings.redis_urls = clean_list(urls);
        }
        if let Some(n) = self.max_connections {
            settings.ws.max_connections = n;
        }
        if let Some(n) = self.max_message_size {
            settings.ws.max_message_size = n;
        }
        if let Some(secret) = &self.jwt_secret {
            // An empty secret stays empty so validate() refuses it: never silently run without auth.
            settings.auth.jwt_secret = Some(Secret::from(secret.as_str()));
        }
        if let Some(keys) = &self.api_keys {
            settings.api_keys = clean_list(keys).into_iter().map(Secret::from).collect();
        }
        if let Some(on) = self.compression {
            settings.compression.enabled = on;
        }
        if let Some(secs) = self.drain_seconds {
            settings.drain = Duration::from_secs(secs);
        }
    }

    /// How to build the tokio runtime (`--worker-threads`, `--pin-workers`).
    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            worker_threads: self.worker_threads,
            pin_workers: self.pin_workers.unwrap_or(false),
        }
    }

    /// The config file to load, if any (an empty `WSGATE_CONFIG=` counts as none).
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref().filter(|p| !p.as_os_str().is_empty())
    }
}

/// Entries trimmed, empty ones (trailing commas, empty env vars) dropped.
fn clean_list(items: &[String]) -> Vec<String> {
    items.iter().flat_map(|s| split_list(s)).collect()
}

/// `--worker-threads`: 1 to 1024.
fn parse_worker_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=1024) => Ok(n),
        _ => Err(format!(
            "expected a number of threads from 1 to 1024, got {s:?}"
        )),
    }
}

/// `on`/`off`, `true`/`false`, `1`/`0`, `yes`/`no`, any case.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
    }
}

/// Defaults, then the file (if any), then env/flags; fails with every problem
/// [`Settings::validate`] finds.
pub fn resolve(cli: &RunArgs) -> Result<Settings, ConfigError> {
    let mut settings = Settings::default();
    if let Some(path) = cli.config_file() {
        FileConfig::load(path)?.apply_to(&mut settings)?;
    }
    cli.apply_overrides(&mut settings);
    validated(settings)
}

/// Defaults plus the file at `path` only (no env, no flags), validated: what
/// `wsgate check-config FILE` reports on.
pub fn check_config(path: &Path) -> Result<Settings, ConfigError> {
    let mut settings = Settings::default();
    FileConfig::load(path)?.apply_to(&mut settings)?;
    validated(settings)
}

fn validated(settings: Settings) -> Result<Settings, ConfigError> {
    let mut problems = settings.validate();
    if problems.is_empty() {
        // Key files are read here too, so a missing or malformed one is reported with the rest
        // rather than when the node starts.
        if let Err(e) = crate::auth::Authenticator::from_settings(&settings.auth) {
            problems.push(super::SettingsProblem {
                path: "auth".into(),
                problem: e.to_string(),
            });
        }
    }
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigError::Problems(problems))
    }
}

/// A few lines saying what a node with these settings will do (for `check-config` and the
/// start-up log): listener, paths, connection limit, broker, auth.
pub fn summary(settings: &Settings) -> String {
    let broker = if settings.redis_urls.is_empty() {
        "in-process (single node)".to_string()
    } else {
        let urls: Vec<String> = settings
            .redis_urls
            .iter()
            .map(|u| super::secret::redact_url(u))
            .collect();
        format!("redis {}", urls.join(", "))
    };
    let scope = if settings.redis_urls.is_empty() {
        "node-wide"
    } else {
        "cluster-wide"
    };
    let api = if settings.api_keys.is_empty() {
        "open to loopback peers only (no API key)".to_string()
    } else {
        format!("{} API key(s)", settings.api_keys.len())
    };
    [
        format!("node_id: {}", settings.node_id),
        format!("listen: {}", settings.listen),
        format!("paths: {}", settings.ws.paths.join(", ")),
        format!("max_connections: {} ({scope})", settings.ws.max_connections),
        format!("broker: {broker}"),
        format!("jwt auth: {}", auth_summary(&settings.auth)),
        format!("http api: {api}"),
    ]
    .join("\n")
}

/// Which key sources turn JWT auth on, e.g. `on (secret, 2 PEM keys, JWKS file)`.
fn auth_summary(auth: &super::AuthSettings) -> String {
    if !auth.enabled() {
        return "off (user_id taken from the query)".into();
    }
    let mut sources = Vec::new();
    if auth.jwt_secret.is_some() {
        sources.push("secret".to_string());
    }
    if !auth.public_keys.is_empty() {
        sources.push(format!("{} PEM key(s)", auth.public_keys.len()));
    }
    if auth.jwks_file.is_some() {
        sources.push("JWKS file".into());
    }
    if !auth.algorithms.is_empty() {
        sources.push(format!("algorithms {}", auth.algorithms.join("/")));
    }
    format!("on ({})", sources.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn on_off() {
        assert_eq!(parse_on_off("ON"), Ok(true));
        assert_eq!(parse_on_off("0"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
    }

    #[test]
    fn worker_threads_from_1_to_1024() {
        assert_eq!(parse_worker_threads("1"), Ok(1));
        assert_eq!(parse_worker_threads(" 1024 "), Ok(1024));
        assert!(parse_worker_threads("0").is_err());
        assert!(parse_worker_threads("1025").is_err());
        assert!(parse_worker_threads("two").is_err());
    }

    #[test]
    fn runtime_flags_become_runtime_options() {
        let cli = Cli::try_parse_from(["wsgate", "--worker-threads", "3", "--pin-workers", "on"])
            .expect("parses");
        assert_eq!(
            cli.run.runtime_options(),
            RuntimeOptions {
                worker_threads: Some(3),
                pin_workers: true
            }
        );
        let cli = Cli::try_parse_from(["wsgate"]).expect("parses");
        assert_eq!(cli.run.runtime_options(), RuntimeOptions::default());
        assert!(Cli::try_parse_from(["wsgate", "--worker-threads", "0"]).is_err());
    }
}
