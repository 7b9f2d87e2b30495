//! The data plane's threads: one current-thread tokio runtime per worker, each accepting on its
//! own `SO_REUSEPORT` listeners, so a connection, its requests and their upstream connections
//! stay on the thread that accepted it (thread-per-core, as pingora and Envoy run). The control
//! plane (watchers, compile, admin, metrics, netlink) runs on a runtime of its own, so a
//! recompile or a scrape never takes a data-plane worker.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use tokio::sync::{mpsc, watch};
use tracing::warn;

/// What one worker serves: built on the worker's own thread, inside its runtime.
pub type WorkerTask = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The running workers; dropping them stops them.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    spawner: Spawner,
}

/// Runs more tasks on the workers, in turn: the connections a predecessor agent hands over.
#[derive(Clone)]
pub struct Spawner {
    workers: Arc<[mpsc::UnboundedSender<WorkerTask>]>,
    next: Arc<AtomicUsize>,
}

impl Spawner {
    pub fn spawn(&self, task: WorkerTask) {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        // A stopped worker drops the task, and the connection with it.
        let _ = self.workers[index].send(task);
    }
}

impl Workers {
    /// Starts one thread per entry of `tasks`. Each runs its tasks, and those of the
    /// [`Spawner`], until [`Workers::stop`].
    pub fn start(tasks: Vec<Vec<WorkerTask>>) -> io::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let mut threads = Vec::with_capacity(tasks.len());
        let mut spawners = Vec::with_capacity(tasks.len());
        for (index, tasks) in tasks.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut stopped = stopped.clone();
            let (spawner, mut spawned) = mpsc::unbounded_channel::<WorkerTask>();
            spawners.push(spawner);
            let thread = std::thread::Builder::new()
                .name(format!("aviary-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        for task in tasks {
                            tokio::spawn(task());
                        }
                        loop {
                            tokio::select! {
                                _ = stopped.wait_for(|stop| *stop) => break,
                                Some(task) = spawned.recv() => {
                                    tokio::spawn(task());
                                }
                            }
                        }
                    });
                    // Dropping the runtime ends every connection this worker held.
                })?;
            threads.push(thread);
        }
        let spawner = Spawner {
            workers: spawners.into(),
            next: Arc::default(),
        };
        Ok(Self {
            threads,
            stop,
            spawner,
        })
    }

    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }

    /// Stops every worker and waits for its thread to end.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let _ = self.stop.send(true);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn!("a data-plane worker panicked");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shut();
    }
}

/// How many workers to run: `configured`, else the CPU limit of this process's cgroup
/// (`cpu.max`, rounded up), else the CPUs available to it.
pub fn worker_count(configured: Option<usize>) -> usize {
    configured
        .filter(|&n| n > 0)
        .or_else(cgroup_cpu_limit)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// The tightest `cpu.max` quota on this process's cgroup and its ancestors, in whole CPUs.
fn cgroup_cpu_limit() -> Option<usize> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = crate::cgroup::cgroup2_mounts(&mountinfo)
        .into_iter()
        .next()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir: PathBuf = mount.join(path.trim_start_matches('/'));
    let mut limit: Option<usize> = None;
    while dir.starts_with(&mount) {
        if let Some(cpus) = std::fs::read_to_string(dir.join("cpu.max"))
            .ok()
            .and_then(|max| cpus_from_cpu_max(&max))
        {
            limit = Some(limit.map_or(cpus, |l| l.min(cpus)));
        }
        if !dir.pop() {
            break;
        }
    }
    limit
}

/// `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none) in whole CPUs, rounded up.
fn cpus_from_cpu_max(contents: &str) -> Option<usize> {
    let mut fields = contents.split_whitespace();
    let quota: u64 = fields.next()?.parse().ok()?;
    let period: u64 = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    (period > 0).then(|| quota.div_ceil(period).max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_in_whole_cpus() {
        assert_eq!(cpus_from_cpu_max("max 100000\n"), None);
        assert_eq!(cpus_from_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(cpus_from_cpu_max("150000 100000"), Some(2));
        assert_eq!(cpus_from_cpu_max("10000 100000"), Some(1));
        assert_eq!(cpus_from_cpu_max(""), None);
    }

    #[test]
    fn a_configured_count_wins_and_zero_means_automatic() {
        assert_eq!(worker_count(Some(3)), 3);
        assert!(worker_count(Some(0)) >= 1);
        assert!(worker_count(None) >= 1);
    }

    #[test]
    fn workers_run_their_tasks_on_their_own_threads_until_stopped() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tasks = (0..2)
            .map(|_| {
                let tx = tx.clone();
                let task: WorkerTask = Box::new(move || {
                    Box::pin(async move {
                        let name = std::thread::current().name().map(str::to_owned);
                        tx.send(name).unwrap();
                    })
                });
                vec![task]
            })
            .collect();
        let workers = Workers::start(tasks).unwrap();
        let mut names: Vec<_> = (0..2).map(|_| rx.recv().unwrap().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["aviary-worker-0", "aviary-worker-1"]);
        workers.stop();
    }
}
