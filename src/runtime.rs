//! The process's tokio runtime: how many worker threads it runs, and whether each one is pinned
//! to a CPU.
//!
//! By default tokio starts one worker per CPU and the kernel places them. On a small machine
//! that also runs Redis or a load generator, the kernel can stack both workers on one CPU while
//! the other idles (a wake-up lands where the waker runs; some VM kernels also pack vCPUs on
//! purpose), and a fan-out then waits in that CPU's run queue for milliseconds.
//! `--pin-workers on` gives worker i the i-th CPU the process may use, round robin, as nginx's
//! `worker_cpu_affinity auto` does. The set is the process's affinity mask, so `taskset`, Docker's
//! `--cpuset-cpus` and Kubernetes' static CPU manager still decide which CPUs those are. Threads
//! tokio starts later for blocking work stay unpinned.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Runtime};

/// How to build the runtime (`--worker-threads`, `--pin-workers`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Worker threads; `None`: tokio's default (one per CPU the process may use, or
    /// `TOKIO_WORKER_THREADS`).
    pub worker_threads: Option<usize>,
    /// Pin worker i to the i-th CPU of the process's affinity mask.
    pub pin_workers: bool,
}

/// The CPUs this thread may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|core| core.id)
        .collect()
}

/// Builds the multi-threaded runtime the node runs on.
pub fn build(options: RuntimeOptions) -> std::io::Result<Runtime> {
    let mut builder = Builder::new_multi_thread();
    builder.enable_all();
    let cpus = if options.pin_workers {
        allowed_cpus()
    } else {
        Vec::new()
    };
    if options.pin_workers && cpus.is_empty() {
        tracing::warn!("cannot read the process's CPU affinity: workers stay unpinned");
    }
    // Pinning needs the count up front; otherwise tokio's own default stays in charge.
    let workers = options
        .worker_threads
        .or((!cpus.is_empty()).then_some(cpus.len()))
        .map(|n| n.max(1));
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    if let (Some(n), false) = (workers, cpus.is_empty()) {
        let started = AtomicUsize::new(0);
        // `build()` starts all n workers before it returns, and nothing else can start a
        // runtime thread before then: the first n threads to start are the workers.
        builder.on_thread_start(move || {
            let i = started.fetch_add(1, Ordering::Relaxed);
            if i < n {
                let cpu = cpus[i % cpus.len()];
                if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    tracing::warn!(worker = i, cpu, "could not pin the worker thread");
                }
            }
        });
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn two_workers(pin_workers: bool) -> Runtime {
        build(RuntimeOptions {
            worker_threads: Some(2),
            pin_workers,
        })
        .expect("runtime")
    }

    /// The CPUs each of `tasks` tasks saw as its thread's affinity mask (tasks run on workers).
    fn masks_seen_by_tasks(runtime: &Runtime, tasks: usize) -> Vec<Vec<usize>> {
        runtime.block_on(async {
            let handles: Vec<_> = (0..tasks)
                .map(|_| {
                    tokio::spawn(async {
                        tokio::task::yield_now().await;
                        allowed_cpus()
                    })
                })
                .collect();
            let mut masks = Vec::new();
            for h in handles {
                masks.push(h.await.expect("task ran"));
            }
            masks
        })
    }

    #[test]
    fn pinned_workers_run_on_one_cpu_each_and_blocking_threads_stay_free() {
        let all = allowed_cpus();
        let runtime = two_workers(true);
        assert_eq!(runtime.metrics().num_workers(), 2);
        let masks = masks_seen_by_tasks(&runtime, 64);
        for mask in &masks {
            assert_eq!(mask.len(), 1, "a worker runs on one CPU: {mask:?}");
            assert!(all.contains(&mask[0]), "{mask:?} is outside {all:?}");
        }
        if all.len() >= 2 {
            // Two tasks that wait for each other without yielding run on both workers at once:
            // each on its own CPU.
            let arrived = Arc::new(AtomicUsize::new(0));
            let both = runtime.block_on(async {
                let meet = |arrived: Arc<AtomicUsize>| async move {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                    while arrived.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline
                    {
                        std::thread::yield_now();
                    }
                    (arrived.load(Ordering::SeqCst) == 2, allowed_cpus())
                };
                let a = tokio::spawn(meet(Arc::clone(&arrived)));
                let b = tokio::spawn(meet(Arc::clone(&arrived)));
                (a.await.expect("ran"), b.await.expect("ran"))
            });
            let ((met_a, cpus_a), (met_b, cpus_b)) = both;
            assert!(met_a && met_b, "the two workers ran at once");
            assert_ne!(cpus_a, cpus_b, "the two workers share a CPU");
        }
        let blocking = runtime
            .block_on(async { tokio::task::spawn_blocking(allowed_cpus).await })
            .expect("blocking task ran");
        assert_eq!(
            blocking, all,
            "a blocking-pool thread keeps the process's mask"
        );
    }

    #[test]
    fn unpinned_workers_keep_the_process_mask() {
        let all = allowed_cpus();
        let runtime = two_workers(false);
        for mask in masks_seen_by_tasks(&runtime, 16) {
            assert_eq!(mask, all);
        }
    }
}
