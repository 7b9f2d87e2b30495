//! The page `--markdown` writes (docs/benchmarks.md is one): a header saying it is generated and
//! how the run was made (the command, the commit, the machine, the date), what every section
//! shares, then the run's report.

use std::path::Path;

use crate::Args;

/// The page's first line: whoever opens it sees that it is written, not edited.
pub const GENERATED: &str = "<!-- written by cargo xtask bench; do not edit -->";

/// What the page is, and where the reading of its figures is.
const ABOUT: &str = "\
This page is written by `cargo xtask bench` from one run: each section says what it measures,
then that run's figures; a section the run left out is not on it. Why the data path costs what
it does, the known problems these figures show, and how the policy compiler keeps its costs
down are in [Performance](performance.md), which no run writes.";

/// How the bench is run, and what every section shares.
const METHOD: &str = "\
`cargo xtask bench` builds in release mode, and installs wrk, nginx-light, haproxy and
linux-perf from Debian (with their services held back from starting on the host):

```
cargo xtask bench [--secs N] [--conns N] [--only http|l4|upgrade|flags|cross-node|all]
                  [--rounds N] [--agent-args \"FLAGS\"] [--perf SECONDS] [--markdown PATH]
```

Without `--only` it runs the policy benchmark and every section, and writes this page (or the
page `--markdown` names). `--only` runs one section, leaves out the policy benchmark, and writes
a page only when `--markdown` asks for one. `--agent-args` adds flags to every agent the run
starts (e.g. `--workers 1`), and `--perf N` records the agent with `perf record -F 2000 -g`
during the 90/10 keep-alive run and shows the top of `perf report` after the HTTP tables (and
after the flags section's, of one more run with flags). `--rounds` is how many times the flags
section measures each of its configurations. The run ends with the goals, each PASS or FAIL
with its figures.

All traffic stays inside the test node's network namespaces, every load loop is bounded by
time, and every figure is set beside direct, measured in the same run over the same veths. wrk,
the backends and the proxy under test share the machine's cores, so ratios move from one run
to the next: compare runs of one machine, and more than one of them.";

/// The code and the machine a run measured, and how it was started.
#[derive(Debug)]
pub struct Run {
    /// The command line, as the page shows it.
    pub command: String,
    /// The commit, `-dirty` when the work tree had changes.
    pub commit: String,
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    /// The run's parameters, in words.
    pub parameters: String,
}

impl Run {
    /// This run, on this machine, of the work tree the bench was built from.
    pub fn of_this_machine(a: &Args) -> anyhow::Result<Self> {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")?
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_default();
        let mut parameters = format!(
            "{} s per measurement, {} keep-alive connections",
            a.secs, a.conns
        );
        if !a.agent_args.trim().is_empty() {
            parameters.push_str(&format!("; extra agent flags: {}", a.agent_args.trim()));
        }
        Ok(Run {
            command: a.invoked_as.clone().unwrap_or_else(own_command),
            commit: commit(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))),
            date: aviary_tests::sh(&["date", "-u", "+%Y-%m-%d"])?
                .trim()
                .to_owned(),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: aviary_tests::sh(&["uname", "-r"])?.trim().to_owned(),
            parameters,
        })
    }

    /// The date, the machine and the parameters, on one line.
    pub fn machine(&self) -> String {
        format!(
            "{} | {} cores, {} | Linux {} | {}",
            self.date, self.cores, self.cpu, self.kernel, self.parameters
        )
    }
}

/// The whole page: the header, what every section shares, then the report's sections.
pub fn page(run: &Run, report: &str) -> String {
    format!(
        "{GENERATED}\n# Benchmark\n\n{ABOUT}\n\n**This run**: `{}`, on `{}`: {}.\n\n{METHOD}\n\n{}",
        run.command,
        run.commit,
        run.machine(),
        report.trim_start()
    )
}

/// How this binary was started, its path shortened to its name.
fn own_command() -> String {
    let mut words: Vec<String> = std::env::args().collect();
    if let Some(program) = words.first_mut() {
        if let Some(name) = Path::new(program.as_str()).file_name() {
            *program = name.to_string_lossy().into_owned();
        }
    }
    words.join(" ")
}

/// `git rev-parse --short HEAD` of `repo`, with `-dirty` when a tracked file has changes.
fn commit(repo: &Path) -> String {
    let git = |args: &[&str]| {
        let repo = repo.to_string_lossy();
        aviary_tests::sh(&[&["git", "-C", &repo], args].concat())
    };
    match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain", "--untracked-files=no"]),
    ) {
        (Ok(head), Ok(changes)) => commit_name(&head, &changes),
        (Err(e), _) | (_, Err(e)) => format!("unknown commit ({e:#})"),
    }
}

fn commit_name(head: &str, changes: &str) -> String {
    let dirty = if changes.trim().is_empty() {
        ""
    } else {
        "-dirty"
    };
    format!("{}{dirty}", head.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dirty_tree_is_named_so() {
        assert_eq!(commit_name("3ee953e\n", ""), "3ee953e");
        assert_eq!(
            commit_name("3ee953e\n", " M agent/src/lib.rs\n"),
            "3ee953e-dirty"
        );
    }

    #[test]
    fn the_page_says_it_is_written_and_how() {
        let run = Run {
            command: "cargo xtask bench --secs 5".into(),
            commit: "3ee953e-dirty".into(),
            date: "2026-12-08".into(),
            cpu: "AMD EPYC".into(),
            cores: 2,
            kernel: "6.18.44".into(),
            parameters: "5 s per measurement, 32 keep-alive connections".into(),
        };
        let page = page(&run, "\n## Transport (L4) and connect()\n");
        let mut lines = page.lines();
        assert_eq!(lines.next(), Some(GENERATED));
        assert_eq!(lines.next(), Some("# Benchmark"));
        assert!(page.contains(
            "**This run**: `cargo xtask bench --secs 5`, on `3ee953e-dirty`: 2026-12-08 | 2 \
             cores, AMD EPYC | Linux 6.18.44 | 5 s per measurement, 32 keep-alive connections."
        ));
        assert!(page.contains("(performance.md)"));
        assert!(page.ends_with("them.\n\n## Transport (L4) and connect()\n"));
    }
}
