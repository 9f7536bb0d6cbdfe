//! The deployment files (`deploy/`) parse, and agree with the binary and with each other: the
//! compose file and the Kubernetes manifests start nodes only with environment variables the
//! binary accepts (read from `wsgate --help`), probe `/healthz` and `/readyz` on the port the
//! container listens on, give a SIGTERM drain the time it needs, and HAProxy points at the
//! compose nodes. No Docker engine or cluster is needed: YAML is parsed with serde-saphyr, the
//! HAProxy config is checked with `haproxy -c` when HAProxy is installed, the Dockerfile's
//! HEALTHCHECK command is run against the real binary, and the ConfigMap's config file goes
//! through `wsgate check-config`.

mod haproxy;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// The time a node may take after its drain window to see the last close frames out (the
/// node's own `CLOSE_GRACE`), which every grace period must leave on top of the drain.
const CLOSE_GRACE_SECS: u64 = 5;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_saphyr::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// Every document of a multi-document YAML file (split on `---` lines), empty ones dropped.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let doc: Value = serde_saphyr::from_str(&current)
                .unwrap_or_else(|e| panic!("{rel}: a document is not valid YAML: {e}"));
            if !doc.is_null() {
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

/// The environment variables the binary accepts: every `[env: NAME]` of `wsgate --help`.
fn accepted_env() -> BTreeSet<String> {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    // SPEC section 9's settings are there, so the parsing above works.
    for name in ["WSGATE_LISTEN", "WSGATE_REDIS_URL", "WSGATE_DRAIN_SECONDS"] {
        assert!(names.contains(name), "{name} not in {names:?}");
    }
    names
}

fn assert_accepted(what: &str, names: impl IntoIterator<Item = String>) {
    let accepted = accepted_env();
    for name in names {
        assert!(
            accepted.contains(&name),
            "{what}: {name} is not an environment variable of the binary ({accepted:?})"
        );
    }
}

/// The port of an `ADDR:PORT` (or `:PORT`) listen address.
fn port_of(listen: &str) -> u16 {
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{listen:?} is not ADDR:PORT"))
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

/// The instructions of the Dockerfile's final stage (continuation lines joined), and the
/// stages' base images.
struct Dockerfile {
    froms: Vec<String>,
    /// (instruction, arguments) of the final stage.
    last_stage: Vec<(String, String)>,
    /// Every instruction of every stage.
    all: Vec<(String, String)>,
}

fn dockerfile() -> Dockerfile {
    let text = read("deploy/Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut df = Dockerfile {
        froms: Vec::new(),
        last_stage: Vec::new(),
        all: Vec::new(),
    };
    for l in logical {
        let (ins, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let ins = ins.to_ascii_uppercase();
        let args = args.trim().to_string();
        if ins == "FROM" {
            df.froms.push(args.clone());
            df.last_stage.clear();
        }
        df.last_stage.push((ins.clone(), args.clone()));
        df.all.push((ins, args));
    }
    df
}

impl Dockerfile {
    fn get(&self, ins: &str) -> Vec<&str> {
        self.last_stage
            .iter()
            .filter(|(i, _)| i == ins)
            .map(|(_, a)| a.as_str())
            .collect()
    }

    /// `ENV` of the final stage (`KEY=VALUE` pairs).
    fn env(&self) -> BTreeMap<String, String> {
        self.get("ENV")
            .iter()
            .flat_map(|a| a.split_whitespace())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    }

    fn expose(&self) -> Vec<u16> {
        self.get("EXPOSE")
            .iter()
            .flat_map(|a| a.split_whitespace())
            .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
            .collect()
    }

    /// The numeric user of `USER uid[:gid]`.
    fn uid(&self) -> u32 {
        let user = self.get("USER");
        let user = user.last().expect("a USER instruction");
        user.split(':')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("USER {user} is not numeric (runAsNonRoot cannot check it)"))
    }

    /// The command of `HEALTHCHECK ... CMD [...]` as a JSON array, if any.
    fn healthcheck(&self) -> Option<Vec<String>> {
        let hc = self.get("HEALTHCHECK");
        let hc = hc.last()?;
        let (_, cmd) = hc.split_once("CMD ").expect("HEALTHCHECK ... CMD");
        Some(serde_json::from_str(cmd.trim()).expect("HEALTHCHECK CMD in JSON (exec) form"))
    }
}

fn image_port() -> u16 {
    let df = dockerfile();
    port_of(df.env().get("WSGATE_LISTEN").expect("ENV WSGATE_LISTEN"))
}

#[test]
fn dockerfile_builds_a_small_non_root_image_listening_where_it_says() {
    let df = dockerfile();
    assert!(df.froms.len() >= 2, "multi-stage: {:?}", df.froms);
    let runtime = df.froms.last().expect("a FROM");
    assert!(
        runtime.contains("slim") || runtime.contains("distroless"),
        "small runtime base: {runtime}"
    );
    assert!(
        df.froms[0].starts_with("rust:"),
        "built by a Rust stage: {:?}",
        df.froms
    );
    // Non-root, with a numeric uid that exists in the image.
    let uid = df.uid();
    assert_ne!(uid, 0, "USER must not be root");
    assert!(
        df.get("RUN")
            .iter()
            .any(|r| r.contains("useradd") && r.contains(&format!("--uid {uid}"))),
        "a user with uid {uid} is created"
    );
    // It listens on the port it exposes, configured by variables the binary knows.
    let env = df.env();
    assert_accepted("Dockerfile ENV", env.keys().cloned());
    let port = image_port();
    assert_eq!(df.expose(), vec![port], "EXPOSE matches WSGATE_LISTEN");
    // The build stage copies what the manifest needs, and the ignore file lets it through.
    let ignore = read("deploy/Dockerfile.dockerignore");
    for (_, args) in df.all.iter().filter(|(i, _)| i == "COPY") {
        if args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY {src}: no such path");
            let name = src.trim_end_matches('/');
            assert!(
                ignore
                    .lines()
                    .any(|l| l.trim().trim_end_matches('/') == format!("!{name}")),
                "deploy/Dockerfile.dockerignore lets {src} into the build context"
            );
        }
    }
    let manifest = read("Cargo.toml");
    for bench in manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
    {
        if repo().join(format!("benches/{bench}.rs")).exists() {
            assert!(
                df.all
                    .iter()
                    .any(|(i, a)| i == "COPY" && a.starts_with("benches")),
                "Cargo.toml declares bench {bench}: the build must copy benches/"
            );
        }
    }
    assert!(
        df.get("ENTRYPOINT")
            .iter()
            .any(|e| e.contains("/usr/local/bin/wsgate")),
        "runs the binary"
    );
}

/// Runs the Dockerfile's HEALTHCHECK command (bash, `/dev/tcp`) with the image's environment
/// against the real binary: 0 while it serves `/healthz`, not 0 when nothing listens.
#[test]
fn dockerfile_healthcheck_asks_the_running_binary_for_healthz() {
    let df = dockerfile();
    let cmd = df.healthcheck().expect("a HEALTHCHECK");
    assert!(
        cmd.iter().any(|a| a.contains("/healthz")),
        "liveness on /healthz: {cmd:?}"
    );
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let run_check = || {
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("WSGATE_LISTEN", &listen)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run the HEALTHCHECK command")
    };
    assert!(!run_check().success(), "healthy with nothing listening?");
    let mut node = Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
        node.env_remove(k);
    }
    let mut child = node
        .env("WSGATE_LISTEN", &listen)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wsgate");
    let addr: SocketAddr = listen.parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = run_check();
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.success(), "HEALTHCHECK failed against a live node");
}

// ---------------------------------------------------------------------------------------------
// compose.yaml and HAProxy
// ---------------------------------------------------------------------------------------------

/// The compose services that run wsgate (built from deploy/Dockerfile), by name.
fn compose_nodes(compose: &Value) -> BTreeMap<String, Value> {
    compose["services"]
        .as_object()
        .expect("services")
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"] == "deploy/Dockerfile")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn compose_runs_redis_three_nodes_and_haproxy_in_front_of_them() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_object().expect("services");
    let nodes = compose_nodes(&compose);
    assert_eq!(nodes.len(), 3, "three nodes: {:?}", nodes.keys());
    assert!(services.contains_key("redis"), "a Redis service");
    assert!(services.contains_key("haproxy"), "an HAProxy service");

    let mut node_ids = BTreeSet::new();
    let mut listen_ports = BTreeMap::new();
    for (name, node) in &nodes {
        // Built from the repository root with the committed Dockerfile.
        let context = node["build"]["context"].as_str().expect("build.context");
        assert_eq!(
            repo().join("deploy").join(context).canonicalize().ok(),
            repo().canonicalize().ok(),
            "{name}: build context is the repository root"
        );
        let env = str_map(&node["environment"]);
        assert!(!env.is_empty(), "{name}: environment as a map");
        assert_accepted(&format!("compose {name}"), env.keys().cloned());
        let listen = env.get("WSGATE_LISTEN").expect("WSGATE_LISTEN");
        let port = port_of(listen);
        assert_eq!(
            port,
            image_port(),
            "{name} listens on the image's port (its HEALTHCHECK's)"
        );
        listen_ports.insert(name.clone(), port);
        assert!(
            node_ids.insert(env.get("WSGATE_NODE_ID").expect("WSGATE_NODE_ID").clone()),
            "{name}: node ids are unique"
        );
        // Redis is the compose service.
        let redis = env.get("WSGATE_REDIS_URL").expect("WSGATE_REDIS_URL");
        let host = redis
            .trim_start_matches("redis://")
            .split([':', '/'])
            .next()
            .unwrap_or_default();
        assert!(
            services.contains_key(host),
            "{name}: {redis} names a service"
        );
        assert!(
            node["depends_on"]["redis"].is_object() || node["depends_on"].is_array(),
            "{name} waits for Redis"
        );
        // Compose waits longer than the drain before SIGKILL.
        let drain: u64 = env
            .get("WSGATE_DRAIN_SECONDS")
            .expect("WSGATE_DRAIN_SECONDS")
            .parse()
            .expect("seconds");
        let grace = humantime::parse_duration(
            node["stop_grace_period"]
                .as_str()
                .expect("stop_grace_period"),
        )
        .expect("a duration");
        assert!(
            grace.as_secs() >= drain + CLOSE_GRACE_SECS,
            "{name}: stop_grace_period {grace:?} < drain {drain} s + {CLOSE_GRACE_SECS} s"
        );
        if let Some(signal) = node["stop_signal"].as_str() {
            assert_eq!(signal, "SIGTERM", "{name}: the drain starts on SIGTERM");
        }
    }

    // HAProxy runs the committed config, which points at exactly these nodes and ports.
    let lb = &services["haproxy"];
    let volumes: Vec<&str> = lb["volumes"]
        .as_array()
        .expect("haproxy volumes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let cfg_mount = volumes
        .iter()
        .find(|v| v.contains("haproxy.cfg"))
        .expect("the config is mounted");
    let mut parts = cfg_mount.split(':');
    let (src, dst) = (parts.next().unwrap(), parts.next().expect("target"));
    assert_eq!(
        repo().join("deploy").join(src).canonicalize().ok(),
        haproxy::config_path().canonicalize().ok(),
        "mounts deploy/haproxy/haproxy.cfg"
    );
    assert_eq!(dst, "/usr/local/etc/haproxy/haproxy.cfg");
    let cfg = std::fs::read_to_string(haproxy::config_path()).expect("haproxy.cfg");
    let servers = haproxy::servers(&cfg);
    let pointed: BTreeMap<String, u16> = servers
        .iter()
        .map(|(_, addr)| {
            let (host, port) = addr.rsplit_once(':').expect("host:port");
            (host.to_string(), port.parse().expect("port"))
        })
        .collect();
    assert_eq!(
        pointed, listen_ports,
        "haproxy.cfg's servers are the compose nodes on their ports"
    );
    for node in nodes.keys() {
        assert!(
            lb["depends_on"][node].is_object(),
            "haproxy waits for {node}"
        );
    }
    let published: Vec<&str> = lb["ports"]
        .as_array()
        .expect("haproxy ports")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for bind in ["8080", "8404"] {
        assert!(
            cfg.contains(&format!("bind :{bind}")),
            "haproxy.cfg binds :{bind}"
        );
        assert!(
            published.iter().any(|p| p.ends_with(&format!(":{bind}"))),
            "compose publishes HAProxy's {bind}: {published:?}"
        );
    }
}

#[test]
fn haproxy_config_checks_readyz_keeps_tunnels_and_is_valid() {
    let cfg = std::fs::read_to_string(haproxy::config_path()).expect("haproxy.cfg");
    let lines: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has("option httpchk"), "health checks over HTTP");
    assert!(
        has("http-check send meth GET uri /readyz"),
        "checks /readyz, which turns 503 when a node drains"
    );
    assert!(has("http-check expect status 200"));
    assert!(
        has("timeout tunnel"),
        "a WebSocket tunnel timeout (not the HTTP ones)"
    );
    assert!(
        has("balance leastconn"),
        "long-lived connections: leastconn"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("retry-on") && l.contains("503")),
        "an upgrade refused by a draining node is retried elsewhere"
    );
    assert!(has("option redispatch"));
    assert!(
        !has("shutdown-sessions"),
        "a node marked down keeps its tunnels: it drains them itself"
    );
    let default_check = lines
        .iter()
        .any(|l| l.starts_with("default-server") && l.split_whitespace().any(|w| w == "check"));
    for (name, _) in haproxy::servers(&cfg) {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("server {name} ")))
            .expect("server line");
        assert!(
            default_check || line.split_whitespace().any(|w| w == "check"),
            "server {name} is health-checked"
        );
    }

    let Some(_) = haproxy::find_binary() else {
        eprintln!("haproxy is not installed: `haproxy -c` skipped (./scripts/test installs it)");
        return;
    };
    haproxy::check(&haproxy::config_path())
        .unwrap_or_else(|out| panic!("haproxy -c refuses deploy/haproxy/haproxy.cfg:\n{out}"));
    // The loopback rendering tests/drain.rs runs.
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let rendered = haproxy::render(
        &cfg,
        addr(18080),
        addr(18404),
        &[addr(18081), addr(18082), addr(18083)],
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, rendered).expect("write");
    haproxy::check(&file).unwrap_or_else(|out| panic!("rendered config refused:\n{out}"));
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

/// Every object of every `deploy/k8s/*.yaml`, with the file it came from.
fn k8s_objects() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/k8s has manifests");
    let mut objects = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(repo())
            .expect("in the repo")
            .to_string_lossy()
            .to_string();
        for doc in yaml_docs(&rel) {
            for key in ["apiVersion", "kind"] {
                assert!(doc[key].is_string(), "{rel}: an object without {key}");
            }
            assert!(
                doc["metadata"]["name"].is_string(),
                "{rel}: an object without a name"
            );
            objects.push((rel.clone(), doc));
        }
    }
    objects
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn the_one<'a>(objects: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (sel, labels) = (str_map(selector), str_map(labels));
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_probe_what_the_binary_serves_and_outlast_the_drain() {
    let objects = k8s_objects();
    let deployment = the_one(&objects, "Deployment");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(
        selects(&deployment["spec"]["selector"]["matchLabels"], pod_labels),
        "the Deployment selects its pods"
    );
    let containers = pod["spec"]["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The environment: explicit entries and whole ConfigMaps, all known to the binary.
    let mut env: BTreeMap<String, Option<String>> = BTreeMap::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .expect("envFrom a ConfigMap");
        for (k, v) in str_map(&find(&objects, "ConfigMap", name)["data"]) {
            env.insert(k, Some(v));
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_string();
        env.insert(name, e["value"].as_str().map(str::to_string));
    }
    assert_accepted("the Deployment's environment", env.keys().cloned());

    // It listens on the container port (and the image's).
    let listen = env
        .get("WSGATE_LISTEN")
        .cloned()
        .flatten()
        .unwrap_or_else(|| "0.0.0.0:8080".into());
    let port = port_of(&listen);
    assert_eq!(port, image_port(), "the image's port");
    let ports = c["ports"].as_array().expect("ports");
    let named: BTreeMap<String, u64> = ports
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["containerPort"].as_u64().expect("containerPort"),
            )
        })
        .collect();
    assert!(
        named.values().any(|p| *p == u64::from(port)),
        "containerPort {port}: {named:?}"
    );
    let resolve = |p: &Value| -> u64 {
        match p {
            Value::Number(n) => n.as_u64().expect("port"),
            Value::String(s) => *named
                .get(s)
                .unwrap_or_else(|| panic!("no container port named {s}")),
            other => panic!("port {other}"),
        }
    };

    // Probes: liveness /healthz, readiness /readyz, on that port.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(resolve(&get["port"]), u64::from(port), "{probe} port");
    }
    if c["startupProbe"].is_object() {
        let get = &c["startupProbe"]["httpGet"];
        assert!(get["path"] == "/healthz" || get["path"] == "/readyz");
        assert_eq!(resolve(&get["port"]), u64::from(port), "startupProbe port");
    }

    // preStop, then SIGTERM and the drain: the grace period covers both and the last closes.
    let pre_stop = &c["lifecycle"]["preStop"];
    assert!(pre_stop.is_object(), "a preStop hook");
    let pre_stop_secs = if let Some(cmd) = pre_stop["exec"]["command"].as_array() {
        let cmd: Vec<&str> = cmd.iter().filter_map(Value::as_str).collect();
        assert_eq!(cmd.first(), Some(&"sleep"), "preStop sleeps: {cmd:?}");
        cmd[1].parse::<u64>().expect("sleep seconds")
    } else {
        pre_stop["sleep"]["seconds"]
            .as_u64()
            .expect("preStop sleep")
    };
    let drain: u64 = env
        .get("WSGATE_DRAIN_SECONDS")
        .cloned()
        .flatten()
        .map_or(30, |s| s.parse().expect("drain seconds"));
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace >= pre_stop_secs + drain + CLOSE_GRACE_SECS,
        "terminationGracePeriodSeconds {grace} < preStop {pre_stop_secs} + drain {drain} \
         + {CLOSE_GRACE_SECS}"
    );

    // The image's user.
    let uid = dockerfile().uid();
    let sc = &pod["spec"]["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"].as_u64(), Some(u64::from(uid)));

    // The mounted config file exists in a ConfigMap and passes check-config.
    if let Some(Some(config)) = env.get("WSGATE_CONFIG") {
        let config = Path::new(config);
        let mount = c["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| config.starts_with(m["mountPath"].as_str().unwrap_or("?")))
            .expect("WSGATE_CONFIG is on a mounted volume");
        let volume = pod["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the volume");
        let map = volume["configMap"]["name"]
            .as_str()
            .expect("a ConfigMap volume");
        let key = config.file_name().expect("file name").to_string_lossy();
        let text = find(&objects, "ConfigMap", map)["data"][key.as_ref()]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {map} has no {key}"))
            .to_string();
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join(key.as_ref());
        std::fs::write(&file, text).expect("write");
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&file)
            .output()
            .expect("run check-config");
        assert!(
            out.status.success(),
            "check-config refuses ConfigMap {map}'s {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The Service, the autoscaler and the disruption budget point at these pods.
    let service = the_one(&objects, "Service");
    assert!(selects(&service["spec"]["selector"], pod_labels));
    for p in service["spec"]["ports"].as_array().expect("service ports") {
        assert_eq!(resolve(&p["targetPort"]), u64::from(port), "targetPort");
    }
    let hpa = the_one(&objects, "HorizontalPodAutoscaler");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], deployment["metadata"]["name"]);
    let (min, max) = (
        hpa["spec"]["minReplicas"].as_u64().expect("minReplicas"),
        hpa["spec"]["maxReplicas"].as_u64().expect("maxReplicas"),
    );
    assert!(min >= 2 && max >= min, "min {min} max {max}");
    let pdb = the_one(&objects, "PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
    assert!(
        pdb["spec"]["maxUnavailable"].is_number() || pdb["spec"]["minAvailable"].is_number(),
        "a budget"
    );
}
