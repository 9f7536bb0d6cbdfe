//! The watched server processes: CPU seconds (user + sys, from `/proc/<pid>/stat`) and resident
//! memory (VmRSS, from `/proc/<pid>/status`), each summed over the processes and their
//! descendants (nginx's workers, for instance).

use std::collections::HashSet;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime, stime) of one process.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces): state is field 3, ppid 4, utime 14,
    // stime 15 (1-based).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.get(1)?.parse().ok()?,
        f.get(11)?.parse().ok()?,
        f.get(12)?.parse().ok()?,
    ))
}

/// The given processes and all their descendants that are alive now.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut all: HashSet<u32> = roots.iter().copied().collect();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some((ppid, _, _)) = stat(pid) {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    loop {
        let before = all.len();
        for &(pid, ppid) in &parents {
            if all.contains(&ppid) {
                all.insert(pid);
            }
        }
        if all.len() == before {
            break;
        }
    }
    let mut v: Vec<u32> = all.into_iter().collect();
    v.sort_unstable();
    v
}

/// Summed (user, sys) CPU seconds.
pub fn cpu(pids: &[u32]) -> (f64, f64) {
    let tck = clk_tck();
    pids.iter()
        .filter_map(|&p| stat(p))
        .fold((0.0, 0.0), |(u, s), (_, ut, st)| {
            (u + ut as f64 / tck, s + st as f64 / tck)
        })
}

/// CPU seconds of a set of processes from a starting moment on.
pub struct CpuSince {
    pids: Vec<u32>,
    start: (f64, f64),
}

impl CpuSince {
    /// Starts counting now for `pids` (as they are: processes started later are not counted).
    pub fn start(pids: &[u32]) -> Self {
        CpuSince {
            pids: pids.to_vec(),
            start: cpu(pids),
        }
    }

    /// (user, sys) seconds since the start.
    pub fn split(&self) -> (f64, f64) {
        let (user, sys) = cpu(&self.pids);
        (user - self.start.0, sys - self.start.1)
    }

    /// User + sys seconds since the start.
    pub fn total(&self) -> f64 {
        let (user, sys) = self.split();
        user + sys
    }
}

/// Summed VmRSS in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the report calls the generator's CPU: this process and the workers it started, so a
    /// child's CPU counts too.
    #[test]
    fn a_childs_cpu_counts_with_its_parent() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh runs");
        let child_pid = child.id();
        let family = with_descendants(&[me]);
        assert!(
            family.contains(&me) && family.contains(&child_pid),
            "{family:?}"
        );
        let own = CpuSince::start(&[me]);
        let with_child = CpuSince::start(&family);
        // Until the child has run 0.2 s (however busy the machine is), at most 20 s.
        let child_alone = CpuSince::start(&[child_pid]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child_alone.total() < 0.2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (own, with_child) = (own.total(), with_child.total());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            with_child >= own + 0.2,
            "the busy child's CPU is counted: {with_child} s with it, {own} s without"
        );
    }
}
