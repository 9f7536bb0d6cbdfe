//! wsgate-loadgen: a native load generator for wsgate (and, for side-by-side runs, Socket.IO 4
//! and nginx + nchan).
//!
//!   wsgate-loadgen run --scenario fanout --connections 10000 --rate 5 --duration 20 --pid PID
//!   wsgate-loadgen compare wsgate.json socketio.json nchan.json
//!
//! `run` opens the connections in worker processes (`--procs`, raised as needed to stay under
//! the file-descriptor limit), spread over source addresses 127.0.0.1..N, subscribes them, then
//! publishes on a schedule with a send timestamp and a sequence number in every payload, and
//! reports deliveries per second, publish-to-receive latency (HdrHistogram; also up to the
//! kernel's receive timestamp on the generator's socket), messages missing
//! and duplicated per connection, connects per second, and the watched server processes' CPU
//! seconds and RSS over the run: a table on stdout, JSON with `--json`. `compare` prints results
//! side by side, each figure also as a ratio to the first file. See loadtest/README.md.

mod client;
mod config;
mod frames;
mod probe;
mod procstat;
mod publish;
mod report;
mod timeline;
mod uring;
mod worker;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

use config::Config;
use report::Report;
use worker::WorkerResult;

#[derive(Parser)]
#[command(name = "wsgate-loadgen", version, about = "Load generator for wsgate")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario against one server (or cluster of nodes).
    Run(Box<Config>),
    /// Print results side by side, each figure also as a ratio to the first.
    Compare {
        /// Figures only, no ratios.
        #[arg(long)]
        no_ratios: bool,
        /// JSON files written by `run --json` (the first is the reference).
        files: Vec<PathBuf>,
    },
    /// (internal) One worker process of a run.
    #[command(hide = true)]
    Worker {
        index: usize,
        procs: usize,
        config: String,
    },
}

/// Most connections one worker process holds (the fd limit here is 20,000).
const PER_PROCESS: usize = 16_000;

/// Raises the soft file-descriptor limit to the hard one.
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker {
            index,
            procs,
            config,
        } => {
            let cfg: Config = serde_json::from_str(&config).expect("worker config");
            worker::main(cfg, index, procs)
        }
        Command::Compare { no_ratios, files } => {
            let reports: Vec<Report> = files
                .iter()
                .map(|f| {
                    let text = std::fs::read_to_string(f)
                        .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                })
                .collect();
            print!("{}", report::compare(&reports, !no_ratios));
        }
        Command::Run(cfg) => {
            raise_nofile();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let report = rt.block_on(coordinate(*cfg));
            std::process::exit(if report.ok() { 0 } else { 1 });
        }
    }
}

enum Line {
    Ready(serde_json::Value),
    Progress(u64),
    Result(Box<WorkerResult>),
    Exited,
}

async fn coordinate(mut cfg: Config) -> Report {
    if cfg.prefix.is_none() {
        cfg.prefix = Some(format!("lg{:x}", publish::now_ns() % 0xFFFFF));
    }
    if cfg.label.is_empty() {
        cfg.label = format!("{:?}", cfg.target).to_lowercase();
    }
    let procs = cfg.procs.max(cfg.connections.div_ceil(PER_PROCESS)).max(1);
    let pids = procstat::with_descendants(&cfg.pid);
    let aux = procstat::with_descendants(&cfg.aux_pid);
    let mut rep = Report::new(&cfg, procs, &pids);
    rep.server.rss_before_kib = procstat::rss_kib(&pids);
    let mut rss_peak = rep.server.rss_before_kib;
    let connect_cpu = procstat::CpuSince::start(&pids);
    let t0 = Instant::now();

    // Workers.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Line)>();
    let exe = std::env::current_exe().expect("own path");
    let cfg_json = serde_json::to_string(&cfg).expect("serializes");
    let mut stdins = Vec::new();
    let mut children = Vec::new();
    for k in 0..procs {
        let mut child = tokio::process::Command::new(&exe)
            .arg("worker")
            .arg(k.to_string())
            .arg(procs.to_string())
            .arg(&cfg_json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn a worker");
        stdins.push(child.stdin.take().expect("piped"));
        let stdout = child.stdout.take().expect("piped");
        children.push(child);
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let line = if let Some(j) = l.strip_prefix("READY ") {
                    Line::Ready(serde_json::from_str(j).unwrap_or_default())
                } else if let Some(n) = l.strip_prefix("P ") {
                    Line::Progress(n.trim().parse().unwrap_or(0))
                } else if let Some(j) = l.strip_prefix("R ") {
                    match serde_json::from_str(j) {
                        Ok(r) => Line::Result(Box::new(r)),
                        Err(e) => {
                            eprintln!("worker {k}: bad result: {e}");
                            continue;
                        }
                    }
                } else {
                    eprintln!("worker {k}: {l}");
                    continue;
                };
                if tx.send((k, line)).is_err() {
                    return;
                }
            }
            let _ = tx.send((k, Line::Exited));
        });
    }
    drop(tx);

    // Connect phase.
    let mut ready = 0;
    let mut expected_total = 0u64;
    let mut progress = vec![0u64; procs];
    let mut sampler = tokio::time::interval(Duration::from_millis(200));
    while ready < procs {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((_, Line::Ready(v))) => {
                    ready += 1;
                    expected_total += v["expected"].as_u64().unwrap_or(0);
                }
                Some((_, Line::Progress(_))) | Some((_, Line::Result(_))) => {}
                Some((_, Line::Exited)) | None => {
                    eprintln!("error: a worker exited during the connect phase");
                    std::process::exit(2);
                }
            },
            _ = sampler.tick() => rss_peak = rss_peak.max(procstat::rss_kib(&pids)),
        }
    }
    rep.connect_phase_seconds = t0.elapsed().as_secs_f64();
    rep.server.connect_cpu_seconds = connect_cpu.total();

    tokio::time::sleep(Duration::from_secs_f64(cfg.settle)).await;
    let mut window_seconds = 0.0;
    let mut cpu_window = (0.0, 0.0);
    let mut aux_cpu = 0.0;
    let mut generator_cpu = 0.0;
    if cfg.scenario == config::Scenario::Idle {
        // RSS with everything connected: two readings a second apart within 1 %.
        let mut after = procstat::rss_kib(&pids);
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let again = procstat::rss_kib(&pids);
            let stable = again.abs_diff(after) <= after / 100;
            after = again;
            if stable {
                break;
            }
        }
        rep.server.rss_connected_kib = after;
        rss_peak = rss_peak.max(after);
        tokio::time::sleep(Duration::from_secs_f64(cfg.hold)).await;
    } else if cfg.scenario == config::Scenario::Storm {
        rep.server.rss_connected_kib = procstat::rss_kib(&pids);
    } else if cfg.publishes() {
        rep.server.rss_connected_kib = procstat::rss_kib(&pids);
        let cfg = Arc::new(cfg.clone());
        let stats = Arc::new(publish::PublishStats::default());
        let server_cpu = procstat::CpuSince::start(&pids);
        let aux_cpu_since = procstat::CpuSince::start(&aux);
        // This process (publisher, probe) and its workers, which are all started by now.
        let generator_pids = procstat::with_descendants(&[std::process::id()]);
        let generator_cpu_since = procstat::CpuSince::start(&generator_pids);
        let worker_pids: Vec<u32> = generator_pids
            .iter()
            .copied()
            .filter(|&p| p != std::process::id())
            .collect();
        let worker_cpu_since = procstat::CpuSince::start(&worker_pids);
        let probe = if cfg.target == config::Target::Wsgate && cfg.probe {
            probe::Probe::start(&cfg).await
        } else {
            None
        };
        let t1 = Instant::now();
        let mut publishing = tokio::spawn(publish::run(Arc::clone(&cfg), Arc::clone(&stats)));
        let mut published_at: Option<Instant> = None;
        let mut received = 0u64;
        let mut last_change = Instant::now();
        let mut last_delivery = t1;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some((k, Line::Progress(n))) => {
                        progress[k] = n;
                        let sum: u64 = progress.iter().sum();
                        if sum != received {
                            received = sum;
                            last_change = Instant::now();
                            last_delivery = last_change;
                        }
                    }
                    Some((_, Line::Exited)) | None => {
                        eprintln!("error: a worker exited while publishing");
                        break;
                    }
                    _ => {}
                },
                r = &mut publishing, if published_at.is_none() => {
                    if let Err(e) = r {
                        eprintln!("error: publisher: {e}");
                    }
                    published_at = Some(Instant::now());
                    last_change = Instant::now();
                },
                _ = sampler.tick() => rss_peak = rss_peak.max(procstat::rss_kib(&pids)),
            }
            if let Some(p) = published_at {
                if received >= expected_total
                    || last_change.elapsed().as_secs_f64() > cfg.drain_timeout
                {
                    rep.publish.seconds = p.duration_since(t1).as_secs_f64();
                    break;
                }
            }
        }
        if published_at.is_none() {
            publishing.abort();
        }
        if let Some(probe) = probe {
            rep.redis_probe_ms = Some(report::of_histogram(&probe.stop().await, 1e-3));
        }
        cpu_window = server_cpu.split();
        aux_cpu = aux_cpu_since.total();
        generator_cpu = generator_cpu_since.total();
        rep.generator_reading_cpu_seconds = worker_cpu_since.total();
        window_seconds = last_delivery.duration_since(t1).as_secs_f64();
        rep.publish.requested = cfg.total_publications();
        rep.publish.ok = stats.ok.load(std::sync::atomic::Ordering::Relaxed);
        rep.publish.errors = stats.errors.load(std::sync::atomic::Ordering::Relaxed);
        rep.publish.first_error = stats.first_error.lock().expect("not poisoned").clone();
    }
    rep.server.rss_end_kib = procstat::rss_kib(&pids);
    rep.server.rss_peak_kib = rss_peak.max(rep.server.rss_end_kib);

    // Results.
    for s in &mut stdins {
        let _ = s.write_all(b"STOP\n").await;
        let _ = s.flush().await;
    }
    let mut results = Vec::new();
    let mut exited = 0;
    while results.len() + exited < procs {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some((_, Line::Result(r)))) => results.push(*r),
            Ok(Some((_, Line::Exited))) => exited += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for mut c in children {
        let _ = c.wait().await;
    }
    rep.fill(&cfg, &results, window_seconds, cpu_window, aux_cpu);
    rep.generator_cpu_seconds = generator_cpu;
    print!("{}", rep.table());
    if let Some(path) = &cfg.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&rep).expect("serializes") + "\n",
        )
        .unwrap_or_else(|e| eprintln!("error: {}: {e}", path.display()));
    }
    rep
}
