//! CPU time and context switches of processes, from `/proc` (the `procfs` crate).

use std::collections::BTreeMap;

use procfs::process::{all_processes, Process};

/// utime + stime of a process (for a process, the sum over its threads), in clock ticks.
fn ticks(process: &Process) -> Option<f64> {
    let stat = process.stat().ok()?;
    Some((stat.utime + stat.stime) as f64)
}

/// The processes of process group `pgid`.
pub fn group(pgid: u32) -> Vec<Process> {
    let Ok(processes) = all_processes() else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter(|p| p.stat().is_ok_and(|s| s.pgrp == pgid as i32))
        .collect()
}

/// Whether a process group still has a process that is not a zombie.
pub fn group_lives(pgid: u32) -> bool {
    group(pgid)
        .iter()
        .any(|p| p.stat().is_ok_and(|s| s.state != 'Z'))
}

pub fn ticks_per_second() -> f64 {
    procfs::ticks_per_second() as f64
}

/// Whose CPU time a measurement counts.
#[derive(Debug, Clone, Copy)]
pub enum Cpu {
    Nobody,
    /// One process (the agent), all its threads.
    Process(u32),
    /// Every process of a process group (a peer proxy: nginx's master and workers).
    Group(u32),
}

impl Cpu {
    fn processes(self) -> Option<Vec<Process>> {
        match self {
            Cpu::Nobody => None,
            Cpu::Process(pid) => Some(Process::new(pid as i32).into_iter().collect()),
            Cpu::Group(pgid) => Some(group(pgid)),
        }
    }

    /// Ticks per process now (None: nobody to count).
    pub fn sample(self) -> Option<BTreeMap<u32, f64>> {
        let processes = self.processes()?;
        Some(
            processes
                .iter()
                .filter_map(|p| Some((p.pid as u32, ticks(p)?)))
                .collect(),
        )
    }

    /// Context switches per process now, voluntary and not, summed over its threads
    /// (None: nobody to count).
    pub fn switches(self) -> Option<BTreeMap<u32, f64>> {
        let processes = self.processes()?;
        let switches = |process: &Process| -> Option<f64> {
            let total = process
                .tasks()
                .ok()?
                .flatten()
                .filter_map(|task| task.status().ok())
                .map(|status| {
                    let voluntary = status.voluntary_ctxt_switches.unwrap_or(0);
                    voluntary + status.nonvoluntary_ctxt_switches.unwrap_or(0)
                })
                .sum::<u64>();
            Some(total as f64)
        };
        Some(
            processes
                .iter()
                .filter_map(|p| Some((p.pid as u32, switches(p)?)))
                .collect(),
        )
    }
}

/// Ticks used between two samples; a process that appeared in between counts in full.
pub fn used(before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ticks_between_samples() {
        let before = BTreeMap::from([(1, 10.0), (2, 5.0)]);
        // Process 2 is gone (its last ticks are lost), process 3 is new.
        let after = BTreeMap::from([(1, 14.0), (3, 2.0)]);
        assert_eq!(used(&before, &after), 6.0);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let ticks = Cpu::Process(me).sample().unwrap();
        assert!(ticks.contains_key(&me), "{ticks:?}");
        let switches = Cpu::Process(me).switches().unwrap();
        assert!(switches[&me] > 0.0, "{switches:?}");
        assert!(ticks_per_second() > 0.0);
    }
}
