//! Config file, env and flag handling (SPEC sections 8 and 9), tested through the library API.
//!
//! Only `cli_env_and_flag_precedence` parses a `Cli` or touches `WSGATE_*` variables; every other
//! test builds `RunArgs` directly, so tests running in parallel never see each other's env.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use wsgate::config::cli::{check_config, resolve, summary};
use wsgate::config::{Access, Cli, Command, ConfigError, FileConfig, RunArgs, Settings};

fn keys(s: &Settings) -> Vec<&str> {
    s.api_keys.iter().map(|k| k.expose()).collect()
}

fn apply(yaml: &str) -> Result<Settings, ConfigError> {
    let mut settings = Settings::default();
    FileConfig::parse(yaml)?.apply_to(&mut settings)?;
    Ok(settings)
}

fn yaml_file(yaml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    file.write_all(yaml.as_bytes()).expect("write temp file");
    file
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[test]
fn framework_guide_shape_resolves() {
    let s = apply("websocket:\n  enable: true\n  port: \"8081\"\n  max_connections: 10000\n")
        .expect("framework guide config");
    assert_eq!(s.listen, addr("0.0.0.0:8081"));
    assert_eq!(s.ws.max_connections, 10000);
    // Everything else keeps its default.
    assert_eq!(s.ws.paths, vec!["/ws".to_string()]);
    assert!(s.redis_urls.is_empty());
}

#[test]
fn flow_style_framework_guide_and_port_as_number() {
    let s = apply("websocket: {enable: true, port: 8082, max_connections: 7}\n").expect("config");
    assert_eq!(s.listen, addr("0.0.0.0:8082"));
    assert_eq!(s.ws.max_connections, 7);
}

#[test]
fn empty_file_means_defaults() {
    let s = apply("# nothing here\n").expect("empty config");
    assert_eq!(s.listen, addr("0.0.0.0:8080"));
    assert_eq!(s.ws.max_connections, 10_000);
}

#[test]
fn full_example_applies_every_field() {
    let yaml = r#"
node_id: edge-1
listen: 127.0.0.1:9000
websocket:
  enable: true
  max_connections: 5000
  paths: [/ws, /api/ws/connect, /ws/tigateway, /api/v1/ws]
  max_message_size: 32768
  max_subscriptions: 64
  max_topic_length: 100
  heartbeat_interval: 20s
  idle_timeout: 1m
  send_queue_bytes: 2097152
  write_timeout: 1500ms
  rate_limit: { per_second: 20, burst: 40 }
  allowed_origins: [https://app.example.com]
  allow_client_broadcast: true
namespaces:
  chat: { client_publish: true }
default_namespace: { client_publish: false }
redis:
  url: redis://127.0.0.1:6379
auth:
  jwt_secret: s3cret
api:
  keys: [k1, k2]
compression: { enable: false, level: 6, threshold: 512 }
shutdown: { drain_seconds: 12 }
"#;
    let s = apply(yaml).expect("full config");
    assert_eq!(s.node_id, "edge-1");
    assert_eq!(s.listen, addr("127.0.0.1:9000"));
    assert_eq!(s.ws.max_connections, 5000);
    assert_eq!(s.ws.paths.len(), 4);
    assert_eq!(s.ws.max_message_size, 32768);
    assert_eq!(s.ws.max_subscriptions, 64);
    assert_eq!(s.ws.max_topic_length, 100);
    assert_eq!(s.ws.heartbeat_interval, Duration::from_secs(20));
    assert_eq!(s.ws.idle_timeout, Duration::from_secs(60));
    assert_eq!(s.ws.send_queue_bytes, 2_097_152);
    assert_eq!(s.ws.write_timeout, Duration::from_millis(1500));
    assert_eq!(s.ws.rate_per_second, 20.0);
    assert_eq!(s.ws.rate_burst, 40);
    assert_eq!(s.ws.allowed_origins, vec!["https://app.example.com"]);
    assert!(s.ws.allow_client_broadcast);
    assert_eq!(s.namespace_of("chat:room1").publish, Access::Anyone);
    assert_eq!(s.namespace_of("alerts:cpu").publish, Access::Nobody);
    assert_eq!(s.redis_urls, vec!["redis://127.0.0.1:6379"]);
    assert_eq!(
        s.auth.jwt_secret.as_ref().map(|k| k.expose()),
        Some("s3cret")
    );
    assert_eq!(keys(&s), ["k1", "k2"]);
    assert!(!s.compression.enabled);
    assert_eq!(s.compression.level, 6);
    assert_eq!(s.compression.threshold, 512);
    assert_eq!(s.drain, Duration::from_secs(12));
    assert!(s.validate().is_empty(), "{:?}", s.validate());
}

#[test]
fn unknown_key_is_refused_with_its_name_and_line() {
    let err = apply("node_id: a\nwebsocket:\n  enable: true\n  max_conections: 5\n")
        .expect_err("typo must be refused");
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Yaml { .. }), "{err:?}");
    assert!(msg.contains("max_conections"), "{msg}");
    assert!(msg.contains("line 4"), "{msg}");
    assert!(msg.contains("websocket.max_conections"), "{msg}");
}

#[test]
fn unknown_top_level_key_is_refused() {
    let msg = apply("websocket:\n  port: 8081\nredis_url: redis://x:1\n")
        .expect_err("unknown key")
        .to_string();
    assert!(msg.contains("redis_url") && msg.contains("line 3"), "{msg}");
}

#[test]
fn bad_duration_is_refused() {
    let msg = apply("websocket:\n  heartbeat_interval: 10s\n  idle_timeout: 5 parsecs\n")
        .expect_err("bad duration")
        .to_string();
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("websocket.idle_timeout"), "{msg}");
    assert!(msg.contains("parsecs"), "{msg}");

    let msg = apply("websocket:\n  idle_timeout: 60\n")
        .expect_err("duration without a unit")
        .to_string();
    assert!(msg.contains("no unit"), "{msg}");
}

#[test]
fn bad_port_and_listen_are_refused() {
    let msg = apply("websocket:\n  port: 70000\n")
        .expect_err("port")
        .to_string();
    assert!(
        msg.contains("websocket.port") && msg.contains("65535"),
        "{msg}"
    );
    let msg = apply("websocket:\n  port: \"http\"\n")
        .expect_err("port")
        .to_string();
    assert!(msg.contains("websocket.port"), "{msg}");
    let msg = apply("listen: localhost\n")
        .expect_err("listen")
        .to_string();
    assert!(msg.contains("listen") && msg.contains("ADDR:PORT"), "{msg}");
    let s = apply("listen: \":9001\"\n").expect("short listen form");
    assert_eq!(s.listen, addr("0.0.0.0:9001"));
}

#[test]
fn listen_and_port_must_agree() {
    let err = apply("listen: 127.0.0.1:9000\nwebsocket:\n  port: 8081\n").expect_err("conflict");
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
    let s = apply("listen: 127.0.0.1:9000\nwebsocket:\n  port: 9000\n").expect("same port");
    assert_eq!(s.listen, addr("127.0.0.1:9000"));
}

#[test]
fn websocket_disabled_is_refused() {
    let err = apply("websocket:\n  enable: false\n").expect_err("enable: false");
    assert!(matches!(err, ConfigError::WebsocketDisabled), "{err:?}");
    assert!(err.to_string().contains("websocket.enable is false"));
}

#[test]
fn redis_url_string_list_and_comma_string() {
    let s = apply("redis:\n  url: redis://10.0.0.1:6379\n").expect("string");
    assert_eq!(s.redis_urls, vec!["redis://10.0.0.1:6379"]);
    let s = apply("redis:\n  url:\n    - redis://a:6379\n    - rediss://b:6380\n").expect("list");
    assert_eq!(s.redis_urls, vec!["redis://a:6379", "rediss://b:6380"]);
    let s = apply("redis: { url: \"redis://a:1, redis://b:2\" }\n").expect("comma string");
    assert_eq!(s.redis_urls, vec!["redis://a:1", "redis://b:2"]);
    let s = apply("redis:\n  url: []\n").expect("empty list");
    assert!(s.redis_urls.is_empty());
}

#[test]
fn file_loses_to_flags() {
    let file = yaml_file("node_id: file-node\nwebsocket:\n  port: 8081\n  max_connections: 100\n");
    let args = RunArgs {
        config: Some(file.path().to_path_buf()),
        max_connections: Some(200),
        compression: Some(false),
        redis_url: Some(vec!["redis://r1:6379".into(), " redis://r2:6379 ".into()]),
        ..RunArgs::default()
    };
    let s = resolve(&args).expect("resolve");
    assert_eq!(s.ws.max_connections, 200, "flag beats file");
    assert_eq!(s.node_id, "file-node", "file beats default");
    assert_eq!(s.listen, addr("0.0.0.0:8081"));
    assert!(!s.compression.enabled);
    assert_eq!(s.redis_urls, vec!["redis://r1:6379", "redis://r2:6379"]);
}

#[test]
fn all_validation_problems_are_reported() {
    let file = yaml_file("websocket:\n  max_connections: 0\n  paths: [/ws, chat]\n");
    let err = check_config(file.path()).expect_err("invalid settings");
    let ConfigError::Problems(problems) = &err else {
        panic!("expected Problems, got {err:?}");
    };
    assert_eq!(problems.len(), 2, "{problems:?}");
    let msg = err.to_string();
    assert!(msg.contains("websocket.max_connections"), "{msg}");
    assert!(msg.contains("\"chat\" must start with '/'"), "{msg}");
    assert_eq!(
        msg.lines().count(),
        3,
        "header plus one line per problem: {msg}"
    );
    assert_eq!(err.problems().len(), 2);

    // Problems introduced by flags are reported the same way.
    let args = RunArgs {
        max_connections: Some(0),
        jwt_secret: Some(String::new()),
        ..RunArgs::default()
    };
    let msg = resolve(&args).expect_err("invalid flags").to_string();
    assert!(msg.contains("websocket.max_connections"), "{msg}");
    assert!(msg.contains("auth.jwt_secret"), "{msg}");
}

#[test]
fn check_config_reads_files_and_names_them() {
    let file =
        yaml_file("websocket:\n  enable: true\n  port: \"8081\"\n  max_connections: 10000\n");
    let s = check_config(file.path()).expect("valid file");
    let text = summary(&s);
    assert!(
        text.contains("0.0.0.0:8081") && text.contains("in-process"),
        "{text}"
    );

    let bad = yaml_file("websocket:\n  prot: 1\n");
    let msg = check_config(bad.path()).expect_err("typo").to_string();
    assert!(
        msg.starts_with(&bad.path().display().to_string()),
        "the file is named: {msg}"
    );

    let missing = std::env::temp_dir().join("wsgate-no-such-config.yaml");
    let err = check_config(&missing).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("wsgate-no-such-config.yaml"));
}

/// The one test that parses `Cli` and sets `WSGATE_*` variables (see the module docs).
#[test]
fn cli_env_and_flag_precedence() {
    const VARS: [&str; 5] = [
        "WSGATE_CONFIG",
        "WSGATE_NODE_ID",
        "WSGATE_MAX_CONNECTIONS",
        "WSGATE_REDIS_URL",
        "WSGATE_JWT_SECRET",
    ];
    let file = yaml_file(
        "node_id: file-node\nredis:\n  url: redis://file:6379\nwebsocket:\n  max_connections: 100\nshutdown:\n  drain_seconds: 5\n",
    );

    // Flags alone, over the file.
    let cli = Cli::try_parse_from([
        "wsgate",
        "--config",
        &file.path().display().to_string(),
        "--listen",
        "127.0.0.1:9100",
        "--node-id",
        "flag-node",
        "--api-key",
        "k1,k2,",
        "--compression",
        "off",
        "--drain-seconds",
        "3",
    ])
    .expect("flags parse");
    assert!(cli.command.is_none());
    assert_eq!(cli.run.log, "info");
    let s = resolve(&cli.run).expect("resolve flags");
    assert_eq!(s.listen, addr("127.0.0.1:9100"));
    assert_eq!(s.node_id, "flag-node");
    assert_eq!(keys(&s), ["k1", "k2"]);
    assert!(!s.compression.enabled);
    assert_eq!(s.drain, Duration::from_secs(3));
    assert_eq!(s.ws.max_connections, 100, "from the file");
    assert_eq!(s.redis_urls, vec!["redis://file:6379"], "from the file");

    // Bad flag values are clap errors naming the flag.
    let err = Cli::try_parse_from(["wsgate", "--listen", "nowhere"]).expect_err("bad listen");
    assert!(err.to_string().contains("--listen"), "{err}");
    let err = Cli::try_parse_from(["wsgate", "--compression", "maybe"]).expect_err("bad bool");
    assert!(err.to_string().contains("--compression"), "{err}");

    // Subcommand.
    let cli = Cli::try_parse_from(["wsgate", "check-config", "/etc/wsgate.yaml"]).expect("check");
    assert!(matches!(
        cli.command,
        Some(Command::CheckConfig { ref file }) if file.to_str() == Some("/etc/wsgate.yaml")
    ));
    assert!(Cli::try_parse_from(["wsgate", "--listen", ":1", "check-config", "f"]).is_err());

    // Env over file, flag over env. Restore the environment even if an assertion fails.
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            for v in VARS {
                std::env::remove_var(v);
            }
        }
    }
    let _restore = Restore;
    std::env::set_var("WSGATE_CONFIG", file.path());
    std::env::set_var("WSGATE_NODE_ID", "env-node");
    std::env::set_var("WSGATE_MAX_CONNECTIONS", "300");
    std::env::set_var("WSGATE_REDIS_URL", ""); // set but empty: in-process broker
    std::env::set_var("WSGATE_JWT_SECRET", "env-secret-value");
    let cli = Cli::try_parse_from(["wsgate", "--max-connections", "400"]).expect("env parse");
    let s = resolve(&cli.run).expect("resolve env");
    assert_eq!(s.node_id, "env-node", "env beats file");
    assert_eq!(s.ws.max_connections, 400, "flag beats env");
    assert!(
        s.redis_urls.is_empty(),
        "empty env list clears the file's URLs"
    );
    assert_eq!(
        s.auth.jwt_secret.as_ref().map(|k| k.expose()),
        Some("env-secret-value")
    );
    assert_eq!(s.drain, Duration::from_secs(5), "file beats default");

    // Help names every env var and never shows the secret's value.
    let help = Cli::command().render_long_help().to_string();
    for var in [
        "WSGATE_CONFIG",
        "WSGATE_LISTEN",
        "WSGATE_NODE_ID",
        "WSGATE_REDIS_URL",
        "WSGATE_MAX_CONNECTIONS",
        "WSGATE_MAX_MESSAGE_SIZE",
        "WSGATE_JWT_SECRET",
        "WSGATE_API_KEYS",
        "WSGATE_COMPRESSION",
        "WSGATE_DRAIN_SECONDS",
        "WSGATE_LOG",
    ] {
        assert!(help.contains(var), "help lacks {var}:\n{help}");
    }
    assert!(!help.contains("env-secret-value"), "{help}");
    assert!(help.contains("WebSocket gateway"), "{help}");
}

#[test]
fn security_settings_from_the_file() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
    let yaml = format!(
        "websocket:
  per_ip: {{ max_connections: 20, connect_rate: {{ per_second: 5, burst: 10 }} }}
  per_user: {{ max_connections: 3 }}
  trusted_proxies: [10.0.0.0/8, 127.0.0.1]
namespaces:
  chat: {{ subscribe: granted, publish: authenticated, presence: false }}
  news: {{ client_publish: true }}
default_namespace: {{ subscribe: authenticated }}
auth:
  jwt_secret: s3cret
  public_keys: [{{ file: {keys}/rsa_public.pem }}, {{ file: {keys}/ed25519_public.pem, kid: ed }}]
  jwks_file: {keys}/jwks.json
  algorithms: [HS256, RS256, EdDSA]
  leeway: 5s
  max_token_bytes: 4096
  topics_claim: perms
  audience: app
  issuer: https://issuer.example
"
    );
    let file = yaml_file(&yaml);
    let s = check_config(file.path()).expect("valid file, keys readable");
    let peers = &s.ws.peer_limits;
    assert_eq!(peers.max_connections_per_ip, 20);
    assert_eq!(
        (peers.connect_rate_per_ip, peers.connect_burst_per_ip),
        (5.0, 10)
    );
    assert_eq!(peers.max_connections_per_user, 3);
    assert_eq!(peers.trusted_proxies.len(), 2);
    let chat = s.namespace_of("chat:1");
    assert_eq!(
        (chat.subscribe, chat.publish, chat.presence),
        (Access::Granted, Access::Authenticated, false)
    );
    assert_eq!(s.namespace_of("news:1").publish, Access::Anyone);
    assert_eq!(s.namespace_of("other").subscribe, Access::Authenticated);
    assert!(s.auth.enabled());
    assert_eq!(s.auth.public_keys[1].kid.as_deref(), Some("ed"));
    assert_eq!(s.auth.algorithms, ["HS256", "RS256", "EdDSA"]);
    assert_eq!(s.auth.leeway, Duration::from_secs(5));
    assert_eq!(s.auth.topics_claim, "perms");
    assert_eq!(s.auth.audience.as_deref(), Some("app"));
    // The summary says auth is on without printing the secret.
    let text = summary(&s);
    assert!(
        text.contains("jwt auth: on (secret, 2 PEM key(s), JWKS file"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        !format!("{s:?}").contains("s3cret"),
        "Debug of the settings shows the secret"
    );
}

#[test]
fn security_settings_that_cannot_work_are_named() {
    let bad_access = apply("namespaces:\n  chat: { subscribe: everyone }\n").expect_err("bad");
    assert!(
        bad_access.to_string().contains("namespaces.chat.subscribe"),
        "{bad_access}"
    );
    let bad_proxy = apply("websocket:\n  trusted_proxies: [not-an-ip]\n").expect_err("bad");
    assert!(
        bad_proxy.to_string().contains("websocket.trusted_proxies"),
        "{bad_proxy}"
    );

    let file = yaml_file("auth:\n  algorithms: [HS256, none]\n  jwt_secret: x\n");
    let msg = check_config(file.path()).expect_err("alg none").to_string();
    assert!(
        msg.contains("auth.algorithms") && msg.contains("\"none\""),
        "{msg}"
    );

    let file = yaml_file("auth:\n  public_keys: [{ file: /nonexistent/key.pem }]\n");
    let msg = check_config(file.path())
        .expect_err("missing key file")
        .to_string();
    assert!(msg.contains("/nonexistent/key.pem"), "{msg}");

    let not_a_key = yaml_file("just text");
    let yaml = format!(
        "auth:\n  public_keys: [{{ file: {} }}]\n",
        not_a_key.path().display()
    );
    let msg = check_config(yaml_file(&yaml).path())
        .expect_err("not a key")
        .to_string();
    assert!(
        msg.contains("not an RSA, EC or Ed25519 public key"),
        "{msg}"
    );

    // Only an RSA key, but only HMAC allowed: no token could ever verify.
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
    let yaml = format!(
        "auth:\n  public_keys: [{{ file: {keys}/rsa_public.pem }}]\n  algorithms: [HS256]\n"
    );
    let msg = check_config(yaml_file(&yaml).path())
        .expect_err("unusable")
        .to_string();
    assert!(msg.contains("allows none of the configured keys"), "{msg}");
}
