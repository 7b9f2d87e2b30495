//! `--perf`: `perf record` of the agent beside one keep-alive run, and the top of its report.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::report::Report;

/// `perf record` of the agent beside one keep-alive run.
pub struct Profile {
    /// The run, as the report names it: "the Aviary 90/10 keep-alive run".
    pub run: &'static str,
    pub pid: u32,
    pub secs: u32,
    pub data: PathBuf,
}

/// A running `perf record`, in a process group of its own, stopped on drop.
pub struct Recording {
    child: Child,
    secs: u32,
}

impl Profile {
    pub fn start(&self) -> anyhow::Result<Recording> {
        let log = std::fs::File::create(self.data.with_extension("log"))?;
        let child = Command::new("/usr/bin/perf")
            .args(["record", "-F", "2000", "-g", "-p", &self.pid.to_string()])
            .arg("-o")
            .arg(&self.data)
            .args(["--", "sleep", &self.secs.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting /usr/bin/perf (linux-perf)")?;
        Ok(Recording {
            child,
            secs: self.secs,
        })
    }

    /// The top of `perf report` by symbol, self time only.
    fn top(&self) -> anyhow::Result<String> {
        let data = self.data.to_string_lossy();
        let report = aviary_tests::sh(&[
            "/usr/bin/perf",
            "report",
            "-i",
            &data,
            "--no-children",
            "--sort",
            "sym",
            "--stdio",
            // One line per symbol; the call graphs stay in the data file.
            "-g",
            "none",
        ])?;
        let top: Vec<&str> = report
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(25)
            .collect();
        Ok(top.join("\n"))
    }

    /// The profile in the report, or why there is none; `recorded` is how `perf record` went
    /// (None: it never ran).
    pub fn report(&self, recorded: Option<&anyhow::Result<()>>, report: &mut Report) {
        report.text(&format!(
            "The agent under {}: perf record -F 2000 -g, {} s (data: {}); perf report \
             --no-children --sort sym, top 25:",
            self.run,
            self.secs,
            self.data.display()
        ));
        match recorded {
            None => report.note("no profile: perf did not run"),
            Some(Err(e)) => report.note(&format!("no profile: {e:#}")),
            Some(Ok(())) => match self.top() {
                Ok(top) => report.code(&top),
                Err(e) => report.note(&format!("perf report failed: {e:#}")),
            },
        }
    }
}

impl Recording {
    pub fn finish(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(u64::from(self.secs) + 30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "perf record failed ({status})");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("perf record did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
